"""Memory that a rematerialised layer keeps alive until its backward pass, per layer kind.

Compiles (does not run) ``grad`` of a stack of ``L`` layers, each wrapped in ``jax.checkpoint``,
for ``L = 2`` and ``L = 4`` and prints XLA's temporary memory and the per-layer increment. With
working rematerialisation the increment is about one ``[T, D]`` activation; anything above it is
held across layers (e.g. residuals a ``custom_vjp`` forces to be saved).

Kinds: ``plain`` (SwiGLU MLP), ``op`` (the MLP with the In-Place TTT down-projection, target = h;
``op_assoc`` / ``op_ref`` with the associative / reference implementations),
``target`` (plain MLP plus the In-Place TTT target conv/projection), ``ttt`` (both).

    python benchmarks/remat_probe.py --seq-len 32768 --d-model 2560 --d-ff 9728
"""

import argparse
import sys
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ttt_jax.ops import inplace_ttt, inplace_ttt_target  # noqa: E402
from ttt_jax.ops.precision import matmul_f32_out  # noqa: E402


PREVENT_CSE = True
SCAN_LAYERS = False
REMAT = "jax"


def remat_tied(fn):
    """A remat whose recomputation is data-dependent on the incoming cotangent (the barrier holds
    both), so XLA cannot schedule a layer's recomputation before its backward pass. Measured on an
    H100: no change in memory held per layer (benchmarks/README.md), so the model does not use it."""

    @jax.custom_vjp
    def wrapped(*args):
        return fn(*args)

    def bwd(args, g):
        args, g = jax.lax.optimization_barrier((args, g))
        return jax.vjp(fn, *args)[1](g)

    wrapped.defvjp(lambda *args: (fn(*args), args), bwd)
    return wrapped


def checkpoint(fn):
    """The layer wrapper under test: ``jax.checkpoint`` or the model's cotangent-tied remat."""
    if REMAT == "tied":
        return remat_tied(fn)
    return jax.checkpoint(fn, prevent_cse=PREVENT_CSE)


def temp_gib(kind, layers, t, d, f, chunk):
    bf = jnp.bfloat16

    def layer(h, p):
        wg, wu, wd, conv, proj = p
        # fp32 results whose backward matmuls stay bf16, as in the model (ttt_jax.ops.precision).
        g = matmul_f32_out("btd,df->btf", h, wg)
        u = matmul_f32_out("btd,df->btf", h, wu)
        z = (jax.nn.silu(g) * u).astype(bf)
        v = inplace_ttt_target(h, conv, proj, chunk_size=chunk) if kind in ("target", "ttt") else h
        if kind in ("op", "ttt", "op_assoc", "op_ref"):
            impl = {"op_assoc": "associative", "op_ref": "reference"}.get(kind, "scan")
            out = inplace_ttt(z, v, wd, lr=3.0, chunk_size=chunk, impl=impl)
        else:
            out = jnp.einsum("btf,fd->btd", z, wd)  # bf16 operands forward and backward
            if kind == "target":
                out = out + v
        return h + out

    shapes = [(d, f), (d, f), (f, d), (5, d), (d, d)]
    if SCAN_LAYERS:  # layers as iterations of one lax.scan over stacked parameters
        def loss(h, ps):
            body = checkpoint(lambda h, p: (layer(h, p), None))
            h, _ = jax.lax.scan(body, h, ps)
            return jnp.sum(h.astype(jnp.float32))

        ps = tuple(jax.ShapeDtypeStruct((layers,) + s, bf) for s in shapes)
    else:
        def loss(h, ps):
            for p in ps:
                h = checkpoint(layer)(h, p)
            return jnp.sum(h.astype(jnp.float32))

        ps = [tuple(jax.ShapeDtypeStruct(s, bf) for s in shapes) for _ in range(layers)]
    c = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(jax.ShapeDtypeStruct((1, t, d), bf), ps).compile()
    return c.memory_analysis().temp_size_in_bytes / 2 ** 30


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--seq-len", type=int, default=8192)
    p.add_argument("--d-model", type=int, default=1024)
    p.add_argument("--d-ff", type=int, default=4096)
    p.add_argument("--chunk", type=int, default=1024)
    p.add_argument("--kinds", nargs="+", default=["plain", "op", "target", "ttt"])
    p.add_argument("--no-prevent-cse", action="store_true")
    p.add_argument("--scan-layers", action="store_true", help="run the layers in a lax.scan")
    p.add_argument("--remat", choices=["jax", "tied"], default="jax",
                   help="jax.checkpoint, or remat_tied (recompute only after the cotangent arrives)")
    a = p.parse_args(argv)
    global PREVENT_CSE, SCAN_LAYERS, REMAT
    REMAT = a.remat
    PREVENT_CSE = not a.no_prevent_cse
    SCAN_LAYERS = a.scan_layers
    act = a.seq_len * a.d_model * 2 / 2 ** 30
    print(f"device {jax.devices()[0].device_kind}; remat {REMAT}; one [T, D] bf16 activation = {act:.3f} GiB")
    for kind in a.kinds:
        t2 = temp_gib(kind, 2, a.seq_len, a.d_model, a.d_ff, a.chunk)
        t4 = temp_gib(kind, 4, a.seq_len, a.d_model, a.d_ff, a.chunk)
        print(f"{kind:>8}: L=2 {t2:7.3f} GiB  L=4 {t4:7.3f} GiB  per layer {(t4 - t2) / 2:7.3f} GiB", flush=True)


if __name__ == "__main__":
    main()
