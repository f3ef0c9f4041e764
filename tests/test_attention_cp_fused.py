"""Fused context-parallel attention (ttt_jax.ops.kernels, ttt_jax.ops.attention_cp_fused).

On CPU the Pallas flash kernels run in interpret mode at tiny shapes: the block kernels (out, lse
and the backward with given lse/delta) against a dense reference, and the fused ring inside
``shard_map`` on 4 emulated devices (contiguous and zigzag, GQA) against the unsharded reference,
values and gradients. The halo sliding-window path's padding and device-0 logic is tested with the
dense local attention standing in for cuDNN. GPU-marked tests run the compiled kernels and the real cuDNN
path.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from ttt_jax.parallel import layout as L
from ttt_jax.parallel.mesh import make_mesh
from ttt_jax.ops import attention_cp as A
from ttt_jax.ops import attention_cp_fused as FA
from ttt_jax.ops import attention_cp_window as W
from ttt_jax.ops import attention_reference as R
from ttt_jax.ops.kernels import cudnn_blocks as C
from ttt_jax.ops.kernels import flash as F

pytestmark = pytest.mark.unit

B, H, KV, DH = 1, 4, 2, 12  # DH = 12: the kernels zero-pad the head dim to 16


def _rand(seed, t, dtype=np.float32, b=B, h=H, kvh=KV, dh=DH):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((b, t, h, dh)).astype(dtype)
    k = rng.standard_normal((b, t, kvh, dh)).astype(dtype)
    v = rng.standard_normal((b, t, kvh, dh)).astype(dtype)
    ct = rng.standard_normal((b, t, h, dh)).astype(np.float32)
    return q, k, v, ct


def _dense_block(q, k, v, causal, scale):
    """Dense (out, lse) of one block: the kernels' reference."""
    g = q.shape[2] // k.shape[2]
    kr, vr = (jnp.repeat(x.astype(jnp.float32), g, axis=2) for x in (k, v))
    s = jnp.einsum("bqhd,bkhd->bhqk", q.astype(jnp.float32), kr) * scale
    if causal:
        s = jnp.where(jnp.tril(jnp.ones(s.shape[-2:], bool)), s, -jnp.inf)
    lse = jax.nn.logsumexp(s, axis=-1)
    out = jnp.einsum("bhqk,bkhd->bqhd", jnp.exp(s - lse[..., None]), vr)
    return out, lse


def _close(got, want, tol):
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w, np.float32), rtol=tol, atol=tol)


@pytest.mark.parametrize("causal,tq,tk,blocks", [
    (True, 32, 32, (16, 16)), (False, 16, 32, (16, 16)),
    (True, 64, 64, (32, 16)), (True, 64, 64, (16, 32)),  # unmasked tiles, then diagonal tiles
])
def test_block_kernels_match_dense(causal, tq, tk, blocks):
    """Forward (out, lse) and the backward given a *foreign* lse/delta (as the ring passes them)."""
    q, _, _, ct = _rand(0, tq)
    _, k, v, _ = _rand(1, tk)
    scale = 0.3
    kw = dict(causal=causal, scale=scale, interpret=True, block_q=blocks[0], block_k=blocks[1])
    out, lse = F.flash_block_fwd(q, k, v, **kw)
    want_out, want_lse = _dense_block(q, k, v, causal, scale)
    _close((out, lse), (want_out, want_lse), 1e-5)
    # Backward with statistics of a larger (global) softmax: lse shifted up, an arbitrary delta.
    rng = np.random.default_rng(2)
    g_lse = want_lse + jnp.asarray(rng.uniform(0.1, 1.0, want_lse.shape), jnp.float32)
    delta = jnp.asarray(rng.standard_normal(want_lse.shape), jnp.float32)
    got = F.flash_block_bwd(q, k, v, ct, g_lse, delta, **kw)
    _close(got, _block_grads_given_stats(q, k, v, ct, g_lse, delta, causal, scale), 1e-4)


