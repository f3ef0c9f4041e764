"""TTT-Linear / TTT-MLP as sequence-mixing layers of the model: config, wiring, causality, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ttt_jax.parallel.mesh import make_mesh
from ttt_jax.config import ConfigError, ModelConfig, RuntimeConfig, TTTConfig, TTTSeqConfig, load_config
from ttt_jax.models.layers import stack_layer_params
from ttt_jax.models.lm import CausalLM
from ttt_jax.nn.ttt_seq import TTTSeqLayer

pytestmark = pytest.mark.model

BASE = dict(vocab_size=37, d_model=16, n_layers=2, n_heads=2, n_kv_heads=1, d_ff=24, max_seq_len=64,
            compute_dtype="float32", ttt=TTTConfig(enabled=False))


def _cfg(**seq):
    return ModelConfig(**BASE, ttt_seq=TTTSeqConfig(**{"enabled": True, "mini_batch": 4, **seq}))


def _tokens(b=2, t=11, seed=0):
    return jax.random.randint(jax.random.PRNGKey(seed), (b, t), 0, BASE["vocab_size"])


def test_default_config_has_no_ttt_seq_layers():
    model = CausalLM(ModelConfig(**BASE), rngs=nnx.Rngs(0))
    for block in model.layers:
        assert block.ttt_seq is None and block.attn is not None
    cfg = load_config("tiny")
    assert not cfg.model.ttt_seq.enabled and not cfg.model.e2e.enabled


@pytest.mark.parametrize("kind,mode", [("linear", "replace"), ("mlp", "beside")])
def test_layers_wired_and_causal(kind, mode):
    cfg = _cfg(kind=kind, mode=mode, layers=(1,), output_gate=(kind == "mlp"))
    model = CausalLM(cfg, rngs=nnx.Rngs(0))
    assert model.layers[0].ttt_seq is None and model.layers[0].attn is not None
    assert isinstance(model.layers[1].ttt_seq, TTTSeqLayer)
    assert (model.layers[1].attn is None) == (mode == "replace")
    tok = _tokens()
    fwd = nnx.jit(lambda m, x: m(x))
    out = fwd(model, tok)
    t = 6
    pert = fwd(model, tok.at[:, t].set((tok[:, t] + 1) % BASE["vocab_size"]))
    np.testing.assert_allclose(pert[:, :t], out[:, :t], atol=1e-6)
    assert not np.allclose(pert[:, t:], out[:, t:])


@pytest.mark.slow
def test_dual_and_reference_models_agree_in_values_and_grads():
    tok = _tokens(1, 10)
    seg = jnp.asarray([[1] * 5 + [2] * 5], jnp.int32)
    res = {}
    for impl in ("dual", "reference"):
        model = CausalLM(_cfg(kind="mlp", layers=(0,)), runtime=RuntimeConfig(ttt_seq_impl=impl),
                         rngs=nnx.Rngs(0))

        @nnx.jit
        def value_and_grad(m):
            return nnx.value_and_grad(
                lambda m: jnp.mean(jax.nn.log_softmax(m(tok, segment_ids=seg))[..., 0]))(m)
        res[impl] = value_and_grad(model)
    np.testing.assert_allclose(res["dual"][0], res["reference"][0], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(res["dual"][1]), jax.tree.leaves(res["reference"][1])):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4)
    inner = res["dual"][1]["layers"][0]["ttt_seq"]
    assert float(jnp.abs(inner["inner_w2"][...]).max()) > 0  # gradients reach the inner model's init


def test_config_validation_and_context_parallel_error():
    with pytest.raises(ConfigError, match="model.ttt_seq.layers"):
        _cfg(layers=(5,)).validate()
    with pytest.raises(ConfigError, match="model.ttt_seq.mini_batch"):
        _cfg(mini_batch=0).validate()
    with pytest.raises(ConfigError, match="model.ttt_seq.enabled.*mesh.context"):
        load_config("tiny", ["model.ttt_seq.enabled=true", "mesh.context=2", "mesh.data=4"])
    with pytest.raises(ConfigError, match="model.ttt_seq"):
        CausalLM(ModelConfig(**BASE, ttt_seq=TTTSeqConfig(enabled=True, layers=(1,))),
                 runtime=RuntimeConfig(scan_layers=True), rngs=nnx.Rngs(0))
    layer = TTTSeqLayer(_cfg(), rngs=nnx.Rngs(0))
    x = jnp.zeros((1, 8, BASE["d_model"]))
    pos = jnp.broadcast_to(jnp.arange(8), (1, 8))
    with jax.set_mesh(make_mesh(data=4, context=2)):
        with pytest.raises(ValueError, match="model.ttt_seq.*mesh.context"):
            layer(x, positions=pos)


@pytest.mark.slow
def test_scan_layers_equals_unrolled():
    cfg = _cfg(mode="replace")
    model = CausalLM(cfg, rngs=nnx.Rngs(0))
    scanned = CausalLM(cfg, runtime=RuntimeConfig(scan_layers=True), rngs=nnx.Rngs(1))
    nnx.update(scanned, stack_layer_params(nnx.state(model), scanned.cfg))
    tok = _tokens(2, 9)
    np.testing.assert_allclose(scanned(tok), model(tok), atol=1e-5, rtol=1e-5)
