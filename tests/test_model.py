"""The NNX layers and the causal LM: init equivalence, causality, packing, gradients, remat, metadata."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ttt_jax.config import ModelConfig, RuntimeConfig, TTTConfig
from ttt_jax.models import (CausalLM, check_tokens, count_params, effective_keys, flops_per_token,
                            matmul_params, positions_from_segments)
from ttt_jax.nn import LOGICAL_AXES, RMSNorm, apply_rope, logical_axes
from ttt_jax.ops import inplace_ttt_target

pytestmark = pytest.mark.model

V = 259
# Tiny model: TTT on layer 0 of 2. The oracle implementations (explicit attention, sequential TTT)
# compile fastest; the default ("auto") implementations are exercised by the tests that say so.
TINY = ModelConfig(vocab_size=V, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128,
                   max_seq_len=256, compute_dtype="float32",
                   ttt=TTTConfig(enabled=True, every=2, start=0, chunk_size=8, lr=1.0))
REF = RuntimeConfig(attention_impl="reference", ttt_impl="reference")
AUTO = RuntimeConfig()     # the default implementations


def tiny(**kw) -> ModelConfig:
    ttt = kw.pop("ttt", {})
    cfg = dataclasses.replace(TINY, **kw)
    return dataclasses.replace(cfg, ttt=dataclasses.replace(cfg.ttt, **ttt))


# Jitted once at module level so that compilations are cached across calls and tests.
_FWD = nnx.jit(lambda m, t, s: m(t, segment_ids=s))


def _forward(model, tokens, segment_ids=None):
    return _FWD(model, tokens, segment_ids)


def _tokens(b, t, seed=0):
    return jax.random.randint(jax.random.key(seed), (b, t), 0, V, dtype=jnp.int32)


def _activate_ttt(model: CausalLM, seed: int = 7, scale: float = 0.5) -> None:
    """Make the TTT path matter: non-zero conv and a dense, sizeable target projection."""
    key = jax.random.key(seed)
    for block in model.layers:
        if block.is_ttt:
            k1, k2, key = jax.random.split(key, 3)
            conv = block.mlp.ttt_conv
            proj = block.mlp.ttt_proj
            conv[...] = jax.random.normal(k1, conv.shape, conv.dtype)
            proj[...] = scale * jax.random.normal(k2, proj.shape, proj.dtype)


def _loss(model, tokens, segment_ids=None):
    logits = model(tokens[:, :-1], segment_ids=None if segment_ids is None else segment_ids[:, :-1])
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1))


# ---------------------------------------------------------------------------------------------
# In-Place TTT at initialisation
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("compute_dtype,target_source,runtime", [
    ("float32", "embeddings", AUTO), ("bfloat16", "hidden", REF)])
def test_ttt_at_init_equals_base(compute_dtype, target_source, runtime):
    cfg = tiny(compute_dtype=compute_dtype, ttt=dict(target_source=target_source))
    base_cfg = dataclasses.replace(cfg, ttt=dataclasses.replace(cfg.ttt, enabled=False))
    ttt_model = CausalLM(cfg, runtime=runtime, rngs=nnx.Rngs(0))
    base = CausalLM(base_cfg, runtime=runtime, rngs=nnx.Rngs(0))
    assert [b.is_ttt for b in ttt_model.layers] == [True, False]
    assert not any(b.is_ttt for b in base.layers)
    tokens = _tokens(3, 29)
    seg = jnp.asarray(np.repeat([[1] * 13 + [2] * 14 + [0] * 2], 3, axis=0))
    # The zero-initialised conv makes the target exactly zero ...
    block = ttt_model.layers[0]
    x0 = ttt_model.embed_tokens(tokens)
    v = inplace_ttt_target(x0, block.mlp.ttt_conv[...], block.mlp.ttt_proj[...],
                           chunk_size=8, segment_ids=seg)
    assert np.all(np.asarray(v) == 0)
    # ... so the model computes exactly the base model: bitwise on CPU; on GPU the TTT op's
    # differently shaped GEMMs (other cuBLAS kernels) may round differently.
    if jax.default_backend() == "cpu":
        assert_same = np.testing.assert_array_equal
    else:
        tol = 1e-5 if compute_dtype == "float32" else 2e-2
        assert_same = lambda x, y: np.testing.assert_allclose(x, y, rtol=tol, atol=tol)
    assert_same(_forward(ttt_model, tokens, seg), _forward(base, tokens, seg))
    # The base path of the TTT model itself: copy its shared weights into a plain model.
    base2 = CausalLM(base_cfg, runtime=runtime, rngs=nnx.Rngs(123))
    shared = nnx.state(ttt_model, nnx.Param)
    flat = {p: v for p, v in nnx.to_flat_state(shared) if p[-1] not in ("ttt_conv", "ttt_proj")}
    nnx.update(base2, nnx.from_flat_state(flat))
    assert_same(_forward(ttt_model, tokens, seg), _forward(base2, tokens, seg))
    # ... and the TTT path does change things once the conv is non-zero.
    _activate_ttt(ttt_model)
    diff = _forward(ttt_model, tokens, seg) - _forward(base, tokens, seg)
    assert float(jnp.max(jnp.abs(diff))) > 1e-3


# ---------------------------------------------------------------------------------------------
# Causality and packing (with TTT active, so that a leak would show)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("target_source", ["embeddings", "hidden"])
def test_causality(target_source):
    cfg = tiny(attention_window=6, full_attention_layers=(1,), ttt=dict(target_source=target_source))
    model = CausalLM(cfg, runtime=REF, rngs=nnx.Rngs(1))
    _activate_ttt(model)
    tokens = _tokens(2, 37)
    fwd = _forward
    base = fwd(model, tokens)
    for t in (0, 13, 20, 36):     # chunk start, mid-chunk (conv looks 2 ahead), ..., last token
        pert = fwd(model, tokens.at[:, t].set((tokens[:, t] + 1) % V))
        np.testing.assert_allclose(pert[:, :t], base[:, :t], rtol=0, atol=1e-6,
                                   err_msg=f"logits before {t} changed")
        assert float(jnp.max(jnp.abs(pert[:, t] - base[:, t]))) > 1e-4


def test_ttt_only_sees_earlier_chunks():
    """The TTT contribution at chunk i depends on chunks < i only (isolates the TTT path)."""
    model = CausalLM(tiny(), runtime=REF, rngs=nnx.Rngs(2))
    _activate_ttt(model)
    tokens = _tokens(1, 32)
    block = model.layers[0]
    h = jax.random.normal(jax.random.key(3), (1, 32, 64))
    x0 = model.embed_tokens(tokens)
    out = block.mlp(h, x0=x0)
    x0p = x0.at[:, 12].add(1.0)                  # token 12 is in chunk 1 (tokens 8..15)
    outp = block.mlp(h, x0=x0p)
    np.testing.assert_allclose(outp[:, :16], out[:, :16], rtol=0, atol=1e-6)
    assert float(jnp.max(jnp.abs(outp[:, 16:] - out[:, 16:]))) > 1e-4


def test_packed_equals_separate_when_chunk_aligned():
    """Default implementations (auto attention, scan TTT)."""
    model = CausalLM(tiny(attention_window=10, full_attention_layers=(1,)), runtime=AUTO,
                     rngs=nnx.Rngs(4))
    _activate_ttt(model)
    a, b = _tokens(1, 16, seed=5), _tokens(1, 24, seed=6)
    packed = jnp.concatenate([a, b, jnp.zeros((1, 8), jnp.int32)], axis=1)        # + padding
    seg = jnp.asarray([[1] * 16 + [2] * 24 + [0] * 8], jnp.int32)
    out = _forward(model, packed, seg)
    np.testing.assert_allclose(out[:, :16], _forward(model, a), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out[:, 16:40], _forward(model, b), rtol=1e-5, atol=1e-5)
    assert bool(jnp.all(jnp.isfinite(out)))


def test_no_cross_document_influence_unaligned():
    model = CausalLM(tiny(), runtime=REF, rngs=nnx.Rngs(5))
    _activate_ttt(model)
    lens = (11, 13, 9)                                   # documents start mid-chunk
    seg = jnp.asarray([sum(([i + 1] * n for i, n in enumerate(lens)), [])], jnp.int32)
    tokens = _tokens(1, sum(lens), seed=8)
    fwd = _forward
    base = fwd(model, tokens, seg)
    d1 = slice(0, 11)
    d2 = slice(11, 24)
    d3 = slice(24, 33)
    pert = tokens.at[:, d1].set((tokens[:, d1] + 7) % V)
    out = fwd(model, pert, seg)
    assert float(jnp.max(jnp.abs(out[:, d1] - base[:, d1]))) > 1e-4
    np.testing.assert_allclose(out[:, d2], base[:, d2], rtol=0, atol=1e-6)
    np.testing.assert_allclose(out[:, d3], base[:, d3], rtol=0, atol=1e-6)
    pert = tokens.at[:, d2].set((tokens[:, d2] + 7) % V)
    out = fwd(model, pert, seg)
    np.testing.assert_allclose(out[:, d1], base[:, d1], rtol=0, atol=1e-6)
    np.testing.assert_allclose(out[:, d3], base[:, d3], rtol=0, atol=1e-6)
    # A document's result equals running it alone at the same chunk phase: doc 2 alone, preceded by
    # an unrelated doc of the same length, gives the same logits.
    other = jnp.concatenate([_tokens(1, 11, seed=9), tokens[:, d2]], axis=1)
    alone = fwd(model, other, seg[:, :24])
    np.testing.assert_allclose(alone[:, 11:], base[:, d2], rtol=1e-5, atol=1e-5)


def test_positions_from_segments():
    seg = jnp.asarray([[1, 1, 1, 2, 2, 0, 0], [3, 3, 1, 1, 1, 1, 1]])
    np.testing.assert_array_equal(positions_from_segments(seg),
                                  [[0, 1, 2, 0, 1, 0, 1], [0, 1, 0, 1, 2, 3, 4]])


# ---------------------------------------------------------------------------------------------
# Gradients, remat, variants
# ---------------------------------------------------------------------------------------------


_LOSS_AND_GRADS = nnx.jit(nnx.value_and_grad(_loss))


def _loss_and_grads(model, tokens, seg=None):
    return _LOSS_AND_GRADS(model, tokens, seg)


def test_gradients_finite_and_reach_ttt_params():
    """The training configuration: bf16 compute, default implementations, packed rows."""
    model = CausalLM(tiny(compute_dtype="bfloat16"), runtime=AUTO, rngs=nnx.Rngs(6))
    tokens = _tokens(3, 25)
    seg = jnp.asarray(np.repeat([[1] * 10 + [2] * 12 + [0] * 3], 3, axis=0))
    loss, grads = _loss_and_grads(model, tokens, seg)
    assert np.isfinite(float(loss))
    for path, g in nnx.to_flat_state(grads):
        assert bool(jnp.all(jnp.isfinite(g[...]))), path
    # At init the conv is zero but its gradient is not: the TTT path is trainable end to end.
    assert float(jnp.max(jnp.abs(grads["layers"][0]["mlp"]["ttt_conv"][...]))) > 0


@pytest.mark.slow
def test_remat_same_loss_and_grads():
    tokens = _tokens(2, 21)
    results = []
    for remat in (False, True):
        model = CausalLM(tiny(), runtime=dataclasses.replace(REF, remat=remat), rngs=nnx.Rngs(7))
        _activate_ttt(model, scale=0.1)
        results.append(_loss_and_grads(model, tokens))
    (l0, g0), (l1, g1) = results
    np.testing.assert_allclose(float(l1), float(l0), rtol=1e-6)
    flat0, flat1 = dict(nnx.to_flat_state(g0)), dict(nnx.to_flat_state(g1))
    assert flat0.keys() == flat1.keys()
    for path in flat0:
        np.testing.assert_allclose(flat1[path][...], flat0[path][...], rtol=1e-5, atol=1e-7,
                                   err_msg=str(path))


@pytest.mark.parametrize("variant", [
    dict(qk_norm=False, tie_embeddings=False),
    dict(attention_window=5, full_attention_layers=(0,), compute_dtype="bfloat16",
         ttt=dict(target_source="hidden", clip_tau=0.5)),
    dict(param_dtype="bfloat16", compute_dtype="bfloat16", n_kv_heads=1, head_dim=8,
         ttt=dict(layers=(1,)), runtime=dict(ttt_impl="associative")),
])
def test_variants_run(variant):
    variant = dict(variant)
    runtime = dataclasses.replace(REF, **variant.pop("runtime", {}))
    cfg = tiny(**variant)
    model = CausalLM(cfg, runtime=runtime, rngs=nnx.Rngs(8))
    _activate_ttt(model, scale=0.1)
    tokens = _tokens(3, 19)
    logits = _forward(model, tokens)
    assert logits.shape == (3, 19, V) and logits.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(logits)))
    assert (model.lm_head is None) == cfg.tie_embeddings
    has_qk = model.layers[0].attn.q_norm is not None
    assert has_qk == cfg.qk_norm


def test_attention_impls_agree_in_model():
    tokens = _tokens(2, 23)
    seg = jnp.asarray(np.repeat([[1] * 9 + [2] * 12 + [0] * 2], 2, axis=0))
    outs = [_forward(CausalLM(tiny(attention_window=7, n_layers=1),
                              runtime=dataclasses.replace(REF, attention_impl=impl), rngs=nnx.Rngs(9)), tokens, seg) for impl in ("reference", "xla")]
    np.testing.assert_allclose(outs[1], outs[0], rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Metadata, checks, counting
# ---------------------------------------------------------------------------------------------


def test_logical_axis_names_on_every_param():
    model = CausalLM(tiny(tie_embeddings=False), runtime=REF, rngs=nnx.Rngs(0))
    flat = list(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    assert flat
    for path, param in flat:
        names = logical_axes(param)
        assert names is not None, path
        assert len(names) == param[...].ndim, (path, names)
        assert all(n is None or n in LOGICAL_AXES for n in names), (path, names)
        assert any(n is not None for n in names), path
    by_path = {"/".join(map(str, p)): logical_axes(v) for p, v in flat}
    assert by_path["embed"] == ("vocab", "embed")
    assert by_path["lm_head"] == ("embed", "vocab")
    assert by_path["layers/0/attn/q"] == ("embed", "heads", "head_dim")
    assert by_path["layers/0/attn/k"] == ("embed", "kv_heads", "head_dim")
    assert by_path["layers/0/attn/o"] == ("heads", "head_dim", "embed")
    assert by_path["layers/0/mlp/down"] == ("mlp", "embed")
    assert by_path["layers/0/mlp/ttt_conv"] == ("conv", "embed")
    assert by_path["layers/0/attn/q_norm/scale"] == ("norm",)
    # Logical names resolve to mesh axes through Flax's rules machinery.
    rules = [("embed", "fsdp"), ("mlp", "tensor"), ("heads", "tensor"), ("kv_heads", "tensor"),
             ("vocab", None), ("head_dim", None), ("norm", None), ("conv", None)]
    with nnx.logical_axis_rules(rules):
        specs = nnx.get_partition_spec(nnx.state(model, nnx.Param))
    spec = specs["layers"][0]["mlp"]["gate"]
    spec = spec.get_value() if isinstance(spec, nnx.Variable) else spec
    assert tuple(spec) == ("fsdp", "tensor")


def test_init_values():
    cfg = tiny()
    model = CausalLM(cfg, runtime=REF, rngs=nnx.Rngs(0))
    mlp = model.layers[0].mlp
    assert np.all(np.asarray(mlp.ttt_conv[...]) == 0)
    proj = np.asarray(mlp.ttt_proj[...])
    assert np.all(proj[~np.eye(64, dtype=bool)] == 0)
    assert 0.005 < np.std(np.diag(proj)) < 0.05
    assert all(p[...].dtype == jnp.float32 for _, p in nnx.to_flat_state(nnx.state(model, nnx.Param)))


def test_count_params_and_flops():
    cfg = tiny(tie_embeddings=False)
    model = CausalLM(cfg, runtime=REF, rngs=nnx.Rngs(0))
    d, f, h, kv, dh, L = 64, 128, 4, 2, 16, 2
    layer = d * h * dh + 2 * d * kv * dh + h * dh * d + 3 * d * f + 2 * d + 2 * dh
    ttt = 5 * d + d * d
    assert count_params(model) == V * d * 2 + d + L * layer + 1 * ttt
    n_mm = L * (d * h * dh + 2 * d * kv * dh + h * dh * d + 3 * d * f) + d * V
    assert matmul_params(cfg) == n_mm
    t = 64
    expect = 6 * n_mm + L * 12 * (t + 1) / 2 * h * dh + 1 * 3 * (2 * d * d + 2 * 5 * d + 4 * f * d)
    assert flops_per_token(cfg, t) == pytest.approx(expect)
    assert effective_keys(100, 10) == pytest.approx((55 + 90 * 10) / 100)
    assert effective_keys(8, 10) == effective_keys(8) == 4.5
    assert flops_per_token(tiny(attention_window=8), 1024) < flops_per_token(tiny(), 1024)
    assert flops_per_token(tiny(ttt=dict(enabled=False)), 64) < flops_per_token(tiny(), 64)


def test_token_range_checked():
    model = CausalLM(tiny(n_layers=1), runtime=REF, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"\[0, 259\)"):
        model(jnp.asarray([[1, 2, 259]], jnp.int32))
    with pytest.raises(ValueError, match="must be integers"):
        check_tokens(jnp.zeros((1, 3), jnp.float32), V)
    with pytest.raises(ValueError):
        check_tokens(np.asarray([[-1, 0]]), V)
    check_tokens(np.asarray([[0, V - 1]]), V)
    with pytest.raises(ValueError, match="segment_ids"):
        model(jnp.zeros((1, 4), jnp.int32), segment_ids=jnp.ones((1, 3), jnp.int32))


def test_bad_config_rejected():
    with pytest.raises(ValueError, match="n_kv_heads"):
        CausalLM(tiny(n_kv_heads=3), runtime=REF, rngs=nnx.Rngs(0))


# ---------------------------------------------------------------------------------------------
# RMSNorm and RoPE
# ---------------------------------------------------------------------------------------------


def test_rmsnorm_matches_numpy():
    norm = RMSNorm(8, eps=1e-6)
    norm.scale[...] = jnp.arange(1.0, 9.0)
    x = np.random.default_rng(0).normal(size=(2, 3, 8)).astype(np.float32)
    ref = x / np.sqrt(np.mean(x ** 2, -1, keepdims=True) + 1e-6) * np.arange(1.0, 9.0)
    np.testing.assert_allclose(norm(jnp.asarray(x)), ref, rtol=1e-5, atol=1e-6)
    assert norm(jnp.asarray(x, jnp.bfloat16)).dtype == jnp.bfloat16


def test_rope_matches_hf_formula_and_is_relative():
    rng = np.random.default_rng(0)
    b, t, h, d, theta = 2, 9, 3, 8, 500.0
    x = rng.normal(size=(b, t, h, d)).astype(np.float32)
    pos = rng.integers(0, 1000, size=(b, t))
    inv = 1.0 / theta ** (np.arange(0, d, 2) / d)
    ang = pos[..., None] * inv
    cos = np.cos(np.concatenate([ang, ang], -1))[:, :, None]
    sin = np.sin(np.concatenate([ang, ang], -1))[:, :, None]
    rot = np.concatenate([-x[..., d // 2:], x[..., :d // 2]], -1)
    np.testing.assert_allclose(apply_rope(jnp.asarray(x), jnp.asarray(pos), theta=theta),
                               x * cos + rot * sin, rtol=1e-4, atol=1e-4)
    # <rope(q, m), rope(k, n)> depends on m - n only.
    q, k = jnp.asarray(x[:1, :1]), jnp.asarray(x[1:, :1])
    dot = lambda m, n: jnp.sum(apply_rope(q, jnp.full((1, 1), m), theta=theta) *
                               apply_rope(k, jnp.full((1, 1), n), theta=theta))
    np.testing.assert_allclose(dot(17, 5), dot(112, 100), rtol=1e-4)
