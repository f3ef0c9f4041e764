"""Long-context inference benchmark: decode tokens/s and prefill tokens/s, SWA + TTT vs full attention.

Two variants of a ~1B-parameter decoder (random weights, bf16): ``swa_ttt`` -- sliding-window
attention (window 4096) on every layer with In-Place TTT on every 4th layer (chunk 1024) -- and
``full`` -- full causal attention on every layer, no TTT; opt-in (``--variants``) the TTT family on
the same backbone: ``ttt_linear`` (TTT-Linear in place of attention on every layer) and
``swa_ttt_mlp`` (TTT-MLP beside the sliding-window attention on every layer), mini-batch 16, whose
decode step replays the open mini-batch (the same cost at every step). For each context length:

* **decode**: the cache is set to ``context`` tokens per sequence (values do not change the work:
  the KV caches and fast weights are fixed-size arrays, attention masks by position), then
  ``--decode-steps`` jitted decode steps are timed (median per step) at batch 1 and 32. The step in
  which a TTT chunk completes (once every ``chunk_size`` tokens; all sequences complete together)
  is timed separately, and ``amortized`` spreads its extra cost over the chunk. Then the same
  decode as one call per ``--decode-block`` tokens (:meth:`ttt_jax.infer.Engine.decode_loop`: the
  steps, sampling and stop checks loop on the device): ``ms_per_token_block`` is the median block
  time / the block length (``--block-repeats`` blocks, no chunk completing), and with TTT a block
  in which one chunk completes is timed too, amortized the same way.
* **prefill**: one prompt of ``context`` tokens, two ways, both producing the caches:
  :meth:`ttt_jax.infer.Engine.prefill` (blocks of ``--prefill-block`` tokens attending to the cache:
  memory bounded by the block) and :meth:`ttt_jax.infer.Engine.prefill_parallel` (one forward pass
  of the model's own layers -- cuDNN attention on GPU -- plus position-wise cache filling; the path
  that splits the sequence over a ``context`` mesh axis).

Combinations whose cache would not fit (``--memory-gb``) are recorded as skipped. Results are
printed as a table and written as JSON (``--out``, default ``$OUT/decode_bench.json`` or
``benchmarks/results/decode_bench.json``). Goals checked in the summary: SWA + TTT decode time per
token within 10% from the shortest to the longest context, and prefill at the longest context at
least 3x faster than full attention.

Usage::

    python benchmarks/decode_bench.py                      # GPU: ~1B model, contexts 4k..128k
    python benchmarks/decode_bench.py --smoke              # CPU: a tiny model, seconds
    python benchmarks/decode_bench.py --variants swa_ttt,ttt_linear,swa_ttt_mlp   # the TTT family
    python benchmarks/decode_bench.py --variants swa_ttt --batches 1 --no-forward  # decode only
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def model_configs(smoke: bool) -> dict:
    from ttt_jax.config import ModelConfig, TTTConfig, TTTSeqConfig

    if smoke:
        base = ModelConfig(vocab_size=259, d_model=64, n_layers=4, n_heads=4, n_kv_heads=2, d_ff=128,
                           max_seq_len=1 << 20, compute_dtype="float32", param_dtype="float32",
                           ttt=TTTConfig(enabled=False))
        window, chunk = 64, 32
    else:
        base = ModelConfig(vocab_size=32000, d_model=2048, n_layers=16, n_heads=16, n_kv_heads=8,
                           head_dim=128, d_ff=8192, max_seq_len=1 << 20, compute_dtype="bfloat16",
                           param_dtype="bfloat16", ttt=TTTConfig(enabled=False))
        window, chunk = 4096, 1024
    swa_ttt = dataclasses.replace(base, attention_window=window, ttt=TTTConfig(
        enabled=True, every=4, start=0, chunk_size=chunk, lr=1.0))
    # The TTT family (opt-in with --variants): as configs/ttt_linear_tiny.yaml / ttt_mlp_tiny.yaml.
    ttt_linear = dataclasses.replace(base, ttt_seq=TTTSeqConfig(enabled=True, kind="linear",
                                                                 mode="replace"))
    swa_ttt_mlp = dataclasses.replace(base, attention_window=window, ttt_seq=TTTSeqConfig(
        enabled=True, kind="mlp", mode="beside"))
    return {"swa_ttt": swa_ttt, "full": base, "ttt_linear": ttt_linear, "swa_ttt_mlp": swa_ttt_mlp}


def _sync(x):
    import jax

    jax.block_until_ready(x)
    return x


def _make_model(cfg, smoke: bool = False):
    from flax import nnx

    from ttt_jax.config import RuntimeConfig
    from ttt_jax.models.lm import CausalLM

    # The smoke run (CPU) uses XLA attention; the real one lets `auto` pick the GPU kernels.
    runtime = RuntimeConfig(attention_impl="xla" if smoke else "auto")
    model = CausalLM(cfg, runtime=runtime, rngs=nnx.Rngs(0))
    # Non-zero TTT target parameters, so the fast weights do real work (values are irrelevant to speed).
    for block in model.layers:
        if block.is_ttt:
            block.mlp.ttt_conv[...] = block.mlp.ttt_conv[...] + 0.01
    return model


def bench_decode(engine, batch: int, context: int, steps: int, mem_budget: float, block: int = 0,
                 block_repeats: int = 5) -> dict:
    import jax
    import jax.numpy as jnp

    from ttt_jax.infer.cache import Cache, init_cache

    cfg = engine.cfg
    max_len = context + max(steps, block) + cfg.ttt.chunk_size + 2
    abstract = jax.eval_shape(lambda: init_cache(cfg, batch, max_len))
    need = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(abstract)) / 2**30
    if need > mem_budget:
        return {"skipped": f"cache needs {need:.1f} GiB > --memory-gb {mem_budget}"}
    cache = init_cache(cfg, batch, max_len)
    c = cfg.ttt.chunk_size if cfg.ttt.layer_ids(cfg.n_layers) else None
    # Start just after a chunk boundary so the timed steps complete no chunk.
    start = context if c is None else (context // c) * c + 1
    cache = Cache(lengths=jnp.full((batch,), start, jnp.int32), layers=cache.layers)
    tok = jnp.zeros((batch,), jnp.int32)
    for _ in range(2):                                                   # compile + warm up
        tok, _, cache = engine.decode(cache, tok, check=False)
    _sync(tok)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        tok, _, cache = engine.decode(cache, tok, check=False)
        _sync(tok)
        times.append(time.perf_counter() - t0)
    step_s = statistics.median(times)
    out = {"cache_gib": round(need, 3), "ms_per_step": step_s * 1e3, "tokens_per_s": batch / step_s}
    if c is not None:
        # Advance to the last token of the chunk: that step folds the chunk into the fast weights.
        cur = int(jax.device_get(cache.lengths[0]))
        cache = Cache(lengths=jnp.full((batch,), cur + (c - 1 - cur % c), jnp.int32), layers=cache.layers)
        t0 = time.perf_counter()
        tok, _, cache = engine.decode(cache, tok, check=False)
        _sync(tok)
        complete_s = time.perf_counter() - t0
        out["ms_chunk_complete_step"] = complete_s * 1e3
        out["ms_per_step_amortized"] = (step_s + (complete_s - step_s) / c) * 1e3
    if block:
        out.update(bench_decode_block(engine, cache, tok, start, block, block_repeats, c))
    return out


def bench_decode_block(engine, cache, tok, start: int, block: int, repeats: int, chunk) -> dict:
    """Decode ``block`` tokens per call (:meth:`Engine.decode_loop`) from ``start`` tokens of context
    (``start`` just after a chunk boundary: no chunk completes in the block when ``block < chunk``);
    with a TTT chunk, also a block ending just after a chunk completes."""
    import jax.numpy as jnp

    from ttt_jax.infer.cache import Cache

    b = cache.batch_size

    def run(at):
        nonlocal cache, tok
        cache = Cache(lengths=jnp.full((b,), at, jnp.int32), layers=cache.layers)
        t0 = time.perf_counter()
        res = engine.decode_loop(cache, tok, block, check=False)
        _sync(res.tokens)
        cache, tok = res.cache, res.last
        return time.perf_counter() - t0

    run(start)                                                           # compile + warm up
    block_s = statistics.median(run(start) for _ in range(repeats))
    out = {"decode_block": block, "ms_per_token_block": block_s / block * 1e3,
           "tokens_per_s_block": b * block / block_s}
    if chunk is not None:
        # The block's second-to-last step feeds the chunk's last token (its update is formed then).
        first = ((start + chunk - 1) // chunk) * chunk - block + 1
        if first > 0:
            complete_s = statistics.median(run(first) for _ in range(max(repeats // 2, 1)))
            out["ms_chunk_complete_block"] = complete_s * 1e3
            out["ms_per_token_block_amortized"] = (block_s / block + (complete_s - block_s) / chunk) * 1e3
    return out


def bench_prefill(engine, context: int, block: int, repeats: int, mem_budget: float,
                  with_forward: bool) -> dict:
    import jax
    import numpy as np

    from ttt_jax.infer.cache import init_cache

    cfg = engine.cfg
    abstract = jax.eval_shape(lambda: init_cache(cfg, 1, context))
    need = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(abstract)) / 2**30
    if need > mem_budget:
        return {"skipped": f"cache needs {need:.1f} GiB > --memory-gb {mem_budget}"}
    prompt = np.random.default_rng(0).integers(3, cfg.vocab_size, (1, context)).astype(np.int32)
    out = {}
    times = []
    for _ in range(repeats + 1):                                         # the first run compiles
        cache = engine.init_cache(1, context)
        t0 = time.perf_counter()
        logits, cache = engine.prefill(cache, prompt)
        _sync(logits)
        times.append(time.perf_counter() - t0)
        del cache
    s = min(times[1:])
    out.update(engine_s=s, engine_tokens_per_s=context / s)
    if with_forward:
        try:
            times = []
            for _ in range(repeats + 1):
                cache = engine.init_cache(1, context)
                t0 = time.perf_counter()
                logits, cache = engine.prefill_parallel(cache, prompt)
                _sync(logits)
                times.append(time.perf_counter() - t0)
                del cache
            out.update(forward_s=min(times[1:]), forward_tokens_per_s=context / min(times[1:]))
        except Exception as e:  # noqa: BLE001 - report (e.g. out of memory) and go on
            out["forward_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny model and contexts (CPU check)")
    p.add_argument("--contexts", default=None, help="comma-separated context lengths")
    p.add_argument("--batches", default="1,32", help="decode batch sizes")
    p.add_argument("--variants", default="swa_ttt,full")
    p.add_argument("--decode-steps", type=int, default=20)
    p.add_argument("--decode-block", type=int, default=None,
                   help="tokens per on-device decode loop call (default 64, smoke 8; 0 = skip)")
    p.add_argument("--block-repeats", type=int, default=5, help="timed decode-loop calls")
    p.add_argument("--prefill-block", type=int, default=None)
    p.add_argument("--prefill-repeats", type=int, default=1)
    p.add_argument("--no-forward", action="store_true", help="skip the one-pass (prefill_parallel) prefill")
    p.add_argument("--memory-gb", type=float, default=40.0, help="largest cache to try (GiB)")
    p.add_argument("--out", default=None, help="JSON path")
    args = p.parse_args(argv)

    import jax

    from ttt_jax.infer import Engine
    from ttt_jax.models.lm import count_params

    if args.smoke:
        contexts = [256, 1024]
        batches = [1, 4] if args.batches == "1,32" else [int(x) for x in args.batches.split(",")]
        block = args.prefill_block or 256
        steps = min(args.decode_steps, 5)
        dblock = 8 if args.decode_block is None else args.decode_block
    else:
        contexts = [4096, 32768, 131072]
        batches = [int(x) for x in args.batches.split(",")]
        block = args.prefill_block or 4096
        steps = args.decode_steps
        dblock = 64 if args.decode_block is None else args.decode_block
    if args.contexts:
        contexts = [int(x) for x in args.contexts.split(",")]
    cfgs = model_configs(args.smoke)
    out = Path(args.out) if args.out else (Path(os.environ["OUT"]) if os.environ.get("OUT") else
                                           ROOT / "benchmarks" / "results") / "decode_bench.json"
    dev = jax.devices()[0]
    results = {"device": f"{dev.device_kind} ({dev.platform})", "jax": jax.__version__,
               "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "smoke": args.smoke,
               "prefill_block": block, "decode_steps": steps, "decode_block": dblock, "variants": {}}
    for name in args.variants.split(","):
        cfg = cfgs[name]
        model = _make_model(cfg, args.smoke)
        engine = Engine(model, prefill_block=block)
        entry = {"config": {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("ttt", "ttt_seq")},
                 "ttt_seq": dataclasses.asdict(cfg.ttt_seq),
                 "ttt": dataclasses.asdict(cfg.ttt), "params": count_params(model), "contexts": {}}
        results["variants"][name] = entry
        for ctx in contexts:
            row = {"prefill": bench_prefill(engine, ctx, block, args.prefill_repeats, args.memory_gb,
                                            not args.no_forward),
                   "decode": {str(b): bench_decode(engine, b, ctx, steps, args.memory_gb, dblock,
                                                   args.block_repeats) for b in batches}}
            entry["contexts"][str(ctx)] = row
            pf = row["prefill"]
            dec = "  ".join(f"b{b}: " + (f"{d['ms_per_step']:.2f} ms/step ({d['tokens_per_s']:.0f} tok/s)"
                                        if "ms_per_step" in d else d["skipped"])
                            + (f", loop {d['ms_per_token_block']:.2f} ms/token" if "ms_per_token_block" in d
                               else "")
                            for b, d in row["decode"].items())
            pre = (f"prefill {pf['engine_tokens_per_s']:.0f} tok/s" if "engine_s" in pf else pf["skipped"])
            if "forward_tokens_per_s" in pf:
                pre += f" (one-pass {pf['forward_tokens_per_s']:.0f} tok/s)"
            print(f"{name:8s} ctx {ctx:7d}  {pre}  decode {dec}", flush=True)
            _write(results, out)  # partial results survive a time limit
    results["summary"] = summarize(results, contexts, batches)
    for line in results["summary"]["lines"]:
        print(line)
    _write(results, out)
    from ttt_jax.bench.plots import plot_decode

    print(f"wrote {out} and {plot_decode(results, out.with_suffix('.png'))}")
    return 0


def _write(results: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))


def summarize(results: dict, contexts: list, batches: list) -> dict:
    """The two goals: SWA + TTT decode flat in context (<= 10% growth), prefill >= 3x full attention."""
    lines, summary = [], {}
    v = results["variants"]
    lo, hi = str(min(contexts)), str(max(contexts))
    if "swa_ttt" in v:
        for b in map(str, batches):
            a, z = v["swa_ttt"]["contexts"][lo]["decode"][b], v["swa_ttt"]["contexts"][hi]["decode"][b]
            key = "ms_per_step_amortized" if "ms_per_step_amortized" in a else "ms_per_step"
            if key in a and key in z:
                growth = z[key] / a[key] - 1
                summary[f"swa_ttt_decode_growth_b{b}"] = growth
                lines.append(f"SWA+TTT decode b{b}: {a[key]:.2f} -> {z[key]:.2f} ms/token ({lo} -> {hi}): "
                             f"{growth:+.1%} ({'meets' if growth <= 0.10 else 'misses'} the <=10% goal)")
            key = "ms_per_token_block_amortized" if "ms_per_token_block_amortized" in a else "ms_per_token_block"
            if key in a and key in z:
                growth = z[key] / a[key] - 1
                summary[f"swa_ttt_decode_loop_growth_b{b}"] = growth
                lines.append(f"SWA+TTT decode loop b{b} ({a['decode_block']} tokens/call): {a[key]:.2f} -> "
                             f"{z[key]:.2f} ms/token ({lo} -> {hi}): {growth:+.1%} "
                             f"({'meets' if growth <= 0.10 else 'misses'} the <=10% goal)")
    if "swa_ttt" in v and "full" in v:
        a, z = v["swa_ttt"]["contexts"][hi]["prefill"], v["full"]["contexts"][hi]["prefill"]
        for key, what in (("engine_s", "blockwise prefill"), ("forward_s", "one-pass prefill")):
            if key in a and key in z:
                ratio = z[key] / a[key]
                summary[f"prefill_speedup_{key}"] = ratio
                lines.append(f"{what} at {hi}: SWA+TTT {ratio:.2f}x faster than full attention "
                             f"({'meets' if ratio >= 3 else 'misses'} the >=3x goal)")
    summary["lines"] = lines
    return summary


if __name__ == "__main__":
    sys.exit(main())
