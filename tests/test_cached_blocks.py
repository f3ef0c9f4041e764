"""The model's own blocks with caches (``CausalLM.hidden(cache=, step=)``): the same values as the
training forward, and the misuses refused."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ttt_jax.config import E2EConfig, ModelConfig, RuntimeConfig, TTTConfig
from ttt_jax.infer import init_cache
from ttt_jax.models import CausalLM
from ttt_jax.nn import CacheStep

pytestmark = pytest.mark.model

V = 53
# Layer 0: sliding window (ring cache) + In-Place TTT; layer 1: full attention.
CFG = ModelConfig(vocab_size=V, d_model=16, n_layers=2, n_heads=2, n_kv_heads=1, d_ff=32,
                  max_seq_len=32, compute_dtype="float32", attention_window=3, full_attention_layers=(1,),
                  ttt=TTTConfig(enabled=True, layers=(0,), chunk_size=4, lr=1.0))
REF = RuntimeConfig(attention_impl="reference", ttt_impl="reference")


def _model(cfg=CFG, runtime=REF):
    model = CausalLM(cfg, runtime=runtime, rngs=nnx.Rngs(0))
    conv = model.layers[0].mlp.ttt_conv          # non-zero target: the fast weight moves
    conv[...] = jax.random.normal(jax.random.key(3), conv.shape)
    return model


def _step(b, t, start=0, **kw):
    return CacheStep(start=jnp.full((b,), start, jnp.int32), n_valid=jnp.full((b,), t, jnp.int32), **kw)


_HIDDEN = nnx.jit(lambda m, t: m.hidden(t))


@functools.partial(nnx.jit, static_argnames="fill")
def _cached(model, tokens, caches, start, *, fill=False):
    return model.hidden(tokens, cache=caches, step=_step(tokens.shape[0], tokens.shape[1], start, fill=fill))


@pytest.mark.slow          # ~40 s on the 2-core machine, mostly compilation
def test_fill_call_is_the_training_forward_and_continues_like_extend():
    model = _model()
    tokens = jax.random.randint(jax.random.key(1), (2, 10), 0, V)
    want = _HIDDEN(model, tokens)
    caches = init_cache(CFG, 2, 16).layers
    got, filled = _cached(model, tokens, caches, 0, fill=True)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))       # the same modules and ops
    ext, extended = _cached(model, tokens, caches, 0)                       # against the caches
    np.testing.assert_allclose(np.asarray(ext), np.asarray(want), atol=2e-5, rtol=2e-5)
    for a, b in zip(jax.tree.leaves(filled), jax.tree.leaves(extended)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5, rtol=2e-5)
    # Two more tokens from either cache: the hidden states of the forward over all 12.
    more = jax.random.randint(jax.random.key(2), (2, 2), 0, V)
    full = _HIDDEN(model, jnp.concatenate([tokens, more], axis=1))[:, 10:]
    for layers in (filled, extended):
        nxt, _ = _cached(model, more, layers, 10)
        np.testing.assert_allclose(np.asarray(nxt), np.asarray(full), atol=2e-5, rtol=2e-5)


def _abstract(cfg=CFG, runtime=REF):
    """A model of shapes only: every refusal below comes before any parameter is read."""
    return nnx.eval_shape(lambda: CausalLM(cfg, runtime=runtime, rngs=nnx.Rngs(0)))


def test_cached_calls_are_refused_where_unsupported():
    caches = init_cache(CFG, 1, 8).layers
    tokens = jnp.zeros((1, 4), jnp.int32)
    model = _abstract()
    with pytest.raises(ValueError, match="step="):
        model.hidden(tokens, cache=caches)
    with pytest.raises(ValueError, match="step="):
        model.layers[0](jnp.zeros((1, 4, 16)), x0=None, positions=jnp.zeros((1, 4), jnp.int32),
                        cache=caches[0])
    with pytest.raises(ValueError, match="segment_ids"):
        model.hidden(tokens, cache=caches, step=_step(1, 4), segment_ids=jnp.ones((1, 4), jnp.int32))
    with pytest.raises(ValueError, match="1 layer caches"):
        model.hidden(tokens, cache=caches[:1], step=_step(1, 4))
    scanned = _abstract(runtime=dataclasses.replace(REF, scan_layers=True))
    with pytest.raises(ValueError, match="unrolled_model"):
        scanned.hidden(tokens, cache=caches, step=_step(1, 4))
    e2e = dataclasses.replace(CFG, attention_window=0, full_attention_layers=(), ttt=TTTConfig(enabled=False),
                              e2e=E2EConfig(enabled=True, last_k=1, chunk_size=4))
    with pytest.raises(ValueError, match="TTT-E2E"):
        _abstract(e2e).hidden(tokens, cache=caches, step=_step(1, 4))
