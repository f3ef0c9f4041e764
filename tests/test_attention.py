"""Attention: every implementation against the explicit masked-softmax reference (values and grads)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ttt_jax.ops.attention import attention, attention_mask, attention_reference

pytestmark = pytest.mark.unit

F32_TOL = dict(rtol=1e-5, atol=1e-5)
BF16_TOL = dict(rtol=3e-2, atol=3e-2)


def _inputs(b, t, h, kv, d, dtype, seed=0):
    kq, kk, kv_, kw = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(kq, (b, t, h, d), jnp.float32).astype(dtype)
    k = jax.random.normal(kk, (b, t, kv, d), jnp.float32).astype(dtype)
    v = jax.random.normal(kv_, (b, t, kv, d), jnp.float32).astype(dtype)
    w = jax.random.normal(kw, (b, t, h, d), jnp.float32)
    return q, k, v, w


def _segments(b, t, seed=1):
    """Rows with several documents and padding (id 0) at the start, middle and end."""
    rng = np.random.default_rng(seed)
    seg = np.zeros((b, t), np.int32)
    for i in range(b):
        cuts = np.sort(rng.choice(np.arange(1, t), size=min(3, t - 1), replace=False))
        bounds = [0, *cuts, t]
        for j in range(len(bounds) - 1):
            seg[i, bounds[j]:bounds[j + 1]] = j + 1
        seg[i, -2:] = 0                     # trailing padding
        if i % 2 == 1:
            seg[i, :1] = 0                  # leading padding
    return jnp.asarray(seg)


def _value_and_grads(impl, q, k, v, w, segment_ids=None, **kw):
    @jax.jit
    def run(q, k, v, w, segment_ids):
        def loss(q, k, v):
            out = attention(q, k, v, impl=impl, segment_ids=segment_ids, **kw)
            return jnp.sum(out.astype(jnp.float32) * w), out

        (_, out), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
        return out, grads

    return run(q, k, v, w, segment_ids)


def _compare(impl, b, t, h, kv, d, window, segmented, dtype, block_size=None):
    q, k, v, w = _inputs(b, t, h, kv, d, dtype)
    seg = _segments(b, t) if segmented else None
    kw = dict(segment_ids=seg, window=window)
    extra = {} if block_size is None else dict(block_size=block_size)
    out, grads = _value_and_grads(impl, q, k, v, w, **kw, **extra)
    # The oracle runs in fp32 on the same (possibly bf16-rounded) inputs.
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    ref_out, ref_grads = _value_and_grads("reference", *f32, w, **kw)
    tol = F32_TOL if dtype == jnp.float32 else BF16_TOL
    assert out.dtype == q.dtype and out.shape == q.shape
    assert bool(jnp.all(jnp.isfinite(out.astype(jnp.float32))))
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref_out), **tol)
    for name, g, rg in zip("qkv", grads, ref_grads):
        assert g.dtype == dtype, name
        scale = max(1.0, float(jnp.max(jnp.abs(rg))))
        np.testing.assert_allclose(np.asarray(g, np.float32) / scale, np.asarray(rg) / scale, **tol,
                                   err_msg=f"d{name}")
    if seg is not None:  # padding queries output exactly zero
        pad = np.asarray(seg) == 0
        assert np.all(np.asarray(out, np.float32)[pad] == 0)


# (b, t, h, kv, d, window, segmented)
# (b, t, h, kv, d, window, segmented, block_size): odd lengths, batch 1 and 3, GQA/MQA/MHA, windows
# shorter than, equal to and longer than a block, and a single block (block_size None = default).
XLA_CASES = [
    (1, 1, 2, 1, 8, 0, False, None),
    (3, 37, 4, 2, 16, 0, True, 8),
    (3, 37, 4, 4, 16, 5, True, 8),
    (1, 50, 6, 2, 8, 13, False, 8),
    (3, 29, 4, 1, 16, 8, True, 8),
    (3, 23, 2, 2, 8, 100, False, None),
    (3, 37, 4, 2, 16, 9, True, None),
]


@pytest.mark.parametrize("case", XLA_CASES)
def test_xla_matches_reference_fp32(case):
    *shape, block_size = case
    _compare("xla", *shape, jnp.float32, block_size=block_size)


@pytest.mark.parametrize("case", [XLA_CASES[2], XLA_CASES[3]])
def test_xla_matches_reference_bf16(case):
    *shape, block_size = case
    _compare("xla", *shape, jnp.bfloat16, block_size=block_size)


# The Pallas TPU splash kernel runs in interpret mode on CPU: slow, so a few representative cases.
PALLAS_CASES = [
    (3, 37, 4, 2, 16, 0, True),
    (1, 45, 4, 1, 16, 7, False),
]


@pytest.mark.parametrize("case", PALLAS_CASES)
def test_pallas_matches_reference_fp32(case):
    _compare("pallas", *case, jnp.float32)


def test_pallas_matches_reference_bf16():
    _compare("pallas", 2, 33, 4, 2, 16, 6, True, jnp.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("case", [(1, 37, 4, 2, 64, 0, False), (3, 64, 8, 2, 64, 0, True),
                                  (3, 37, 4, 4, 128, 5, True), (2, 128, 4, 1, 64, 17, False)])
def test_cudnn_matches_reference_bf16(case):
    _compare("cudnn", *case, jnp.bfloat16)


def test_cudnn_unavailable_raises_clear_error():
    if jax.default_backend() == "gpu":
        pytest.skip("cuDNN is available here")
    q, k, v, _ = _inputs(1, 8, 2, 1, 8, jnp.bfloat16)
    with pytest.raises(ValueError, match="cuDNN attention needs an NVIDIA GPU"):
        attention(q, k, v, impl="cudnn")


def test_auto_matches_reference():
    q, k, v, _ = _inputs(2, 19, 4, 2, 16, jnp.float32)
    seg = _segments(2, 19)
    out = jax.jit(lambda q, k, v, s: attention(q, k, v, segment_ids=s, window=6))(q, k, v, seg)
    ref = attention_reference(q, k, v, segment_ids=seg, window=6)
    np.testing.assert_allclose(out, ref, **F32_TOL)


@pytest.mark.parametrize("impl", ["reference", "xla", "pallas"])
def test_padding_is_isolated(impl):
    """Padding rows are finite zeros; padding tokens neither influence nor receive gradient."""
    b, t = 3, 24
    q, k, v, w = _inputs(b, t, 4, 2, 8, jnp.float32)
    seg = _segments(b, t)
    pad = np.asarray(seg) == 0
    kw = dict(window=0, **({"block_size": 8} if impl == "xla" else {}))
    out, grads = _value_and_grads(impl, q, k, v, w, segment_ids=seg, **kw)
    assert bool(jnp.all(jnp.isfinite(out)))
    assert np.all(np.asarray(out)[pad] == 0)
    # Garbage (even huge) values at padding positions change nothing elsewhere.
    junk = jnp.where(jnp.asarray(pad)[:, :, None, None], 1e4, 0.0)
    out2, _ = _value_and_grads(impl, q + junk, k + junk[:, :, :2], v - junk[:, :, :2], w,
                               segment_ids=seg, **kw)
    np.testing.assert_allclose(out2, out, rtol=0, atol=1e-6)
    for g in grads:
        assert bool(jnp.all(jnp.isfinite(g)))
        assert np.all(np.asarray(g)[pad] == 0)


def test_fully_padded_row():
    q, k, v, w = _inputs(2, 16, 2, 1, 8, jnp.float32)
    seg = jnp.zeros((2, 16), jnp.int32).at[1, 3:9].set(4)
    for impl in ("reference", "xla"):
        out, grads = _value_and_grads(impl, q, k, v, w, segment_ids=seg, window=0)
        assert np.all(np.asarray(out[0]) == 0)
        assert all(bool(jnp.all(jnp.isfinite(g))) for g in grads)


def test_causality_and_window():
    """Perturbing key/value at s changes only queries t >= s (and t < s + window)."""
    b, t, window = 1, 30, 7
    q, k, v, _ = _inputs(b, t, 2, 1, 8, jnp.float32)
    s = 11
    for impl in ("reference", "xla"):
        kw = dict(window=window, impl=impl, **({"block_size": 8} if impl == "xla" else {}))
        f = jax.jit(lambda q, k, v: attention(q, k, v, **kw))
        base = f(q, k, v)
        pert = f(q, k.at[:, s].add(1.0), v.at[:, s].add(1.0))
        changed = np.any(np.asarray(base != pert), axis=(0, 2, 3))
        expect = (np.arange(t) >= s) & (np.arange(t) < s + window)
        np.testing.assert_array_equal(changed, expect)


def test_attention_mask_semantics():
    idx = jnp.arange(6)
    seg = jnp.asarray([1, 1, 2, 2, 2, 0])
    m = np.asarray(attention_mask(idx, idx, window=2, q_segment_ids=seg, k_segment_ids=seg))
    expect = np.zeros((6, 6), bool)
    for qi in range(6):
        for ki in range(6):
            expect[qi, ki] = (ki <= qi and ki > qi - 2 and seg[qi] == seg[ki] and seg[qi] != 0)
    np.testing.assert_array_equal(m, expect)
    full = np.asarray(attention_mask(idx, idx))
    np.testing.assert_array_equal(full, np.tril(np.ones((6, 6), bool)))


def test_gqa_head_order_matches_repeat_kv():
    """Query head h uses kv head h // (H // KV) (Hugging Face repeat_kv order)."""
    q, k, v, _ = _inputs(2, 12, 6, 2, 8, jnp.float32)
    rep = lambda x: jnp.repeat(x, 3, axis=2)
    out = jax.jit(lambda q, k, v: attention(q, k, v, impl="xla"))(q, k, v)
    np.testing.assert_allclose(out, attention_reference(q, rep(k), rep(v)), **F32_TOL)
    np.testing.assert_allclose(attention_reference(q, k, v), attention_reference(q, rep(k), rep(v)),
                               **F32_TOL)


