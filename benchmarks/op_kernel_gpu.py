"""The In-Place TTT op on one GPU, in one process: the honest bf16 dense layer, the XLA scan, the
fused Pallas kernel, and the official PyTorch scheme as an anchor.

At ``D x F`` (default 2560 x 9728), batch 1, bf16, for every ``T`` x chunk it times forward +
backward of each row (median of ``--iters`` after ``--warmup`` calls). Every JAX row is one jitted
call returning the forward output beside the gradients w.r.t. all inputs for a random cotangent, so
neither pass can be dropped (tested in tests/test_honest_baselines.py). Rows:

* ``plain``: ``z @ w0`` in bf16 (bf16 operands forward and backward, fp32 accumulation); its
  lowered program is checked once for exactly three matmuls, none with an fp32 operand.
* ``scan``: ``inplace_ttt(impl="scan")``.
* ``pallas``: ``inplace_ttt(impl="pallas")`` (``KernelConfig.apply="prologue"``: the state enters
  the Pallas matmuls' prologue); ``pallas_epilogue``: the same kernel with ``apply="epilogue"``
  (the update kernel also writes the bf16 weight, the applies are XLA matmuls). Their outputs and
  gradients are compared with the scan's of the same inputs (relative error at bf16 tolerance;
  ``match`` in the row).
* ``torch_plain``, ``torch_official``: PyTorch, autograd, bf16: the dense layer, and the official
  scheme of ByteDance-Seed/In-Place-TTT (``hf_models/hf_qwen3/modeling_qwen3.py``, ``Qwen3MLP``):
  per-chunk deltas ``v_i^T z_i`` for all chunks but the last, ``lr``-scaled and concatenated after
  ``W0``, a cumulative sum over chunks giving every chunk's weight, one batched matmul. Run before
  the JAX rows (JAX's allocator keeps what it grows into).

Each row reports ms, the ratio to the JAX ``plain`` row of the same shape, TFLOP/s on the useful
FLOPs (plain 6TDF, TTT 14TDF) and memory: ``temp_gib`` (XLA's temporaries: what the op needs beyond
its inputs and outputs) and ``extra_gib`` over ``plain``; for torch rows the allocator's peak above
the inputs, outputs and gradients. One JSON line per row on stdout; all rows to ``--out``.

``--check``: a quick correctness run (small and full-width shapes: packed documents, odd ``T``,
``initial_state``/``return_state``, the kernel against the scan and the fp32 oracle); exit 1 on a
failure. ``--sweep``: the kernel's tile configurations at one shape.

Usage (repository root)::

    PYTHONPATH=$PWD python benchmarks/op_kernel_gpu.py --check --out $OUT/check.json
    PYTHONPATH=$PWD python benchmarks/op_kernel_gpu.py --out $OUT/op_kernel.json
"""

from __future__ import annotations

import os

# JAX and PyTorch share the GPU: JAX must not take 75% of it up front.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from ttt_jax.bench import op as op_bench  # noqa: E402
from ttt_jax.ops import inplace_ttt  # noqa: E402
from ttt_jax.ops import inplace_ttt_pallas as kernel  # noqa: E402
from ttt_jax.ops import inplace_ttt_reference as ref  # noqa: E402
from ttt_jax.ops.inplace_ttt_layout import chunk_layout, pad_to_chunks, unchunk  # noqa: E402

GIB = 2 ** 30
LR = 0.01


def _emit(row: dict, rows: list) -> None:
    rows.append(row)
    print(json.dumps(row), flush=True)


@jax.jit
def _rel_device(a, b):
    a, b = a.astype(jnp.float32), b.astype(jnp.float32)   # fused into the reductions: no fp32 copies
    return jnp.sqrt(jnp.sum(jnp.square(a - b))) / jnp.maximum(jnp.sqrt(jnp.sum(jnp.square(b))), 1e-30)


def _rel(a, b) -> float:
    """Relative L2 error, reduced on the device in fp32."""
    return float(_rel_device(jnp.asarray(a), jnp.asarray(b)))


def _time(fn, args, warmup: int, iters: int):
    result = None
    for _ in range(warmup):
        result = jax.block_until_ready(fn(*args))
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        result = jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times, result


