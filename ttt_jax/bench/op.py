"""Op-level benchmark of In-Place TTT against the plain down-projection (forward + backward).

For each sequence length ``T`` and chunk size it times one jitted call that returns the forward
output *and* its VJP w.r.t. every input (``z``, ``v``, ``w0`` for TTT; ``z``, ``w0`` for the plain
projection) for a random cotangent, so the compiler can drop neither pass, and reports

* median time (ms) and the ratio to the plain down-projection ``z @ w0`` measured in the same run,
* achieved TFLOP/s on the *useful* FLOPs (plain 6TDF; TTT 14TDF: forward 4TDF, backward 10TDF
  with recomputation) and the fraction of the measured bf16 matmul peak,
* compiled temporary memory (XLA's memory analysis) and the extra over the plain projection.

The ``plain`` row is a bf16 dense layer as mixed-precision training runs it: bf16 operands in the
forward *and* both backward matmuls, fp32 accumulation inside the matmul (the dot returns bf16; an
fp32-result dot followed by a cast would hand autodiff an fp32 cotangent and fp32 backward
matmuls). :func:`check_plain_row` verifies this on the lowered program (three matmuls, none with
an fp32 operand).

Rows: every ``inplace_ttt`` impl plus two comparison schemes re-expressed in JAX:
``naive_scan`` (``lax.scan`` carrying the fast weight, plain autodiff) and ``official_cumsum``
(the official PyTorch scheme: materialise every chunk's weight as a cumulative sum, then a batched
matmul).

Usage::

    ttt-jax bench op --lengths 4096 32768 131072 --chunks 1024 --out results.json
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp

from ttt_jax.bench.fmt import num, pct
from ttt_jax.bench.hlo_dots import dots, f32_operand_dots
from ttt_jax.ops import inplace_ttt
from ttt_jax.ops.inplace_ttt import IMPLS
from ttt_jax.ops.precision import matmul_f32_out
from ttt_jax.paths import ensure_writable_file

# The rows a run can ask for: every inplace_ttt impl and the comparison schemes above.
ROWS = ("plain", "naive_scan", "official_cumsum") + IMPLS


def naive_scan(z, v, w0, *, lr, chunk_size):
    """``lax.scan`` carrying ``W`` with plain autodiff (stores every chunk's state)."""
    b, t, f = z.shape
    n = t // chunk_size
    zc = z.reshape(b, n, chunk_size, f).swapaxes(0, 1)
    vc = v.reshape(b, n, chunk_size, -1).swapaxes(0, 1)

    def step(w, xs):
        zi, vi = xs
        out = jnp.einsum("bcf,bfd->bcd", zi, w.astype(zi.dtype))
        w = w + lr * matmul_f32_out("bcf,bcd->bfd", zi, vi)
        return w, out

    w = jnp.broadcast_to(w0.astype(jnp.float32), (b,) + w0.shape)
    _, out = jax.lax.scan(step, w, (zc, vc))
    return out.swapaxes(0, 1).reshape(b, t, -1)


def official_cumsum(z, v, w0, *, lr, chunk_size):
    """The official scheme: per-chunk deltas, exclusive cumsum -> one weight per chunk, bmm."""
    b, t, f = z.shape
    n = t // chunk_size
    zc = z.reshape(b, n, chunk_size, f)
    vc = v.reshape(b, n, chunk_size, -1)
    dw = matmul_f32_out("bncf,bncd->bnfd", zc, vc)
    s = jnp.cumsum(dw, axis=1) - dw
    w = (w0.astype(jnp.float32) + lr * s).astype(z.dtype)
    return jnp.einsum("bncf,bnfd->bncd", zc, w).reshape(b, t, -1)


def plain(z, v, w0, **_):
    """The dense layer ``z @ w0`` in the operands' dtype (fp32 accumulation inside the matmul)."""
    del v
    return jnp.einsum("btf,fd->btd", z, w0.astype(z.dtype))


def make_fn(name):
    if name == "plain":
        return plain
    if name == "naive_scan":
        return naive_scan
    if name == "official_cumsum":
        return official_cumsum
    return lambda z, v, w0, lr, chunk_size: inplace_ttt(z, v, w0, lr=lr, chunk_size=chunk_size, impl=name)


def fwd_bwd(name, lr, chunk_size):
    """Jitted ``(z, v, w0, cot) -> (out, grads)``: the forward output beside its VJP for ``cot``,
    so that neither pass can be dropped (grads w.r.t. ``z, w0`` for ``plain``, else ``z, v, w0``)."""
    fn = make_fn(name)

    def run(z, v, w0, cot):
        if name == "plain":
            out, vjp = jax.vjp(lambda z, w0: fn(z, v, w0, lr=lr, chunk_size=chunk_size), z, w0)
        else:
            out, vjp = jax.vjp(lambda z, v, w0: fn(z, v, w0, lr=lr, chunk_size=chunk_size), z, v, w0)
        return out, vjp(cot.astype(out.dtype))

    return jax.jit(run)


def check_plain_row(z, v, w0, cot) -> dict:
    """Lower the plain row and read its matmuls: a fwd+bwd dense layer has exactly three, and in a
    low-precision run none takes an fp32 operand. Returns ``{"dots", "f32_operand_dots"}``; raises
    ``AssertionError`` when either check fails."""
    text = fwd_bwd("plain", 0.0, 1).lower(z, v, w0, cot).as_text()
    found, bad = dots(text), f32_operand_dots(text)
    assert len(found) == 3, f"plain row lowers to {len(found)} matmuls, not 3: {found}"
    if z.dtype != jnp.float32:
        assert not bad, f"plain row has fp32-operand matmuls: {bad}"
    return {"dots": len(found), "f32_operand_dots": len(bad)}


def time_fn(fn, args, iters):
    out = fn(*args)
    jax.block_until_ready(out)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def matmul_peak(dtype=jnp.bfloat16, n=8192, iters=10):
    """Measured dense matmul rate (TFLOP/s) on this device."""
    k = jax.random.split(jax.random.key(0), 2)
    a = jax.random.normal(k[0], (n, n), dtype)
    b = jax.random.normal(k[1], (n, n), dtype)
    f = jax.jit(lambda a, b: a @ b)
    return 2 * n ** 3 / time_fn(f, (a, b), iters) / 1e12


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="+", default=[4096, 32768, 131072])
    p.add_argument("--chunks", type=int, nargs="+", default=[1024])
    p.add_argument("--impls", nargs="+",
                   default=["plain", "scan", "associative", "naive_scan", "official_cumsum"])
    p.add_argument("--d-model", type=int, default=2560)
    p.add_argument("--d-ff", type=int, default=9728)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--lr", type=float, default=3.0)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    dtype = check_args(args)
    if args.out:
        ensure_writable_file(args.out, "--out")

    dev = jax.devices()[0]
    peak = matmul_peak(dtype) if dev.platform == "gpu" else matmul_peak(dtype, n=1024, iters=2)
    print(f"device: {dev.device_kind} ({dev.platform}); measured {args.dtype} matmul peak "
          f"{num(peak, ' TFLOP/s')}", flush=True)
    d, f, b = args.d_model, args.d_ff, args.batch
    rows, plain_check = [], None
    for t in args.lengths:
        for c in args.chunks:
            if t % c:
                continue
            k = jax.random.split(jax.random.key(t + c), 4)
            z = jax.random.normal(k[0], (b, t, f), dtype)
            v = (0.01 * jax.random.normal(k[1], (b, t, d))).astype(dtype)
            w0 = (0.02 * jax.random.normal(k[2], (f, d))).astype(dtype)
            cot = jax.random.normal(k[3], (b, t, d), dtype)
            base_ms = None
            if plain_check is None and "plain" in args.impls:
                plain_check = check_plain_row(z, v, w0, cot)
                print(f"plain row: {plain_check['dots']} matmuls, {plain_check['f32_operand_dots']} with an fp32 "
                      "operand (lowered HLO)", flush=True)
            for name in args.impls:
                row = dict(T=t, chunk=c, impl=name, B=b, D=d, F=f, device=dev.device_kind)
                try:
                    fn = fwd_bwd(name, args.lr, c)
                    compiled = fn.lower(z, v, w0, cot).compile()
                    mem = compiled.memory_analysis()
                    row["temp_gib"] = mem.temp_size_in_bytes / 2 ** 30 if mem is not None else None
                    sec = time_fn(fn, (z, v, w0, cot), args.iters)
                    flops = (6 if name == "plain" else 14) * b * t * d * f
                    row.update(ms=sec * 1e3, tflops=flops / sec / 1e12)
                    row["frac_peak"] = row["tflops"] / peak if peak > 0 else None
                    if name == "plain":
                        base_ms, base_temp = row["ms"], row["temp_gib"]
                    if base_ms is not None:
                        row["ratio"] = row["ms"] / base_ms
                        if row["temp_gib"] is not None and base_temp is not None:
                            row["extra_gib"] = row["temp_gib"] - base_temp
                except Exception as e:  # OOM or unsupported: recorded, not hidden
                    row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
                rows.append(row)
                _print_row(row)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        result = dict(peak_tflops=peak, device=dev.device_kind, plain_check=plain_check, rows=rows)
        args.out.write_text(json.dumps(result, indent=1))
        from ttt_jax.bench.plots import plot_op

        print(f"wrote {args.out} and {plot_op(result, args.out.with_suffix('.png'))}")
    return rows