def test_scale_argument():
    q, k, v, _ = _inputs(1, 10, 2, 2, 8, jnp.float32)
    np.testing.assert_allclose(jax.jit(lambda q, k, v: attention(q, k, v, impl="xla", scale=0.3))(q, k, v),
                               attention_reference(q * (0.3 * np.sqrt(8)), k, v), **F32_TOL)


def _max_intermediate_size(jaxpr) -> int:
    best = 0
    for eqn in jaxpr.eqns:
        for var in eqn.outvars:
            shape = getattr(var.aval, "shape", ())
            best = max(best, int(np.prod(shape)) if shape else 1)
        for param in eqn.params.values():
            subs = param if isinstance(param, (list, tuple)) else [param]
            for sub in subs:
                if isinstance(sub, jax.extend.core.ClosedJaxpr):
                    best = max(best, _max_intermediate_size(sub.jaxpr))
                elif isinstance(sub, jax.extend.core.Jaxpr):
                    best = max(best, _max_intermediate_size(sub))
    return best


def test_xla_memory_is_blockwise():
    """Forward + backward of the xla path never builds a [.., T, T] array (structural check)."""
    b, t, h, d, blk = 1, 256, 2, 8, 32
    q, k, v, w = _inputs(b, t, h, 1, d, jnp.float32)
    seg = _segments(b, t)

    def loss(impl):
        return lambda q, k, v: jnp.sum(attention(q, k, v, segment_ids=seg, impl=impl, block_size=blk) * w)

    xla = _max_intermediate_size(jax.make_jaxpr(jax.grad(loss("xla"), argnums=(0, 1, 2)))(q, k, v).jaxpr)
    ref = _max_intermediate_size(jax.make_jaxpr(jax.grad(loss("reference"), argnums=(0, 1, 2)))(q, k, v).jaxpr)
    assert ref >= b * h * t * t
    assert xla <= b * h * t * blk


def test_bad_arguments():
    q, k, v, _ = _inputs(1, 8, 3, 2, 8, jnp.float32)
    with pytest.raises(ValueError, match="multiple of kv heads"):
        attention(q, k, v)
    q, k, v, _ = _inputs(1, 8, 4, 2, 8, jnp.float32)
    with pytest.raises(ValueError, match="impl"):
        attention(q, k, v, impl="splash")
    with pytest.raises(ValueError, match="segment_ids"):
        attention(q, k, v, segment_ids=jnp.ones((1, 7), jnp.int32))
    with pytest.raises(ValueError, match="window"):
        attention(q, k, v, window=-1)
    with pytest.raises(ValueError, match="k .* and v"):
        attention(q, k[:, :4], v)
