"""What the cached calls of the layers share: :class:`CacheStep`, the description of one call.

Every layer kind keeps its own per-sequence cache beside its module -- attention a KV cache
(:mod:`ttt_jax.nn.kv_cache`), the In-Place TTT MLP its fast weight (:mod:`ttt_jax.nn.ttt_cache`),
a TTT-Linear/MLP layer its inner model's state (:mod:`ttt_jax.nn.ttt_seq_cache`); a decoder block
holds one :class:`~ttt_jax.nn.block.LayerCache` of them. A module called with ``cache=`` (its cache)
and ``step=`` (a :class:`CacheStep`) returns ``(output, new cache)`` for ``T`` new tokens per
sequence (``Flax``'s Gemma example works the same way); without a cache it is the training forward.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Mapping, Optional

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class CacheStep:
    """One cached call over ``T`` new tokens of each of ``B`` sequences.

    Attributes:
      start: ``[B]`` int32 tokens of each sequence already in the caches; the new token ``i`` of
        sequence ``b`` sits at position ``start[b] + i`` (:meth:`positions`).
      n_valid: ``[B]`` int32 real new tokens per sequence in ``[0, T]``; later rows are padding
        (garbage outputs, never written to a cache). ``0`` leaves a sequence's caches unchanged.
      fill: the caches are empty and every row is a whole prompt (``start = 0``, ``n_valid = T``):
        the outputs come from the modules' full forward pass -- under a mesh with a ``context``
        axis the context-parallel one -- and the caches are filled position-wise from it.
        Otherwise the new tokens attend to / continue from the caches (any ``start``, ragged rows).
      q_deltas: optional ``{layer: [B, D, H, Dh]}`` per-sequence query-kernel additions (query-only
        TTT, :mod:`ttt_jax.infer.qttt`).
      attn_impl, attn_block: :func:`ttt_jax.ops.attention_cache.cache_attention` options.
      attn_platform: the platform the step is built for (``None``: ask
        :func:`ttt_jax.platform.target_platform` while tracing); ``attn_impl="auto"`` takes the
        Pallas TPU kernel on ``"tpu"``.
    """

    start: jax.Array
    n_valid: jax.Array
    fill: bool = False
    q_deltas: Mapping[int, jax.Array] = dataclasses.field(default_factory=dict)
    attn_impl: str = "auto"
    attn_block: int = 512
    attn_platform: Optional[str] = None

    def positions(self, t: int) -> jax.Array:
        """``[B, T]`` int32 positions of the new tokens: ``start[b] + i``."""
        return self.start.astype(jnp.int32)[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]


def round_up(n: int, multiple: int) -> int:
    """``n`` rounded up to a multiple of ``multiple``."""
    return int(math.ceil(n / multiple) * multiple)


def gather_rows(x: jax.Array, idx: jax.Array) -> jax.Array:
    """``x [B, S, ...]``, ``idx [B, L]`` -> ``x[b, idx[b, l]]`` as ``[B, L, ...]``."""
    return jnp.take_along_axis(x, idx.reshape(idx.shape + (1,) * (x.ndim - 2)), axis=1)
