"""The Pallas TPU cache-attention kernel (prefill / decode) in interpret mode on CPU, against the
reference of ``ttt_jax.ops.attention_cache``.

Cases: decode (one query) and prefill blocks, causal and sliding window, GQA and MQA, empty slots,
ring-buffer caches whose slots are not in position order (as ``KVCache`` lays them out), lengths that
are not multiples of the key block or the row tile, several row tiles, rows that see nothing, fp32
(values at 1e-5, gradients of the custom VJP at 1e-4) and bf16. Plus the block-skipping table, the
``auto`` dispatch by target platform, and an engine whose cache attention is the kernel.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ttt_jax.config import ModelConfig, RuntimeConfig, TTTConfig
from ttt_jax.infer import Engine
from ttt_jax.models import CausalLM
from ttt_jax.nn.kv_cache import KVCache
from ttt_jax.ops import attention_cache as ac
from ttt_jax.ops.kernels import tpu_cache

pytestmark = pytest.mark.unit

RNG = np.random.default_rng(0)


def _qkv(b, tq, s, h, kv, dh, dtype=jnp.float32):
    q = jnp.asarray(RNG.standard_normal((b, tq, h, dh)), dtype)
    k = jnp.asarray(RNG.standard_normal((b, s, kv, dh)), dtype)
    v = jnp.asarray(RNG.standard_normal((b, s, kv, dh)), dtype)
    return q, k, v


def _full_slots(s, lengths):
    """``[B, S]`` positions of a full cache (slot = position) holding ``lengths[b]`` tokens."""
    idx = np.arange(s)
    return jnp.asarray(np.stack([np.where(idx < n, idx, -1) for n in lengths]), jnp.int32)


def _ring_slots(window, lengths):
    """``[B, W]`` positions of a ring cache of ``window`` slots (as ``KVCache.slot_positions``)."""
    cache = KVCache(jnp.zeros((len(lengths), window, 1, 1)), jnp.zeros((len(lengths), window, 1, 1)),
                    window=window, ring=True)
    return cache.slot_positions(jnp.asarray(lengths, jnp.int32))


def _both(q, q_pos, k, v, k_pos, windows, block=128):
    """Kernel and reference outputs for each window, in one compilation."""
    @jax.jit
    def run(q, q_pos, k, v, k_pos):
        return [(ac.cache_attention(q, q_pos, k, v, k_pos, window=w, impl="pallas", block=block),
                 ac.cache_attention(q, q_pos, k, v, k_pos, window=w, impl="reference"))
                for w in windows]
    return run(q, q_pos, k, v, k_pos)


def _close(pairs, tol):
    for got, want in pairs:
        assert got.dtype == want.dtype
        np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), **tol)


F32 = dict(rtol=1e-5, atol=1e-5)


def test_decode_full_cache_gqa_partial_last_block():
    """One query per sequence against a full cache of 300 slots (key blocks of 128: the last one
    partial), filled to different lengths (one sequence's cache only 37 tokens: most blocks are
    skipped); causal and a window of 50."""
    b, s = 3, 300
    q, k, v = _qkv(b, 1, s, 4, 2, 16)
    lengths = [200, 37, 300]
    k_pos = _full_slots(s, lengths)
    q_pos = jnp.asarray([[n - 1] for n in lengths], jnp.int32)
    _close(_both(q, q_pos, k, v, k_pos, (0, 50)), F32)


def test_prefill_block_gqa_window_and_two_row_tiles(monkeypatch):
    """A prefill block of 20 queries x 4 query heads per kv head (80 rows) split into row tiles of
    16 (the last one partial), causal and window 24; the block's keys are already in the cache."""
    monkeypatch.setattr(tpu_cache, "ROWS_PER_STEP", 32)   # 2 kv heads -> row tiles of 16
    b, s, tq = 2, 260, 20
    q, k, v = _qkv(b, tq, s, 8, 2, 16)
    ends = [200, 20]
    k_pos = _full_slots(s, ends)
    q_pos = jnp.asarray(np.stack([np.arange(e - tq, e) for e in ends]), jnp.int32)
    assert tpu_cache.row_tile(tq * 4, 2, jnp.float32) == 16
    _close(_both(q, q_pos, k, v, k_pos, (0, 24)), F32)


