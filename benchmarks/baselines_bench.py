"""Train-step cost of the TTT family at equal parameter count: SWA, In-Place TTT, TTT-Linear,
TTT-MLP, TTT-E2E.

Every variant is the same decoder (a preset) with a sliding-window attention backbone, changed as
follows:

==============  =====================================================================================
``swa``         sliding-window attention (``--window``) everywhere; no TTT. The parameter target.
``inplace``     ``swa`` + In-Place TTT MLPs (the preset's ``model.ttt`` placement)
``ttt_linear``  TTT-Linear layers in place of attention in every layer (mini-batch 16)
``ttt_mlp``     TTT-MLP layers in place of attention in every layer
``e2e``         ``swa`` + TTT-E2E on the last ``n_layers / 4`` blocks (chunk ``--e2e-chunk``)
==============  =====================================================================================

Parameter counts are matched to ``swa`` by changing ``model.d_ff`` (rounded to ``--ff-multiple``);
the table prints the counts. Each variant runs in its own subprocess (so the device's peak-memory
counter is its own): one jitted AdamW train step on random tokens (chunked cross-entropy, donated
state), warm-up, median of ``--iters`` steps, ``peak_bytes_in_use`` and XLA's temp size. The
parent prints step time, tokens/s, peak memory and ratios to ``swa`` and to ``inplace``.

GPU (defaults: ``small`` preset, ~100M parameters, 4k tokens, batch 4)::

    PYTHONPATH=. python benchmarks/baselines_bench.py --out $OUT/baselines.json

CPU smoke check (tiny preset, 64 tokens)::

    PYTHONPATH=. python benchmarks/baselines_bench.py --smoke
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ttt_jax.bench.isolate import run_variant_process  # noqa: E402  (after the path insert)

VARIANTS = ("swa", "inplace", "ttt_linear", "ttt_mlp", "e2e")


def variant_overrides(variant: str, args, n_layers: int) -> list[str]:
    """Config overrides (on top of the preset and ``--set``) that define ``variant``."""
    swa = [f"model.attention_window={args.window}", "model.full_attention_layers=[]"]
    off = ["model.ttt.enabled=false"]
    if variant == "swa":
        return swa + off
    if variant == "inplace":
        return swa + ["model.ttt.enabled=true"]
    if variant in ("ttt_linear", "ttt_mlp"):
        kind = variant.split("_")[1]
        return swa + off + ["model.ttt_seq.enabled=true", f"model.ttt_seq.kind={kind}",
                            "model.ttt_seq.mode=replace", f"model.ttt_seq.mini_batch={args.mini_batch}"]
    if variant == "e2e":
        return swa + off + ["model.e2e.enabled=true", f"model.e2e.last_k={max(1, n_layers // 4)}",
                            f"model.e2e.chunk_size={args.e2e_chunk}"]
    raise ValueError(f"unknown variant {variant!r}; choose from {VARIANTS}")


def _param_count(mcfg) -> int:
    import jax
    import numpy as np
    from flax import nnx

    from ttt_jax.models.lm import CausalLM

    abstract = nnx.eval_shape(lambda: CausalLM(mcfg, rngs=nnx.Rngs(0)))
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(nnx.state(abstract, nnx.Param))))


def build_config(variant: str, args):
    """``(model config, runtime config, parameter target)``: the variant's architecture with
    ``d_ff`` chosen so its parameter count matches ``swa``'s."""
    import dataclasses

    from ttt_jax.config import load_config

    common = list(args.set) + [f"data.seq_len={args.seq_len}", f"model.max_seq_len={max(args.seq_len, 8)}"]
    base = load_config(args.preset, common)
    n_layers = base.model.n_layers
    target = _param_count(load_config(args.preset, common + variant_overrides("swa", args, n_layers)).model)
    cfg = load_config(args.preset, common + variant_overrides(variant, args, n_layers))
    m = cfg.model
    if variant != "swa":
        d1, d2 = m.d_ff, m.d_ff + 8 * args.ff_multiple
        p1 = _param_count(m)
        p2 = _param_count(dataclasses.replace(m, d_ff=d2))
        d_ff = d1 + (target - p1) * (d2 - d1) / (p2 - p1)
        d_ff = max(args.ff_multiple, int(round(d_ff / args.ff_multiple)) * args.ff_multiple)
        m = dataclasses.replace(m, d_ff=d_ff)
        m.validate()
    return m, cfg.runtime, target


