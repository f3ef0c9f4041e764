"""Context-parallel attention (ttt_jax.ops.attention_cp*) against the unsharded reference.

Values and gradients w.r.t. q, k, v on 2 / 4 / 8 emulated devices, contiguous and zigzag layouts,
GQA, segment ids whose documents span device boundaries (and reuse ids, and contain padding).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from ttt_jax.parallel import layout as L
from ttt_jax.parallel.mesh import make_mesh
from ttt_jax.ops import attention_cp as A
from ttt_jax.ops import attention_cp_ring as RING
from ttt_jax.ops import attention_cp_window as W
from ttt_jax.ops import attention_reference as R

pytestmark = pytest.mark.unit

B, T, H, KV, DH = 2, 32, 4, 2, 8


def _mesh(n, data=1):
    return make_mesh(data=data, context=n, devices=jax.devices()[: n * data])


def _inputs(seed, dtype=np.float32):
    """q, k, v, segment ids and an output cotangent (numpy: eager JAX ops would each compile)."""
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((B, T, H, DH)).astype(dtype)
    k = rng.standard_normal((B, T, KV, DH)).astype(dtype)
    v = rng.standard_normal((B, T, KV, DH)).astype(dtype)
    # Row 0: documents spanning device boundaries, trailing padding. Row 1: ids reused by separate
    # runs (same id = same document), padding in the middle.
    seg = np.array([[1] * 5 + [2] * 13 + [3] * 10 + [0] * 4,
                    [1] * 3 + [2] * 7 + [1] * 6 + [0] * 2 + [3] * 9 + [2] * 5], np.int32)
    ct = rng.standard_normal((B, T, H, DH)).astype(np.float32)
    return q, k, v, seg, ct


def _sharded(inner, n, layout, with_seg, data=1):
    """Global [B, T, ...] in sequence order -> the sharded function's output in sequence order."""
    spec = P("data" if data > 1 else None, "context")
    fn = jax.shard_map(inner, mesh=_mesh(n, data), in_specs=(spec, spec, spec, spec if with_seg else None),
                       out_specs=spec)
    to = (lambda x: L.to_zigzag(x, n)) if layout == "zigzag" else (lambda x: x)
    back = (lambda x: L.from_zigzag(x, n)) if layout == "zigzag" else (lambda x: x)

    def run(q, k, v, seg):
        return back(fn(to(q), to(k), to(v), None if seg is None else to(seg)))
    return run


def _vjp(fn, q, k, v, seg, ct):
    out, pullback = jax.vjp(lambda q, k, v: fn(q, k, v, seg), q, k, v)
    return out, pullback(ct.astype(out.dtype))


def _value_and_grads(fn, q, k, v, seg, ct):
    """Output and gradients w.r.t. (q, k, v) of ``<fn(q, k, v, seg), ct>``, one compile."""
    return jax.jit(lambda q, k, v, seg, ct: _vjp(fn, q, k, v, seg, ct))(q, k, v, seg, ct)


@jax.jit(static_argnames="window")
def _reference_value_and_grads(q, k, v, seg, ct, window=0):
    """The same for the unsharded reference (jitted once per window / segment-ids case)."""
    ref = lambda q, k, v, seg: R.attention_reference(q, k, v, segment_ids=seg, window=window)
    return _vjp(ref, q, k, v, seg, ct)


def _assert_close(got, want, tol):
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w, np.float32), rtol=tol, atol=tol)


@pytest.mark.parametrize("impl,layout,n,with_seg,block_size", [
    ("ring", "contiguous", 4, True, 4),   # key sub-blocks: 2 per K/V block
    ("ring", "contiguous", 2, False, None),
    ("ring", "zigzag", 4, True, 2),       # 4 per diagonal block, 2 per half block
    ("ring", "zigzag", 8, False, None),
    ("allgather", "contiguous", 4, True, None),
    ("allgather", "zigzag", 2, True, None),
])
def test_full_causal_matches_reference(impl, layout, n, with_seg, block_size):
    q, k, v, seg, ct = _inputs(n)
    seg = seg if with_seg else None
    inner = lambda q, k, v, s: A.context_attention(q, k, v, "context", segment_ids=s, impl=impl,
                                                   layout=layout, block_size=block_size)
    got = _value_and_grads(_sharded(inner, n, layout, with_seg), q, k, v, seg, ct)
    want = _reference_value_and_grads(q, k, v, seg, ct)
    _assert_close(got, want, 2e-5)
    if with_seg:  # padding queries output exactly zero
        assert np.all(np.asarray(got[0])[seg == 0] == 0)


def test_ring_on_data_x_context_mesh():
    """Batch over ``data`` and sequence over ``context`` on all 8 devices."""
    q, k, v, seg, ct = _inputs(0)
    inner = lambda q, k, v, s: RING.ring_attention(q, k, v, "context", segment_ids=s, layout="zigzag")
    got = _value_and_grads(_sharded(inner, 4, "zigzag", True, data=2), q, k, v, seg, ct)
    want = _reference_value_and_grads(q, k, v, seg, ct)
    _assert_close(got, want, 2e-5)


def test_ring_bf16_and_causality():
    n = 4
    q, k, v, seg, ct = _inputs(1)
    bf = lambda x: jnp.asarray(x, jnp.bfloat16)
    inner = lambda q, k, v, s: RING.ring_attention(q, k, v, "context", segment_ids=s)
    fn = _sharded(inner, n, "contiguous", True)
    got = _value_and_grads(fn, bf(q), bf(k), bf(v), seg, ct)
    assert got[0].dtype == jnp.bfloat16 and all(g.dtype == jnp.bfloat16 for g in got[1])
    want = _reference_value_and_grads(q, k, v, seg, ct)
    _assert_close(got, want, 6e-2)
    # Causality: perturbing token t changes no output before t.
    run = jax.jit(fn)
    base = np.asarray(run(q, k, v, None))
    t = 13
    k2, v2 = k.copy(), v.copy()
    k2[:, t] += 3.0
    v2[:, t] -= 3.0
    moved = np.asarray(run(q, k2, v2, None))
    np.testing.assert_array_equal(moved[:, :t], base[:, :t])
    assert np.abs(moved[:, t:] - base[:, t:]).max() > 1e-3


