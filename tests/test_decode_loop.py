"""The on-device decode loop (Engine.decode_loop, generate's decode_block) against the per-token loop.

Blocks of 5 steps over ragged prompts: TTT chunks of 8 (In-Place TTT) and mini-batches of 5
(TTT-Linear/MLP) complete inside blocks, the last block is shorter than the buffer, and sequences
stop at different steps. Tokens must be identical, logits within 1e-5.
"""

import functools

import jax
import numpy as np
import pytest
from flax import nnx

from ttt_jax.infer import Engine, GenerationConfig, generate
from ttt_jax.models import CausalLM

import test_infer
import test_infer_ttt_seq

pytestmark = pytest.mark.model

BLOCK = 5
N_NEW = 12          # blocks of 5, 5 and 1 after the prefill's token
PROMPTS = (13, 5, 20)


@functools.cache
def setup(name):
    """Model, engine and ragged prompts of the test_infer / test_infer_ttt_seq cases (the same
    structures, so compilations are shared with those tests in one process)."""
    if name in test_infer.CASES:
        model, block = test_infer.make_model(test_infer.CASES[name]), 12
    else:
        model = CausalLM(test_infer_ttt_seq.CASES[name], runtime=test_infer.REF, rngs=nnx.Rngs(0))
        test_infer_ttt_seq.activate(model)
        block = 6
    tokens = np.random.default_rng(1).integers(0, model.cfg.vocab_size, (3, max(PROMPTS)))
    prompts = [tokens[i, :n].tolist() for i, n in enumerate(PROMPTS)]
    return model, Engine(model, prefill_block=block), prompts


def _same(a, b):
    assert a.tokens == b.tokens
    assert a.stop_reasons == b.stop_reasons
    for x, y in zip(a.logits, b.logits):
        assert x.shape == y.shape
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-5)


# In-Place TTT (chunks of 4) beside TTT-MLP and a window; TTT-Linear in place of attention. (In-Place
# TTT with full attention: the two tests below.)
@pytest.mark.parametrize("name", ["mlp_beside_window_gate", "linear_replace"])
@pytest.mark.slow
def test_blocks_equal_the_per_token_loop(name):
    """Greedy and seeded top-k/top-p sampling; then a stop token that ends the sequences at
    different steps (and one that never comes): the same tokens, stop reasons and logits."""
    _, engine, prompts = setup(name)
    configs = [GenerationConfig(max_new_tokens=N_NEW),
               GenerationConfig(max_new_tokens=N_NEW, temperature=1.0, top_k=40, top_p=0.9, seed=5)]
    sampled = None
    for cfg in configs:
        ref = generate(engine, prompts, cfg, return_logits=True, decode_block=0)
        _same(generate(engine, prompts, cfg, return_logits=True, decode_block=BLOCK), ref)
        sampled = ref
    # A stop token taken from the sampled continuation of sequence 1 (at step 3): where it comes
    # first differs between sequences (or it never comes), so the batch is ragged.
    stop = sampled.tokens[1][3]
    cfg = GenerationConfig(max_new_tokens=N_NEW, temperature=1.0, top_k=40, top_p=0.9, seed=5,
                           stop_tokens=(stop, 258))
    ref = generate(engine, prompts, cfg, return_logits=True, decode_block=0)
    assert ref.stop_reasons[1] == "stop" and len(ref.tokens[1]) <= 3
    _same(generate(engine, prompts, cfg, return_logits=True, decode_block=BLOCK), ref)


def test_decode_loop_state_equals_the_per_token_steps():
    """Engine.decode_loop directly: a stopped sequence's cache stays as it was when it stopped (the
    stop token is not fed), the others' advance; the whole cache equals the per-token loop's; the
    loop ends early once every sequence has stopped."""
    _, engine, prompts = setup("full_attention_embeddings")
    key = jax.random.key(11)
    opts = dict(temperature=1.0, top_k=0, top_p=1.0)

    def prefilled():
        cache = engine.init_cache(3, max(PROMPTS) + 16)
        return engine.prefill(cache, prompts)[1]

    # Reference: one step at a time, the host deactivating a sequence after its stop token.
    first = np.asarray([p[-1] for p in prompts])
    cache, tok, active = prefilled(), first, np.ones(3, bool)
    toks, stop = [], None
    for s in range(9):
        tok, _, cache = engine.decode(cache, tok, active=active, key=jax.random.fold_in(key, s), **opts)
        tok = np.asarray(tok)
        toks.append(tok)
        if s == 1:
            stop = int(tok[0])                  # sequence 0 stops at step 1 (others maybe later)
        if stop is not None:
            active = active & (tok != stop)
    ref_cache, ref_toks = cache, np.stack(toks)
    # The loop, in two blocks with the stop token from step 1 on: the same tokens wherever a
    # sequence was active, the same final cache.
    one = engine.decode_loop(prefilled(), first, 1, key=key, step0=0, size=8, **opts)
    assert int(one.steps) == 1
    res = engine.decode_loop(one.cache, one.last, 8, active=one.active, key=key, step0=1, size=8,
                             stop_tokens=(stop,), **opts)
    assert int(res.steps) == 8
    got = np.concatenate([np.asarray(one.tokens)[:1], np.asarray(res.tokens)])
    for i in range(3):
        hits = np.flatnonzero(ref_toks[1:, i] == stop)
        end = hits[0] + 2 if len(hits) else 9          # up to and including the stop token
        np.testing.assert_array_equal(got[:end, i], ref_toks[:end, i])
    assert np.asarray(res.active).tolist() == active.tolist()
    for a, b in zip(jax.tree.leaves(res.cache), jax.tree.leaves(ref_cache)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)
    lengths = np.asarray(res.cache.lengths) - np.asarray(PROMPTS)
    assert lengths[0] == 2                      # fed the prompt's last token and step 0's
    # Every sequence stopped: the loop ends at once and changes nothing.
    done = engine.decode_loop(res.cache, res.last, 5, active=np.zeros(3, bool), key=key, step0=9,
                              size=8, **opts)
    assert int(done.steps) == 0
    assert np.asarray(done.cache.lengths).tolist() == (lengths + np.asarray(PROMPTS)).tolist()


def test_cli_streams_blocks_with_the_same_text(tmp_path):
    """`ttt-jax generate` with blocks of 3 and with one call per token prints the same text."""
    from test_generate import _cli
    from ttt_jax.config import Config, DataConfig
    from ttt_jax.checkpoint import save_model

    model = setup("full_attention_embeddings")[0]
    path = tmp_path / "model"
    save_model(path, model, Config(model=test_infer.CASES["full_attention_embeddings"],
                                   data=DataConfig(seq_len=64)))
    base = ["generate", str(path), "--prompt", "def f(x):", "--max-new-tokens", "10", "--temperature",
            "0.9", "--seed", "2", "--prefill-block", "12"]
    code, want, err = _cli(base + ["--decode-block", "0"])
    assert code == 0, err
    code, out, err = _cli(base + ["--decode-block", "3"])
    assert code == 0, err
    assert out == want and want.strip()
    assert "tokens/s" in err, err
    code, _, err = _cli(base + ["--decode-block", "-1"])
    assert code == 2 and "decode-block" in err
