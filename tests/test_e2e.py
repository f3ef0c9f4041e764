"""TTT-E2E: the chunk scan against the per-chunk reference (values and outer gradients), outer
gradients against finite differences, causality, configuration errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ttt_jax.config import ConfigError, E2EConfig, ModelConfig, RuntimeConfig, TTTConfig, load_config
from ttt_jax.models.lm import CausalLM

pytestmark = pytest.mark.model

V = 29
BASE = dict(vocab_size=V, d_model=16, n_layers=3, n_heads=2, n_kv_heads=1, d_ff=24, max_seq_len=64,
            compute_dtype="float32", attention_window=3, ttt=TTTConfig(enabled=False))
# window 3 with chunks of 4: the KV cache holds one earlier chunk, so chunk 2 evicts chunk 0.


def _model(impl="chunked", enabled=True, **e2e):
    # The inner gradients' norms here are ~0.1: a clip of 0.03 is active.
    kw = {"enabled": enabled, "last_k": 2, "chunk_size": 4, "lr": 3.0, "grad_clip": 0.03}
    kw.update(e2e)
    return CausalLM(ModelConfig(**BASE, e2e=E2EConfig(**kw)), runtime=RuntimeConfig(e2e_impl=impl),
                    rngs=nnx.Rngs(0))


# Packed documents: row 0's second document starts mid-chunk, row 1 ends in padding.
SEG = np.asarray([[1] * 6 + [2] * 5, [1] * 9 + [0] * 2], np.int32)


def _tokens(b=2, t=11, seed=0):
    return jax.random.randint(jax.random.PRNGKey(seed), (b, t), 0, V)


def _loss(model, tok, seg=None):
    logits = model(tok, segment_ids=seg)
    logp = jax.nn.log_softmax(logits[:, :-1])
    return -jnp.mean(jnp.take_along_axis(logp, tok[:, 1:, None], axis=-1)), logits


# ((loss, logits), gradients): one compiled program per model config and input layout. The tests
# share two: packed documents with the default config, and unpacked rows with _plain's.
_value_and_grad = nnx.jit(nnx.value_and_grad(_loss, has_aux=True))
_value = nnx.jit(lambda model, tok, seg: _loss(model, tok, seg)[0])


def _plain(impl="chunked", **kw):
    """The unpacked tests' model: no gradient clipping (the loss is smooth in the parameters, for
    finite differences), a large inner lr (the inner steps move the loss)."""
    return _model(impl, **{"grad_clip": 0.0, "lr": 5.0, **kw})


@pytest.mark.parametrize("segmented", [pytest.param(False, marks=pytest.mark.slow), True])
def test_chunk_scan_equals_per_chunk_reference(segmented):
    """Values and outer gradients. Packed documents (a document starting mid-chunk, padding) with
    the inner gradient clipped; without packing, unclipped (the program the tests below share)."""
    tok = _tokens()
    seg = SEG if segmented else None
    make = _model if segmented else _plain
    ((l_c, _), g_c), ((l_r, _), g_r) = (_value_and_grad(make(impl), tok, seg)
                                        for impl in ("chunked", "reference"))
    np.testing.assert_allclose(l_c, l_r, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(g_c), jax.tree.leaves(g_r)):
        np.testing.assert_allclose(a, b, atol=2e-6, rtol=2e-4)
    # The inner loop matters: without it the loss differs.
    l_off = _value(make(enabled=False), tok, seg)
    assert abs(float(l_off) - float(l_c)) > 1e-4


@pytest.mark.slow
def test_outer_gradient_matches_finite_differences():
    """Directional derivative of the loss (through the inner SGD steps) vs central differences."""
    model = _plain()
    tok = _tokens()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss_at(p):
        return float(_value_and_grad(nnx.merge(graphdef, p, rest), tok, None)[0][0])

    (_, _), grads = _value_and_grad(model, tok, None)
    leaves, treedef = jax.tree.flatten(params)
    assert jax.tree.structure(grads) == treedef
    keys = jax.random.split(jax.random.PRNGKey(7), len(leaves))
    for trial in range(2):
        raw = [jax.random.normal(jax.random.fold_in(k, trial), x.shape) for k, x in zip(keys, leaves)]
        norm = float(jnp.sqrt(sum(jnp.sum(r * r) for r in raw)))
        direction = jax.tree.unflatten(treedef, [r / norm for r in raw])           # unit length
        analytic = sum(float(jnp.vdot(g, d)) for g, d in zip(jax.tree.leaves(grads),
                                                               jax.tree.leaves(direction)))
        eps = 2e-3
        shift = lambda s: jax.tree.map(lambda p, d: p + s * eps * d, params, direction)  # noqa: E731
        numeric = (loss_at(shift(1.0)) - loss_at(shift(-1.0))) / (2 * eps)
        assert abs(analytic - numeric) <= 2e-2 * abs(numeric) + 2e-4, (analytic, numeric)


@pytest.mark.slow
def test_second_order_terms_matter():
    """Stopping the gradient through the inner step's gradient changes the outer gradient: the
    outer loop is really differentiated through the inner update."""
    import ttt_jax.models.e2e as e2e
    tok = _tokens()
    _, g_full = _value_and_grad(_plain(), tok, None)
    original = e2e.sgd_step
    try:
        e2e.sgd_step = lambda f, g, lr, clip: original(f, jax.lax.stop_gradient(g), lr, clip)
        _, g_first = nnx.jit(nnx.value_and_grad(_loss, has_aux=True))(_plain(), tok, None)
    finally:
        e2e.sgd_step = original
    diff = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(g_full),
                                                              jax.tree.leaves(g_first)))
    assert diff > 1e-5


def test_causal():
    """On the packed rows of the reference test above (its compiled program)."""
    model = _model()
    tok = _tokens()
    (_, out), _ = _value_and_grad(model, tok, SEG)
    for t in (4, 7):  # a chunk start, and inside a chunk (of row 0's second document)
        (_, pert), _ = _value_and_grad(model, tok.at[:, t].set((tok[:, t] + 5) % V), SEG)
        np.testing.assert_allclose(pert[:, :t], out[:, :t], atol=1e-6)
        assert not np.allclose(pert[:, t], out[:, t])


def test_config_errors():
    with pytest.raises(ConfigError, match="model.e2e.last_k"):
        load_config("tiny", ["model.e2e.enabled=true", "model.e2e.last_k=2"])   # layer 2 has In-Place TTT
    with pytest.raises(ConfigError, match="model.e2e.last_k"):
        load_config("tiny", ["model.e2e.enabled=true", "model.e2e.last_k=9"])
    with pytest.raises(ConfigError, match="runtime.scan_layers"):
        load_config("tiny", ["model.e2e.enabled=true", "runtime.scan_layers=true", "model.ttt.enabled=false"])
    with pytest.raises(ConfigError, match="model.e2e.enabled.*mesh.context"):
        load_config("tiny", ["model.e2e.enabled=true", "mesh.context=2", "mesh.data=4"])
