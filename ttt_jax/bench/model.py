"""Model-level benchmark: train-step time and peak memory with and without In-Place TTT.

Each variant runs in its own subprocess (so the device's peak-memory counter belongs to it alone):
build the model from a preset, one jitted AdamW train step (chunked cross-entropy, donation),
warm up, time the median of ``--iters`` steps each waited for (``step_s``) and ``--iters`` steps
dispatched back to back as the trainer runs them (``step_pipelined_s``), and read
``peak_bytes_in_use``. The parent prints a
table with tokens/s, MFU (analytic FLOPs, ``ttt_jax.models.flops``) and the TTT / base ratios.

Usage (Qwen3-4B shape, 32k tokens, remat, bf16 parameters)::

    ttt-jax bench model --preset qwen3_4b_shape --seq-len 32768 \\
        --set model.param_dtype=bfloat16 runtime.remat=true --out results/model.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np

from ttt_jax.bench.fmt import num, pct
from ttt_jax.bench.isolate import run_variant_process
from ttt_jax.paths import ensure_writable_file
from ttt_jax.train.metrics import peak_tflops_per_device


VARIANTS = {
    "base": ["model.ttt.enabled=false"],
    "ttt": ["model.ttt.enabled=true"],
    # Sliding-window attention on every layer (window from --window), without / with In-Place TTT.
    "swa": ["model.ttt.enabled=false", "model.attention_window={window}"],
    "swa_ttt": ["model.ttt.enabled=true", "model.attention_window={window}"],
}


def parse_mesh(spec: str) -> dict:
    """``"context=4,fsdp=1"`` -> ``{"context": 4, "fsdp": 1}`` (axes of ``mesh.*``)."""
    out = {}
    for part in filter(None, spec.split(",")):
        key, _, value = part.partition("=")
        try:
            out[key.strip()] = int(value)
        except ValueError:
            raise ValueError(f"--mesh {spec!r}: expected axis=size pairs such as context=4,fsdp=2") from None
    return out


def check_args(args) -> None:
    """Reject what no variant can run with, before any child starts (``ValueError``, one line):
    unknown variants, sizes < 1, and overrides / presets / meshes the config rejects."""
    from ttt_jax.config import load_config

    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        raise ValueError(f"--variants {unknown[0]!r}: expected some of {', '.join(VARIANTS)}")
    for name in ("batch", "iters", "window"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} {getattr(args, name)}: expected an integer >= 1")
    if args.warmup < 0:
        raise ValueError(f"--warmup {args.warmup}: expected an integer >= 0")
    lengths = args.seq_lens or [args.seq_len]
    if min(lengths) < 2:
        raise ValueError(f"--seq-len {min(lengths)}: expected integers >= 2")
    mesh_over = [f"mesh.{k}={v}" for k, v in parse_mesh(args.mesh).items()]
    for length in lengths:
        for v in args.variants:
            variant = [o.format(window=args.window) for o in VARIANTS[v]]
            # The same overrides run_variant applies; a ConfigError names the bad key or value.
            load_config(args.preset, list(args.set) + variant + mesh_over + [
                f"data.seq_len={length}", f"model.max_seq_len={max(length, 8)}"])


def context_comm(mcfg, runtime, mesh_shape, batch: int, seq_len: int) -> dict:
    """Analytic bytes each device receives over ``context`` per step (:mod:`parallel.comm`)."""
    import jax.numpy as jnp

    from ttt_jax.parallel.comm import context_comm_bytes

    tp = int(mesh_shape.get("tensor", 1))
    rows = max(1, batch // (int(mesh_shape.get("data", 1)) * int(mesh_shape.get("fsdp", 1))))
    return context_comm_bytes(
        n=int(mesh_shape.get("context", 1)), batch=rows, seq_len=seq_len,
        layer_windows=[mcfg.layer_window(i) for i in range(mcfg.n_layers)],
        kv_heads=max(1, mcfg.n_kv_heads // tp), head_dim=mcfg.resolved_head_dim,
        ttt_layers=len(mcfg.ttt.layer_ids(mcfg.n_layers)) if mcfg.ttt.enabled else 0,
        ttt_shape=(mcfg.d_ff // tp, mcfg.d_model), act_bytes=jnp.dtype(mcfg.compute_dtype).itemsize,
        attention=runtime.context.attention, layout=runtime.context.layout,
        remat=runtime.remat and runtime.remat_policy == "full")  # saved exchanges are not repeated


def benchmark_step(mcfg, mesh, loss_groups: Optional[int] = None, shard_optimizer: bool = False,
                   runtime=None):
    """The benchmarked train step of model config ``mcfg`` (run as ``runtime`` says) on ``mesh``: forward, chunked loss,
    backward and an AdamW update, jitted with the state's shardings and donation.

    ``loss_groups`` defaults to the context size, as in the trainer: every device computes the loss
    of its own positions (with 1 the loss scan gathers the hidden states to all devices).
    ``shard_optimizer``: ZeRO-1, the Adam moments split over the axes that replicate parameters
    (``train.shard_optimizer``, :func:`ttt_jax.sharding.split_further`).

    Returns ``(step, graphdef, abstract_state, state_shardings, build)``:
    ``step(state, inputs, targets, positions) -> (state, loss)`` with ``[B, T]`` int inputs, and
    ``build()`` creating ``(model, optimizer)``.
    """
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from ttt_jax.models.lm import CausalLM
    from ttt_jax.ops.loss import chunked_cross_entropy
    from ttt_jax import sharding

    tx = optax.adamw(1e-5, weight_decay=0.1)
    groups = mesh.shape.get("context", 1) if loss_groups is None else loss_groups

    def build():
        model = CausalLM(mcfg, runtime=runtime, rngs=nnx.Rngs(0))
        return model, nnx.Optimizer(model, tx, wrt=nnx.Param)

    graphdef, abs_state = nnx.split(nnx.eval_shape(build))
    shardings = sharding.state_shardings(abs_state, mesh,
                                         zero_axes=sharding.ZERO_AXES if shard_optimizer else ())

    def step(state, inputs, targets, positions):
        model, opt = nnx.merge(graphdef, state)

        def loss_fn(m):
            h = m.hidden(inputs, positions=positions)
            nll, n = chunked_cross_entropy(h, m.head(), targets, jnp.ones(targets.shape, jnp.float32),
                                           groups=groups)
            return nll / n

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        with jax.named_scope("optimizer"):
            opt.update(model, grads)
        return nnx.state((model, opt)), loss

    batch_sh = sharding.batch_sharding(mesh)
    # Explicit out_shardings, as in the trainer: the updated state keeps its (ZeRO-1) layout.
    jitted = jax.jit(step, donate_argnums=0, in_shardings=(shardings, batch_sh, batch_sh, batch_sh),
                     out_shardings=(shardings, sharding.replicated(mesh)))
    return jitted, graphdef, abs_state, shardings, build


def run_variant(args) -> dict:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from ttt_jax.config import load_config
    from ttt_jax.models.flops import flops_per_token
    from ttt_jax.models.lm import count_params

    from ttt_jax import sharding

    variant = [o.format(window=args.window) for o in VARIANTS[args.variant]]
    mesh_over = [f"mesh.{k}={v}" for k, v in parse_mesh(args.mesh).items()]
    overrides = list(args.set) + variant + mesh_over + [f"data.seq_len={args.seq_len}",
                                                        f"model.max_seq_len={max(args.seq_len, 8)}"]
    cfg = load_config(args.preset, overrides)
    mcfg, rt = cfg.model, cfg.runtime
    sizes = [cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor, cfg.mesh.context]
    # A mesh of explicit sizes smaller than the machine (e.g. --mesh data=1 beside emulated CPU
    # devices) runs on the first devices; on GPUs CUDA_VISIBLE_DEVICES does the same.
    used = int(np.prod(sizes)) if min(sizes) > 0 else len(jax.devices())
    mesh = sharding.make_mesh(cfg.mesh, devices=jax.devices()[:used])
    sharding.check_supported(mesh, args.seq_len, mcfg.ttt.chunk_size if mcfg.ttt.layer_ids(mcfg.n_layers) else None,
                             rt.context.layout)
    step, graphdef, abs_state, shardings, build = benchmark_step(mcfg, mesh, runtime=rt,
                                                                 shard_optimizer=cfg.train.shard_optimizer)
    # Created directly in its sharding: a large model is never whole on one device.
    state = jax.jit(lambda: nnx.state(build()), out_shardings=shardings)()
    n_params = count_params(nnx.merge(graphdef, state)[0])
    batch_sh = sharding.batch_sharding(mesh)
    t = args.seq_len
    rows = np.asarray(jax.random.randint(jax.random.key(1), (args.batch, t + 1), 0, mcfg.vocab_size, jnp.int32))
    host = {"inputs": rows[:, :-1], "targets": rows[:, 1:],
            "positions": np.broadcast_to(np.arange(t, dtype=np.int32), (args.batch, t)).copy()}
    batch = sharding.put_batch(host, batch_sh, rt.context.layout)
    tokens = (batch["inputs"], batch["targets"], batch["positions"])
    ctx = jax.set_mesh(mesh)
    ctx.__enter__()
    t0 = time.perf_counter()
    compiled = step.lower(state, *tokens).compile()
    compile_s = time.perf_counter() - t0
    # Progress on stderr (the parent keeps the child's last lines when a variant fails).
    print(f"[{args.variant}] compiled in {compile_s:.1f} s", file=sys.stderr, flush=True)
    mem = compiled.memory_analysis()
    for _ in range(args.warmup):
        state, loss = step(state, *tokens)
    jax.block_until_ready(state)
    times = []
    for _ in range(args.iters):
        t0 = time.perf_counter()
        state, loss = step(state, *tokens)
        jax.block_until_ready(loss)
        times.append(time.perf_counter() - t0)
        print(f"[{args.variant}] step {len(times)}: {times[-1]:.3f} s", file=sys.stderr, flush=True)
    sec = statistics.median(times)
    # Pipelined, as the trainer runs: the host enqueues the next step while the devices run this
    # one, so per-step dispatch work (argument handling for every shard of the state, launches)
    # overlaps device time instead of adding to it. One block at the end.
    jax.block_until_ready(state)
    t0 = time.perf_counter()
    for _ in range(args.iters):
        state, loss = step(state, *tokens)
    jax.block_until_ready((state, loss))
    pipelined = (time.perf_counter() - t0) / args.iters
    print(f"[{args.variant}] pipelined: {pipelined:.3f} s per step", file=sys.stderr, flush=True)
    profile = None
    if args.profile:
        profile = _profile_step(step, state, tokens, Path(args.profile) / f"{args.variant}_{t}",
                                hlo_text=compiled.as_text())
        state = profile.pop("state")
    comm = context_comm(mcfg, rt, mesh.shape, args.batch, t)
    dev = jax.devices()[0]
    peaks = [(d.memory_stats() or {}).get("peak_bytes_in_use", 0) for d in mesh.devices.flat]
    fpt = flops_per_token(mcfg, t)
    return dict(variant=args.variant, device=dev.device_kind, n_devices=mesh.size,
                mesh={k: int(v) for k, v in mesh.shape.items()}, layout=rt.context.layout,
                window=mcfg.attention_window, params=n_params, seq_len=t, batch=args.batch,
                step_s=sec, step_pipelined_s=pipelined, tokens_per_s=args.batch * t / sec,
                tflops=fpt * args.batch * t / sec / 1e12 / mesh.size,   # per device
                peak_gib=max(peaks) / 2 ** 30,
                temp_gib=(mem.temp_size_in_bytes / 2 ** 30) if mem is not None else None,
                compile_s=compile_s, loss=float(loss), ttt_layers=list(mcfg.ttt.layer_ids(mcfg.n_layers)),
                context_attention=rt.context.attention, context_kernel=rt.context.kernel,
                remat=rt.remat, remat_policy=rt.remat_policy,
                shard_optimizer=cfg.train.shard_optimizer,
                comm_bytes_per_device=comm,
                **({"profile": profile} if profile is not None else {}))


def _profile_step(step, state, tokens, log_dir: Path, hlo_text: Optional[str] = None) -> dict:
    """One more step under ``jax.profiler.trace``; returns the trace's per-device summary
    (:mod:`ttt_jax.bench.trace`), the traced step's host-side seconds, and the new ``state``.

    ``hlo_text`` (the step's compiled module) is saved beside the trace as ``step.hlo.txt`` and
    gives the summary each kernel's op name, hence its model scope."""
    import jax

    from ttt_jax.bench.trace import format_summary, summarize_trace

    log_dir.mkdir(parents=True, exist_ok=True)
    with jax.profiler.trace(str(log_dir), create_perfetto_trace=True):
        t0 = time.perf_counter()
        state, loss = step(state, *tokens)
        jax.block_until_ready((state, loss))
        traced_s = time.perf_counter() - t0
    if hlo_text is not None:
        (log_dir / "step.hlo.txt").write_text(hlo_text)
    summary = summarize_trace(log_dir, hlo_text=hlo_text)
    print(format_summary(summary), file=sys.stderr, flush=True)
    return dict(summary, traced_step_s=traced_s, state=state)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="qwen3_4b_shape")
    p.add_argument("--seq-len", type=int, default=32768)
    p.add_argument("--seq-lens", type=int, nargs="+", default=None,
                   help="several sequence lengths (a sweep: every variant at every length; overrides "
                        "--seq-len); the PNG written next to --out plots tokens/s and peak memory")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--window", type=int, default=4096, help="sliding window of the swa variants")
    p.add_argument("--mesh", default="", help="mesh axes, e.g. context=4 or context=2,fsdp=2 "
                   "(default: data parallel over all devices)")
    p.add_argument("--set", nargs="*", default=["model.param_dtype=bfloat16", "runtime.remat=true"],
                   help="config overrides applied to every variant")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS))
    p.add_argument("--variant", help=argparse.SUPPRESS)
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="per-device peak for MFU (default: the device's known peak; MFU n/a when unknown)")
    p.add_argument("--out", type=Path)
    p.add_argument("--profile", type=Path, default=None,
                   help="after timing, trace one more step with jax.profiler into this directory and "
                        "add a per-device summary (busy/idle time, time by kind and by model scope) "
                        "to each result (ttt_jax.bench.trace)")
    args = p.parse_args(argv)
    if args.variant:
        print("RESULT " + json.dumps(run_variant(args)), flush=True)
        return None
    check_args(args)
    if args.out:
        ensure_writable_file(args.out, "--out")
    lengths = args.seq_lens or [args.seq_len]
    # The children import this package from where the parent found it (installed or not).
    root = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    rows = []
    for length in lengths:
        for v in args.variants:
            child = ["-m", "ttt_jax.bench.model", "--variant", v, "--preset", args.preset,
                     "--seq-len", str(length), "--batch", str(args.batch), "--iters", str(args.iters),
                     "--warmup", str(args.warmup), "--window", str(args.window), "--mesh", args.mesh,
                     *(["--profile", str(args.profile)] if args.profile else []), "--set", *args.set]
            row = run_variant_process(child, v, env)
            row.setdefault("seq_len", length)
            rows.append(row)
            if "error" in row:  # the child's stderr went by above; one line here
                print(f"[{v}] T={length} failed (exit {row.get('returncode')}): {row['error']}", flush=True)
            else:
                print({k: v for k, v in row.items() if k != "profile"}, flush=True)
            if "profile" in row:  # the per-device detail is in --out; a digest here
                from ttt_jax.bench.trace import format_summary

                print(format_summary(row["profile"]), flush=True)
            if args.out:  # partial results survive a time limit
                _write(rows, args.out)
    print(f"\n{'variant':>8} {'T':>7} {'step s':>8} {'piped s':>8} {'tok/s':>9} {'TFLOP/s':>8} {'MFU':>6} {'peak GiB':>9} "
          f"{'compile s':>9} {'comm MiB':>9}")
    for r in rows:
        if "error" in r:
            print(f"{r['variant']:>8} {r['seq_len']:>7} ERROR (exit {r.get('returncode')}) {r['error']}")
            continue
        peak = peak_tflops_per_device(r.get("device", ""), args.peak_tflops)
        mfu = r["tflops"] / peak if peak else None
        print(f"{r['variant']:>8} {r['seq_len']:>7} {num(r['step_s']):>8} {num(r.get('step_pipelined_s')):>8} "
              f"{num(r['tokens_per_s']):>9} {num(r['tflops']):>8} {pct(mfu):>6} "
              f"{num(r['peak_gib'] or None):>9} {num(r['compile_s']):>9} "
              f"{num(r['comm_bytes_per_device']['total'] / 2**20):>9}")
    for length in lengths:
        ok = {r["variant"]: r for r in rows if "error" not in r and r["seq_len"] == length}
        for base, ttt, what in (("base", "ttt", "TTT / base"), ("swa", "swa_ttt", "SWA+TTT / SWA")):
            if base in ok and ttt in ok:
                b, t = ok[base], ok[ttt]
                mem = f"{t['peak_gib'] / b['peak_gib']:.3f}x" if b["peak_gib"] else "n/a (no device memory stats)"
                print(f"T={length}: {what}: step time {t['step_s'] / b['step_s']:.3f}x, peak memory {mem}")
    if args.out:
        _write(rows, args.out)
        from ttt_jax.bench.plots import plot_model_sweep

        print(f"wrote {args.out} and {plot_model_sweep(rows, args.out.with_suffix('.png'))}")
    return rows


def _write(rows, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
