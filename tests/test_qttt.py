"""Query-only TTT: only the query adaptation changes; the span loss falls; 0 steps changes nothing."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ttt_jax.infer import GenerationConfig, QTTTConfig, adapt_queries, generate

from test_infer import PROMPTS, _FWD, setup

pytestmark = pytest.mark.model


def _snapshot(tree):
    return [np.array(x) for x in jax.tree.leaves(tree)]


@pytest.mark.parametrize("rank,layers", [(0, None), pytest.param(2, (1,), marks=pytest.mark.slow)])
def test_qttt_adapts_only_queries_and_lowers_the_span_loss(rank, layers):
    model, engine, tokens, ref = setup("full_attention_embeddings")
    prompts = [tokens[i, :n].tolist() for i, n in enumerate(PROMPTS)]
    cache = engine.init_cache(3, max(PROMPTS), ring=False)
    _, cache = engine.prefill(cache, prompts)
    cache_before = _snapshot(cache)
    params_before = _snapshot(nnx.state(engine.model()))
    cfg = QTTTConfig(steps=6, span=4, lr=3e-2, rank=rank, layers=layers)
    deltas, losses = adapt_queries(engine, cache, prompts, cfg)
    # The cache and every model parameter (queries included: the adaptation is separate) unchanged.
    for a, b in zip(cache_before, _snapshot(cache)):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(params_before, _snapshot(nnx.state(engine.model()))):
        np.testing.assert_array_equal(a, b)
    assert sorted(deltas) == ([0, 1] if layers is None else [1])
    d, h, dh = model.layers[0].attn.q.shape
    assert all(x.shape == (3, d, h, dh) and float(jnp.abs(x).max()) > 0 for x in deltas.values())
    # Sequence 1 (5 tokens) has one possible span of 4, in the first TTT chunk (no fast-weight
    # updates yet): its first loss is exactly the forward pass's NLL, and it falls.
    logp = jax.nn.log_softmax(jnp.asarray(ref[1, :4]), axis=-1)
    nll = -np.mean(np.take_along_axis(np.asarray(logp), tokens[1, 1:5, None], axis=-1))
    np.testing.assert_allclose(losses[0, 1], nll, rtol=1e-5)
    assert np.all(np.diff(losses[:, 1]) < 0) and losses[-1, 1] < losses[0, 1] - 0.02, losses[:, 1]


def test_qttt_zero_steps_or_zero_lr_leaves_outputs_identical():
    model, engine, tokens, _ = setup("full_attention_embeddings")
    prompts = [tokens[i, :n].tolist() for i, n in enumerate(PROMPTS)]
    gen = GenerationConfig(max_new_tokens=4)
    base = generate(engine, prompts, gen, return_logits=True)
    zero = generate(engine, prompts, gen, return_logits=True, qttt=QTTTConfig(steps=0))
    assert zero.tokens == base.tokens
    for a, b in zip(base.logits, zero.logits):
        np.testing.assert_array_equal(a, b)
    # lr 0: the adaptation stays exactly zero, so decoding with it gives the same logits.
    still = generate(engine, prompts, gen, return_logits=True,
                     qttt=QTTTConfig(steps=1, span=4, lr=0.0))
    assert still.tokens == base.tokens and still.qttt_losses.shape == (1, 3)
    for a, b in zip(base.logits, still.logits):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_qttt_needs_full_caches_and_valid_options():
    model, engine, tokens, _ = setup("sliding_window_hidden")
    prompts = [tokens[0, :20].tolist()]
    cache = engine.init_cache(1, 20)             # ring buffers for the window-5 layers
    _, cache = engine.prefill(cache, prompts, logits="all")
    with pytest.raises(ValueError, match="ring=False"):
        adapt_queries(engine, cache, prompts, QTTTConfig(steps=1))
    with pytest.raises(ValueError, match="layer indices"):
        QTTTConfig(steps=1, layers=(7,)).validate(2)
