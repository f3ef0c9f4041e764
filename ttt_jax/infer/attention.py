"""Attention against a KV cache, under the names inference has always exported.

The op is :func:`ttt_jax.ops.attention_cache.cache_attention` (``reference`` / ``blockwise`` / the
TPU kernel ``pallas``, with its mask :func:`~ttt_jax.ops.attention_cache.cache_mask`); the KV cache
and its update live beside the attention layer (:mod:`ttt_jax.nn.kv_cache`), whose cached call the
model's blocks make.
"""

from ttt_jax.ops.attention_cache import IMPLS, cache_attention, cache_mask

__all__ = ["IMPLS", "cache_attention", "cache_mask"]
