"""The TTT-Linear / TTT-MLP op: dual form against the primal reference, in values and gradients;
state carry; packed documents; remat groups.

The primal reference takes each token's gradient with ``jax.grad`` of the inner loss and
materialises the per-token weights; the dual form shares only the inner model's definition with it.

Compiling is most of this file's time: every comparison goes through the two module-level jitted
functions below (``_op``, ``_VALUE_AND_GRADS``) on one shape (``B`` sequences of ``T`` tokens, or
the whole-mini-batch prefixes ``T_WHOLE``, ``2 * K``), so tests share their compiled programs. The
inputs are numpy arrays (no op-by-op JAX work outside those functions).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ttt_jax.ops.ttt_layer import inner_apply, layer_norm, param_shapes, ttt_layer

pytestmark = pytest.mark.unit

H, DH, K = 2, 4, 4
B, T = 3, 14            # 3 full mini-batches, then an open one of 2 tokens
T_WHOLE = 3 * K         # the whole mini-batches of T


def _params(kind, seed=0, h=H, d=DH):
    rng = np.random.default_rng(seed)
    shapes = param_shapes(kind, h, d)
    return {n: ((0.3 if n.startswith("w") else 0.1) * rng.standard_normal(s)).astype(np.float32)
            for n, s in sorted(shapes.items())}


def _inputs(b=B, t=T, seed=1, h=H, d=DH):
    rng = np.random.default_rng(seed)
    f32 = lambda x: np.asarray(x, np.float32)  # noqa: E731
    q, k, v = (f32(rng.standard_normal((b, t, h, d))) for _ in range(3))
    lr = f32(0.5 / (1.0 + np.exp(-rng.standard_normal((b, t, h)))))
    scale = f32(1.0 + 0.1 * rng.standard_normal((h, d)))
    bias = f32(0.1 * rng.standard_normal((h, d)))
    return q, k, v, lr, scale, bias


def _segments(b=B, t=T, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(b):
        row, sid = [], 1
        while len(row) < t:
            row += [sid] * int(rng.integers(1, 2 * K + 2))
            sid += 1
        row = np.array(row[:t])
        row[t - t // 5:] = 0
        rows.append(row)
    return np.stack(rows).astype(np.int32)


@functools.partial(jax.jit, static_argnames=("impl", "return_state", "remat_group"))
def _op(q, k, v, lr, params, scale, bias, seg=None, init=None, keep=None, *, impl="dual",
        return_state=False, remat_group=None):
    """``ttt_layer`` with ``mini_batch=K``, jitted once for the file."""
    return ttt_layer(q, k, v, lr, params, scale, bias, mini_batch=K, segment_ids=seg, impl=impl,
                     initial_state=init, return_state=return_state, remat_group=remat_group,
                     keep_mini_batches=keep)


def _weighted_sum(impl, q, k, v, lr, params, scale, bias, token_factor, seg, w):
    out = ttt_layer(q, k, v, lr, params, scale, bias, mini_batch=K, token_factor=token_factor,
                    segment_ids=seg, impl=impl, remat_group=2)
    return jnp.sum(out.astype(jnp.float32) * w), out


# ((loss, out), grads w.r.t. q, k, v, lr, params, ln scale, ln bias, token_factor) per impl.
_VALUE_AND_GRADS = {impl: jax.jit(jax.value_and_grad(functools.partial(_weighted_sum, impl),
                                                     argnums=tuple(range(8)), has_aux=True))
                    for impl in ("dual", "reference")}


def _token_factor(seed=3):
    """A position factor other than the default ``1 / (i + 1)`` (the model learns a bias on it)."""
    rng = np.random.default_rng(seed)
    return np.asarray(1.0 / np.arange(1, K + 1) + 0.1 * rng.standard_normal(K), np.float32)


@jax.jit
def _token_grad(w, k, target, scale, bias):
    """One token's inner-loss gradient at weights ``w`` (one head)."""
    def loss(p):
        return 0.5 * jnp.sum((layer_norm(inner_apply(p, k), scale, bias) - target) ** 2)
    return jax.grad(loss)(w)


@jax.jit
def _token_out(w, q, scale, bias):
    return q + layer_norm(inner_apply(w, q), scale, bias)


