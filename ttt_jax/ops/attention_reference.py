"""The attention pattern, defined once, and the dense oracles of every attention path.

* :func:`attention_mask` -- the one definition of who sees whom: query ``t`` sees key ``s`` iff
  ``s <= t`` (causal), ``s > t - window`` when ``window > 0`` (the window counts the query itself),
  and, with segment ids, ``seg[s] == seg[t] != 0`` (same id, not same run; 0 = padding).
* :func:`attention_reference` -- explicit masked softmax over ``[B, H, T, T]`` logits: the oracle of
  single-device attention (``ttt_jax.ops.attention``) and of the context-parallel paths
  (``ttt_jax.ops.attention_cp``), whose sharded result must equal it on the gathered sequence.
* :func:`masked_attention` -- the same mask on explicit *global* positions of a query block and a
  key block (keys at negative positions are invalid: the halo of device 0); the local building
  block of the context-parallel XLA paths (all-gather, sliding window). :func:`position_mask` is
  its mask, also used per block by the XLA ring.

Shapes: ``q [B, T, H, Dh]``, ``k, v [B, T, KV, Dh]`` with ``H % KV == 0`` (GQA: query head ``h``
uses kv head ``h // (H // KV)``). A query that sees no key outputs exactly 0.
"""

from __future__ import annotations

import math
from typing import Optional

import jax
import jax.numpy as jnp

NEG_INF = -1e30
"""Finite "minus infinity" for float32 logits; masked probabilities are zeroed explicitly."""


def attention_mask(q_idx: jax.Array, k_idx: jax.Array, *, window: int = 0,
                   q_segment_ids: Optional[jax.Array] = None,
                   k_segment_ids: Optional[jax.Array] = None) -> jax.Array:
    """Boolean "query may attend to key" mask.

    Args:
      q_idx: ``[..., Tq]`` int sequence indices of the queries (index in the packed row, not the
        RoPE position).
      k_idx: ``[..., Tk]`` int sequence indices of the keys.
      window: 0 for full causal attention; ``> 0``: a query at ``t`` sees keys ``t-window+1 .. t``.
      q_segment_ids, k_segment_ids: optional ``[..., Tq]`` / ``[..., Tk]`` int segment ids
        (0 = padding). Both or neither.

    Returns:
      ``[..., Tq, Tk]`` bool (leading dims broadcast).
    """
    q = q_idx[..., :, None]
    k = k_idx[..., None, :]
    mask = k <= q
    if window > 0:
        mask = mask & (k > q - window)
    if (q_segment_ids is None) != (k_segment_ids is None):
        raise ValueError("attention_mask: pass both q_segment_ids and k_segment_ids, or neither")
    if q_segment_ids is not None:
        qs = q_segment_ids[..., :, None]
        mask = mask & (qs == k_segment_ids[..., None, :]) & (qs != 0)
    return mask


def attention_reference(q: jax.Array, k: jax.Array, v: jax.Array, *,
                        segment_ids: Optional[jax.Array] = None, window: int = 0,
                        scale: Optional[float] = None) -> jax.Array:
    """Explicit masked softmax over the full ``[B, H, T, T]`` logits (the test oracle).

    Shapes as :func:`attention`. Rows with no visible key (padding) give 0.
    """
    b, t, h, d = q.shape
    kv = k.shape[2]
    g = h // kv
    if scale is None:
        scale = 1.0 / math.sqrt(d)
    qg = q.reshape(b, t, kv, g, d)
    s = jnp.einsum("bqkgd,bskd->bkgqs", qg, k, preferred_element_type=jnp.float32) * scale
    idx = jnp.arange(t)
    if segment_ids is not None:
        mask = attention_mask(idx, idx, window=window, q_segment_ids=segment_ids,
                              k_segment_ids=segment_ids)[:, None, None]       # [B,1,1,T,T]
    else:
        mask = attention_mask(idx, idx, window=window)                        # [T,T]
    s = jnp.where(mask, s, -jnp.inf)
    m = jax.lax.stop_gradient(jnp.max(s, axis=-1, keepdims=True))
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    p = jnp.exp(s - m)
    l = jnp.sum(p, axis=-1, keepdims=True)
    p = p / jnp.where(l > 0, l, 1.0)
    out = jnp.einsum("bkgqs,bskd->bqkgd", p, v.astype(jnp.float32))
    return out.reshape(b, t, h, d).astype(q.dtype)



