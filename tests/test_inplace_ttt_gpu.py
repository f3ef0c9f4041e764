"""The In-Place TTT op on an NVIDIA GPU: the fast paths against the linear-attention oracle, in values
and gradients, at sizes where the GPU's own kernels (cuBLAS matmuls, XLA's fused loops) are used.

Marked ``gpu``: skipped without a GPU; run with ``TTT_TEST_GPU=1 python -m pytest -m gpu``. The CPU
suite (tests/test_inplace_ttt.py) covers the same semantics at small sizes.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ttt_jax.ops import inplace_ttt
from ttt_jax.ops import inplace_ttt_reference as ref

pytestmark = [pytest.mark.unit, pytest.mark.gpu]

B, T, F, D, C = 2, 4096, 512, 256, 256


def _segments():
    rng = np.random.default_rng(0)
    rows = []
    for _ in range(B):
        row, sid = [], 1
        while len(row) < T:
            row += [sid] * int(rng.integers(100, 1500))   # documents start mid-chunk
            sid += 1
        rows.append(row[:T])
    return jnp.asarray(rows, jnp.int32)


def _vg(fn, cot):
    @jax.jit
    def run(*args):
        out, vjp = jax.vjp(fn, *args)
        return out, vjp(cot.astype(out.dtype))
    return run


@pytest.mark.parametrize("impl", ["scan", "associative", "pallas", "auto"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("packed", [False, True], ids=["rows", "packed"])
def test_gpu_values_and_grads_match_oracle(impl, dtype, packed):
    assert jax.devices()[0].platform == "gpu"
    k = jax.random.split(jax.random.key(0), 4)
    z = jax.random.normal(k[0], (B, T, F)).astype(dtype)
    v = (0.05 * jax.random.normal(k[1], (B, T, D))).astype(dtype)
    w0 = (0.05 * jax.random.normal(k[2], (F, D))).astype(dtype)
    cot = jax.random.normal(k[3], (B, T, D))
    seg = _segments() if packed else None
    lr = 0.01

    def oracle(z, v, w0):
        f = lambda x: x.astype(jnp.float32)
        return ref.linear_attention(f(z), f(v), f(w0), lr=lr, chunk_size=C, segment_ids=seg)

    def fast(z, v, w0):
        return inplace_ttt(z, v, w0, lr=lr, chunk_size=C, segment_ids=seg, impl=impl)

    # fp32 matmuls in full precision (GPUs default to TF32 for fp32 dots).
    with jax.default_matmul_precision("highest"):
        out, g_fast = _vg(fast, cot)(z, v, w0)
        want, g_want = _vg(oracle, cot)(z, v, w0)
    out, want = np.asarray(out, np.float32), np.asarray(want, np.float32)
    rel = (lambda a, b: np.linalg.norm(a - b) / np.linalg.norm(b))
    tol = 1e-5 if dtype == jnp.float32 else 2e-2
    assert rel(out, want) < tol
    for name, a, b in zip(("z", "v", "w0"), g_fast, g_want):
        assert rel(np.asarray(a, np.float32), np.asarray(b, np.float32)) < tol * 2, name


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["fp32", "bf16"])
def test_gpu_pallas_state_odd_length_matches_scan(dtype):
    """The compiled kernel with packed documents, a length that is not a multiple of the chunk,
    ``initial_state`` and ``return_state``: values, final state and every gradient against the scan
    (itself tested against the oracle above)."""
    t = T - 77
    k = jax.random.split(jax.random.key(3), 6)
    z = jax.random.normal(k[0], (B, t, F)).astype(dtype)
    v = (0.05 * jax.random.normal(k[1], (B, t, D))).astype(dtype)
    w0 = (0.05 * jax.random.normal(k[2], (F, D))).astype(dtype)
    s0 = 0.01 * jax.random.normal(k[3], (B, F, D))
    cots = (jax.random.normal(k[4], (B, t, D)).astype(dtype), jax.random.normal(k[5], (B, F, D)))
    seg = _segments()[:, :t]

    def run(impl):
        fn = lambda z, v, w0, s0: inplace_ttt(z, v, w0, lr=0.01, chunk_size=C, segment_ids=seg, impl=impl,
                                              initial_state=s0, return_state=True)

        @jax.jit
        def vg(*args):
            out, vjp = jax.vjp(fn, *args)
            return out, vjp(cots)
        with jax.default_matmul_precision("highest"):
            return jax.tree.map(lambda x: np.asarray(x, np.float32), vg(z, v, w0, s0))

    (out, st), grads = run("pallas")
    (want, st_want), gwant = run("scan")
    rel = (lambda a, b: np.linalg.norm(a - b) / np.linalg.norm(b))
    tol = 1e-5 if dtype == jnp.float32 else 1e-2
    assert rel(out, want) < tol and rel(st, st_want) < tol
    for name, a, b in zip(("z", "v", "w0", "s0"), grads, gwant):
        assert rel(a, b) < 10 * tol, name


def test_gpu_auto_is_scan():
    k = jax.random.split(jax.random.key(1), 3)
    z = jax.random.normal(k[0], (1, T, F), jnp.bfloat16)
    v = jax.random.normal(k[1], (1, T, D), jnp.bfloat16)
    w0 = jax.random.normal(k[2], (F, D), jnp.bfloat16)
    run = lambda impl: np.asarray(jax.jit(lambda z, v, w0: inplace_ttt(
        z, v, w0, lr=0.01, chunk_size=C, impl=impl))(z, v, w0), np.float32)
    np.testing.assert_array_equal(run("auto"), run("scan"))


@pytest.mark.skipif(len(jax.devices()) < 2, reason="needs at least 2 local devices")
@pytest.mark.parametrize("impl", ["fused", "correction"])
@pytest.mark.parametrize("packed", [False, True], ids=["rows", "packed"])
def test_gpu_context_parallel_op_matches_oracle(impl, packed):
    """The context-parallel op on every local GPU (bf16, contiguous layout) against the fp32
    linear-attention oracle of the whole sequence, values and gradients."""
    from jax.sharding import PartitionSpec as P

    from ttt_jax.parallel.mesh import make_mesh
    from ttt_jax.ops.inplace_ttt_cp import inplace_ttt_sharded

    n = len(jax.devices())
    if T % (n * C):
        pytest.skip(f"T = {T} is not a multiple of {n} x {C}")
    k = jax.random.split(jax.random.key(2), 4)
    z = jax.random.normal(k[0], (B, T, F)).astype(jnp.bfloat16)
    v = (0.05 * jax.random.normal(k[1], (B, T, D))).astype(jnp.bfloat16)
    w0 = (0.05 * jax.random.normal(k[2], (F, D))).astype(jnp.bfloat16)
    cot = jax.random.normal(k[3], (B, T, D))
    seg = _segments() if packed else None
    lr = 0.01
    mesh = make_mesh(data=1, context=n)
    spec = P(None, "context")

    def local(z, v, w0, s):
        return inplace_ttt_sharded(z, v, w0, lr=lr, chunk_size=C, axis_name="context", segment_ids=s,
                                   impl=impl)

    sharded = jax.shard_map(local, mesh=mesh, in_specs=(spec, spec, P(), spec if packed else None),
                            out_specs=spec)

    def oracle(z, v, w0):
        f = lambda x: x.astype(jnp.float32)
        return ref.linear_attention(f(z), f(v), f(w0), lr=lr, chunk_size=C, segment_ids=seg)

    with jax.default_matmul_precision("highest"):
        out, g_fast = _vg(lambda z, v, w0: sharded(z, v, w0, seg), cot)(z, v, w0)
        want, g_want = _vg(oracle, cot)(z, v, w0)
    rel = (lambda a, b: np.linalg.norm(np.asarray(a, np.float32) - np.asarray(b, np.float32))
           / np.linalg.norm(np.asarray(b, np.float32)))
    assert rel(out, want) < 2e-2
    for name, a, b in zip(("z", "v", "w0"), g_fast, g_want):
        assert rel(a, b) < 4e-2, name