def _pallas_with(cfg):
    """``inplace_ttt(impl="pallas")`` for one unsegmented document, with the kernel config ``cfg``."""
    def fn(z, v, w0, *, lr, chunk_size):
        b, t, f = z.shape
        lay = chunk_layout(b, t, chunk_size)
        s0 = jnp.zeros((b, f, v.shape[-1]), jnp.float32)
        out, _ = kernel.pallas_chunks(pad_to_chunks(z, chunk_size), pad_to_chunks(v, chunk_size), w0, lay.use,
                                      lay.upd, lay.a, s0, lr, False, cfg)
        return unchunk(out, t)
    return fn


def _jax_row(name, fn, args, t, c, d, f, warmup, iters):
    """Compile, time and measure one JAX row; returns (row, result)."""
    def run(z, v, w0, cot):
        if name == "plain":
            out, vjp = jax.vjp(lambda z, w0: fn(z, v, w0, lr=LR, chunk_size=c), z, w0)
        else:
            out, vjp = jax.vjp(lambda z, v, w0: fn(z, v, w0, lr=LR, chunk_size=c), z, v, w0)
        return out, vjp(cot.astype(out.dtype))

    jitted = jax.jit(run)
    t0 = time.perf_counter()
    compiled = jitted.lower(*args).compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    sec, times, result = _time(compiled, args, warmup, iters)
    flops = (6 if name == "plain" else 14) * t * d * f
    row = dict(impl=name, T=t, chunk=c, ms=sec * 1e3, ms_all=[x * 1e3 for x in times],
               tflops=flops / sec / 1e12, compile_s=compile_s,
               temp_gib=None if mem is None else mem.temp_size_in_bytes / GIB)
    return row, result


# ---------------------------------------------------------------------------------------------
# PyTorch anchor
# ---------------------------------------------------------------------------------------------


def _torch_rows(t, c, d, f, warmup, iters):
    import torch

    dev = torch.device("cuda")
    bf = torch.bfloat16
    gen = torch.Generator(device=dev).manual_seed(0)
    z = torch.randn(1, t, f, device=dev, dtype=bf, generator=gen).requires_grad_()
    v = (0.05 * torch.randn(1, t, d, device=dev, generator=gen)).to(bf).requires_grad_()
    w = (0.02 * torch.randn(d, f, device=dev, generator=gen)).to(bf).requires_grad_()   # nn.Linear [out, in]
    cot = torch.randn(1, t, d, device=dev, dtype=bf, generator=gen)

    def plain():
        return torch.nn.functional.linear(z, w)

    def official():
        # Qwen3MLP.forward of the official code, TTT branch, from the gated activation ``h`` (= z)
        # and the already convolved and projected target ``t`` (= v).
        bs, n = 1, t // c
        h = z.reshape(bs, n, c, f)
        tt = v.reshape(bs, n, c, d)
        d_down = torch.einsum("btch,btcd->btdh", h[:, :-1], tt[:, :-1])
        d_down = torch.cat([w.unsqueeze(0).unsqueeze(0).expand(bs, 1, d, f), d_down * LR], dim=1)
        d_sum = d_down.cumsum(dim=1)
        out = torch.einsum("btdh,btch->btcd", d_sum, h)
        return out.reshape(bs, n * c, d)

    rows = []
    for name, fn, flops in (("torch_plain", plain, 6 * t * d * f), ("torch_official", official, 14 * t * d * f)):
        row = dict(impl=name, T=t, chunk=c)
        try:
            def step():
                for p in (z, v, w):
                    p.grad = None
                out = fn()
                out.backward(cot)
                return out

            for _ in range(warmup):
                step()
            for p in (z, v, w):   # the base: inputs and cotangent only
                p.grad = None
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            times = []
            for _ in range(iters):
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                out = step()
                torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
            peak = torch.cuda.max_memory_allocated()
            kept = sum(x.numel() * x.element_size() for x in (out, z.grad, v.grad, w.grad) if x is not None)
            sec = statistics.median(times)
            row.update(ms=sec * 1e3, ms_all=[x * 1e3 for x in times], tflops=flops / sec / 1e12,
                       peak_above_inputs_gib=(peak - base) / GIB,
                       extra_gib=max(peak - base - kept, 0) / GIB)
            del out
        except Exception as e:  # OOM or an unsupported op: recorded, not hidden
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
        for p in (z, v, w):
            p.grad = None
        torch.cuda.empty_cache()
        rows.append(row)
    del z, v, w, cot
    torch.cuda.empty_cache()
    return rows


