"""``runtime.scan_layers``: stacked layer parameters run by one ``nnx.scan`` equal the unrolled model.

Weights of an unrolled model are copied into a scanned one with ``stack_layer_params``; logits and
gradients must match (fp32, tight) with and without packed segments, with remat on and off, with
and without In-Place TTT, and for periodic sliding-window layouts. Non-periodic layer structures are
rejected at construction with a message naming the fix.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ttt_jax.config import ConfigError, ModelConfig, RuntimeConfig, TTTConfig, load_config
from ttt_jax.models.layers import LAYERS_AXIS, scan_period, stack_layer_params, unstack_layer_params
from ttt_jax.models.lm import CausalLM, count_params
from ttt_jax.nn import logical_axes

pytestmark = pytest.mark.model

V = 259
# 4 layers, TTT on layers 0 and 2 (period 2 -> 2 groups). The TTT op is the training default
# ("scan", with its custom VJP: the op that motivates scan_layers).
BASE = ModelConfig(vocab_size=V, d_model=32, n_layers=4, n_heads=4, n_kv_heads=2, d_ff=64,
                   max_seq_len=128, compute_dtype="float32",
                   ttt=TTTConfig(enabled=True, every=2, start=0, chunk_size=8, lr=1.0))
RT = RuntimeConfig(attention_impl="reference", ttt_impl="scan")     # unrolled layers
SCAN = dataclasses.replace(RT, scan_layers=True)
T = 40


def cfg_of(**kw) -> ModelConfig:
    ttt = kw.pop("ttt", {})
    cfg = dataclasses.replace(BASE, **kw)
    return dataclasses.replace(cfg, ttt=dataclasses.replace(cfg.ttt, **ttt))


def _loss_and_logits(model, tokens, segment_ids):
    seg_in = None if segment_ids is None else segment_ids[:, :-1]
    logits = model(tokens[:, :-1], segment_ids=seg_in)
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
    w = jnp.ones_like(nll) if segment_ids is None else (segment_ids[:, 1:] > 0).astype(nll.dtype)
    return jnp.sum(nll * w) / jnp.sum(w), logits


# Jitted once at module level: a model's graph (config included) keys the compilation cache, so
# the unrolled reference model compiles once for the tests that share its config.
_GRAD = nnx.jit(nnx.value_and_grad(_loss_and_logits, has_aux=True))
_FWD = nnx.jit(lambda m, t, s: m(t, segment_ids=s))


def _tokens(b=2, t=T + 1, seed=0):
    return jax.random.randint(jax.random.key(seed), (b, t), 0, V, dtype=jnp.int32)


def _segments(b=2, t=T + 1):
    row = [1] * 13 + [2] * 19 + [3] * (t - 13 - 19 - 3) + [0] * 3
    return jnp.asarray(np.repeat([row], b, axis=0), jnp.int32)


def _activate_ttt(model: CausalLM, seed: int = 3, scale: float = 0.3) -> None:
    """Non-zero conv and a dense target projection so that TTT changes the output."""
    key = jax.random.key(seed)
    for block in model.layers:
        if block.is_ttt:
            k1, k2, key = jax.random.split(key, 3)
            conv, proj = block.mlp.ttt_conv, block.mlp.ttt_proj
            conv[...] = jax.random.normal(k1, conv.shape, conv.dtype)
            proj[...] = scale * jax.random.normal(k2, proj.shape, proj.dtype)


def _pair(cfg: ModelConfig, **scan_kw):
    """An unrolled model of ``cfg`` (TTT activated) and a scanned one (runtime ``SCAN`` with
    ``scan_kw``, e.g. ``remat=True``) holding the same weights."""
    unrolled = CausalLM(cfg, runtime=RT, rngs=nnx.Rngs(0))
    _activate_ttt(unrolled)
    runtime = dataclasses.replace(SCAN, **scan_kw)
    # Built abstractly (no values): every weight of the scanned model must come from the copy.
    scanned = nnx.eval_shape(lambda: CausalLM(cfg, runtime=runtime, rngs=nnx.Rngs(1)))
    nnx.update(scanned, stack_layer_params(nnx.state(unrolled), cfg))
    return unrolled, scanned, cfg


def _assert_same_grads(unrolled, scanned, scfg, tokens, seg):
    """Loss, logits and every parameter gradient (mapped to the stacked layout) agree."""
    (l0, z0), g0 = _GRAD(unrolled, tokens, seg)
    (l1, z1), g1 = _GRAD(scanned, tokens, seg)
    np.testing.assert_allclose(z1, z0, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(float(l1), float(l0), rtol=1e-6)
    flat0 = dict(nnx.to_flat_state(stack_layer_params(g0, scfg)))
    flat1 = dict(nnx.to_flat_state(g1))
    assert flat0.keys() == flat1.keys()
    for path in flat0:
        np.testing.assert_allclose(flat1[path][...], flat0[path][...], rtol=1e-4, atol=1e-6,
                                   err_msg=str(path))
    return z0


def _assert_same_logits(unrolled, scanned, tokens, seg):
    z0, z1 = _FWD(unrolled, tokens, seg), _FWD(scanned, tokens, seg)
    np.testing.assert_allclose(z1, z0, rtol=1e-5, atol=1e-5)
    return z0


@pytest.mark.parametrize("remat", [False, pytest.param(True, marks=pytest.mark.slow)])  # ~25 CPU s each
def test_scan_equals_unrolled_with_ttt(remat):
    # The reference is always the plain unrolled model (remat does not change its numerics:
    # tests/test_model.py::test_remat_same_loss_and_grads), so it compiles once for both cases.
    unrolled, scanned, scfg = _pair(cfg_of(), remat=remat)
    assert scanned.period == 2 and len(scanned.layers) == 2
    assert [b.is_ttt for b in scanned.layers] == [True, False]
    tokens = _tokens()
    z_seg = _assert_same_grads(unrolled, scanned, scfg, tokens, _segments())
    if not remat:
        z = _assert_same_logits(unrolled, scanned, tokens[:, :-1], None)
        assert float(jnp.max(jnp.abs(z - z_seg))) > 1e-3    # the segments matter
        # TTT is active: turning the conv off changes the logits.
        off = nnx.clone(scanned)
        off.layers[0].mlp.ttt_conv[...] = jnp.zeros_like(off.layers[0].mlp.ttt_conv[...])
        assert float(jnp.max(jnp.abs(_FWD(off, tokens[:, :-1], None) - z))) > 1e-3


@pytest.mark.slow   # ~26 CPU s measured
def test_scan_equals_unrolled_without_ttt():
    cfg = cfg_of(ttt=dict(enabled=False))
    assert scan_period(cfg) == 1
    unrolled, scanned, scfg = _pair(cfg, remat=True)
    assert len(scanned.layers) == 1
    assert scanned.layers[0].attn.q.shape[0] == 4
    _assert_same_grads(unrolled, scanned, scfg, _tokens(), _segments())


def test_scan_sliding_window_periodic():
    # every=2 with layers 0 and 2 full attention, 1 and 3 sliding: periodic in i % 2.
    cfg = cfg_of(attention_window=5, full_attention_layers=(0, 2),
                 ttt=dict(start=1, target_source="hidden"))
    assert scan_period(cfg) == 2
    unrolled, scanned, _ = _pair(cfg)
    assert [b.attn.window for b in scanned.layers] == [0, 5]
    assert [b.is_ttt for b in scanned.layers] == [False, True]
    _assert_same_logits(unrolled, scanned, _tokens()[:, :-1], _segments()[:, :-1])


@pytest.mark.parametrize("kw,match", [
    (dict(n_layers=5), r"n_layers=5 is not a multiple of model.ttt.every=2.*scan_layers=false"),
    (dict(ttt=dict(start=2)), r"ttt.start < model.ttt.every.*start=2.*scan_layers=false"),
    (dict(ttt=dict(layers=(0, 1))), r"ttt.layers=\[0, 1\] is not of that form.*scan_layers=false"),
    (dict(ttt=dict(layers=(0, 2, 3))), r"ttt.layers=\[0, 2, 3\] is not of that form"),
    (dict(n_layers=6, ttt=dict(layers=(2, 4))), r"ttt.layers=\[2, 4\] is not of that form"),
    (dict(attention_window=5, full_attention_layers=(0,)),
     r"window.*i % 2.*layer 2 has window 5.*scan_layers=false"),
    (dict(attention_window=5, full_attention_layers=(1,), ttt=dict(enabled=False)),
     r"window.*i % 1.*layer 1 has window 0.*scan_layers=false"),
])
def test_non_periodic_structure_rejected(kw, match):
    cfg = cfg_of(**kw)
    with pytest.raises(ConfigError, match=match):
        CausalLM(cfg, runtime=SCAN, rngs=nnx.Rngs(0))
    assert issubclass(ConfigError, ValueError)
    # The unrolled model accepts the same structure.
    nnx.eval_shape(lambda: CausalLM(cfg, runtime=RT, rngs=nnx.Rngs(0)))


@pytest.mark.parametrize("kw,period", [
    (dict(), 2), (dict(ttt=dict(every=4)), 4), (dict(ttt=dict(every=1)), 1),
    (dict(ttt=dict(enabled=False)), 1), (dict(ttt=dict(layers=(1, 3))), 2),
    (dict(ttt=dict(layers=(0, 1, 2, 3))), 1), (dict(ttt=dict(layers=(3,))), 4),
    (dict(n_layers=6, ttt=dict(every=3, start=2)), 3),
    (dict(attention_window=5, full_attention_layers=(1, 3)), 2),
    (dict(attention_window=5, ttt=dict(enabled=False)), 1),
])
def test_scan_period(kw, period):
    cfg = cfg_of(**kw)
    assert scan_period(cfg) == period
    model = nnx.eval_shape(lambda: CausalLM(cfg, runtime=SCAN, rngs=nnx.Rngs(0)))
    assert model.period == period and len(model.layers) == period
    ttt = set(cfg.ttt.layer_ids(cfg.n_layers))
    for p, block in enumerate(model.layers):
        assert block.is_ttt == (p in ttt)
        assert block.attn.window == cfg.layer_window(p)
        assert block.attn_norm.scale.shape == (cfg.n_layers // period, cfg.d_model)


def test_scan_layers_config_key():
    cfg = load_config("tiny", ["runtime.scan_layers=true"])
    assert cfg.runtime.scan_layers is True
    assert scan_period(cfg.model) == 2   # the preset's explicit ttt.layers [0, 2] are periodic
    assert load_config("tiny").runtime.scan_layers is False
    with pytest.raises(ConfigError, match="runtime.scan_layers"):
        dataclasses.replace(SCAN, scan_layers="yes").validate()
    with pytest.raises(ConfigError, match="moved to runtime.scan_layers"):
        load_config("tiny", ["model.scan_layers=true"])


def test_stacked_params_tree_and_axis_names():
    cfg = cfg_of(tie_embeddings=False)
    model = CausalLM(cfg, runtime=SCAN, rngs=nnx.Rngs(0))
    unrolled = nnx.eval_shape(lambda: CausalLM(cfg, runtime=RT, rngs=nnx.Rngs(0)))
    assert count_params(model) == count_params(unrolled)
    flat = {p: v for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    by_path = {"/".join(map(str, p)): v for p, v in flat.items()}
    assert logical_axes(by_path["embed"]) == ("vocab", "embed")
    assert logical_axes(by_path["lm_head"]) == ("embed", "vocab")
    assert logical_axes(by_path["layers/0/attn/q"]) == (LAYERS_AXIS, "embed", "heads", "head_dim")
    assert by_path["layers/0/attn/q"].shape == (2, 32, 4, 8)
    assert logical_axes(by_path["layers/0/mlp/ttt_proj"]) == (LAYERS_AXIS, "embed", None)
    assert "layers/1/mlp/ttt_conv" not in by_path
    for path, v in flat.items():
        if path[0] != "layers":
            continue
        assert logical_axes(v)[0] == LAYERS_AXIS and v.shape[0] == 2, path
        assert len(logical_axes(v)) == v[...].ndim, path
    # Each group is initialised independently (except the constant-initialised ones).
    for name in ("layers/0/attn/q", "layers/1/mlp/down", "layers/0/mlp/ttt_proj"):
        w = np.asarray(by_path[name][...])
        assert not np.allclose(w[0], w[1]), name
    q0, q1 = (np.asarray(by_path[f"layers/{p}/attn/q"][...]) for p in (0, 1))
    assert not np.allclose(q0, q1)
    # The converters map the abstract unrolled state onto exactly this tree (shapes, dtypes, names).
    abstract = stack_layer_params(nnx.state(unrolled, nnx.Param), cfg)
    flat_abs = dict(nnx.to_flat_state(abstract))
    assert flat_abs.keys() == flat.keys()
    for path, v in flat.items():
        a = flat_abs[path]
        assert (a.shape, a.dtype) == (v.shape, v.dtype), path
        assert logical_axes(a) == logical_axes(v), path


def test_unstack_inverts_stack():
    cfg = cfg_of()
    unrolled = CausalLM(cfg, runtime=RT, rngs=nnx.Rngs(5))
    state = nnx.state(unrolled)
    back = unstack_layer_params(stack_layer_params(state, cfg), cfg)
    flat0, flat1 = list(nnx.to_flat_state(state)), list(nnx.to_flat_state(back))
    assert [p for p, _ in flat0] == [p for p, _ in flat1]
    for (path, a), (_, b) in zip(flat0, flat1):
        assert type(a) is type(b), path
        assert a.get_metadata() == b.get_metadata(), path
        np.testing.assert_array_equal(a[...], b[...], err_msg=str(path))
    # Plain nested dicts (nnx.to_pure_dict) work too and stay dicts.
    pure = nnx.to_pure_dict(state)
    stacked = stack_layer_params(pure, cfg)
    assert isinstance(stacked, dict) and stacked["layers"][1]["mlp"]["up"].shape == (2, 32, 64)
    np.testing.assert_array_equal(stacked["layers"][1]["mlp"]["up"][1],
                                  pure["layers"][3]["mlp"]["up"])
    with pytest.raises(ValueError, match="missing for layers"):
        del pure["layers"][3]
        stack_layer_params(pure, cfg)