def test_small_cache_is_one_block_and_rows_that_see_nothing_are_zero():
    """A cache of 40 slots (one block shorter than 128 lanes), an empty sequence (every slot -1), and
    queries before every key: their outputs are exactly 0, as the reference's."""
    b, s = 2, 40
    q, k, v = _qkv(b, 3, s, 2, 1, 8)
    k_pos = jnp.asarray(np.stack([np.where(np.arange(s) >= 10, np.arange(s), -1),
                                  np.full(s, -1)]), jnp.int32)
    q_pos = jnp.asarray([[3, 15, 39], [0, 1, 2]], jnp.int32)
    pairs = _both(q, q_pos, k, v, k_pos, (0, 4))
    _close(pairs, F32)
    got = np.asarray(pairs[0][0])
    assert np.all(got[0, 0] == 0) and np.all(got[1] == 0)


@pytest.mark.parametrize("t", [1, 6])
def test_ring_cache_through_kv_cache_extend(t):
    """``KVCache.extend`` of a sliding-window layer's ring buffer (slots not in position order): one
    token (the write evicts the oldest position) and a block of 6 (the kernel reads [ring as it was,
    new keys]); the kernel gives the reference's outputs and the same cache."""
    b, w, kv, h, dh = 2, 136, 2, 4, 16                     # a ring longer than one 128-slot block
    start = jnp.asarray([150, 300], jnp.int32)
    ring = KVCache(*_qkv(b, 1, w, kv, kv, dh)[1:], window=w, ring=True)
    q, k, v = _qkv(b, t, t, h, kv, dh)
    assert sorted(np.asarray(ring.slot_positions(start))[0].tolist()) == list(range(150 - w, 150))
    n_valid = jnp.asarray([t, max(t - 2, 1)], jnp.int32)

    @jax.jit
    def run(ring, q, k, v):
        return [ring.extend(q, k, v, start, n_valid, impl=impl, block=128)
                for impl in ("pallas", "reference")]

    (got, c1), (want, c2) = run(ring, q, k, v)
    valid = np.arange(t)[None, :] < np.asarray(n_valid)[:, None]
    np.testing.assert_allclose(np.asarray(got)[valid], np.asarray(want)[valid], **F32)
    np.testing.assert_array_equal(np.asarray(c1.k), np.asarray(c2.k))


@pytest.mark.parametrize("tq", [1, 5])
def test_mqa_bfloat16(tq):
    """bf16 inputs, one kv head (the squeezed-block path), decode and a 5-query block, window 30."""
    b, s = 2, 200
    k_pos = _full_slots(s, [180, 60])
    q, k, v = _qkv(b, tq, s, 4, 1, 32, jnp.bfloat16)
    q_pos = jnp.asarray([np.arange(180 - tq, 180), np.arange(60 - tq, 60)], jnp.int32)
    _close(_both(q, q_pos, k, v, k_pos, (0, 30)), dict(rtol=2e-2, atol=2e-2))


def test_gradients_through_the_custom_vjp():
    """The kernel is forward only; ``impl="pallas"`` differentiates by recomputing through XLA
    (query-only TTT takes gradients of the cache attention): values at 1e-5, gradients at 1e-4."""
    b, s, tq = 2, 150, 4
    q, k, v = _qkv(b, tq, s, 4, 2, 16)
    k_pos = _full_slots(s, [150, 90])
    q_pos = jnp.asarray([np.arange(146, 150), np.arange(86, 90)], jnp.int32)
    ct = jnp.asarray(RNG.standard_normal(q.shape), jnp.float32)

    @jax.jit
    def vg(q, k, v):
        out = []
        for impl in ("pallas", "reference"):
            o, pb = jax.vjp(lambda q_, k_, v_: ac.cache_attention(q_, q_pos, k_, v_, k_pos, window=40,
                                                                  impl=impl), q, k, v)
            out.append((o, pb(ct)))
        return out

    (o1, g1), (o2, g2) = vg(q, k, v)
    np.testing.assert_allclose(np.asarray(o1), np.asarray(o2), **F32)
    for a, b_ in zip(g1, g2):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b_), rtol=1e-4, atol=1e-4)


