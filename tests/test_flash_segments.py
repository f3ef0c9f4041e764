"""Pallas flash kernels with packed segments and windows: ``attention(impl="flash")``.

Values and gradients against ``attention_reference`` (the oracle of ``ttt_jax.ops.attention``), in
Pallas interpret mode on CPU at tiny shapes (tiles of 16 rows, so documents cross tiles), plus the
compiled kernels on a GPU and the ``impl="auto"`` choice.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ttt_jax.ops.kernels import flash as F
from ttt_jax.ops import attention as A

pytestmark = pytest.mark.unit


def _inputs(seed, b, t, h, kvh, d, dtype=jnp.float32):
    ks = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(ks[0], (b, t, h, d), jnp.float32).astype(dtype)
    k = jax.random.normal(ks[1], (b, t, kvh, d), jnp.float32).astype(dtype)
    v = jax.random.normal(ks[2], (b, t, kvh, d), jnp.float32).astype(dtype)
    ct = jax.random.normal(ks[3], (b, t, h, d), jnp.float32)
    return q, k, v, ct


def _packed(t, rows):
    """``[len(rows), t]`` ids from per-row lists of (id, length); the rest of a row is padding."""
    out = np.zeros((len(rows), t), np.int32)
    for r, docs in enumerate(rows):
        pos = 0
        for sid, n in docs:
            out[r, pos:pos + n] = sid
            pos += n
    return jnp.asarray(out)


def _value_and_grads(fn, q, k, v, ct):
    out, vjp = jax.vjp(fn, q, k, v)
    return (out,) + vjp(ct.astype(out.dtype))


def _close(got, want, tol):
    for g, w in zip(got, want):
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w, np.float32),
                                   atol=tol, rtol=tol)


# T = 75 is padded to 80 = 5 tiles of 16; documents of 23/30/... tokens cross tile boundaries.
# Row 0 ends in padding; row 1 reuses id 1 after id 2 (same id = same document) and starts with a
# one-token document; row 1 also has padding in the middle.
_T = 75
_SEG = _packed(_T, [[(1, 23), (2, 30), (3, 12)],
                    [(5, 1), (1, 20), (0, 5), (2, 17), (1, 25), (7, 7)]])


@pytest.mark.parametrize("window, rows, skip", [(0, 2, True), (19, 2, True), (0, 1, False)])
def test_flash_segments_match_reference(window, rows, skip, monkeypatch):
    """``skip``: tiles with disjoint id ranges skipped (the default) or computed and masked
    (another batch size, so that the kernels are traced again with the flag)."""
    monkeypatch.setattr(F, "_SKIP_SEGMENT_TILES", skip)
    seg = _SEG[2 - rows:]
    q, k, v, ct = _inputs(0, rows, _T, 4, 2, 16)
    f = lambda q, k, v: A.attention(q, k, v, segment_ids=seg, window=window, impl="flash")
    ref = lambda q, k, v: A.attention_reference(q, k, v, segment_ids=seg, window=window)
    got = _value_and_grads(f, q, k, v, ct)
    _close(got, _value_and_grads(ref, q, k, v, ct), 2e-5)
    pad = np.asarray(seg == 0)
    out, dq = np.asarray(got[0]), np.asarray(got[1])
    assert pad.any() and np.all(out[pad] == 0.0) and np.all(dq[pad] == 0.0)
    assert np.all(np.isfinite(out)) and all(np.all(np.isfinite(np.asarray(x))) for x in got[1:])


@pytest.mark.parametrize("window", [0, 5])
def test_flash_no_segments_match_reference(window):
    """Odd length (padded inside), head_dim 24 (zero-padded to 32), MHA."""
    q, k, v, ct = _inputs(1, 1, 37, 2, 2, 24)
    f = lambda q, k, v: A.attention(q, k, v, window=window, impl="flash")
    ref = lambda q, k, v: A.attention_reference(q, k, v, window=window)
    _close(_value_and_grads(f, q, k, v, ct), _value_and_grads(ref, q, k, v, ct), 2e-5)


def test_block_kernels_segments_non_causal_and_errors():
    """The block API with distinct q / k ids, no causal mask, and its argument checks."""
    q, k, v, ct = _inputs(2, 1, 32, 2, 1, 16)
    kk, vv = k[:, :16], v[:, :16]
    qs = _packed(32, [[(1, 10), (2, 12)]])                                 # 10 padding queries
    ks = _packed(16, [[(2, 6), (1, 8)]])
    out, lse = F.flash_block_fwd(q, kk, vv, causal=False, scale=0.25, interpret=True,
                                 q_segment_ids=qs, k_segment_ids=ks)
    mask = (qs[0][:, None] == ks[0][None, :]) & (qs[0][:, None] != 0)     # [Tq, Tk]
    s = jnp.einsum("bqhd,bkhd->bhqk", q, jnp.repeat(kk, 2, axis=2)) * 0.25
    s = jnp.where(mask, s, -jnp.inf)
    want_lse = jax.nn.logsumexp(s, axis=-1)
    p = jnp.where(mask, jnp.exp(s - jnp.where(mask.any(-1), want_lse, 0.0)[..., None]), 0.0)
    want = jnp.einsum("bhqk,bkhd->bqhd", p, jnp.repeat(vv, 2, axis=2))
    live = np.asarray(mask.any(-1))
    np.testing.assert_allclose(np.asarray(out), np.asarray(want), atol=2e-5)
    np.testing.assert_allclose(np.asarray(lse)[..., live], np.asarray(want_lse)[..., live], atol=2e-5)
    assert np.all(np.asarray(lse)[..., ~live] == 0.0)
    with pytest.raises(ValueError, match="window"):
        F.flash_block_fwd(q, kk, vv, causal=False, scale=0.25, interpret=True, window=4)
    with pytest.raises(ValueError, match="both"):
        F.flash_block_fwd(q, kk, vv, causal=False, scale=0.25, interpret=True, q_segment_ids=qs)
    with pytest.raises(ValueError, match="segment ids must be"):
        F.flash_block_fwd(q, kk, vv, causal=False, scale=0.25, interpret=True, q_segment_ids=qs,
                          k_segment_ids=qs)


@pytest.mark.slow
def test_model_flash_equals_reference_attention():
    """A tiny model (GQA, a TTT layer) on packed rows: ``runtime.attention_impl="flash"`` gives the loss and
    parameter gradients of ``"reference"``."""
    from flax import nnx

    from ttt_jax.config import ModelConfig, RuntimeConfig, TTTConfig
    from ttt_jax.models.lm import CausalLM

    t = 48
    seg = _packed(t, [[(1, 20), (2, 21)]])
    tokens = jax.random.randint(jax.random.key(5), (1, t), 0, 259)
    grads = []
    for impl in ("reference", "flash"):
        cfg = ModelConfig(vocab_size=259, d_model=32, n_layers=1, n_heads=4, n_kv_heads=2, d_ff=64,
                          max_seq_len=64, compute_dtype="float32",
                          ttt=TTTConfig(enabled=True, every=2, start=0, chunk_size=8, lr=1.0))
        model = CausalLM(cfg, runtime=RuntimeConfig(attention_impl=impl, ttt_impl="reference"),
                         rngs=nnx.Rngs(0))
        loss = lambda m: jnp.mean(jnp.sin(m(tokens, segment_ids=seg)))
        value, grad = nnx.jit(nnx.value_and_grad(loss))(model)   # jitted: op by op is slow on CI
        grads.append([value] + jax.tree.leaves(grad))
    _close(grads[1], grads[0], 2e-5)


def test_auto_picks_flash_only_for_large_segment_masks(monkeypatch):
    """GPU rule: cuDNN unless segment ids would need a dense bias above the limit, then flash;
    fp32 (cuDNN and the GPU kernels both refuse it) goes to XLA. Shapes only: nothing runs."""
    sds = jax.ShapeDtypeStruct
    t_big = int(np.sqrt(A.CUDNN_MAX_MASK_ELEMENTS)) * 2
    q_big, seg_big = sds((1, t_big, 8, 128), jnp.bfloat16), sds((1, t_big), jnp.int32)
    q_small, seg_small = sds((1, 1024, 8, 128), jnp.bfloat16), sds((1, 1024), jnp.int32)
    monkeypatch.setattr(A, "_default_backend", lambda: "gpu")
    assert A._auto_impl(q_big, None) == "cudnn"
    assert A._auto_impl(q_small, seg_small) == "cudnn"
    assert A._auto_impl(q_big, seg_big) == "flash"
    assert A._auto_impl(sds(q_big.shape, jnp.float32), seg_big) == "xla"
    monkeypatch.setattr(A, "_default_backend", lambda: "tpu")
    assert A._auto_impl(q_big, seg_big) == "pallas"
    monkeypatch.setattr(A, "_default_backend", lambda: "cpu")
    assert A._auto_impl(q_big, seg_big) == "xla"


@pytest.mark.parametrize("window", [0, 300])
def test_flash_segments_lower_for_gpu(window, monkeypatch):
    """Cross-lower forward and backward for CUDA on CPU: the segmented / windowed kernels (with
    tile skipping) pass Pallas's Triton lowering."""
    monkeypatch.setattr(F, "flash_unsupported_reason", lambda *a, **k: None)
    seg = jax.ShapeDtypeStruct((2, 1024), jnp.int32)
    q = jax.ShapeDtypeStruct((2, 1024, 8, 128), jnp.bfloat16)
    k = jax.ShapeDtypeStruct((2, 1024, 2, 128), jnp.bfloat16)
    loss = lambda q, k, v, s: jnp.sum(F.flash_attention(q, k, v, True, None, False, segment_ids=s,
                                                        window=window).astype(jnp.float32))
    hlo = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(q, k, k, seg).lower(
        lowering_platforms=("cuda",)).as_text()
    assert hlo.count("__gpu$xla.gpu.triton") >= 3  # forward, dQ and dK/dV kernels


@pytest.mark.gpu
@pytest.mark.parametrize("window", [0, 700])
def test_flash_segments_compiled_on_gpu(window):
    """Compiled Triton kernels, bf16, packed documents (lengths not multiples of the tiles,
    padding at the end), GQA 4:1, head_dim 128, vs the fp32 reference."""
    t = 2000                                                            # padded to 2048 inside
    q, k, v, ct = _inputs(3, 2, t, 8, 2, 128)
    seg = _packed(t, [[(1, 700), (2, 333), (3, 900)], [(4, 1500), (9, 490)]])
    bf = lambda x: x.astype(jnp.bfloat16)
    f = lambda q, k, v: A.attention(q, k, v, segment_ids=seg, window=window, impl="flash")
    ref = lambda q, k, v: A.attention_reference(q, k, v, segment_ids=seg, window=window)
    got = _value_and_grads(jax.jit(f), bf(q), bf(k), bf(v), ct)
    want = _value_and_grads(ref, q, k, v, ct)
    _close(got[:1], want[:1], 3e-2)
    _close(got[1:], want[1:], 1e-1)
    pad = np.asarray(seg == 0)
    assert np.all(np.asarray(got[0])[pad] == 0) and np.all(np.asarray(got[1])[pad] == 0)
