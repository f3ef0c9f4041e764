"""The In-Place TTT op: every impl against the oracles, in values and gradients.

Oracle: ``impl="attention"`` (per-token block-causal linear attention, form 3 of DESIGN.md), which
shares no code with the chunk recursion. ``impl="reference"`` (form 1) is checked against it too, and
is the oracle for update clipping, which form 3 cannot express.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ttt_jax.ops import inplace_ttt, inplace_ttt_target
from ttt_jax.ops import inplace_ttt_reference as ref

pytestmark = pytest.mark.unit

FAST_IMPLS = ["reference", "associative", "scan", "auto"]
F, D, C = 12, 6, 8


def _segments(batch: int, length: int, kind: str):
    """Packed-document ids: None, or rows with documents starting mid-chunk and trailing padding."""
    if kind == "none":
        return None
    rng = np.random.default_rng(length * 7 + batch)
    rows = []
    for _ in range(batch):
        row, sid = [], 1
        while len(row) < length:
            n = int(rng.integers(1, 2 * C + 3))
            row += [sid] * n
            sid += 1
        row = np.array(row[:length])
        row[length - length // 6:] = 0  # trailing padding
        rows.append(row)
    return jnp.asarray(np.stack(rows), jnp.int32)


def _normal(seed, shape, dtype=jnp.float32, scale=1.0):
    # numpy draws: jax.random would compile a sampling program per shape (most of a small case's
    # time outside the op itself).
    return jnp.asarray(scale * np.random.default_rng(seed).standard_normal(shape), jnp.float32).astype(dtype)


def _inputs(batch, length, dtype, seed=0):
    z = _normal((seed, 0), (batch, length, F), dtype)
    v = _normal((seed, 1), (batch, length, D), dtype)
    w0 = _normal((seed, 2), (F, D), dtype, scale=0.3)
    return z, v, w0


def _tol(dtype):
    return dict(atol=2e-4, rtol=2e-4) if dtype == jnp.float32 else dict(atol=0.15, rtol=0.05)


def _value_and_grads(fn, cot):
    """One compiled call: ``fn``'s output and the gradients of ``sum(out * cot)`` w.r.t. its inputs."""
    @jax.jit
    def run(*args):
        out, vjp = jax.vjp(fn, *args)
        return out, vjp(cot.astype(out.dtype))
    return run


SHAPES = [(1, 37), (3, 37), (3, 5), (1, 32), (3, 24)]   # T not a multiple of C, T < C, T multiple


@pytest.mark.parametrize("impl", ["reference", "associative", "scan"])  # "auto" is "scan": see below
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("segs", ["none", "packed"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"B{s[0]}T{s[1]}")
def test_values_and_grads_match_oracle(impl, dtype, segs, shape):
    batch, length = shape
    z, v, w0 = _inputs(batch, length, dtype)
    seg = _segments(batch, length, segs)
    lr = 0.3
    cot = _normal(9, (batch, length, D))

    def oracle(z, v, w0):
        # Oracle always in fp32 from the (possibly rounded) inputs.
        f = lambda x: x.astype(jnp.float32)
        return ref.linear_attention(f(z), f(v), f(w0), lr=lr, chunk_size=C, segment_ids=seg)

    def fast(z, v, w0):
        return inplace_ttt(z, v, w0, lr=lr, chunk_size=C, segment_ids=seg, impl=impl)

    out, g_fast = _value_and_grads(fast, cot)(z, v, w0)
    assert out.shape == (batch, length, D) and out.dtype == dtype
    want, g_want = _value_and_grads(oracle, cot)(z, v, w0)
    valid = np.ones((batch, length), bool) if seg is None else np.asarray(seg) != 0
    np.testing.assert_allclose(np.asarray(out, np.float32)[valid], np.asarray(want)[valid], **_tol(dtype))
    scale = 1.0 if dtype == jnp.float32 else 4.0
    for name, a, b in zip("z v w0".split(), g_fast, g_want):
        a = np.asarray(a, np.float32)
        b = np.asarray(b, np.float32)
        tol = _tol(dtype)
        np.testing.assert_allclose(a, b, atol=tol["atol"] * scale * max(1.0, np.abs(b).max() / 10),
                                   rtol=tol["rtol"] * scale, err_msg=f"grad {name}")


@pytest.mark.parametrize("impl", ["associative", "scan"])
@pytest.mark.parametrize("segs", ["none", "packed"])
def test_clipping_matches_reference(impl, segs):
    z, v, w0 = _inputs(3, 37, jnp.float32, seed=1)
    seg = _segments(3, 37, segs)
    kw = dict(lr=0.5, chunk_size=C, segment_ids=seg, clip_tau=2.0)
    unclipped = inplace_ttt(z, v, w0, lr=0.5, chunk_size=C, segment_ids=seg, impl="reference")
    want = inplace_ttt(z, v, w0, impl="reference", **kw)
    got = inplace_ttt(z, v, w0, impl=impl, **kw)
    assert float(jnp.abs(want - unclipped).max()) > 1e-2, "tau too large: clipping is not exercised"
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
    f = lambda impl: jax.jit(jax.grad(
        lambda z, v, w0: jnp.sum(jnp.sin(inplace_ttt(z, v, w0, impl=impl, **kw))), argnums=(0, 1, 2)))(z, v, w0)
    for a, b in zip(f(impl), f("reference")):
        assert np.isfinite(np.asarray(a)).all()
        np.testing.assert_allclose(a, b, atol=2e-4, rtol=2e-4)


def test_reference_forms_agree_and_updates_matter():
    """Form 1 equals form 3, and the fast-weight term is not negligible (the test can fail)."""
    z, v, w0 = _inputs(2, 40, jnp.float32)
    a = ref.sequential(z, v, w0, lr=0.3, chunk_size=C)
    b = ref.linear_attention(z, v, w0, lr=0.3, chunk_size=C)
    np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)
    plain = z @ w0
    np.testing.assert_allclose(a[:, :C], plain[:, :C], atol=1e-5)   # first chunk sees W0 only
    assert float(jnp.abs(a[:, C:] - plain[:, C:]).max()) > 0.1


