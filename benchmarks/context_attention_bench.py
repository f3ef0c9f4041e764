"""Op-level timing of context-parallel attention against single-device cuDNN (forward + backward).

For each sequence length ``T`` (global) it times, as ``jit(value_and_grad)`` of ``<attn(q,k,v), ct>``:

* ``cudnn_1dev``      -- ``ttt_jax.ops.attention.attention(impl="cudnn")`` on one device, whole ``T``
  (an error row where it does not fit; ``--skip-single`` to skip);
* ``flash_1dev``      -- the Pallas flash kernels of :mod:`ttt_jax.ops.kernels.flash` on one device (the ring's
  block kernel alone, to compare it with cuDNN);
* ``ring_<layout>_<kernel>`` -- :func:`ttt_jax.ops.attention_cp.context_attention` over ``n`` devices
  with each of ``--kernels`` (``fused``: cuDNN blocks in the ring where JAX's private cuDNN rules
  are as expected; ``pallas``: the Pallas blocks; ``xla``), contiguous and zigzag layouts;
* ``window_<W>``      -- sliding window ``W`` over ``n`` devices (halo + one cuDNN call per device)
  and on one device, when ``--window`` is given.

Reports milliseconds and TFLOP/s per device (causal attention FLOPs: forward ``2 B H T^2 Dh``,
backward 2.5x that; a window of ``W`` keys: ``T * W`` instead of ``T^2 / 2``). JSON goes to
``--out`` (default ``$OUT/context_attention.json`` when ``$OUT`` is set).

GPU::

    python benchmarks/context_attention_bench.py --seq-lens 32768 131072 --out $OUT/ctx_attn.json

CPU smoke test (4 emulated devices, tiny shapes, kernels in Pallas interpret mode, the XLA
attention standing in for cuDNN)::

    python benchmarks/context_attention_bench.py --smoke
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq-lens", type=int, nargs="+", default=[32768, 131072])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--devices", type=int, default=None, help="context devices (default: all)")
    p.add_argument("--kernels", nargs="+", default=["fused"], choices=["auto", "xla", "fused", "pallas"])
    p.add_argument("--layouts", nargs="+", default=["contiguous", "zigzag"])
    p.add_argument("--window", type=int, default=0, help="also time a sliding window of this size")
    p.add_argument("--skip-single", action="store_true", help="skip the one-device baselines")
    p.add_argument("--tiles", type=int, nargs=4, default=None, metavar=("FQ", "FK", "BQ", "BK"),
                   help="flash kernel tiles: forward queries x keys, backward queries x keys")
    p.add_argument("--launch", type=int, nargs=4, default=None, metavar=("FW", "FS", "BW", "BS"),
                   help="Triton num_warps / num_stages of the forward and backward kernels")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--smoke", action="store_true", help="CPU, tiny shapes, interpret mode")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    if args.smoke:
        args.seq_lens, args.heads, args.kv_heads, args.head_dim = [256], 2, 1, 16
        args.iters, args.warmup, args.window = 2, 1, 33
    if args.out is None and os.environ.get("OUT"):
        args.out = Path(os.environ["OUT"]) / "context_attention.json"
    return args


def _time(fn, *xs, iters, warmup):
    import jax
    compiled = jax.jit(fn).lower(*xs).compile()
    for _ in range(warmup):
        jax.block_until_ready(compiled(*xs))
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(*xs))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None):
    args = _parse(argv)
    if args.smoke:
        os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import functools

    import jax
    import jax.numpy as jnp
    from jax.sharding import PartitionSpec as P

    from ttt_jax.parallel.mesh import make_mesh
    from ttt_jax.ops import attention_cp as A
    from ttt_jax.ops import attention_cp_fused as FA
    from ttt_jax.ops import attention_cp_window as W
    from ttt_jax.ops.attention import attention, attention_reference
    from ttt_jax.ops.kernels import flash as F

    smoke = args.smoke
    if args.tiles:  # the kernels read their default tiles from these at call time
        F._FWD_BLOCKS, F._BWD_BLOCKS = tuple(args.tiles[:2]), tuple(args.tiles[2:])
    if args.launch:
        F._LAUNCH.update(fwd=tuple(args.launch[:2]), bwd=tuple(args.launch[2:]))
    devices = jax.devices()[: args.devices or len(jax.devices())]
    n = len(devices)
    mesh = make_mesh(data=1, context=n, devices=devices)
    dtype = jnp.float32 if smoke else jnp.bfloat16
    single_impl = "xla" if smoke else "cudnn"
    b, h, kvh, dh = args.batch, args.heads, args.kv_heads, args.head_dim
    rows = []

    def grad_of(attn):
        def loss(q, k, v, ct):
            return jnp.sum(attn(q, k, v).astype(jnp.float32) * ct)
        return jax.value_and_grad(loss, argnums=(0, 1, 2))

    def sharded(inner, layout):
        spec = P(None, "context")
        fn = jax.shard_map(inner, mesh=mesh, in_specs=(spec,) * 3, out_specs=spec,
                           check_vma=not smoke)  # Pallas's interpreter and vma checks (JAX 0.10)
        return fn  # inputs are already in the layout's order (the timing does not depend on it)

    def record(name, t, sec, ndev, window=0, kernel=None):
        attended = t * t / 2 if not window else t * min(window, t)
        flops = 3.5 * 4 * b * h * attended * dh  # fwd 4 B H (T^2/2) Dh; bwd 2.5x
        rows.append(dict(name=name, seq_len=t, devices=ndev, ms=sec * 1e3,
                         tflops_per_device=flops / sec / 1e12 / ndev, window=window,
                         batch=b, heads=h, kv_heads=kvh, head_dim=dh, kernel=kernel,
                         tiles=[*F._FWD_BLOCKS, *F._BWD_BLOCKS], launch=args.launch,
                         device=devices[0].device_kind))
        print(json.dumps(rows[-1]), flush=True)

    for t in args.seq_lens:
        key = jax.random.split(jax.random.key(0), 4)
        q = jax.random.normal(key[0], (b, t, h, dh), dtype)
        k = jax.random.normal(key[1], (b, t, kvh, dh), dtype)
        v = jax.random.normal(key[2], (b, t, kvh, dh), dtype)
        ct = jax.random.normal(key[3], (b, t, h, dh), jnp.float32)
        timed = functools.partial(_time, iters=args.iters, warmup=args.warmup)
        if not args.skip_single:
            one = jax.device_put((q, k, v, ct), devices[0])
            for name, fn in ((f"{single_impl}_1dev", lambda q, k, v: attention(q, k, v, impl=single_impl)),
                             ("flash_1dev", lambda q, k, v: F.flash_attention(q, k, v, True, None, smoke))):
                try:
                    record(name, t, timed(grad_of(fn), *one), 1)
                except Exception as e:  # e.g. out of memory at long T
                    rows.append(dict(name=name, seq_len=t, error=str(e).splitlines()[0][:300]))
                    print(json.dumps(rows[-1]), flush=True)
        # Inputs placed in their sharding once, so the timed calls move no data between devices.
        spread = jax.device_put((q, k, v, ct), jax.sharding.NamedSharding(mesh, P(None, "context")))
        for layout in args.layouts:
            for kernel in args.kernels:
                if smoke:
                    inner = lambda q, k, v, layout=layout: FA.ring_flash_attention(
                        q, k, v, "context", layout=layout, scale=dh ** -0.5, interpret=True)
                else:
                    inner = lambda q, k, v, layout=layout, kernel=kernel: A.context_attention(
                        q, k, v, "context", layout=layout, kernel=kernel)
                try:
                    record(f"ring_{layout}_{kernel}", t, timed(grad_of(sharded(inner, layout)), *spread),
                           n, kernel=kernel)
                except Exception as e:  # e.g. out of memory at long T
                    rows.append(dict(name=f"ring_{layout}_{kernel}", seq_len=t,
                                     error=str(e).splitlines()[0][:300]))
                    print(json.dumps(rows[-1]), flush=True)
        if args.window:
            w = args.window
            if smoke:
                local = functools.partial(attention_reference, window=w)
                inner = lambda q, k, v: W.halo_window_attention(q, k, v, "context", window=w,
                                                                 local_attention=local)
            else:
                inner = lambda q, k, v: A.context_attention(q, k, v, "context", window=w,
                                                            kernel=args.kernels[0])
            record(f"window_{w}", t, timed(grad_of(sharded(inner, "contiguous")), *spread), n, w,
                   kernel=args.kernels[0])
            if not args.skip_single:
                fn = lambda q, k, v: attention(q, k, v, window=w, impl=single_impl)
                record(f"window_{w}_{single_impl}_1dev", t, timed(grad_of(fn), *one), 1, w)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()