def check_args(args) -> "jnp.dtype":
    """Reject arguments no benchmark can run with (``ValueError``, one line); returns the dtype."""
    for name in ("lengths", "chunks"):
        bad = [x for x in getattr(args, name) if x < 1]
        if bad:
            raise ValueError(f"--{name} {bad[0]}: expected integers >= 1")
    for name in ("d_model", "d_ff", "batch", "iters"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} {getattr(args, name)}: expected an integer >= 1")
    unknown = [x for x in args.impls if x not in ROWS]
    if unknown:
        raise ValueError(f"--impls {unknown[0]!r}: expected some of {', '.join(ROWS)}")
    if not any(t % c == 0 for t in args.lengths for c in args.chunks):
        raise ValueError(f"no --lengths {args.lengths} is a multiple of a --chunks {args.chunks}: "
                         "nothing to run")
    try:
        dtype = jnp.dtype(args.dtype)
    except TypeError:
        raise ValueError(f"--dtype {args.dtype!r}: not a dtype (e.g. bfloat16, float32)") from None
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"--dtype {args.dtype!r}: expected a floating dtype (e.g. bfloat16, float32)")
    return dtype


def _print_row(r):
    if "error" in r:
        print(f"T={r['T']:>7} C={r['chunk']:>5} {r['impl']:>16}  ERROR {r['error']}", flush=True)
        return
    ratio = f"{r['ratio']:.2f}x" if "ratio" in r else "-"
    extra = f"{r['extra_gib']:+.2f}" if r.get("extra_gib") is not None else "-"
    print(f"T={r['T']:>7} C={r['chunk']:>5} {r['impl']:>16} {num(r['ms']):>9} ms  ratio {ratio:>6}  "
          f"{num(r['tflops'], ' TF/s'):>11} ({pct(r['frac_peak'])} peak)  temp {num(r['temp_gib'])} GiB "
          f"extra {extra} GiB", flush=True)


if __name__ == "__main__":
    main()