def test_explicit_formula_small():
    """Chunk i uses W0 + lr * sum_{j<i} z_j^T v_j, checked with explicit numpy loops."""
    z, v, w0 = (np.asarray(x, np.float64) for x in _inputs(1, 20, jnp.float32, seed=3))
    lr, c = 0.7, 6
    want = np.zeros((1, 20, D))
    for t in range(20):
        i = t // c
        w = w0 + lr * sum(np.outer(z[0, s], v[0, s]) for s in range(i * c))
        want[0, t] = z[0, t] @ w
    got = inplace_ttt(*(jnp.asarray(x, jnp.float32) for x in (z, v, w0)), lr=lr, chunk_size=c, impl="scan")
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("impl", FAST_IMPLS)
@pytest.mark.parametrize("segs", ["none", "packed"])
def test_causality(impl, segs):
    """Perturbing token t changes no output at positions < t (z, v and the target source)."""
    length = 37
    z, v, w0 = _inputs(1, length, jnp.float32)
    seg = _segments(1, length, segs)
    base = inplace_ttt(z, v, w0, lr=0.3, chunk_size=C, segment_ids=seg, impl=impl)
    for t in (3, 8, 17, 30):
        z2 = z.at[:, t].add(5.0)
        v2 = v.at[:, t].add(5.0)
        out = inplace_ttt(z2, v2, w0, lr=0.3, chunk_size=C, segment_ids=seg, impl=impl)
        np.testing.assert_array_equal(np.asarray(out[:, :t]), np.asarray(base[:, :t]))
        assert not np.allclose(out[:, t], base[:, t])