@pytest.mark.parametrize("n,window,with_seg,block_size", [
    (4, 5, True, None),
    (4, 9, False, 4),    # window - 1 == T_local: the whole left block is the halo; blocked queries
    (2, 1, True, None),  # window 1: no halo, each query sees itself only
])
def test_sliding_window_matches_reference(n, window, with_seg, block_size):
    q, k, v, seg, ct = _inputs(10 + window)
    seg = seg if with_seg else None
    inner = lambda q, k, v, s: W.sliding_window_attention(q, k, v, "context", window=window,
                                                          segment_ids=s, block_size=block_size)
    got = _value_and_grads(_sharded(inner, n, "contiguous", with_seg), q, k, v, seg, ct)
    want = _reference_value_and_grads(q, k, v, seg, ct, window=window)
    _assert_close(got, want, 2e-5)


def test_zigzag_layout():
    n = 4
    x = np.arange(T)[None, :, None]  # [1, T, 1] positions
    z = np.asarray(L.to_zigzag(x, n))
    seg = T // (2 * n)
    shards = z[0, :, 0].reshape(n, 2 * seg)
    for i in range(n):  # device i holds segments i and 2n-1-i
        want = np.concatenate([np.arange(i * seg, (i + 1) * seg),
                               np.arange((2 * n - 1 - i) * seg, (2 * n - i) * seg)])
        np.testing.assert_array_equal(shards[i], want)
    np.testing.assert_array_equal(np.asarray(L.from_zigzag(z, n)), x)
    # local_positions agrees with the permutation
    for layout, ref in (("zigzag", shards), ("contiguous", np.arange(T).reshape(n, -1))):
        fn = jax.shard_map(lambda: L.local_positions("context", T // n, layout)[None], mesh=_mesh(n),
                           in_specs=(), out_specs=P("context"))
        np.testing.assert_array_equal(np.asarray(fn()), ref)
    with pytest.raises(ValueError, match="divisible by 2 \\* n"):
        L.to_zigzag(np.zeros((1, 12)), 4)


def test_errors():
    q, k, v, seg, _ = _inputs(0)
    n = 4

    def call(inner):
        spec = P(None, "context")
        return jax.shard_map(inner, mesh=_mesh(n), in_specs=(spec, spec, spec), out_specs=spec)(q, k, v)

    with pytest.raises(ValueError, match="exceeds the 8 tokens per device"):
        call(lambda q, k, v: W.sliding_window_attention(q, k, v, "context", window=10))
    with pytest.raises(ValueError, match="even number of tokens"):
        call(lambda q, k, v: RING.ring_attention(q[:, :3], k[:, :3], v[:, :3], "context", layout="zigzag"))
    with pytest.raises(ValueError, match="multiple of kv heads"):
        call(lambda q, k, v: RING.ring_attention(q[:, :, :3], k, v, "context"))
    with pytest.raises(ValueError, match="impl"):
        call(lambda q, k, v: A.context_attention(q, k, v, "context", impl="flash"))
    with pytest.raises(ValueError, match="contiguous layout"):
        call(lambda q, k, v: A.context_attention(q, k, v, "context", window=4, layout="zigzag"))


@pytest.mark.gpu
def test_context_attention_on_gpus():
    """Every path on all local GPUs (NCCL collectives), fp32 tight and bf16 loose."""
    devices = [d for d in jax.devices() if d.platform == "gpu"]
    n = len(devices)
    mesh = make_mesh(data=1, context=n, devices=devices)
    rng = np.random.default_rng(0)
    b, t, h, kvh, dh = 2, 64 * n, 8, 2, 64
    q = rng.standard_normal((b, t, h, dh)).astype(np.float32)
    k = rng.standard_normal((b, t, kvh, dh)).astype(np.float32)
    v = rng.standard_normal((b, t, kvh, dh)).astype(np.float32)
    seg = np.repeat(rng.integers(0, 3, (b, t // 16)), 16, axis=1).astype(np.int32)
    ct = rng.standard_normal((b, t, h, dh)).astype(np.float32)
    spec = P(None, "context")
    cases = [("ring", "contiguous", 0), ("ring", "zigzag", 0), ("allgather", "contiguous", 0),
             ("ring", "contiguous", 33)]
    for impl, layout, window in cases:
        inner = lambda q, k, v, s: A.context_attention(q, k, v, "context", segment_ids=s, impl=impl,
                                                       layout=layout, window=window, block_size=32)
        fn = jax.shard_map(inner, mesh=mesh, in_specs=(spec,) * 4, out_specs=spec)
        to = (lambda x: L.to_zigzag(x, n)) if layout == "zigzag" else (lambda x: x)
        back = (lambda x: L.from_zigzag(x, n)) if layout == "zigzag" else (lambda x: x)
        sharded = lambda q, k, v, s: back(fn(to(q), to(k), to(v), to(s)))
        want = _reference_value_and_grads(q, k, v, seg, ct, window=window)
        got = _value_and_grads(sharded, q, k, v, seg, ct)
        _assert_close(got, want, 1e-4)
        bf = lambda x: jnp.asarray(x, jnp.bfloat16)
        got = _value_and_grads(sharded, bf(q), bf(k), bf(v), seg, ct)
        _assert_close(got, want, 1e-1)
