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
    model = nnx.eval_shape(lambda: CausalLM(ModelConfig(**BASE), rngs=nnx.Rngs(0)))
    for block in model.layers:
        assert block.ttt_seq is None and block.attn is not None
    cfg = load_config("tiny")
    assert not cfg.model.ttt_seq.enabled and not cfg.model.e2e.enabled
    # The runtime's implementation reaches every layer (dual and reference agree in values and
    # gradients: tests/test_ttt_linear.py, w.r.t. every input the layer feeds the op).
    ref = nnx.eval_shape(lambda: CausalLM(_cfg(), runtime=RuntimeConfig(ttt_seq_impl="reference"),
                                          rngs=nnx.Rngs(0)))
    assert [b.ttt_seq.impl for b in ref.layers] == ["reference"] * BASE["n_layers"]


def _loss(m, tok, seg):
    logits = m(tok, segment_ids=seg)
    return jnp.mean(jax.nn.log_softmax(logits)[..., 0]), logits


# One compiled program per model config: the logits, or with them the gradients of a loss w.r.t.
# the model's parameters.
_LOGITS = nnx.jit(lambda m, tok, seg: m(tok, segment_ids=seg))
_VALUE_AND_GRAD = nnx.jit(nnx.value_and_grad(_loss, has_aux=True))
_FWD = nnx.jit(lambda m, x: m(x))


@pytest.mark.parametrize("kind,mode", [("linear", "replace"), ("mlp", "beside")])
def test_layers_wired_and_causal(kind, mode):
    """Layer 1 only; causal; packed documents stay apart (the op restarts the inner model per
    document, attention masks across them). TTT-MLP: gradients reach every parameter of the layer,
    the inner model's initial weights and the position factor's bias included (the layer's code is
    shared by both kinds)."""
    cfg = _cfg(kind=kind, mode=mode, layers=(1,), output_gate=(kind == "mlp"))
    model = CausalLM(cfg, rngs=nnx.Rngs(0))
    assert model.layers[0].ttt_seq is None and model.layers[0].attn is not None
    assert isinstance(model.layers[1].ttt_seq, TTTSeqLayer)
    assert (model.layers[1].attn is None) == (mode == "replace")

    def logits(tok):
        if kind == "mlp":
            (_, out), grads = _VALUE_AND_GRAD(model, tok, seg)
            return out, grads
        return _LOGITS(model, tok, seg), None

    tok = _tokens()
    seg = jnp.asarray([[1] * 5 + [2] * 6, [1] * 11], jnp.int32)   # doc 2 starts mid-mini-batch
    out, grads = logits(tok)
    for t in (6, 2):
        pert, _ = logits(tok.at[:, t].set((tok[:, t] + 1) % BASE["vocab_size"]))
        np.testing.assert_allclose(pert[:, :t], out[:, :t], atol=1e-6)
        assert not np.allclose(pert[:, t:], out[:, t:])
    # Token 2 is in row 0's first document: its second document (from 5) does not see it.
    np.testing.assert_allclose(pert[0, 5:], out[0, 5:], atol=1e-6)
    assert not np.allclose(pert[1, 5:], out[1, 5:])
    if grads is not None:
        layer = grads["layers"][1]["ttt_seq"]
        assert {"inner_w1", "inner_w2", "token_bias"} <= set(layer)
        for path, g in jax.tree_util.tree_leaves_with_path(layer):
            g = np.asarray(g)
            assert np.isfinite(g).all() and np.abs(g).max() > 0, jax.tree_util.keystr(path)


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
    tok = _tokens()
    np.testing.assert_allclose(_FWD(scanned, tok), _FWD(model, tok), atol=1e-5, rtol=1e-5)