# ---------------------------------------------------------------------------------------------
# Modes
# ---------------------------------------------------------------------------------------------


def _inputs(t, d, f, dtype=jnp.bfloat16, seed=0):
    k = jax.random.split(jax.random.key(seed), 4)
    z = jax.random.normal(k[0], (1, t, f), dtype)
    v = (0.05 * jax.random.normal(k[1], (1, t, d))).astype(dtype)
    w0 = (0.02 * jax.random.normal(k[2], (f, d))).astype(dtype)
    cot = jax.random.normal(k[3], (1, t, d), dtype)
    return z, v, w0, cot


def bench(args) -> list:
    rows, start = [], time.perf_counter()
    d, f = args.d_model, args.d_ff
    dev = jax.devices()[0]
    _emit(dict(kind="device", device=dev.device_kind, platform=dev.platform, jax=jax.__version__,
               kernel_config=dataclasses.asdict(kernel.DEFAULT_CONFIG)), rows)
    shapes = [(t, c) for t in args.lengths for c in args.chunks if t % c == 0]
    if not args.no_torch:
        for t, c in shapes:
            try:
                for row in _torch_rows(t, c, d, f, args.warmup, args.iters):
                    _emit(row, rows)
            except Exception as e:
                _emit(dict(impl="torch", T=t, chunk=c, error=f"{type(e).__name__}: {e}"[:300]), rows)
    checked = False
    for t, c in shapes:
        if time.perf_counter() - start > args.budget_s:
            _emit(dict(T=t, chunk=c, skipped=f"time budget {args.budget_s} s spent"), rows)
            continue
        z, v, w0, cot = _inputs(t, d, f)
        if not checked:
            try:
                _emit(dict(kind="plain_check", T=t, **op_bench.check_plain_row(z, v, w0, cot)), rows)
            except AssertionError as e:
                _emit(dict(kind="plain_check", T=t, error=str(e)[:500]), rows)
            checked = True
        base, scan_result = None, None
        for name in args.impls:
            fn = {"plain": op_bench.plain,
                  "pallas_epilogue": _pallas_with(dataclasses.replace(kernel.DEFAULT_CONFIG, apply="epilogue")),
                  }.get(name) or (
                lambda z, v, w0, lr, chunk_size, _i=name: inplace_ttt(z, v, w0, lr=lr, chunk_size=chunk_size,
                                                                      impl=_i))
            try:
                row, result = _jax_row(name, fn, (z, v, w0, cot), t, c, d, f, args.warmup, args.iters)
            except Exception as e:
                _emit(dict(impl=name, T=t, chunk=c, error=f"{type(e).__name__}: {str(e)[:400]}"), rows)
                traceback.print_exc()
                continue
            if name == "plain":
                base = row
            if base is not None:
                row["ratio"] = row["ms"] / base["ms"]
                if row["temp_gib"] is not None and base["temp_gib"] is not None:
                    row["extra_gib"] = row["temp_gib"] - base["temp_gib"]
            if name == "scan":
                scan_result = result
            elif name.startswith("pallas") and scan_result is not None:
                errs = {"out": _rel(result[0], scan_result[0])}
                errs.update({f"d{k}": _rel(a, b) for k, a, b in zip(("z", "v", "w0"), result[1], scan_result[1])})
                row["rel_err_vs_scan"] = errs
                row["match"] = all(e < 2e-2 for e in errs.values())
            _emit(row, rows)
            del result
        for r in rows:   # torch rows: ratio to this shape's JAX plain row
            if base is not None and r.get("T") == t and r.get("chunk") == c and r.get("impl", "").startswith(
                    "torch") and "ms" in r:
                r["ratio"] = r["ms"] / base["ms"]
        del z, v, w0, cot, scan_result
    summary = [dict((k, r.get(k)) for k in ("impl", "T", "chunk", "ms", "ratio", "extra_gib", "match", "error"))
               for r in rows if "impl" in r]
    print("SUMMARY " + json.dumps(summary), flush=True)
    return rows


