"""The KV cache of one attention layer: its type, its initial value and its update.

A :class:`KVCache` holds keys and values after RoPE, ``[B, S, KV, Dh]``. A *full* cache stores
position ``p`` at slot ``p`` (``S`` = capacity, at least the longest sequence). A *ring* cache, for
a sliding-window layer of window ``W``, has ``S = W`` slots and stores position ``p`` at slot
``p % W``: exactly the keys a query may still see, so its memory does not grow with the context.

The update, as :class:`ttt_jax.nn.attention.Attention` calls it with a cache:

* :meth:`KVCache.extend` -- ``T`` new tokens per sequence (a prefill block, or ``T = 1`` when
  decoding) at ``start + i``: their keys and values are written and their queries attend to the
  cache (:func:`ttt_jax.ops.attention_cache.cache_attention`), computing exactly what one forward
  pass over the whole sequence computes for those tokens;
* :meth:`KVCache.fill` -- an empty cache, whole prompts: the keys and values of every position
  (the last ``window`` for a ring) are written; the outputs come from the full forward pass.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp

from ttt_jax.config import ModelConfig
from ttt_jax.nn.cache import round_up
from ttt_jax.ops.attention_cache import cache_attention


@dataclasses.dataclass(frozen=True)
class KVCache:
    """Keys and values of one attention layer.

    Attributes:
      k, v: ``[B, S, KV, Dh]`` in the compute dtype (keys after QK-norm and RoPE).
      window: the layer's sliding window (0 = full causal attention). Static.
      ring: whether slots are a ring buffer of ``S = window`` positions (slot ``p % window``) or
        slot ``p`` holds position ``p``. Static.
    """

    k: jax.Array
    v: jax.Array
    window: int = 0
    ring: bool = False

    @property
    def capacity(self) -> int:
        return int(self.k.shape[1])

    def slot_positions(self, lengths: jax.Array) -> jax.Array:
        """``[B, S]`` int32 position held by every slot once ``lengths [B]`` tokens are in, -1 if empty."""
        s = jnp.arange(self.capacity, dtype=jnp.int32)[None, :]
        lengths = lengths.astype(jnp.int32)[:, None]
        if not self.ring:
            return jnp.where(s < lengths, s, -1)
        last = lengths - 1
        pos = last - jnp.mod(last - s, self.capacity)
        return jnp.where(pos >= 0, pos, -1)

    def written(self, k: jax.Array, v: jax.Array, slots: jax.Array) -> "KVCache":
        """This cache with ``k, v [B, T, KV, Dh]`` scattered at ``slots [B, T]`` (``>= S``: dropped)."""
        return KVCache(write_rows(self.k, k, slots), write_rows(self.v, v, slots), window=self.window,
                       ring=self.ring)

    def extend(self, q: jax.Array, k: jax.Array, v: jax.Array, start: jax.Array, n_valid: jax.Array,
               *, impl: str = "auto", block: int = 512, platform: Optional[str] = None
               ) -> tuple[jax.Array, "KVCache"]:
        """Attention of ``T`` new tokens per sequence, with their keys and values written.

        Args:
          q, k, v: ``[B, T, heads, Dh]`` projections of the new tokens (after QK-norm and RoPE);
            row ``i`` of sequence ``b`` is position ``start[b] + i``. Rows ``i >= n_valid[b]`` are
            padding: their outputs are garbage and they are never written.
          start: ``[B]`` int32 tokens already in the cache.
          n_valid: ``[B]`` int32 real new tokens per sequence (0 leaves the sequence untouched).
          impl, block, platform: :func:`ttt_jax.ops.attention_cache.cache_attention` options.

        Returns:
          ``([B, T, H, Dh]`` attention output before the output projection, the updated cache).
        """
        t = q.shape[1]
        idx = jnp.arange(t, dtype=jnp.int32)[None, :]
        positions = start[:, None] + idx
        valid = idx < n_valid[:, None]
        new_len = start + n_valid
        cap = self.capacity
        if self.ring and t > 1:
            # Earlier queries of the block need keys that the block's own writes would evict: attend
            # to [ring as it was, new keys], then keep the last `window` positions.
            keys = jnp.concatenate([self.k, k.astype(self.k.dtype)], axis=1)
            vals = jnp.concatenate([self.v, v.astype(self.v.dtype)], axis=1)
            k_pos = jnp.concatenate([self.slot_positions(start), jnp.where(valid, positions, -1)], axis=1)
            out = cache_attention(q, positions, keys, vals, k_pos, window=self.window, impl=impl,
                                  block=block, platform=platform)
            keep = valid & (positions >= new_len[:, None] - cap)
            return out, self.written(k, v, jnp.where(keep, positions % cap, cap))
        # Full cache (slot = position), or one token into a ring: the write evicts position
        # p - window, which query p no longer sees.
        kv = self.written(k, v, jnp.where(valid, positions % cap if self.ring else positions, cap))
        out = cache_attention(q, positions, kv.k, kv.v, kv.slot_positions(new_len), window=self.window,
                              impl=impl, block=block, platform=platform)
        return out, kv

    def fill(self, k: jax.Array, v: jax.Array) -> "KVCache":
        """This (empty) cache holding the keys and values ``[B, T, KV, Dh]`` of positions
        ``0 .. T-1`` (a ring keeps the last ``window``)."""
        b, t = k.shape[:2]
        positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        keep = positions >= t - self.capacity
        return self.written(k, v, jnp.where(keep, positions % self.capacity, self.capacity))


jax.tree_util.register_dataclass(KVCache, data_fields=["k", "v"], meta_fields=["window", "ring"])


def write_rows(cache_arr: jax.Array, new: jax.Array, slots: jax.Array) -> jax.Array:
    """Scatter ``new [B, T, ...]`` into ``cache_arr [B, S, ...]`` at ``slots [B, T]`` (``>= S``: dropped)."""
    b = jnp.broadcast_to(jnp.arange(new.shape[0])[:, None], slots.shape)
    return cache_arr.at[b, slots].set(new.astype(cache_arr.dtype), mode="drop")


def cache_capacity(max_len: int, block: int = 512) -> int:
    """Slots of a full KV cache for sequences of up to ``max_len`` tokens (a multiple of ``block``
    once it exceeds one block, so that blockwise attention needs no padding copy)."""
    if max_len < 1:
        raise ValueError(f"max_len must be >= 1, got {max_len}")
    return max_len if max_len <= block else round_up(max_len, block)


def init_kv_cache(cfg: ModelConfig, layer: int, batch_size: int, max_len: int, *, ring: bool = True,
                  kv_dtype=None) -> KVCache:
    """An empty :class:`KVCache` of layer ``layer`` for sequences of at most ``max_len`` tokens: a ring
    of ``window`` slots for a sliding-window layer when ``ring`` and the window is shorter than
    ``max_len``, else :func:`cache_capacity` slots. ``kv_dtype`` defaults to the compute dtype."""
    kvdt = jnp.dtype(kv_dtype if kv_dtype is not None else cfg.compute_dtype)
    window = cfg.layer_window(layer)
    use_ring = ring and 0 < window < max_len
    slots = window if use_ring else cache_capacity(max_len)
    shape = (batch_size, slots, cfg.n_kv_heads, cfg.resolved_head_dim)
    return KVCache(jnp.zeros(shape, kvdt), jnp.zeros(shape, kvdt), window=window, ring=use_ring)