def position_mask(q_pos: jax.Array, k_pos: jax.Array, q_seg: Optional[jax.Array],
                  k_seg: Optional[jax.Array], window: int) -> jax.Array:
    """:func:`attention_mask` on global positions, shaped for ``[B, KV, G, Tq, Tk]`` scores.

    Args:
      q_pos: ``[Tq]`` int global positions of the queries; k_pos: ``[Tk]`` of the keys (keys at
        negative positions are never visible).
      q_seg, k_seg: optional ``[B, Tq]`` / ``[B, Tk]`` int segment ids (both or neither).
      window: 0 = full causal; ``> 0`` = sliding window including the query.

    Returns:
      ``[B|1, 1, 1, Tq, Tk]`` bool.
    """
    if q_seg is None:
        mask = attention_mask(q_pos, k_pos, window=window)[None]
    else:
        mask = attention_mask(q_pos[None], k_pos[None], window=window, q_segment_ids=q_seg,
                              k_segment_ids=k_seg)
    mask = mask & (k_pos >= 0)[None, None, :]
    return mask[:, None, None]


def split_heads(q: jax.Array, kv_heads: int) -> jax.Array:
    """``[B, T, H, Dh]`` -> ``[B, T, KV, G, Dh]`` (the GQA grouping of the query heads)."""
    b, t, h, d = q.shape
    return q.reshape(b, t, kv_heads, h // kv_heads, d)


def gqa_scores(q5: jax.Array, k: jax.Array, scale: float) -> jax.Array:
    """``[B, Tq, KV, G, Dh]`` x ``[B, Tk, KV, Dh]`` -> ``[B, KV, G, Tq, Tk]`` float32 logits."""
    return jnp.einsum("bqhgd,bkhd->bhgqk", q5, k, preferred_element_type=jnp.float32) * scale


def masked_attention(q: jax.Array, k: jax.Array, v: jax.Array, q_pos: jax.Array, k_pos: jax.Array, *,
                     q_segment_ids: Optional[jax.Array] = None,
                     k_segment_ids: Optional[jax.Array] = None, window: int = 0,
                     scale: Optional[float] = None) -> jax.Array:
    """Dense masked softmax attention on explicit global positions (no communication).

    Args:
      q: ``[B, Tq, H, Dh]``; k, v: ``[B, Tk, KV, Dh]``.
      q_pos: ``[Tq]`` int global positions of the queries; k_pos: ``[Tk]`` of the keys (keys at
        negative positions are ignored).
      q_segment_ids, k_segment_ids: optional ``[B, Tq]`` / ``[B, Tk]`` int (both or neither).
      window: 0 = full causal; ``> 0`` = sliding window including the query.
      scale: logit scale, default ``1 / sqrt(Dh)``.

    Returns:
      ``[B, Tq, H, Dh]`` in ``q.dtype``. Memory ``O(B * H * Tq * Tk)``.
    """
    if (q_segment_ids is None) != (k_segment_ids is None):
        raise ValueError("masked_attention: pass both q_segment_ids and k_segment_ids, or neither")
    b, tq, h, d = q.shape
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    s = gqa_scores(split_heads(q, k.shape[2]), k, scale)  # [B, KV, G, Tq, Tk]
    mask = position_mask(q_pos, k_pos, q_segment_ids, k_segment_ids, window)
    s = jnp.where(mask, s, NEG_INF)
    m = jnp.max(s, axis=-1, keepdims=True)
    p = jnp.where(mask, jnp.exp(s - m), 0.0)
    denom = jnp.sum(p, axis=-1, keepdims=True)
    p = p / jnp.where(denom == 0, 1.0, denom)
    out = jnp.einsum("bhgqk,bkhd->bqhgd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return out.reshape(b, tq, h, d).astype(q.dtype)


def check_qkv(q, k, v, segment_ids, what: str) -> None:
    """``ValueError`` (prefixed by ``what``) unless ``q [B,T,H,Dh]``, ``k, v [B,T,KV,Dh]`` with
    ``H % KV == 0`` and optional ``segment_ids [B, T]``."""
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"{what}: expected q [B,T,H,Dh], k/v [B,T,KV,Dh]; got q {q.shape}, "
                         f"k {k.shape}, v {v.shape}")
    b, t, h, d = q.shape
    if k.shape != v.shape or k.shape[:2] != (b, t) or k.shape[3] != d:
        raise ValueError(f"{what}: k {k.shape} and v {v.shape} must both be [B={b}, T={t}, KV, Dh={d}] "
                         f"to match q {q.shape}")
    if h % k.shape[2]:
        raise ValueError(f"{what}: query heads ({h}) must be a multiple of kv heads ({k.shape[2]})")
    if segment_ids is not None and tuple(segment_ids.shape) != (b, t):
        raise ValueError(f"{what}: segment_ids must be [B, T] = {(b, t)}, got {tuple(segment_ids.shape)}")
