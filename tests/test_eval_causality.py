"""Evaluation never trains on the tokens it scores, and the reconstruction-target ablation.

With In-Place TTT chunks much shorter than the sequence (so fast-weight updates are applied many
times) and the TTT path made to matter (non-zero conv, dense projection), the score at position
``p`` (NLL of ``targets[p]`` and the arg-max prediction, through the jitted evaluation path) must
not change when any input at or after ``p + 1`` changes -- which includes the scored token itself
(``inputs[p + 1] == targets[p]``). The look-ahead conv reads future tokens only inside a chunk,
whose update reaches later chunks only.
"""

import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ttt_jax.eval.scoring import Scorer
from ttt_jax.models import CausalLM
from ttt_jax.ops import inplace_ttt_target

from test_model import V, _activate_ttt, _forward, tiny

pytestmark = pytest.mark.model

T = 40  # 5 TTT chunks of 8


def _rows(seed=0):
    toks = np.asarray(jax.random.randint(jax.random.key(seed), (2, T + 1), 3, V), np.int32)
    return toks[:, :-1], toks[:, 1:]


def test_scores_never_see_the_scored_token_or_later():
    model = CausalLM(tiny(attention_window=12, ttt=dict(lr=3.0)), rngs=nnx.Rngs(11))
    _activate_ttt(model)
    scorer = Scorer(model, logits_chunk=16)
    inputs, targets = _rows()
    nll, pred = scorer(inputs, targets)
    rng = np.random.default_rng(0)
    for p in (0, 6, 7, 8, 13, 23, 38):   # chunk ends/starts, mid-chunk (the conv looks 2 ahead)
        pert = inputs.copy()
        pert[:, p + 1:] = rng.integers(3, V, size=pert[:, p + 1:].shape)
        nll_p, pred_p = scorer(pert, targets)
        np.testing.assert_array_equal(nll_p[:, :p + 1], nll[:, :p + 1],
                                      err_msg=f"scores up to {p} depend on inputs after {p}")
        np.testing.assert_array_equal(pred_p[:, :p + 1], pred[:, :p + 1])
        assert np.abs(nll_p[:, p + 1:] - nll[:, p + 1:]).max() > 1e-4

    # ...while the fast-weight updates do act: without them (a zero target) the later chunks
    # score differently, the first chunk (which no update reaches) identically.
    model.layers[0].mlp.ttt_conv[...] = jnp.zeros_like(model.layers[0].mlp.ttt_conv[...])
    frozen = copy.copy(scorer)                      # same compiled function, other parameters
    frozen.state = nnx.state(model)
    nll0, _ = frozen(inputs, targets)
    np.testing.assert_allclose(nll0[:, :8], nll[:, :8], rtol=1e-6, atol=1e-6)
    assert np.abs(nll0[:, 8:] - nll[:, 8:]).max() > 1e-3


def test_reconstruction_target_differs_only_in_the_future_taps():
    """`model.ttt.target=reconstruction` == the aligned model with the conv's future taps zeroed;
    it differs from the aligned model with them, and its target has no look-ahead."""
    tokens = jnp.asarray(_rows(1)[0])
    aligned = CausalLM(tiny(), rngs=nnx.Rngs(3))
    _activate_ttt(aligned)
    recon = CausalLM(tiny(ttt=dict(target="reconstruction")), rngs=nnx.Rngs(3))
    nnx.update(recon, nnx.state(aligned))          # identical parameters, same parameter count
    causal = CausalLM(tiny(), rngs=nnx.Rngs(3))
    nnx.update(causal, nnx.state(aligned))
    conv = causal.layers[0].mlp.ttt_conv
    conv[...] = conv[...].at[3:].set(0.0)           # K = 5: taps 3, 4 read t[c+1], t[c+2]
    out_r, out_a, out_c = _forward(recon, tokens), _forward(aligned, tokens), _forward(causal, tokens)
    np.testing.assert_allclose(out_r, out_c, rtol=1e-6, atol=1e-6)
    assert float(jnp.abs(out_r - out_a).max()) > 1e-3

    # The reconstruction target at position c reads no later token; the aligned one does.
    mlp = recon.layers[0].mlp
    x0 = recon.embed_tokens(tokens)
    w = mlp.ttt_conv[...]
    k = w.shape[0]
    masked = w * (jnp.arange(k) <= (k - 1) // 2)[:, None]
    v = inplace_ttt_target(x0, masked, mlp.ttt_proj[...], chunk_size=8)
    v_pert = inplace_ttt_target(x0.at[:, 13].add(1.0), masked, mlp.ttt_proj[...], chunk_size=8)
    np.testing.assert_array_equal(v_pert[:, :13], v[:, :13])
    va = inplace_ttt_target(x0, w, mlp.ttt_proj[...], chunk_size=8)
    va_pert = inplace_ttt_target(x0.at[:, 13].add(1.0), w, mlp.ttt_proj[...], chunk_size=8)
    assert float(jnp.abs(va_pert[:, 11:13] - va[:, 11:13]).max()) > 1e-4


def test_target_option_validates():
    from ttt_jax.config import ConfigError, load_config

    assert load_config("tiny", ["model.ttt.target=reconstruction"]).model.ttt.target == "reconstruction"
    assert load_config("tiny").model.ttt.target == "aligned"
    with pytest.raises(ConfigError, match="model.ttt.target"):
        load_config("tiny", ["model.ttt.target=next"])


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_ttt_seq_beside_swa_scores_never_see_the_scored_token_or_later(kind):
    """The research comparison's SWA + TTT-Linear/MLP models go through the same full-forward
    scorer (the cached engine refuses them): mini-batches of 8 (< T, T not a multiple) make the
    inner-model updates reach later positions; scores up to ``p`` ignore every input after ``p``."""
    from ttt_jax.config import TTTSeqConfig

    cfg = tiny(attention_window=12, initializer_range=0.2, ttt=dict(enabled=False),
               ttt_seq=TTTSeqConfig(enabled=True, kind=kind, layers=(1,), mode="beside",
                                    mini_batch=8))
    scorer = Scorer(CausalLM(cfg, rngs=nnx.Rngs(5)), logits_chunk=16)
    inputs, targets = _rows(2)
    nll, pred = scorer(inputs, targets)
    rng = np.random.default_rng(1)
    for p in (0, 7, 8, 21, 38):          # mini-batch end/start, mid, beyond the window
        pert = inputs.copy()
        pert[:, p + 1:] = rng.integers(3, V, size=pert[:, p + 1:].shape)
        nll_p, pred_p = scorer(pert, targets)
        np.testing.assert_array_equal(nll_p[:, :p + 1], nll[:, :p + 1], err_msg=f"p={p}")
        np.testing.assert_array_equal(pred_p[:, :p + 1], pred[:, :p + 1])
        assert np.abs(nll_p[:, p + 1:] - nll[:, p + 1:]).max() > 1e-4