def run_variant(args) -> dict:
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from ttt_jax.models.lm import CausalLM, count_params
    from ttt_jax.ops.loss import chunked_cross_entropy

    mcfg, runtime, target = build_config(args.variant, args)
    model = CausalLM(mcfg, runtime=runtime, rngs=nnx.Rngs(0))
    n_params = count_params(model)
    optimizer = nnx.Optimizer(model, optax.adamw(1e-5, weight_decay=0.1), wrt=nnx.Param)
    graphdef, state = nnx.split((model, optimizer))

    def step(state, tokens):
        model, opt = nnx.merge(graphdef, state)

        def loss_fn(m):
            h = m.hidden(tokens[:, :-1])
            nll, n = chunked_cross_entropy(h, m.head(), tokens[:, 1:],
                                           jnp.ones(tokens[:, 1:].shape, jnp.float32))
            return nll / n

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        opt.update(model, grads)
        return nnx.state((model, opt)), loss

    step = jax.jit(step, donate_argnums=0)
    t = args.seq_len
    tokens = jax.random.randint(jax.random.key(1), (args.batch, t + 1), 0, mcfg.vocab_size, jnp.int32)
    t0 = time.perf_counter()
    compiled = step.lower(state, tokens).compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    for _ in range(2):
        state, loss = step(state, tokens)
    jax.block_until_ready(loss)
    times = []
    for _ in range(args.iters):
        t0 = time.perf_counter()
        state, loss = step(state, tokens)
        jax.block_until_ready(loss)
        times.append(time.perf_counter() - t0)
    sec = statistics.median(times)
    dev = jax.devices()[0]
    stats = dev.memory_stats() or {}
    return dict(variant=args.variant, device=dev.device_kind, jax=jax.__version__, params=n_params,
                param_target=target, d_ff=mcfg.d_ff, seq_len=t, batch=args.batch, step_s=sec,
                tokens_per_s=args.batch * t / sec, peak_gib=stats.get("peak_bytes_in_use", 0) / 2 ** 30,
                temp_gib=(mem.temp_size_in_bytes / 2 ** 30) if mem is not None else None,
                compile_s=compile_s, loss=float(loss))


def _ratio(a: dict, b: dict, key: str) -> str:
    return f"{a[key] / b[key]:.2f}x" if b.get(key) else "n/a"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="small")
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--window", type=int, default=1024, help="sliding window of the backbone")
    p.add_argument("--mini-batch", type=int, default=16, help="TTT-Linear/MLP mini-batch")
    p.add_argument("--e2e-chunk", type=int, default=1024, help="TTT-E2E chunk size")
    p.add_argument("--ff-multiple", type=int, default=64, help="d_ff rounding when matching params")
    p.add_argument("--set", nargs="*", default=["runtime.remat=true"],
                   help="config overrides applied to every variant")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--smoke", action="store_true",
                   help="CPU check: tiny preset, 64 tokens, batch 2, window 16, E2E chunk 16, 2 iters")
    p.add_argument("--variant", help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    if args.smoke:
        args.preset, args.seq_len, args.batch, args.iters = "tiny", 64, 2, 2
        args.window, args.e2e_chunk, args.ff_multiple = 16, 16, 8
        args.set = ["model.ttt.chunk_size=16"]
    if args.variant:
        print("RESULT " + json.dumps(run_variant(args)), flush=True)
        return None
    rows = []
    for v in args.variants:
        child = [__file__, "--variant", v, "--preset", args.preset,
                 "--seq-len", str(args.seq_len), "--batch", str(args.batch), "--iters", str(args.iters),
                 "--window", str(args.window), "--mini-batch", str(args.mini_batch),
                 "--e2e-chunk", str(args.e2e_chunk), "--ff-multiple", str(args.ff_multiple),
                 "--set", *args.set]
        rows.append(run_variant_process(child, v))
        print(rows[-1], flush=True)
    ok = {r["variant"]: r for r in rows if "error" not in r}
    print(f"\n{'variant':>10} {'params':>11} {'d_ff':>6} {'step s':>8} {'tok/s':>9} {'peak GiB':>9} "
          f"{'temp GiB':>9} {'vs swa':>7} {'vs inplace':>10}")
    for r in rows:
        if "error" in r:
            print(f"{r['variant']:>10} ERROR (exit {r.get('returncode')}) {r['error']}")
            continue
        vs_swa = _ratio(r, ok["swa"], "step_s") if "swa" in ok else "n/a"
        vs_ip = _ratio(r, ok["inplace"], "step_s") if "inplace" in ok else "n/a"
        temp = r["temp_gib"] if r["temp_gib"] is not None else float("nan")
        print(f"{r['variant']:>10} {r['params']:>11,} {r['d_ff']:>6} {r['step_s']:8.3f} "
              f"{r['tokens_per_s']:9.0f} {r['peak_gib']:9.2f} {temp:9.3f} {vs_swa:>7} {vs_ip:>10}")
    if ok:
        r0 = next(iter(ok.values()))
        print(f"\ndevice: {r0['device']}, jax {r0['jax']}, preset {args.preset}, T={args.seq_len}, "
              f"batch {args.batch}, window {args.window}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(dict(args={k: (str(v) if isinstance(v, Path) else v)
                                                  for k, v in vars(args).items()}, rows=rows), indent=1))
    return rows


if __name__ == "__main__":
    main()