def test_target_causality_respects_chunks():
    """The target conv looks 2 tokens ahead *within* a chunk, so perturbing the source at t can change
    v only in t's chunk, and the op's output only in later chunks: never at any position < t."""
    k = jax.random.split(jax.random.key(4), 5)
    length, d = 37, D
    src = jax.random.normal(k[0], (1, length, d))
    conv = jax.random.normal(k[1], (5, d))
    proj = jax.random.normal(k[2], (d, d))
    z = jax.random.normal(k[3], (1, length, F))
    w0 = jax.random.normal(k[4], (F, d))

    def run(src):
        v = inplace_ttt_target(src, conv, proj, chunk_size=C)
        return v, inplace_ttt(z, v, w0, lr=0.3, chunk_size=C)

    v0, out0 = run(src)
    for t in (1, 7, 8, 20):
        v1, out1 = run(src.at[:, t].add(3.0))
        chunk_start = (t // C) * C
        np.testing.assert_array_equal(np.asarray(v1[:, :chunk_start]), np.asarray(v0[:, :chunk_start]))
        next_chunk = min(length, chunk_start + C)
        np.testing.assert_array_equal(np.asarray(out1[:, :next_chunk]), np.asarray(out0[:, :next_chunk]))


@pytest.mark.parametrize("segs", ["none", "packed"])
@pytest.mark.parametrize("kernel", [1, 3, 5])
def test_target_matches_reference_values_and_grads(segs, kernel):
    k = jax.random.split(jax.random.key(5), 3)
    t = jax.random.normal(k[0], (3, 37, D))
    conv = jax.random.normal(k[1], (kernel, D))
    proj = jax.random.normal(k[2], (D, D))
    seg = _segments(3, 37, segs)
    got = inplace_ttt_target(t, conv, proj, chunk_size=C, segment_ids=seg)
    want = ref.target_reference(t, conv, proj, chunk_size=C, segment_ids=seg)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    cot = jax.random.normal(jax.random.key(6), t.shape)
    ga = jax.grad(lambda *a: jnp.sum(inplace_ttt_target(*a, chunk_size=C, segment_ids=seg) * cot),
                  argnums=(0, 1, 2))(t, conv, proj)
    gb = jax.grad(lambda *a: jnp.sum(ref.target_reference(*a, chunk_size=C, segment_ids=seg) * cot),
                  argnums=(0, 1, 2))(t, conv, proj)
    for a, b in zip(ga, gb):
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)


def test_target_tap_convention():
    """Tap j multiplies t[c + j - (K-1)//2]: a one-hot kernel is a shift, zero across chunk edges."""
    t = jnp.arange(1, 17, dtype=jnp.float32).reshape(1, 16, 1)
    eye = jnp.ones((1, 1))
    for j, shift in zip(range(5), (-2, -1, 0, 1, 2)):
        conv = jnp.zeros((5, 1)).at[j, 0].set(1.0)
        v = inplace_ttt_target(t, conv, eye, chunk_size=8)[0, :, 0]
        for c in range(16):
            src = c + shift
            want = t[0, src, 0] if 0 <= src < 16 and src // 8 == c // 8 else 0.0
            assert float(v[c]) == float(want), (j, c)