def _naive(q, k, v, lr, params, scale, bias, mini_batch):
    """Token-by-token loop over each sequence without packing (the published semantics written out
    literally): per mini-batch, gradients at the start weights, W_t by explicit sums."""
    b, t, h, d = q.shape
    outs = np.zeros(q.shape, np.float32)
    for bi in range(b):
        for hi in range(h):
            w = {n: x[hi] for n, x in params.items()}
            for s0 in range(0, t, mini_batch):
                idx = list(range(s0, min(s0 + mini_batch, t)))
                grads = [jax.tree.map(np.asarray, _token_grad(
                    w, k[bi, s, hi], v[bi, s, hi] - k[bi, s, hi], scale[hi], bias[hi])) for s in idx]
                for i, t_ in enumerate(idx):
                    wt = {n: w[n] - sum(lr[bi, idx[j], hi] / (i + 1) * grads[j][n] for j in range(i + 1))
                          for n in w}
                    outs[bi, t_, hi] = _token_out(wt, q[bi, t_, hi], scale[hi], bias[hi])
                w = wt
    return outs


@pytest.mark.parametrize("kind", [pytest.param("linear", marks=pytest.mark.slow), "mlp"])
def test_reference_matches_literal_loop(kind):
    q, k, v, lr, scale, bias = _inputs()
    params = _params(kind)
    want = _naive(q, k, v, lr, params, scale, bias, mini_batch=K)
    got = _op(q, k, v, lr, params, scale, bias, impl="reference")
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=2e-5)


def _values_and_grads(impl, kind, segmented, dtype=np.float32):
    """``_VALUE_AND_GRADS[impl]`` on the file's inputs, their views rounded to bf16 (and given in
    ``dtype``), a non-default position factor and ``segment_ids`` if ``segmented``."""
    q, k, v, lr, scale, bias = _inputs()
    q, k, v = (x.astype(jnp.bfloat16).astype(dtype) for x in (q, k, v))
    w = np.random.default_rng(9).standard_normal(q.shape).astype(np.float32)
    seg = _segments() if segmented else None
    return _VALUE_AND_GRADS[impl](q, k, v, lr, _params(kind), scale, bias, _token_factor(), seg, w)


@pytest.mark.parametrize("kind,segmented", [pytest.param("linear", True, marks=pytest.mark.slow),
                                            pytest.param("mlp", False, marks=pytest.mark.slow),
                                            ("mlp", True)])
def test_dual_equals_reference_values_and_grads(kind, segmented):
    """Values and gradients w.r.t. every input (the views, lr, inner parameters, the inner
    LayerNorm and a non-default position factor); a partial last mini-batch."""
    (_, o_ref), g_ref = _values_and_grads("reference", kind, segmented)
    (_, o_dual), g_dual = _values_and_grads("dual", kind, segmented)
    np.testing.assert_allclose(o_dual, o_ref, atol=2e-5, rtol=2e-5)
    for a, r in zip(jax.tree.leaves(g_dual), jax.tree.leaves(g_ref)):
        np.testing.assert_allclose(a, r, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind,impl", [("linear", "dual"), ("mlp", "dual"),
                                       pytest.param("mlp", "reference", marks=pytest.mark.slow)])