def sweep(args) -> list:
    """The kernel's tile configurations at the first length and chunk (one document, bf16); prints
    the fastest."""
    rows = []
    t, c, d, f = args.lengths[0], args.chunks[0], args.d_model, args.d_ff
    z, v, w0, cot = _inputs(t, d, f)
    base, _ = _jax_row("plain", op_bench.plain, (z, v, w0, cot), t, c, d, f, args.warmup, args.iters)
    _emit(base, rows)
    kc = kernel.KernelConfig
    cfgs = [kernel.DEFAULT_CONFIG,
            kc(mm_m=64, mm_n=128, mm_k=64, mm_warps=4),
            kc(mm_m=128, mm_n=256, mm_k=32),
            kc(mm_k=64, up_k=64, mm_stages=3, up_stages=3),
            kc(apply="epilogue"),
            kc(apply="epilogue", up_f=64, up_d=128, up_k=64, up_warps=4),
            kc(apply="epilogue", up_f=128, up_d=256, up_k=32, up_stages=4),
            kc(apply="epilogue", up_k=64, up_stages=2)]
    for cfg in cfgs:
        try:
            row, _ = _jax_row("pallas", _pallas_with(cfg), (z, v, w0, cot), t, c, d, f, args.warmup, args.iters)
            row.update(ratio=row["ms"] / base["ms"], config=dataclasses.asdict(cfg))
        except Exception as e:
            row = dict(impl="pallas", config=dataclasses.asdict(cfg), error=f"{type(e).__name__}: {str(e)[:300]}")
        _emit(row, rows)
    ok = [r for r in rows[1:] if "ms" in r]
    if ok:
        best = min(ok, key=lambda r: r["ms"])
        print("BEST " + json.dumps(dict(ms=best["ms"], ratio=best["ratio"], config=best["config"])), flush=True)
    return rows


