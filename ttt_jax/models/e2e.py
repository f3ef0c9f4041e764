"""TTT-E2E: the last blocks' MLPs trained by SGD on next-token loss during the forward pass.

The SwiGLU MLPs (``gate [D, F]``, ``up [D, F]``, ``down [F, D]``) of the last ``k`` decoder blocks
are *fast weights*, one copy per sequence, initialised from the model's parameters. The blocks
before them do not depend on the fast weights and run once over the whole sequence
(:class:`~ttt_jax.models.lm.CausalLM`); this module runs the last ``k`` blocks, the final norm and
the LM head chunk by chunk (``C = model.e2e.chunk_size`` tokens)::

    for chunk i:                                     apply-then-update
        h_i   = blocks(x_i; W_i, KV window of earlier chunks)   -> output of chunk i
        L_i   = mean next-token NLL of chunk i (per sequence; targets = the following tokens)
        W_i+1 = W_i - lr * clip(grad_W L_i)          (clip: global norm over the k MLPs, per sequence)

Each chunk's attention sees the keys and values of earlier chunks as they were computed then (with
their chunks' fast weights): a cache of the last ``ceil((window - 1) / C)`` chunks per block (all
earlier chunks for full attention) is carried through the chunk scan. The next-token target of a
chunk's last token is the first token of the next chunk, which the next chunk's output may depend
on: the output at position ``t`` depends on tokens ``<= t`` only (tested). The model's outputs
are the pre-update ones, so the ordinary next-token loss of the model is the published outer loss
(the chunks' pre-update losses, weighted by token count); differentiating it differentiates through
the inner SGD steps (second order). Each chunk's step runs under ``jax.checkpoint``: the backward
pass keeps the fast weights and KV window per chunk, not the chunk's activations.

Packed documents: the inner loss never pairs a token with a target of another document, and
attention never crosses documents, but the fast weights are per row: a document packed after
another starts from the weights the earlier one produced (train on rows of one document for the
published semantics).

Two implementations: :func:`e2e_hidden` (the chunk scan above) and :func:`e2e_hidden_reference`
(a Python loop over chunks that recomputes the whole prefix with the standard attention module and
explicit per-chunk weights; the test oracle).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import jax
import jax.numpy as jnp

from ttt_jax.ops.attention import attention_mask
from ttt_jax.nn.rope import apply_rope

_F32 = jnp.float32
FAST_NAMES = ("gate", "up", "down")


def initial_fast_weights(blocks: Sequence, batch: int) -> list[dict[str, jax.Array]]:
    """The fast weights of ``blocks`` (their MLPs' gate/up/down), fp32, one copy per sequence
    (``[B, ...]``)."""
    return [{n: jnp.broadcast_to(getattr(b.mlp, n)[...].astype(_F32),
                                 (batch,) + tuple(getattr(b.mlp, n).shape)) for n in FAST_NAMES}
            for b in blocks]


def _swiglu(h: jax.Array, w: dict[str, jax.Array], dtype) -> jax.Array:
    """``h [B, C, D]`` through per-sequence SwiGLU weights ``w`` (``[B, D, F]``, ``[B, F, D]``)."""
    mm = lambda eq, a, b: jnp.einsum(eq, a.astype(dtype), b.astype(dtype),  # noqa: E731
                                     preferred_element_type=_F32)
    z = jax.nn.silu(mm("bcd,bdf->bcf", h, w["gate"])) * mm("bcd,bdf->bcf", h, w["up"])
    return mm("bcf,bfd->bcd", z.astype(dtype), w["down"]).astype(dtype)


def next_token_targets(tokens: jax.Array, segment_ids: Optional[jax.Array]):
    """``(targets [B, T], mask [B, T] fp32)``: the following token of the same document."""
    b, t = tokens.shape
    targets = jnp.concatenate([tokens[:, 1:], jnp.zeros((b, 1), tokens.dtype)], axis=1)
    mask = jnp.broadcast_to(jnp.arange(t) < t - 1, (b, t))
    if segment_ids is not None:
        nxt = jnp.concatenate([segment_ids[:, 1:], jnp.zeros((b, 1), segment_ids.dtype)], axis=1)
        mask = mask & (segment_ids != 0) & (nxt == segment_ids)
    return targets, mask.astype(_F32)


def _chunk_nll(hidden_normed: jax.Array, head: jax.Array, targets: jax.Array, mask: jax.Array):
    """Per-sequence mean next-token NLL of a chunk: ``[B]`` fp32."""
    logits = jnp.einsum("bcd,dv->bcv", hidden_normed, head.astype(hidden_normed.dtype),
                        preferred_element_type=_F32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    tgt = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return jnp.sum((lse - tgt) * mask, axis=1) / jnp.maximum(jnp.sum(mask, axis=1), 1.0)


def sgd_step(fast: list, grads: list, lr: float, clip: float) -> list:
    """``fast - lr * clip(grads)``, the clip a global norm over all fast weights, per sequence."""
    if clip > 0:
        sq = sum(jnp.sum(jnp.square(g), axis=tuple(range(1, g.ndim))) for g in jax.tree.leaves(grads))
        norm = jnp.sqrt(jnp.maximum(sq, 1e-30))
        scale = jnp.minimum(1.0, clip / norm)                                         # [B]
    else:
        scale = jnp.ones(jax.tree.leaves(grads)[0].shape[:1], _F32)
    return jax.tree.map(lambda w, g: w - lr * scale.reshape((-1,) + (1,) * (g.ndim - 1)) * g,
                        fast, grads)


# --------------------------------------------------------------------------------------------------
# Chunked form
# --------------------------------------------------------------------------------------------------


def _cache_len(window: int, chunk: int, n_chunks: int) -> int:
    """Keys of earlier chunks a chunk's queries can see: whole chunks, at most all earlier ones."""
    if window <= 0:
        return (n_chunks - 1) * chunk
    return min(n_chunks - 1, math.ceil((window - 1) / chunk)) * chunk


def _cached_attention(attn, h, pos, idx, seg, cache):
    """Attention of a chunk's queries over (cached earlier keys, the chunk's keys).

    ``h [B, C, D]`` normed input, ``pos [B, C]`` RoPE positions, ``idx [C]`` sequence indices,
    ``seg [B, C]`` (0 = padding); ``cache = (k [B, M, KV, Dh], v, idx [M], seg [B, M])`` with index
    -1 for empty slots. Returns the block's attention output ``[B, C, D]`` and the next cache.
    """
    dt = attn.dtype
    mm = lambda eq, a, b: jnp.einsum(eq, a.astype(dt), b.astype(dt), preferred_element_type=_F32)  # noqa: E731
    q = mm("btd,dhk->bthk", h, attn.q[...]).astype(dt)
    k = mm("btd,dhk->bthk", h, attn.k[...]).astype(dt)
    v = mm("btd,dhk->bthk", h, attn.v[...]).astype(dt)
    if attn.q_norm is not None:
        q, k = attn.q_norm(q), attn.k_norm(k)
    scaling = getattr(attn, "rope_scaling", None)
    q = apply_rope(q, pos, theta=attn.rope_theta, scaling=scaling)
    k = apply_rope(k, pos, theta=attn.rope_theta, scaling=scaling)
    ck, cv, cidx, cseg = cache
    keys, vals = jnp.concatenate([ck, k], 1), jnp.concatenate([cv, v], 1)
    kidx, kseg = jnp.concatenate([cidx, idx]), jnp.concatenate([cseg, seg], 1)
    mask = attention_mask(idx, kidx, window=attn.window, q_segment_ids=seg, k_segment_ids=kseg)
    mask = mask & (kidx >= 0)                                                     # [B, C, M+C]
    b, c, nh, dh = q.shape
    kvh = keys.shape[2]
    qg = q.reshape(b, c, kvh, nh // kvh, dh)
    s = jnp.einsum("bqkgd,bskd->bkgqs", qg, keys, preferred_element_type=_F32) / math.sqrt(dh)
    s = jnp.where(mask[:, None, None], s, -jnp.inf)
    m = jax.lax.stop_gradient(jnp.max(s, axis=-1, keepdims=True))
    p = jnp.exp(s - jnp.where(jnp.isfinite(m), m, 0.0))
    l = jnp.sum(p, axis=-1, keepdims=True)
    p = p / jnp.where(l > 0, l, 1.0)  # padding queries see no key; keep their (second-order) grads finite
    out = jnp.einsum("bkgqs,bskd->bqkgd", p, vals.astype(_F32)).reshape(b, c, nh, dh).astype(dt)
    out = mm("bthk,hkd->btd", out, attn.o[...]).astype(dt)
    m_len = ck.shape[1]
    new_cache = (keys[:, c:][:, :m_len], vals[:, c:][:, :m_len], kidx[c:][:m_len], kseg[:, c:][:, :m_len])
    return out, new_cache


def e2e_hidden(blocks: Sequence, final_norm, head: jax.Array, x: jax.Array, tokens: jax.Array,
               positions: jax.Array, segment_ids: Optional[jax.Array], *, chunk_size: int,
               lr: float, grad_clip: float, return_fast: bool = False):
    """Run the E2E blocks chunk by chunk with inner SGD (module docstring).

    Args:
      blocks: the last ``k`` :class:`~ttt_jax.nn.block.DecoderBlock` (plain SwiGLU MLPs).
      final_norm: the model's final RMSNorm; ``head``: ``[D, V]`` output projection.
      x: ``[B, T, D]`` input of the first E2E block; ``tokens``: ``[B, T]`` int (inner targets are
        ``tokens[:, t + 1]``); ``positions``: ``[B, T]`` RoPE positions; ``segment_ids``: optional
        ``[B, T]`` (0 = padding).
    Returns:
      ``[B, T, D]`` final-normed hidden states (pre-update outputs), in ``x.dtype``; with
      ``return_fast`` also the fast weights after the last chunk.
    """
    b, t, d = x.shape
    c = int(chunk_size)
    n = -(-t // c)
    pad = n * c - t
    targets, tmask = next_token_targets(tokens, segment_ids)
    seg = jnp.ones((b, t), jnp.int32) if segment_ids is None else segment_ids.astype(jnp.int32)

    def chunks(a):
        a = jnp.pad(a, [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2))
        return jnp.moveaxis(a.reshape((b, n, c) + a.shape[2:]), 1, 0)

    idx = jnp.arange(n * c, dtype=jnp.int32).reshape(n, c)
    xs = (chunks(x), chunks(positions), idx, chunks(seg), chunks(targets), chunks(tmask))
    caches = []
    for blk in blocks:
        m = _cache_len(blk.attn.window, c, n)
        kvh, dh = blk.attn.n_kv_heads, blk.attn.head_dim
        z = jnp.zeros((b, m, kvh, dh), blk.attn.dtype)
        caches.append((z, z, -jnp.ones((m,), jnp.int32), jnp.zeros((b, m), jnp.int32)))
    fast0 = initial_fast_weights(blocks, b)

    def forward(fast, caches, xc, pc, ic, sc):
        h, new = xc, []
        for blk, w, cache in zip(blocks, fast, caches):
            a, cache = _cached_attention(blk.attn, blk.attn_norm(h), pc, ic, sc, cache)
            h = h + a
            h = h + _swiglu(blk.mlp_norm(h), w, blk.mlp.dtype)
            new.append(cache)
        return final_norm(h), new

    @jax.checkpoint
    def step(carry, xs_i):
        fast, caches = carry
        xc, pc, ic, sc, tc, mc = xs_i

        def inner_loss(fast):
            hn, new = forward(fast, caches, xc, pc, ic, sc)
            return jnp.sum(_chunk_nll(hn, head, tc, mc)), (hn, new)

        grads, (hn, new) = jax.grad(inner_loss, has_aux=True)(fast)
        return (sgd_step(fast, grads, lr, grad_clip), new), hn

    (fast, _), out = jax.lax.scan(step, (fast0, caches), xs)
    out = jnp.moveaxis(out, 0, 1).reshape(b, n * c, d)[:, :t].astype(x.dtype)
    return (out, fast) if return_fast else out


# --------------------------------------------------------------------------------------------------
# Reference: explicit per-chunk loop, whole prefix recomputed with the standard modules
# --------------------------------------------------------------------------------------------------


def e2e_hidden_reference(blocks: Sequence, final_norm, head: jax.Array, x: jax.Array,
                         tokens: jax.Array, positions: jax.Array, segment_ids: Optional[jax.Array],
                         *, chunk_size: int, lr: float, grad_clip: float, return_fast: bool = False):
    """Same contract as :func:`e2e_hidden`. For chunk ``i`` it reruns the E2E blocks over tokens
    ``[0, end_i)`` with the model's own :class:`~ttt_jax.nn.attention.Attention` (full prefix) and
    the MLP of each earlier chunk's tokens evaluated with that chunk's weights, then takes the SGD
    step on chunk ``i``'s loss. Quadratic in the number of chunks: a test oracle."""
    b, t, _ = x.shape
    c = int(chunk_size)
    targets, tmask = next_token_targets(tokens, segment_ids)
    weights = [initial_fast_weights(blocks, b)]
    outs = []
    for i in range(-(-t // c)):
        lo, hi = i * c, min((i + 1) * c, t)
        seg = None if segment_ids is None else segment_ids[:, :hi]

        def prefix_forward(w_i):
            ws = weights[:i] + [w_i]
            h = x[:, :hi]
            for l, blk in enumerate(blocks):
                h = h + blk.attn(blk.attn_norm(h), positions=positions[:, :hi], segment_ids=seg)
                hm = blk.mlp_norm(h)
                parts = [_swiglu(hm[:, j * c:min((j + 1) * c, hi)], ws[j][l], blk.mlp.dtype)
                         for j in range(i + 1)]
                h = h + jnp.concatenate(parts, axis=1)
            hn = final_norm(h[:, lo:hi])
            return jnp.sum(_chunk_nll(hn, head, targets[:, lo:hi], tmask[:, lo:hi])), hn

        grads, hn = jax.grad(prefix_forward, has_aux=True)(weights[i])
        weights.append(sgd_step(weights[i], grads, lr, grad_clip))
        outs.append(hn)
    out = jnp.concatenate(outs, axis=1).astype(x.dtype)
    return (out, weights[-1]) if return_fast else out
