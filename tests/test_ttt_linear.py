"""The TTT-Linear / TTT-MLP op: dual form against the primal reference, in values and gradients;
state carry; packed documents; remat groups.

The primal reference takes each token's gradient with ``jax.grad`` of the inner loss and
materialises the per-token weights; the dual form shares only the inner model's definition with it.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ttt_jax.ops.ttt_layer import inner_apply, layer_norm, param_shapes, ttt_layer

pytestmark = pytest.mark.unit

H, DH, K = 2, 4, 4


def _params(kind, seed=0, h=H, d=DH):
    keys = jax.random.split(jax.random.PRNGKey(seed), 4)
    shapes = param_shapes(kind, h, d)
    return {n: (0.3 if n.startswith("w") else 0.1) * jax.random.normal(kk, s)
            for kk, (n, s) in zip(keys, sorted(shapes.items()))}


def _inputs(b, t, seed=1, h=H, d=DH):
    ks = jax.random.split(jax.random.PRNGKey(seed), 6)
    q, k, v = (jax.random.normal(ks[i], (b, t, h, d)) for i in range(3))
    lr = 0.5 * jax.nn.sigmoid(jax.random.normal(ks[3], (b, t, h)))
    scale = 1.0 + 0.1 * jax.random.normal(ks[4], (h, d))
    bias = 0.1 * jax.random.normal(ks[5], (h, d))
    return q, k, v, lr, scale, bias


def _segments(b, t, seed=0):
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
    return jnp.asarray(np.stack(rows), jnp.int32)


def _naive(q, k, v, lr, params, scale, bias, mini_batch):
    """Token-by-token numpy-style loop over one sequence without packing (the published semantics
    written out literally): per mini-batch, gradients at the start weights, W_t by explicit sums."""
    b, t, h, d = q.shape
    outs = np.zeros(q.shape, np.float32)
    for bi in range(b):
        for hi in range(h):
            w = jax.tree.map(lambda x: x[hi], params)
            for s0 in range(0, t, mini_batch):
                idx = list(range(s0, min(s0 + mini_batch, t)))
                grads = []
                for s in idx:
                    def loss(p):
                        z = inner_apply(p, k[bi, s, hi])
                        tgt = v[bi, s, hi] - k[bi, s, hi]
                        return 0.5 * jnp.sum((layer_norm(z, scale[hi], bias[hi]) - tgt) ** 2)
                    grads.append(jax.grad(loss)(w))
                for i, t_ in enumerate(idx):
                    wt = jax.tree.map(
                        lambda w0, *gs: w0 - sum(lr[bi, idx[j], hi] / (i + 1) * gs[j] for j in range(i + 1)),
                        w, *grads)
                    z = inner_apply(wt, q[bi, t_, hi])
                    outs[bi, t_, hi] = q[bi, t_, hi] + layer_norm(z, scale[hi], bias[hi])
                    last = wt
                w = last
    return outs


@pytest.mark.parametrize("kind", [pytest.param("linear", marks=pytest.mark.slow), "mlp"])
def test_reference_matches_literal_loop(kind):
    q, k, v, lr, scale, bias = _inputs(1, 7)
    params = _params(kind)
    want = _naive(q, k, v, lr, params, scale, bias, mini_batch=K)
    got = ttt_layer(q, k, v, lr, params, scale, bias, mini_batch=K, impl="reference")
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("kind,segmented,b,t", [
    pytest.param("linear", True, 3, 13, marks=pytest.mark.slow),
    pytest.param("mlp", False, 1, 16, marks=pytest.mark.slow),
    ("mlp", True, 1, 13)])
def test_dual_equals_reference_values_and_grads(kind, segmented, b, t):
    q, k, v, lr, scale, bias = _inputs(b, t)
    params = _params(kind)
    seg = _segments(b, t) if segmented else None
    w = jax.random.normal(jax.random.PRNGKey(9), q.shape)

    def loss(impl, q, k, v, lr, params, scale, bias):
        out = ttt_layer(q, k, v, lr, params, scale, bias, mini_batch=K, segment_ids=seg, impl=impl,
                        remat_group=2)
        return jnp.sum(out * w), out

    args = (q, k, v, lr, params, scale, bias)
    def grad_fn(impl):
        return jax.jit(jax.value_and_grad(lambda *a: loss(impl, *a), argnums=tuple(range(7)),
                                          has_aux=True))
    (_, o_ref), g_ref = grad_fn("reference")(*args)
    (_, o_dual), g_dual = grad_fn("dual")(*args)
    np.testing.assert_allclose(o_dual, o_ref, atol=2e-5, rtol=2e-5)
    for a, r in zip(jax.tree.leaves(g_dual), jax.tree.leaves(g_ref)):
        np.testing.assert_allclose(a, r, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind,impl", [("linear", "dual"), ("mlp", "dual"),
                                       pytest.param("mlp", "reference", marks=pytest.mark.slow)])
def test_two_pieces_with_carried_state_equal_one_run(kind, impl):
    q, k, v, lr, scale, bias = _inputs(2, 24)
    params = _params(kind)
    full, s_full = ttt_layer(q, k, v, lr, params, scale, bias, mini_batch=K, impl=impl,
                             return_state=True)
    cut = 8
    a, s_a = ttt_layer(q[:, :cut], k[:, :cut], v[:, :cut], lr[:, :cut], params, scale, bias,
                       mini_batch=K, impl=impl, return_state=True)
    bpart, s_b = ttt_layer(q[:, cut:], k[:, cut:], v[:, cut:], lr[:, cut:], params, scale, bias,
                           mini_batch=K, impl=impl, initial_state=s_a, return_state=True)
    np.testing.assert_allclose(jnp.concatenate([a, bpart], 1), full, atol=1e-5, rtol=1e-5)
    for x, y in zip(jax.tree.leaves(s_b), jax.tree.leaves(s_full)):
        np.testing.assert_allclose(x, y, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("impl", ["dual", pytest.param("reference", marks=pytest.mark.slow)])
def test_keep_mini_batches_returns_the_state_after_them(impl):
    """Per sequence, the state after its first ``keep[b]`` mini-batches (what a decoder with an
    open mini-batch carries); outputs are those of the plain run up to the first mini-batch not kept."""
    q, k, v, lr, scale, bias = _inputs(3, 14)                    # 3 full mini-batches of 4, then 2
    params = _params("mlp")
    op = jax.jit(lambda n, keep=None: ttt_layer(q[:, :n], k[:, :n], v[:, :n], lr[:, :n], params, scale,
                                                bias, mini_batch=K, impl=impl, return_state=True,
                                                keep_mini_batches=keep), static_argnums=0)
    keep = jnp.asarray([0, 2, 3], jnp.int32)
    out, state = op(14, keep)
    full, _ = op(14, jnp.full((3,), 4, jnp.int32))
    for b, n in enumerate(keep.tolist()):
        want = op(n * K)[1] if n else jax.tree.map(lambda p: jnp.broadcast_to(p, (3,) + p.shape), params)
        for x, y in zip(jax.tree.leaves(state), jax.tree.leaves(want)):
            np.testing.assert_allclose(x[b], y[b], atol=1e-5, rtol=1e-5)
        stop = min((n + 1) * K, 14)
        np.testing.assert_allclose(out[b, :stop], full[b, :stop], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="return_state"):
        ttt_layer(q, k, v, lr, params, scale, bias, mini_batch=K, keep_mini_batches=keep)


@pytest.mark.slow
def test_packed_documents_equal_separate_runs():
    """Documents starting on mini-batch boundaries (and one starting mid-mini-batch) are computed as
    if alone; the packed row never leaks one document into another."""
    q, k, v, lr, scale, bias = _inputs(1, 20)
    params = _params("mlp")
    seg = jnp.asarray([[1] * 8 + [2] * 6 + [3] * 6], jnp.int32)   # doc 3 starts mid-mini-batch
    packed = ttt_layer(q, k, v, lr, params, scale, bias, mini_batch=K, segment_ids=seg)
    for lo, hi in ((0, 8), (8, 14)):
        alone = ttt_layer(q[:, lo:hi], k[:, lo:hi], v[:, lo:hi], lr[:, lo:hi], params, scale, bias,
                          mini_batch=K)
        np.testing.assert_allclose(packed[:, lo:hi], alone, atol=1e-5, rtol=1e-5)
    # Doc 3 (starts at 14, position 2 of its mini-batch): nothing of docs 1-2 reaches it.
    q2 = q.at[:, :14].set(0.0).at[:, :14].add(jax.random.normal(jax.random.PRNGKey(5), q[:, :14].shape))
    k2 = k.at[:, :14].multiply(-1.0)
    other = ttt_layer(q2, k2, v, lr, params, scale, bias, mini_batch=K, segment_ids=seg)
    np.testing.assert_allclose(other[:, 14:], packed[:, 14:], atol=1e-6)


@pytest.mark.slow
def test_causal_and_remat_group_invariant():
    q, k, v, lr, scale, bias = _inputs(1, 21)
    params = _params("linear")
    base = ttt_layer(q, k, v, lr, params, scale, bias, mini_batch=K, remat_group=1)
    for g in (2, 6):
        np.testing.assert_allclose(ttt_layer(q, k, v, lr, params, scale, bias, mini_batch=K,
                                             remat_group=g), base, atol=1e-6)
    t = 10
    pert = ttt_layer(q, k.at[:, t].add(1.0), v.at[:, t].add(-1.0), lr, params, scale, bias,
                     mini_batch=K)
    np.testing.assert_array_equal(pert[:, :t], base[:, :t])
    assert not np.allclose(pert[:, t], base[:, t])


@pytest.mark.parametrize("kind", [pytest.param("linear", marks=pytest.mark.slow), "mlp"])
def test_bf16_dual_close_to_fp32_reference(kind):
    """bf16 views (as the model feeds them with ``compute_dtype=bfloat16``): the dual form returns
    bf16 within bf16 rounding of the fp32 primal reference on the same (bf16-rounded) inputs, and
    its gradients (views, lr, inner parameters) stay within bf16 rounding of the fp32 ones (the
    fp32 dual gradients equal the reference's: the test above)."""
    q, k, v, lr, scale, bias = _inputs(1, 10)
    q, k, v = (x.astype(jnp.bfloat16) for x in (q, k, v))
    params = _params(kind)
    w = jax.random.normal(jax.random.PRNGKey(9), q.shape)

    def run(impl, dtype, q, k, v, lr, params):
        cast = lambda x: x.astype(dtype)  # noqa: E731
        return ttt_layer(cast(q), cast(k), cast(v), lr, params, scale, bias, mini_batch=K, impl=impl)

    def value_and_grads(dtype):
        def loss(*a):
            out = run("dual", dtype, *a)
            return jnp.sum(out.astype(jnp.float32) * w), out
        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4), has_aux=True))(
            q, k, v, lr, params)

    (_, o_bf), g_bf = value_and_grads(jnp.bfloat16)
    (_, _), g_32 = value_and_grads(jnp.float32)
    o_ref = jax.jit(lambda *a: run("reference", jnp.float32, *a))(q, k, v, lr, params)
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