def check(args) -> list:
    """Correctness of the compiled kernel: against the fp32 oracle at small width, against the scan
    at full width."""
    rows = []

    def record(name, errs, tol):
        ok = all(e < tol for e in errs.values())
        _emit(dict(kind="check", name=name, ok=ok, tol=tol, rel_err=errs), rows)

    def vg(fn, args_, cots):
        @jax.jit
        def run(*a):
            out, vjp = jax.vjp(fn, *a)
            return out, vjp(cots)
        return run(*args_)

    b, t, f, d, c = (2, 45, 32, 16, 16) if args.tiny else (2, 4096 - 77, 512, 256, 256)
    rng = np.random.default_rng(0)
    seg = []
    for _ in range(b):
        row, sid = [], 1
        while len(row) < t:
            row += [sid] * int(rng.integers(max(2, c // 4), (2 if args.tiny else 6) * c))
            sid += 1
        seg.append(row[:t])
    seg = jnp.asarray(seg, jnp.int32)
    for dtype, tol in ((jnp.float32, 1e-4), (jnp.bfloat16, 2e-2)):
        k = jax.random.split(jax.random.key(1), 6)
        z = jax.random.normal(k[0], (b, t, f)).astype(dtype)
        v = (0.05 * jax.random.normal(k[1], (b, t, d))).astype(dtype)
        w0 = (0.05 * jax.random.normal(k[2], (f, d))).astype(dtype)
        s0 = 0.01 * jax.random.normal(k[3], (b, f, d))
        cot = jax.random.normal(k[4], (b, t, d)).astype(dtype)
        cot_s = jax.random.normal(k[5], (b, f, d))
        name = jnp.dtype(dtype).name
        for packed in (False, True):
            sg = seg if packed else None
            try:
                with jax.default_matmul_precision("highest"):
                    out, g = vg(lambda z, v, w0: inplace_ttt(z, v, w0, lr=LR, chunk_size=c, segment_ids=sg,
                                                             impl="pallas"), (z, v, w0), cot)
                    f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
                    want, gw = vg(lambda z, v, w0: ref.linear_attention(f32(z), f32(v), f32(w0), lr=LR, chunk_size=c,
                                                                        segment_ids=sg), (z, v, w0), cot.astype(jnp.float32))
                errs = {"out": _rel(out, want), **{f"d{n}": _rel(x, y) for n, x, y in zip("zvw", g, gw)}}
                record(f"oracle_{name}_{'packed' if packed else 'rows'}_oddT", errs, tol)
            except Exception as e:
                _emit(dict(kind="check", name=f"oracle_{name}_{packed}", ok=False, error=f"{type(e).__name__}: {e}"[:600]),
                      rows)
                traceback.print_exc()
        try:
            def with_state(impl):
                fn = lambda z, v, w0, s0: inplace_ttt(z, v, w0, lr=LR, chunk_size=c, segment_ids=seg, impl=impl,  # noqa: E731
                                                      initial_state=s0, return_state=True)
                with jax.default_matmul_precision("highest"):
                    return vg(fn, (z, v, w0, s0), (cot, cot_s))
            (o1, s1), g1 = with_state("pallas")
            (o2, s2), g2 = with_state("scan")
            errs = {"out": _rel(o1, o2), "state": _rel(s1, s2), **{f"d{n}": _rel(x, y) for n, x, y in zip(
                ("z", "v", "w", "s0"), g1, g2)}}
            record(f"state_vs_scan_{name}_packed_oddT", errs, tol)
        except Exception as e:
            _emit(dict(kind="check", name=f"state_vs_scan_{name}", ok=False, error=f"{type(e).__name__}: {e}"[:600]),
                  rows)
            traceback.print_exc()
    # Full width, bf16, the benchmark's layout: kernel against scan.
    t, c = (64, 16) if args.tiny else (8192, 1024)
    z, v, w0, cot = _inputs(t, args.d_model, args.d_ff)
    try:
        outs = {}
        for impl in ("scan", "pallas"):
            outs[impl] = vg(lambda z, v, w0, _i=impl: inplace_ttt(z, v, w0, lr=LR, chunk_size=c, impl=_i),
                            (z, v, w0), cot)
        (o1, g1), (o2, g2) = outs["pallas"], outs["scan"]
        errs = {"out": _rel(o1, o2), **{f"d{n}": _rel(x, y) for n, x, y in zip(("z", "v", "w0"), g1, g2)}}
        record(f"full_width_bf16_T{t}_C{c}_vs_scan", errs, 2e-2)
    except Exception as e:
        _emit(dict(kind="check", name="full_width", ok=False, error=f"{type(e).__name__}: {e}"[:600]), rows)
        traceback.print_exc()
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=None, help="JSON file for all rows")
    p.add_argument("--check", action="store_true", help="quick correctness run (exit 1 on a failure)")
    p.add_argument("--sweep", action="store_true", help="kernel tile configurations at the first T and chunk")
    p.add_argument("--lengths", type=int, nargs="+", default=[32768, 131072])
    p.add_argument("--chunks", type=int, nargs="+", default=[1024, 4096])
    p.add_argument("--impls", nargs="+", default=["plain", "scan", "pallas", "pallas_epilogue"])
    p.add_argument("--d-model", type=int, default=2560)
    p.add_argument("--d-ff", type=int, default=9728)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--no-torch", action="store_true", help="leave out the PyTorch anchor rows")
    p.add_argument("--tiny", action="store_true", help="--check at toy sizes (a CPU smoke run of this script)")
    p.add_argument("--budget-s", type=float, default=330.0,
                   help="skip the remaining JAX shapes once this many seconds have passed")
    args = p.parse_args(argv)
    if args.check:
        rows = check(args)
        failed = [r for r in rows if not r.get("ok", True)]
    elif args.sweep:
        rows, failed = sweep(args), []
    else:
        rows, failed = bench(args), []
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(dict(argv=sys.argv[1:], rows=rows), indent=1))
        print(f"wrote {args.out}", flush=True)
    if args.check:
        print(f"CHECK {'FAILED: ' + ', '.join(r['name'] for r in failed) if failed else 'PASSED'}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