def test_two_pieces_with_carried_state_equal_one_run(kind, impl):
    q, k, v, lr, scale, bias = _inputs()
    q, k, v, lr = (x[:, :T_WHOLE] for x in (q, k, v, lr))      # whole mini-batches: 2 + 1
    params = _params(kind)
    full, s_full = _op(q, k, v, lr, params, scale, bias, impl=impl, return_state=True)
    cut = 2 * K
    a, s_a = _op(q[:, :cut], k[:, :cut], v[:, :cut], lr[:, :cut], params, scale, bias, impl=impl,
                 return_state=True)
    bpart, s_b = _op(q[:, cut:], k[:, cut:], v[:, cut:], lr[:, cut:], params, scale, bias,
                     init=s_a, impl=impl, return_state=True)
    np.testing.assert_allclose(np.concatenate([a, bpart], 1), full, atol=1e-5, rtol=1e-5)
    for x, y in zip(jax.tree.leaves(s_b), jax.tree.leaves(s_full)):
        np.testing.assert_allclose(x, y, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("impl", ["dual", pytest.param("reference", marks=pytest.mark.slow)])
def test_keep_mini_batches_returns_the_state_after_them(impl):
    """Per sequence, the state after its first ``keep[b]`` mini-batches (what a decoder with an
    open mini-batch carries); outputs are those of the plain run up to the first mini-batch not kept."""
    q, k, v, lr, scale, bias = _inputs()                       # 3 full mini-batches of 4, then 2
    params = _params("mlp")

    def op(n, keep=None):
        return _op(q[:, :n], k[:, :n], v[:, :n], lr[:, :n], params, scale, bias, keep=keep, impl=impl,
                   return_state=True)

    keep = np.asarray([0, 2, 3], np.int32)
    out, state = op(T, keep)
    full, _ = op(T, np.full((B,), 4, np.int32))
    for b, n in enumerate(keep.tolist()):
        want = op(n * K)[1] if n else jax.tree.map(lambda p: np.broadcast_to(p, (B,) + p.shape), params)
        for x, y in zip(jax.tree.leaves(state), jax.tree.leaves(want)):
            np.testing.assert_allclose(x[b], y[b], atol=1e-5, rtol=1e-5)
        stop = min((n + 1) * K, T)
        np.testing.assert_allclose(out[b, :stop], full[b, :stop], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="return_state"):
        ttt_layer(q, k, v, lr, params, scale, bias, mini_batch=K, keep_mini_batches=keep)


@pytest.mark.slow
def test_packed_documents_equal_separate_runs():
    """Documents starting on mini-batch boundaries (and one starting mid-mini-batch) are computed as
    if alone; the packed row never leaks one document into another."""
    q, k, v, lr, scale, bias = _inputs(1, 20)
    params = _params("mlp")
    seg = np.asarray([[1] * 8 + [2] * 6 + [3] * 6], np.int32)   # doc 3 starts mid-mini-batch
    packed = np.asarray(_op(q, k, v, lr, params, scale, bias, seg))
    # Docs 1 (0-8) and 2 (8-14) alone, without segment ids, as two rows of one run: doc 2's row
    # ends in two tokens of doc 3, which cannot reach its earlier outputs (the op is causal: below).
    rows = lambda x: np.concatenate([x[:, 0:8], x[:, 8:16]])  # noqa: E731
    alone = np.asarray(_op(rows(q), rows(k), rows(v), rows(lr), params, scale, bias))
    np.testing.assert_allclose(packed[:, 0:8], alone[:1], atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(packed[:, 8:14], alone[1:, :6], atol=1e-5, rtol=1e-5)
    # Doc 3 (starts at 14, position 2 of its mini-batch): nothing of docs 1-2 reaches it.
    q2, k2 = q.copy(), k.copy()
    q2[:, :14] = np.random.default_rng(5).standard_normal(q[:, :14].shape)
    k2[:, :14] *= -1.0
    other = _op(q2, k2, v, lr, params, scale, bias, seg)
    np.testing.assert_allclose(other[:, 14:], packed[:, 14:], atol=1e-6)


@pytest.mark.slow
def test_causal_and_remat_group_invariant():
    q, k, v, lr, scale, bias = _inputs(1, 21)
    params = _params("linear")
    base = np.asarray(_op(q, k, v, lr, params, scale, bias, remat_group=1))
    for g in (2, 6):
        np.testing.assert_allclose(_op(q, k, v, lr, params, scale, bias, remat_group=g), base,
                                   atol=1e-6)
    t = 10
    k2, v2 = k.copy(), v.copy()
    k2[:, t] += 1.0
    v2[:, t] -= 1.0
    pert = np.asarray(_op(q, k2, v2, lr, params, scale, bias, remat_group=1))
    np.testing.assert_array_equal(pert[:, :t], base[:, :t])
    assert not np.allclose(pert[:, t], base[:, t])


@pytest.mark.parametrize("kind", [pytest.param("linear", marks=pytest.mark.slow), "mlp"])
def test_bf16_dual_close_to_fp32_reference(kind):
    """bf16 views (as the model feeds them with ``compute_dtype=bfloat16``): the dual form returns
    bf16 within bf16 rounding of the fp32 primal reference on the same (bf16-rounded) inputs, and
    its gradients (every input) stay within bf16 rounding of the reference's fp32 ones (which the
    fp32 dual gradients equal: the test above, whose compiled program this one reuses)."""
    (_, o_bf), g_bf = _values_and_grads("dual", kind, True, dtype=jnp.bfloat16)
    (_, o_ref), g_32 = _values_and_grads("reference", kind, True)
    assert o_bf.dtype == jnp.bfloat16 and o_ref.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(o_bf, np.float32), o_ref, atol=3e-2, rtol=2e-2)
    for a, r in zip(jax.tree.leaves(g_bf), jax.tree.leaves(g_32)):
        a, r = np.asarray(a, np.float32), np.asarray(r, np.float32)
        assert np.isfinite(a).all()
        np.testing.assert_allclose(a, r, atol=3e-2 * np.abs(r).max(), rtol=3e-2)


def test_bad_arguments_raise():
    q, k, v, lr, scale, bias = _inputs(1, 8)
    params = _params("linear")
    with pytest.raises(ValueError, match="impl"):
        ttt_layer(q, k, v, lr, params, scale, bias, impl="fast")
    with pytest.raises(ValueError, match="whole number of mini-batches"):
        ttt_layer(q, k, v, lr, params, scale, bias, mini_batch=3, return_state=True)
    with pytest.raises(ValueError, match="params"):
        ttt_layer(q, k, v, lr, _params("linear", d=6), scale, bias)