def test_block_skipping_ranges():
    """Key blocks of 128 over 512 slots. Decode at position 130 of a full cache: blocks 0-1 are
    visible, steps 2 and 3 re-load block 1 (no new fetch). Position 300: blocks 0-2. A ring whose
    only filled block is the last: every step loads it. No key at all: nothing, block 0. Window 2:
    only block 1 for position 130, only block 2 for position 300."""
    kp = np.full((4, 512), -1, np.int32)
    kp[0, :131] = np.arange(131)
    kp[1, :301] = np.arange(301)
    kp[2, 384:400] = np.arange(16)
    q = jnp.asarray([[130], [300], [20], [5]], jnp.int32)[:, None]      # [B, nq=1, rows=1]
    ranges = [np.asarray(tpu_cache.visible_blocks(q, jnp.asarray(kp).reshape(4, 4, 128), w))[:, 0]
              for w in (0, 2)]
    assert ranges[0].tolist() == [[0, 1], [0, 2], [3, 3], [0, -1]]
    assert ranges[1][:2].tolist() == [[1, 1], [2, 2]]
    loads = [[int(tpu_cache.fetched_block(j, f, l)) for j in range(4)] for f, l in ranges[0]]
    assert loads == [[0, 1, 1, 1], [0, 1, 2, 2], [3, 3, 3, 3], [0, 0, 0, 0]]


def test_auto_takes_the_kernel_for_a_tpu_target_only():
    q, k, v = _qkv(1, 1, 16, 2, 1, 8)
    pos = jnp.arange(16, dtype=jnp.int32)[None]

    def prims(**kw):
        jaxpr = jax.make_jaxpr(lambda q, k, v: ac.cache_attention(q, pos[:, -1:], k, v, pos, **kw))(q, k, v)
        return str(jaxpr)

    assert "pallas_call" in prims(platform="tpu")
    assert "pallas_call" not in prims(platform="cpu") and "pallas_call" not in prims(platform="gpu")
    assert "pallas_call" not in prims()          # this host (CPU), no mesh
    with pytest.raises(ValueError, match="impl="):
        ac.cache_attention(q, pos[:, -1:], k, v, pos, impl="splash")


TINY = ModelConfig(vocab_size=259, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64,
                   max_seq_len=64, compute_dtype="float32", attention_window=6,
                   full_attention_layers=(1,), ttt=TTTConfig(enabled=False))


@pytest.mark.slow
def test_engine_with_the_kernel_equals_the_xla_engine():
    """An engine whose cache attention is the kernel (``attn_impl="pallas"``: interpret mode on this
    CPU host) through prefill in blocks and decode, layer 0 a ring buffer of 6 slots, layer 1 a full
    cache: the logits of the XLA engine. (With ``attn_impl="auto"`` an engine takes the kernel when
    its platform is TPU: the AOT test of ``tests/test_tpu_aot.py`` compiles those steps.)"""
    model = CausalLM(TINY, runtime=RuntimeConfig(attention_impl="reference"), rngs=nnx.Rngs(0))
    assert Engine(model).platform == "cpu" and Engine(model, platform="TPU").platform == "tpu"
    tokens = np.asarray(jax.random.randint(jax.random.key(1), (2, 14), 0, 259))
    out = []
    for impl in ("pallas", "reference"):
        engine = Engine(model, prefill_block=8, attn_impl=impl)
        cache = engine.init_cache(2, 20)
        pre, cache = engine.prefill(cache, [tokens[0, :11].tolist(), tokens[1, :7].tolist()], logits="all")
        dec = []
        for j in range(3):
            _, logits, cache = engine.decode(cache, [tokens[0, 11 + j], tokens[1, 7 + j]])
            dec.append(np.asarray(logits))
        out.append((np.asarray(pre), np.stack(dec)))
    (p1, d1), (p2, d2) = out
    np.testing.assert_allclose(p1[0, :11], p2[0, :11], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(p1[1, :7], p2[1, :7], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(d1, d2, rtol=1e-5, atol=1e-5)