@pytest.mark.parametrize("impl", FAST_IMPLS + ["attention"])
def test_packed_equals_separate(impl):
    """Documents starting at multiples of the chunk size: packed == run alone, values and grads."""
    k = jax.random.split(jax.random.key(7), 4)
    lens = [2 * C, C + 3, 5]                       # padded to chunk multiples inside the row
    starts = [0, 2 * C, 4 * C]
    length = 5 * C
    z = jax.random.normal(k[0], (1, length, F))
    t = jax.random.normal(k[1], (1, length, D))
    conv = jax.random.normal(k[2], (5, D))
    w0 = jax.random.normal(k[3], (F, D))
    proj = jnp.eye(D)
    seg = np.zeros((1, length), np.int32)
    for i, (s, n) in enumerate(zip(starts, lens)):
        seg[0, s:s + n] = i + 1
    seg = jnp.asarray(seg)

    def packed(z, t):
        v = inplace_ttt_target(t, conv, proj, chunk_size=C, segment_ids=seg)
        return inplace_ttt(z, v, w0, lr=0.3, chunk_size=C, segment_ids=seg, impl=impl)

    out = packed(z, t)
    for s, n in zip(starts, lens):
        zs, ts = z[:, s:s + n], t[:, s:s + n]
        v = inplace_ttt_target(ts, conv, proj, chunk_size=C)
        alone = inplace_ttt(zs, v, w0, lr=0.3, chunk_size=C, impl=impl)
        np.testing.assert_allclose(out[:, s:s + n], alone, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("impl", FAST_IMPLS)
def test_no_cross_document_influence_unaligned(impl):
    """Unaligned packing: perturbing one document changes no output of another."""
    length = 40
    z, v_src, w0 = _inputs(1, length, jnp.float32)
    conv = jax.random.normal(jax.random.key(8), (5, D))
    seg = jnp.asarray([[1] * 11 + [2] * 19 + [3] * 10], jnp.int32)

    def run(z, t):
        v = inplace_ttt_target(t, conv, jnp.eye(D), chunk_size=C, segment_ids=seg)
        return inplace_ttt(z, v, w0, lr=0.3, chunk_size=C, segment_ids=seg, impl=impl)

    base = run(z, v_src)
    doc2 = np.asarray(seg[0]) == 2
    pert = run(z.at[:, doc2].add(1.0), v_src.at[:, doc2].add(1.0))
    others = ~doc2
    np.testing.assert_array_equal(np.asarray(pert[0, others]), np.asarray(base[0, others]))
    assert not np.allclose(pert[0, doc2], base[0, doc2])


def test_padding_never_affects_real_tokens():
    z, v, w0 = _inputs(1, 21, jnp.float32)
    seg = jnp.asarray([[1] * 15 + [0] * 6], jnp.int32)
    base = inplace_ttt(z, v, w0, lr=0.3, chunk_size=C, segment_ids=seg)
    noisy = inplace_ttt(z.at[:, 15:].set(100.0), v.at[:, 15:].set(-100.0), w0, lr=0.3, chunk_size=C,
                        segment_ids=seg)
    np.testing.assert_array_equal(np.asarray(base[:, :15]), np.asarray(noisy[:, :15]))


def test_jit_and_lr_zero_is_plain_projection():
    z, v, w0 = _inputs(2, 30, jnp.float32)
    out = jax.jit(lambda z, v, w0: inplace_ttt(z, v, w0, lr=0.0, chunk_size=C))(z, v, w0)
    np.testing.assert_allclose(out, z @ w0, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("bad, match", [
    (dict(chunk_size=0), "chunk_size"),
    (dict(chunk_size=2.5), "chunk_size"),
    (dict(impl="fastest"), "impl"),
    (dict(clip_tau=-1.0), "clip_tau"),
    (dict(impl="attention", clip_tau=1.0), "clipping"),
])
def test_argument_errors(bad, match):
    z, v, w0 = _inputs(1, 10, jnp.float32)
    kw = dict(lr=0.1, chunk_size=4) | bad
    with pytest.raises(ValueError, match=match):
        inplace_ttt(z, v, w0, **kw)


def test_shape_errors():
    z, v, w0 = _inputs(1, 10, jnp.float32)
    with pytest.raises(ValueError, match="w0"):
        inplace_ttt(z, v, w0.T, lr=0.1, chunk_size=4)
    with pytest.raises(ValueError, match="v must be"):
        inplace_ttt(z, v[:, :5], w0, lr=0.1, chunk_size=4)
    with pytest.raises(ValueError, match="segment_ids"):
        inplace_ttt(z, v, w0, lr=0.1, chunk_size=4, segment_ids=jnp.ones((1, 9), jnp.int32))
    with pytest.raises(ValueError, match="segment_ids"):
        inplace_ttt(z, v, w0, lr=0.1, chunk_size=4, segment_ids=jnp.ones((1, 10), jnp.float32))
    with pytest.raises(ValueError, match="proj"):
        inplace_ttt_target(v, jnp.zeros((5, D)), jnp.zeros((D, D + 1)), chunk_size=4)
    with pytest.raises(ValueError, match="odd"):
        inplace_ttt_target(v, jnp.zeros((4, D)), jnp.zeros((D, D)), chunk_size=4)


@pytest.mark.slow
def test_scan_memory_does_not_grow_with_chunks():
    """The custom VJP keeps only inputs as residuals: no per-chunk [F, D] state is saved."""
    z, v, w0 = _inputs(1, 64, jnp.float32)
    for impl, expect_lean in (("scan", True), ("associative", False)):
        _, vjp = jax.vjp(lambda z, v, w0: inplace_ttt(z, v, w0, lr=0.3, chunk_size=4, impl=impl), z, v, w0)
        res = [x for x in jax.tree_util.tree_leaves(vjp) if hasattr(x, "shape")]
        per_chunk_states = [x for x in res if x.ndim >= 4 and x.shape[-2:] == (F, D)]
        assert (not per_chunk_states) == expect_lean, (impl, [x.shape for x in per_chunk_states])


def test_all_impls_jit_compile_with_grads():
    z, v, w0 = _inputs(3, 19, jnp.bfloat16)
    for impl in itertools.chain(FAST_IMPLS, ["attention"]):
        g = jax.jit(jax.grad(lambda z: jnp.sum(
            inplace_ttt(z, v, w0, lr=0.3, chunk_size=4, impl=impl).astype(jnp.float32))))(z)
        assert g.dtype == jnp.bfloat16 and np.isfinite(np.asarray(g, np.float32)).all()


@pytest.mark.parametrize("impl", ["reference", "associative", "scan"])
@pytest.mark.parametrize("segs", ["none", "packed"])
def test_state_carry_splits_sequence(impl, segs):
    """Running [0, s) with return_state, then [s, T) from that state == running [0, T) at once
    (s a multiple of the chunk size), in values and in gradients through the carried state."""
    length, split = 40, 24
    z, v, w0 = _inputs(2, length, jnp.float32, seed=11)
    seg = _segments(2, length, segs)
    kw = dict(lr=0.3, chunk_size=C, impl=impl)

    def whole(z, v, w0):
        return inplace_ttt(z, v, w0, segment_ids=seg, **kw)

    def split_run(z, v, w0):
        s1 = None if seg is None else seg[:, :split]
        s2 = None if seg is None else seg[:, split:]
        out1, state = inplace_ttt(z[:, :split], v[:, :split], w0, segment_ids=s1, return_state=True, **kw)
        if seg is not None:  # the carried state belongs to a document only if it goes on
            same = (seg[:, split - 1] == seg[:, split]) & (seg[:, split] != 0)
            state = state * same[:, None, None]
        out2 = inplace_ttt(z[:, split:], v[:, split:], w0, segment_ids=s2, initial_state=state, **kw)
        return jnp.concatenate([out1, out2], axis=1)

    # Jitted (one compile each; op by op this test took ~10 s on a CI core).
    np.testing.assert_allclose(jax.jit(split_run)(z, v, w0), jax.jit(whole)(z, v, w0), atol=1e-4, rtol=1e-4)
    cot = jax.random.normal(jax.random.key(2), (2, length, D))
    ga = jax.jit(jax.grad(lambda *a: jnp.sum(split_run(*a) * cot), argnums=(0, 1, 2)))(z, v, w0)
    gb = jax.jit(jax.grad(lambda *a: jnp.sum(whole(*a) * cot), argnums=(0, 1, 2)))(z, v, w0)
    for a, b in zip(ga, gb):
        np.testing.assert_allclose(a, b, atol=2e-4, rtol=2e-4)


def test_auto_is_scan():
    z, v, w0 = _inputs(1, 20, jnp.float32)
    a = inplace_ttt(z, v, w0, lr=0.3, chunk_size=C, impl="auto")
    b = inplace_ttt(z, v, w0, lr=0.3, chunk_size=C, impl="scan")
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("impl", ["reference", "associative", "scan"])
@pytest.mark.parametrize("segs", ["none", "packed"])
def test_target_and_op_grads_wrt_all_params(impl, segs):
    """The whole TTT path (target conv + projection + fast weights): gradients w.r.t. the target
    source, z, conv, proj and w0 match the per-token oracles (target_reference + linear_attention)."""
    k = jax.random.split(jax.random.key(12), 5)
    batch, length = 3, 37
    t = jax.random.normal(k[0], (batch, length, D))
    z = jax.random.normal(k[1], (batch, length, F))
    conv = 0.5 * jax.random.normal(k[2], (5, D))
    proj = jax.random.normal(k[3], (D, D))
    w0 = 0.3 * jax.random.normal(k[4], (F, D))
    seg = _segments(batch, length, segs)
    cot = jax.random.normal(jax.random.key(13), (batch, length, D))

    def fast(t, z, conv, proj, w0):
        v = inplace_ttt_target(t, conv, proj, chunk_size=C, segment_ids=seg)
        return inplace_ttt(z, v, w0, lr=0.3, chunk_size=C, segment_ids=seg, impl=impl)

    def oracle(t, z, conv, proj, w0):
        v = ref.target_reference(t, conv, proj, chunk_size=C, segment_ids=seg)
        return ref.linear_attention(z, v, w0, lr=0.3, chunk_size=C, segment_ids=seg)

    args = (t, z, conv, proj, w0)
    out, g_fast = _value_and_grads(fast, cot)(*args)
    want, g_want = _value_and_grads(oracle, cot)(*args)
    valid = np.ones((batch, length), bool) if seg is None else np.asarray(seg) != 0
    np.testing.assert_allclose(np.asarray(out)[valid], np.asarray(want)[valid], atol=2e-4, rtol=2e-4)
    for name, a, b in zip(["t", "z", "conv", "proj", "w0"], g_fast, g_want):
        assert float(jnp.abs(b).max()) > 0, name   # every parameter actually receives gradient
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=5e-4, rtol=5e-4, err_msg=name)
