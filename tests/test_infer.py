"""Inference with KV caches and fast-weight state: prefill + decode logits == one forward pass."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ttt_jax.config import ModelConfig, RuntimeConfig, TTTConfig
from ttt_jax.infer import Engine, cache_attention, init_cache
from ttt_jax.infer.attention import cache_mask
from ttt_jax.models import CausalLM

pytestmark = pytest.mark.model

V = 259
# TTT chunks of 8 tokens: prompts of 13-29 tokens and decoding cross several chunk boundaries.
TINY = ModelConfig(vocab_size=V, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64,
                   max_seq_len=128, compute_dtype="float32",
                   ttt=TTTConfig(enabled=True, layers=(0,), chunk_size=8, lr=1.0))
REF = RuntimeConfig(attention_impl="reference", ttt_impl="reference")


def tiny(**kw) -> ModelConfig:
    ttt = kw.pop("ttt", {})
    cfg = dataclasses.replace(TINY, **kw)
    return dataclasses.replace(cfg, ttt=dataclasses.replace(cfg.ttt, **ttt))


def activate_ttt(model: CausalLM, seed: int = 7, scale: float = 2.0) -> None:
    """Non-zero conv and a dense target projection, so the fast weights change the outputs."""
    key = jax.random.key(seed)
    for block in model.layers:
        if block.is_ttt:
            k1, k2, key = jax.random.split(key, 3)
            conv, proj = block.mlp.ttt_conv, block.mlp.ttt_proj
            conv[...] = jax.random.normal(k1, conv.shape).astype(conv.dtype)
            proj[...] = (scale * jax.random.normal(k2, proj.shape)).astype(proj.dtype)


def make_model(cfg, seed=0):
    model = CausalLM(cfg, runtime=REF, rngs=nnx.Rngs(seed))
    activate_ttt(model)
    return model


_FWD = nnx.jit(lambda m, t: m(t))

CASES = {
    "full_attention_embeddings": tiny(),
    "sliding_window_hidden": tiny(attention_window=5, full_attention_layers=(1,),
                                  ttt=dict(target_source="hidden")),      # layer 0: window + TTT
}
PROMPTS = (13, 5, 20)      # ragged; prefill blocks of 12 tokens do not align with chunks of 8
STEPS = 17                 # decode steps: every sequence crosses two or more chunk boundaries
MORE = 3                   # a second prefill call, starting mid-chunk
TOTAL = max(PROMPTS) + STEPS + MORE
_SETUPS = {}


def setup(name):
    """Model, engine, tokens [3, TOTAL] and the full forward logits, built once per case."""
    if name not in _SETUPS:
        model = make_model(CASES[name])
        tokens = np.asarray(jax.random.randint(jax.random.key(1), (3, TOTAL), 0, V))
        ref = np.asarray(_FWD(model, jnp.asarray(tokens)))
        _SETUPS[name] = (model, Engine(model, prefill_block=12), tokens, ref)
    return _SETUPS[name]


def _run(engine, tokens, prompts, steps, more):
    """Prefill ragged prompts, decode `steps` tokens, prefill `more`: the logits of every step."""
    b = len(prompts)
    cache = engine.init_cache(b, TOTAL)
    pre, cache = engine.prefill(cache, [tokens[i, :n].tolist() for i, n in enumerate(prompts)],
                                logits="all")
    dec = []
    for j in range(steps):
        _, logits, cache = engine.decode(cache, [tokens[i, n + j] for i, n in enumerate(prompts)])
        dec.append(np.asarray(logits))
    post, cache = engine.prefill(cache, [tokens[i, n + steps:n + steps + more].tolist()
                                         for i, n in enumerate(prompts)], logits="all")
    return np.asarray(pre), np.stack(dec, axis=1), np.asarray(post), cache


@pytest.mark.parametrize("name", list(CASES))
def test_prefill_decode_prefill_equals_forward(name):
    model, engine, tokens, ref = setup(name)
    pre, dec, post, cache = _run(engine, tokens, PROMPTS, STEPS, MORE)
    tol = dict(rtol=1e-4, atol=1e-4)
    for i, n in enumerate(PROMPTS):
        np.testing.assert_allclose(pre[i, :n], ref[i, :n], **tol)
        np.testing.assert_allclose(dec[i], ref[i, n:n + STEPS], **tol)
        np.testing.assert_allclose(post[i], ref[i, n + STEPS:n + STEPS + MORE], **tol)
    assert np.asarray(cache.lengths).tolist() == [n + STEPS + MORE for n in PROMPTS]
    # The fast weights took part: every TTT layer's state has moved.
    for lc in cache.layers:
        if lc.ttt is not None:
            assert np.all(np.asarray(jnp.abs(lc.ttt.delta).max(axis=(1, 2))) > 1e-3)
    if CASES[name].attention_window:
        assert [lc.kv.capacity for lc in cache.layers] == [5, TOTAL]   # ring buffers of the window


@pytest.mark.parametrize("name", list(CASES))
def test_prefill_decode_in_bfloat16_follow_the_forward_pass(name):
    """bf16 parameters and compute: cached prefill / decode round differently from one forward
    pass, so the check is loose (measured error ~0.004 on logits of magnitude ~0.7), but far below
    what the fast weights change (0.02 - 0.5 here: a stale or missing update would fail)."""
    cfg = dataclasses.replace(CASES[name], compute_dtype="bfloat16", param_dtype="bfloat16")
    model = make_model(cfg)
    tokens = setup(name)[2]
    ref = np.asarray(_FWD(model, jnp.asarray(tokens)).astype(jnp.float32))
    pre, dec, post, _ = _run(Engine(model, prefill_block=12), tokens, PROMPTS, STEPS, MORE)
    no_ttt = make_model(dataclasses.replace(cfg, ttt=dataclasses.replace(cfg.ttt, enabled=False)))
    ref_no_ttt = np.asarray(_FWD(no_ttt, jnp.asarray(tokens)).astype(jnp.float32))
    tol = dict(rtol=0, atol=1e-2)
    for i, n in enumerate(PROMPTS):
        np.testing.assert_allclose(pre[i, :n].astype(np.float32), ref[i, :n], **tol)
        np.testing.assert_allclose(dec[i].astype(np.float32), ref[i, n:n + STEPS], **tol)
        np.testing.assert_allclose(post[i].astype(np.float32), ref[i, n + STEPS:n + STEPS + MORE], **tol)
        assert np.abs(ref_no_ttt[i, n:] - ref[i, n:]).max() > 1.5e-2   # the tolerance can tell


def test_batched_sequence_equals_it_alone():
    model, engine, tokens, ref = setup("sliding_window_hidden")
    together = _run(engine, tokens, PROMPTS, STEPS, 0)
    # Alone, and with the blockwise (online-softmax) cache attention over blocks of 4 keys.
    blockwise = Engine(model, prefill_block=12, attn_impl="blockwise", attn_block=4)
    alone = _run(blockwise, tokens[1:2], PROMPTS[1:2], STEPS, 0)
    n = PROMPTS[1]
    np.testing.assert_allclose(together[0][1, :n], alone[0][0, :n], rtol=1e-4, atol=1e-4)   # prefill
    np.testing.assert_allclose(together[1][1], alone[1][0], rtol=1e-4, atol=1e-4)           # decode


def test_inactive_sequences_are_untouched():
    model, engine, tokens, ref = setup("full_attention_embeddings")
    cache = engine.init_cache(3, TOTAL)
    _, cache = engine.prefill(cache, [[5, 6, 7], [8, 9, 10, 11], [12]], logits="all")
    before = jax.tree.map(np.asarray, cache)
    _, _, cache = engine.decode(cache, [3, 4, 5], active=[True, False, True])
    after = jax.tree.map(np.asarray, cache)
    assert after.lengths.tolist() == [4, 4, 2]
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after)):
        np.testing.assert_array_equal(a[1], b[1])


def test_cache_attention_blockwise_equals_reference():
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    b, tq, s, h, kv, dh = 2, 5, 37, 4, 2, 8
    q = jax.random.normal(k1, (b, tq, h, dh))
    k = jax.random.normal(k2, (b, s, kv, dh))
    v = jax.random.normal(k3, (b, s, kv, dh))
    k_pos = jnp.asarray(np.stack([np.arange(s), np.where(np.arange(s) < 20, np.arange(s), -1)]))
    q_pos = jnp.asarray([[0, 7, 19, 30, 36], [3, 4, 19, 25, 30]])
    window = 3

    @jax.jit
    def both(q, q_pos, k, v, k_pos):
        return [cache_attention(q, q_pos, k, v, k_pos, window=w, impl=impl, block=8)
                for w in (0, window) for impl in ("reference", "blockwise")]

    ref0, got0, ref, got = both(q, q_pos, k, v, k_pos)
    np.testing.assert_allclose(np.asarray(got0), np.asarray(ref0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-5, atol=1e-5)
    # Explicit softmax oracle for one query.
    m = np.asarray(cache_mask(q_pos, k_pos, window))[1, 2]
    logits = np.einsum("d,sd->s", np.asarray(q[1, 2, 3]), np.asarray(k[1, :, 1])) / np.sqrt(dh)
    p = np.where(m, np.exp(logits - logits[m].max()), 0)
    np.testing.assert_allclose(np.asarray(ref[1, 2, 3]), (p / p.sum()) @ np.asarray(v[1, :, 1]),
                               rtol=1e-5, atol=1e-5)


def test_cache_too_small_is_a_clear_error():
    engine = setup("full_attention_embeddings")[1]
    cache = engine.init_cache(1, 4)
    with pytest.raises(ValueError, match="larger max_len"):
        engine.prefill(cache, [[1, 2, 3, 4, 5]])
    cache = init_cache(engine.cfg, 1, 16)
    with pytest.raises(ValueError, match="token ids"):
        engine.prefill(cache, [[1, V]])


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_context_parallel_prefill_equals_prefill(name):
    """prefill_parallel under a mesh with context=4 (the model's ring / halo attention and
    cross-device TTT scan) fills the same cache as the single-device blockwise prefill."""
    from ttt_jax.parallel.mesh import make_mesh

    model, engine, tokens, ref = setup(name)
    prompt = tokens[:2, :32]                     # a multiple of 4 devices x chunks of 8
    want_logits, want = engine.prefill(engine.init_cache(2, 40), prompt)
    want = jax.tree.map(np.asarray, want)
    mesh = make_mesh(data=2, context=4)
    with jax.set_mesh(mesh):
        got_logits, got = engine.prefill_parallel(engine.init_cache(2, 40), prompt)
    np.testing.assert_allclose(np.asarray(got_logits), np.asarray(want_logits), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(got_logits), ref[:2, 31], rtol=1e-4, atol=1e-4)
    for a, b in zip(jax.tree.leaves(jax.tree.map(np.asarray, got)), jax.tree.leaves(want)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    # And decoding continues from it as from the ordinary prefill.
    _, logits, _ = engine.decode(got, tokens[:2, 32])
    np.testing.assert_allclose(np.asarray(logits), ref[:2, 32], rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="multiple of mesh.context"), jax.set_mesh(mesh):
        engine.prefill_parallel(engine.init_cache(2, 40), tokens[:2, :20])


@pytest.mark.slow
def test_reconstruction_target_and_unsupported_models():
    """The ablation target (no look-ahead) is applied as the module applies it; model kinds without
    a cached path say so."""
    cfg = tiny(ttt=dict(target="reconstruction"))
    model = make_model(cfg)
    tokens = np.asarray(jax.random.randint(jax.random.key(4), (1, 20), 0, V))
    ref = np.asarray(_FWD(model, jnp.asarray(tokens)))
    engine = Engine(model, prefill_block=12)
    logits, cache = engine.prefill(engine.init_cache(1, 20), tokens[:, :11], logits="all")
    dec = []
    for t in range(11, 20):
        _, lg, cache = engine.decode(cache, tokens[:, t])
        dec.append(np.asarray(lg))
    np.testing.assert_allclose(np.asarray(logits)[0], ref[0, :11], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.stack(dec, 1)[0], ref[0, 11:], rtol=1e-4, atol=1e-4)
    e2e_cfg = dataclasses.replace(TINY, e2e=dataclasses.replace(TINY.e2e, enabled=True, chunk_size=8))
    with pytest.raises(ValueError, match="TTT-E2E"):
        Engine(CausalLM(e2e_cfg, rngs=nnx.Rngs(0)))