def _block_grads_given_stats(q, k, v, ct, g_lse, delta, causal, scale):
    """Dense (dq, dk, dv) of one block given a global log-sum-exp and ``delta = rowsum(dO * O)``."""
    q, k, v = (jnp.asarray(x, jnp.float32) for x in (q, k, v))

    def p_of(q, k):  # P = exp(S * scale - lse_global), the quantity the backward differentiates
        grp = q.shape[2] // k.shape[2]
        s = jnp.einsum("bqhd,bkhd->bhqk", q, jnp.repeat(k, grp, axis=2)) * scale
        if causal:
            s = jnp.where(jnp.tril(jnp.ones(s.shape[-2:], bool)), s, -jnp.inf)
        return jnp.exp(s - g_lse[..., None])

    def surrogate(q, k, v):
        # d/dS of <P V, dO> with the "- delta" term of the flash backward: <P, dO V^T - delta>.
        p = p_of(q, k)
        vr = jnp.repeat(v, q.shape[2] // k.shape[2], axis=2)
        dp = jnp.einsum("bqhd,bkhd->bhqk", jnp.asarray(ct), vr)
        return jnp.sum(jax.lax.stop_gradient(dp - delta[..., None]) * p) + \
            jnp.sum(jnp.einsum("bhqk,bkhd->bqhd", jax.lax.stop_gradient(p), vr) * ct)

    return jax.grad(surrogate, argnums=(0, 1, 2))(q, k, v)


def test_flash_attention_matches_reference():
    """The single-device custom VJP over the kernels (GQA, padded head dim), values and grads."""
    q, k, v, ct = _rand(3, 32)
    f = lambda q, k, v: F.flash_attention(q, k, v, True, None, True)
    got = jax.jit(lambda *a: (lambda o, pb: (o, pb(ct)))(*jax.vjp(f, *a)))(q, k, v)
    want = jax.jit(lambda *a: (lambda o, pb: (o, pb(ct)))(*jax.vjp(R.attention_reference, *a)))(q, k, v)
    _close(got, want, 1e-4)


def _sharded(inner, n, layout, check_vma=True):
    mesh = make_mesh(data=1, context=n, devices=jax.devices()[:n])
    spec = P(None, "context")
    fn = jax.shard_map(inner, mesh=mesh, in_specs=(spec,) * 3, out_specs=spec, check_vma=check_vma)
    to = (lambda x: L.to_zigzag(x, n)) if layout == "zigzag" else (lambda x: x)
    back = (lambda x: L.from_zigzag(x, n)) if layout == "zigzag" else (lambda x: x)
    return lambda q, k, v: back(fn(to(q), to(k), to(v)))


def _value_and_grads(fn, q, k, v, ct):
    def run(q, k, v, ct):
        out, pb = jax.vjp(fn, q, k, v)
        return out, pb(ct.astype(out.dtype))
    return jax.jit(run)(q, k, v, ct)


@pytest.mark.parametrize("layout,n", [("contiguous", 4), ("zigzag", 8)])
def test_ring_flash_matches_reference(layout, n):
    t = 32 * n if layout == "zigzag" else 16 * n  # zigzag half blocks need 16 tokens
    q, k, v, ct = _rand(4, t)
    scale = 1.0 / np.sqrt(DH)
    inner = lambda q, k, v: FA.ring_flash_attention(q, k, v, "context", layout=layout, scale=scale,
                                                    interpret=True)
    # Pallas's interpreter trips over shard_map's axis-variance checks (JAX 0.10); compiled kernels
    # declare their outputs' variance (ttt_jax.ops.kernels.flash._out).
    got = _value_and_grads(_sharded(inner, n, layout, check_vma=False), q, k, v, ct)
    want = _value_and_grads(R.attention_reference, q, k, v, ct)
    _close(got, want, 1e-4)


def _packed_ids(t, seed):
    """``[B, t]`` document ids: documents of random lengths that cross device boundaries, ids
    increasing along the row, and a padded tail (id 0)."""
    rng = np.random.default_rng(seed)
    cuts = np.sort(rng.choice(np.arange(1, t - 8), size=5, replace=False))
    ids = np.searchsorted(cuts, np.arange(t), side="right") + 1
    ids[t - 5:] = 0
    return np.broadcast_to(ids, (B, t)).astype(np.int32)


@pytest.mark.parametrize("layout,n", [("contiguous", 4), ("zigzag", 4)])
def test_ring_flash_with_segment_ids_matches_reference(layout, n):
    """Packed documents in the Pallas ring: key ids travel with their block, rows that see no key
    of a block leave the merge untouched, padding rows (id 0) output 0; values and gradients."""
    t = 32 * n
    q, k, v, ct = _rand(9, t)
    seg = _packed_ids(t, 3)
    scale = 1.0 / np.sqrt(DH)
    mesh = make_mesh(data=1, context=n, devices=jax.devices()[:n])
    spec = P(None, "context")
    inner = lambda q, k, v, s: FA.ring_flash_attention(q, k, v, "context", layout=layout, scale=scale,
                                                       interpret=True, segment_ids=s)
    fn = jax.shard_map(inner, mesh=mesh, in_specs=(spec,) * 4, out_specs=spec, check_vma=False)
    to = (lambda x: L.to_zigzag(x, n)) if layout == "zigzag" else (lambda x: x)
    back = (lambda x: L.from_zigzag(x, n)) if layout == "zigzag" else (lambda x: x)
    sharded = lambda q, k, v: back(fn(to(q), to(k), to(v), to(jnp.asarray(seg))))
    ref = lambda q, k, v: R.attention_reference(q, k, v, segment_ids=jnp.asarray(seg))
    got = _value_and_grads(sharded, q, k, v, ct)
    want = _value_and_grads(ref, q, k, v, ct)
    _close(got, want, 1e-4)
    assert np.abs(np.asarray(got[0])[:, t - 5:]).max() == 0.0  # padding rows


def test_auto_routes_packed_documents_to_the_fused_ring(monkeypatch):
    """Where the fused ring could run (stood in for on CPU), ``kernel="auto"`` sends segment ids to
    the fused ring (with the ids); ``kernel="xla"`` keeps them on the XLA ring."""
    monkeypatch.setattr(F, "flash_unsupported_reason", lambda *a, **k: None)
    q, k, v, _ = _rand(6, 64)
    seg = jnp.asarray(_packed_ids(64, 5))
    mesh = make_mesh(data=1, context=2, devices=jax.devices()[:2])
    spec = P(None, "context")
    called = []
    monkeypatch.setattr(FA, "ring_flash_attention", lambda *a, **kw: called.append(kw) or a[0])
    run = lambda kern: jax.jit(jax.shard_map(
        lambda q, k, v, s: A.context_attention(q, k, v, "context", kernel=kern, segment_ids=s),
        mesh=mesh, in_specs=(spec,) * 4, out_specs=spec))(q, k, v, seg)
    run("xla")
    assert not called
    run("fused")
    assert called and called[-1]["segment_ids"] is not None
    called.clear()
    run("auto")
    assert called and called[-1]["segment_ids"] is not None


@pytest.mark.parametrize("n,window", [(4, 5), (4, 9), (2, 1)])
def test_halo_window_single_call_matches_reference(n, window):
    """Equal-length padding + device-0 handling, with a dense local attention standing in for cuDNN."""
    t = 8 * n
    q, k, v, ct = _rand(5, t)
    local = functools.partial(R.attention_reference, window=window)
    inner = lambda q, k, v: W.halo_window_attention(q, k, v, "context", window=window,
                                                     local_attention=local)
    got = _value_and_grads(_sharded(inner, n, "contiguous"), q, k, v, ct)
    ref = lambda q, k, v: R.attention_reference(q, k, v, window=window)
    want = _value_and_grads(ref, q, k, v, ct)
    _close(got, want, 1e-4)


def test_kernel_selection_and_errors():
    q, k, v, _ = _rand(6, 32)
    seg = np.ones((B, 32), np.int32)
    # On CPU "auto" is the XLA path, bit-for-bit.
    mesh = make_mesh(data=1, context=2, devices=jax.devices()[:2])
    spec = P(None, "context")
    run = lambda kern, window=0: jax.jit(jax.shard_map(
        lambda q, k, v: A.context_attention(q, k, v, "context", kernel=kern, window=window), mesh=mesh,
        in_specs=(spec,) * 3, out_specs=spec))(q, k, v)
    np.testing.assert_array_equal(np.asarray(run("auto", 3)), np.asarray(run("xla", 3)))
    with pytest.raises(ValueError, match="kernel 'fused' cannot run here: the Pallas flash kernels need an NVIDIA GPU"):
        run("fused")
    with pytest.raises(ValueError, match="kernel 'pallas' cannot run here: the Pallas flash kernels need an NVIDIA GPU"):
        run("pallas")
    with pytest.raises(ValueError, match="kernel 'fused' cannot run here: cuDNN attention needs an NVIDIA GPU"):
        run("fused", 3)
    with pytest.raises(ValueError, match="kernel="):
        run("triton")
    assert "segment ids" in A.fused_unsupported_reason(q, k, segment_ids=seg, window=3)
    assert "allgather" in A.fused_unsupported_reason(q, k, impl="allgather")
    assert "multiples of 16" in F.flash_unsupported_reason(q[:, :8], k[:, :8], interpret=True)
    assert "as many queries" in F.flash_unsupported_reason(q[:, :16], k, causal=True, interpret=True)


# --------------------------------------------------------------------------------------------------
# GPU: compiled kernels and the real cuDNN path
# --------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dh", [64, 128])
def test_block_kernels_compiled_on_gpu(dh):
    t, scale = 1024, 1.0 / np.sqrt(dh)
    q, k, v, ct = _rand(7, t, dtype=np.float32, b=2, h=8, kvh=2, dh=dh)
    bf = lambda x: jnp.asarray(x, jnp.bfloat16)
    for causal in (True, False):
        out, lse = F.flash_block_fwd(bf(q), bf(k), bf(v), causal=causal, scale=scale)
        want_out, want_lse = _dense_block(bf(q), bf(k), bf(v), causal, scale)
        _close((out, lse), (want_out, want_lse), 2e-2)
    f = lambda q, k, v: F.flash_attention(q, k, v, True, None, False)
    got = _value_and_grads(f, bf(q), bf(k), bf(v), ct)
    want = _value_and_grads(R.attention_reference, q, k, v, ct)
    _close(got, want, 1e-1)


@pytest.mark.gpu
@pytest.mark.parametrize("causal,tq,tk", [(True, 1024, 1024), (False, 512, 1024), (False, 1024, 512)])
def test_cudnn_block_kernels_on_gpu(causal, tq, tk):
    """cuDNN's block forward (out, float32 lse) and its backward fed a *foreign* global output and
    log-sum-exp (as the ring passes them), against the dense float32 formulas."""
    assert C.private_api_problem() is None, C.private_api_problem()
    scale = 1.0 / np.sqrt(64)
    q, _, _, ct = _rand(10, tq, b=2, h=8, kvh=2, dh=64)
    _, k, v, _ = _rand(11, tk, b=2, h=8, kvh=2, dh=64)
    bf = lambda x: jnp.asarray(x, jnp.bfloat16)
    qb, kb, vb, ctb = bf(q), bf(k), bf(v), bf(ct)
    out, lse = jax.jit(functools.partial(C.cudnn_block_fwd, causal=causal, scale=scale))(qb, kb, vb)
    assert out.dtype == jnp.bfloat16 and lse.dtype == jnp.float32 and lse.shape == (2, 8, tq)
    want_out, want_lse = _dense_block(qb, kb, vb, causal, scale)
    _close(lse, want_lse, 2e-3)  # natural-log units, float32
    _close(out, want_out, 2e-2)
    rng = np.random.default_rng(12)
    g_lse = want_lse + jnp.asarray(rng.uniform(0.1, 1.0, want_lse.shape), jnp.float32)
    g_out = bf(rng.standard_normal(q.shape))
    delta = jnp.einsum("bthd,bthd->bht", g_out.astype(jnp.float32), ctb.astype(jnp.float32))
    got = jax.jit(functools.partial(C.cudnn_block_bwd, causal=causal, scale=scale))(
        qb, kb, vb, ctb, g_out, g_lse)
    want = _block_grads_given_stats(qb, kb, vb, ctb.astype(jnp.float32), g_lse, delta, causal, scale)
    for g, w in zip(got, want):  # bf16 outputs: compare relative to each gradient's scale
        w = np.asarray(w)
        np.testing.assert_allclose(np.asarray(g, np.float32), w, atol=2e-2 * np.abs(w).max(), rtol=0)


@pytest.mark.gpu
def test_fused_context_attention_on_gpus():
    """Fused ring (both layouts; cuDNN and Pallas blocks) and the cuDNN halo window on all local
    GPUs, bf16, vs fp32 reference."""
    devices = [d for d in jax.devices() if d.platform == "gpu"]
    n = len(devices)
    mesh = make_mesh(data=1, context=n, devices=devices)
    t = 256 * n
    q, k, v, ct = _rand(8, t, dtype=np.float32, b=2, h=8, kvh=2, dh=64)
    bf = lambda x: jnp.asarray(x, jnp.bfloat16)
    spec = P(None, "context")
    cases = [("contiguous", 0, "fused"), ("zigzag", 0, "fused"), ("contiguous", 0, "pallas"),
             ("zigzag", 0, "pallas"), ("contiguous", 101, "fused"), ("contiguous", 256, "fused")]
    for layout, window, kernel in cases:
        inner = lambda q, k, v: A.context_attention(q, k, v, "context", window=window, layout=layout,
                                                    kernel=kernel)
        fn = jax.shard_map(inner, mesh=mesh, in_specs=(spec,) * 3, out_specs=spec)
        to = (lambda x: L.to_zigzag(x, n)) if layout == "zigzag" else (lambda x: x)
        back = (lambda x: L.from_zigzag(x, n)) if layout == "zigzag" else (lambda x: x)
        sharded = lambda q, k, v: back(fn(to(q), to(k), to(v)))
        ref = lambda q, k, v: R.attention_reference(q, k, v, window=window)
        want = _value_and_grads(ref, q, k, v, ct)
        got = _value_and_grads(sharded, bf(q), bf(k), bf(v), ct)
        _close(got, want, 1e-1)


@pytest.mark.parametrize("layout,segmented", [("contiguous", False), ("zigzag", False), ("zigzag", True)])
def test_fused_ring_lowers_for_gpu(layout, segmented, monkeypatch):
    """Cross-lower the fused ring's forward and backward (Pallas blocks; with segment ids too) for
    CUDA on CPU: the kernels pass Pallas's Triton lowering and declare their outputs' variance
    inside a checking ``shard_map``."""
    monkeypatch.setattr(F, "flash_unsupported_reason", lambda *a, **k: None)
    n = 4
    mesh = make_mesh(data=1, context=n, devices=jax.devices()[:n])
    spec = P(None, "context")
    inner = lambda q, k, v, s: FA.ring_flash_attention(q, k, v, "context", layout=layout, scale=0.125,
                                                       blocks="pallas",
                                                       segment_ids=s if segmented else None)
    fn = jax.shard_map(inner, mesh=mesh, in_specs=(spec,) * 4, out_specs=spec)
    loss = lambda q, k, v, s: jnp.sum(fn(q, k, v, s).astype(jnp.float32))
    q = jax.ShapeDtypeStruct((1, 512, 4, 64), jnp.bfloat16)
    k = jax.ShapeDtypeStruct((1, 512, 2, 64), jnp.bfloat16)
    s = jax.ShapeDtypeStruct((1, 512), jnp.int32)
    hlo = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(q, k, k, s).lower(
        lowering_platforms=("cuda",)).as_text()
    assert hlo.count("__gpu$xla.gpu.triton") >= 3  # forward, dQ and dK/dV kernels


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
def test_segmented_ring_on_gpus(layout):
    """Packed documents through the Pallas ring (``kernel="fused"`` with segment ids) on all local
    GPUs, bf16, against the fp32 reference: values and gradients."""
    devices = [d for d in jax.devices() if d.platform == "gpu"]
    n = len(devices)
    mesh = make_mesh(data=1, context=n, devices=devices)
    t = 512 * n
    q, k, v, ct = _rand(13, t, dtype=np.float32, b=B, h=8, kvh=2, dh=64)
    seg = jnp.asarray(_packed_ids(t, 4))
    bf = lambda x: jnp.asarray(x, jnp.bfloat16)
    spec = P(None, "context")
    inner = lambda q, k, v, s: A.context_attention(q, k, v, "context", segment_ids=s, layout=layout,
                                                   kernel="fused")
    fn = jax.shard_map(inner, mesh=mesh, in_specs=(spec,) * 4, out_specs=spec)
    to = (lambda x: L.to_zigzag(x, n)) if layout == "zigzag" else (lambda x: x)
    back = (lambda x: L.from_zigzag(x, n)) if layout == "zigzag" else (lambda x: x)
    sharded = lambda q, k, v: back(fn(to(q), to(k), to(v), to(seg)))
    ref = lambda q, k, v: R.attention_reference(q, k, v, segment_ids=seg)
    _close(_value_and_grads(sharded, bf(q), bf(k), bf(v), ct), _value_and_grads(ref, q, k, v, ct), 1e-1)


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
def test_cudnn_ring_lowers_for_gpu(layout):
    """JAX's private cuDNN attention functions have the signatures ttt_jax.ops.kernels.cudnn_blocks was
    written against, and the ring with cuDNN blocks cross-lowers for CUDA on CPU: cuDNN forward and
    backward calls, no Triton kernel, and no custom partitioning (which fails inside the model's
    partially manual shard_map)."""
    assert C.private_api_problem() is None, C.private_api_problem()
    n = 4
    mesh = make_mesh(data=1, context=n, devices=jax.devices()[:n])
    spec = P(None, "context")
    inner = lambda q, k, v: FA._ring_flash(q, k, v, None, "context", layout, 0.125, "cudnn")
    fn = jax.shard_map(inner, mesh=mesh, in_specs=(spec,) * 3, out_specs=spec)
    loss = lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32))
    q = jax.ShapeDtypeStruct((1, 512, 4, 64), jnp.bfloat16)
    k = jax.ShapeDtypeStruct((1, 512, 2, 64), jnp.bfloat16)
    hlo = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(q, k, k).lower(
        lowering_platforms=("cuda",)).as_text()
    assert "__cudnn$fmhaSoftmax" in hlo and "__cudnn$fmhaSoftmaxBackward" in hlo
    assert "__gpu$xla.gpu.triton" not in hlo and "CustomSPMDPartitioning" not in hlo
    with pytest.raises(ValueError, match="cuDNN block kernels cannot run here"):
        FA.ring_flash_attention(jnp.zeros((1, 64, 4, 64), jnp.bfloat16),
                                jnp.zeros((1, 64, 2, 64), jnp.bfloat16),
                                jnp.zeros((1, 64, 2, 64), jnp.bfloat16), "context", scale=0.1,
                                blocks="cudnn")


@pytest.mark.gpu
@pytest.mark.parametrize("extra", [["runtime.context.layout=zigzag"], ["model.attention_window=100"],
                                   ["model.attention_window=100", "runtime.remat=true"]])
def test_model_fused_equals_xla_on_gpus(extra):
    """The whole model on all local GPUs: context_kernel=fused and =xla give the same loss and grads."""
    from flax import nnx
    from jax.sharding import NamedSharding

    from ttt_jax.config import load_config
    from ttt_jax.models.lm import CausalLM

    devices = [d for d in jax.devices() if d.platform == "gpu"]
    n = len(devices)
    t = 512 * n
    base = ["model.vocab_size=64", "model.d_model=128", "model.n_layers=2", "model.n_heads=2",
            "model.n_kv_heads=1", "model.d_ff=256", "model.compute_dtype=bfloat16",
            f"model.max_seq_len={t}", "model.ttt.layers=[0]", "model.ttt.chunk_size=64", *extra]
    tokens = jax.random.randint(jax.random.key(1), (1, t), 0, 64)
    mesh = make_mesh(data=1, context=n, devices=devices)
    results = []
    for kernel in ("xla", "fused"):
        cfg = load_config(None, base + [f"runtime.context.kernel={kernel}"])
        graphdef, state = nnx.split(CausalLM(cfg.model, runtime=cfg.runtime, rngs=nnx.Rngs(0)))

        def loss(state, tokens):
            logits = nnx.merge(graphdef, state)(tokens).astype(jnp.float32)
            return jnp.mean(jax.nn.log_softmax(logits)[..., 0])

        with jax.set_mesh(mesh):
            tok = jax.device_put(tokens, NamedSharding(mesh, P(None, "context")))
            results.append(jax.jit(jax.value_and_grad(loss))(state, tok))
    _close(results[1], results[0], 2e-2)


def test_config_context_kernel():
    from ttt_jax.config import load_config

    kernel = lambda *o: load_config(None, list(o)).runtime.context.kernel
    assert kernel() == "auto"
    assert kernel("runtime.context.kernel=fused") == "fused"
    assert kernel("runtime.context.kernel=pallas") == "pallas"
    with pytest.raises(ValueError, match="runtime.context.kernel"):
        kernel("runtime.context.kernel=triton")
