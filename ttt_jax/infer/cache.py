"""The per-sequence inference state of a whole model: :class:`Cache` and :func:`init_cache`.

A :class:`Cache` holds, for a batch of ``B`` independent sequences,

* ``lengths [B]`` int32: how many tokens of each sequence have been consumed (the next token of
  sequence ``b`` sits at position ``lengths[b]``);
* per decoder layer a :class:`~ttt_jax.nn.block.LayerCache`, whose pieces live beside the modules
  that use them:

  - ``kv``: a :class:`~ttt_jax.nn.kv_cache.KVCache` of keys and values after RoPE,
    ``[B, S, KV, Dh]``: a full cache (slot = position), or for a sliding-window layer a ring
    buffer of ``window`` slots, so its memory does not grow with the context. ``None`` where a
    TTT-Linear/MLP layer replaces attention (``ttt_seq.mode="replace"``).
  - ``ttt`` (In-Place TTT layers only): a :class:`~ttt_jax.nn.ttt_cache.TTTCache` with the
    fast-weight state ``delta [B, F, D]`` fp32 (the accumulated ``S`` of ``W = W0 + S``, DESIGN.md
    section 1) as of the start of the current chunk, and the rows of the current, incomplete chunk
    that its update will need. Because the target conv looks two tokens ahead inside the chunk, a
    chunk's update can only be formed once its last token is known; it is folded into ``delta``
    exactly then (apply-then-update, as in training).
  - ``seq`` (TTT-Linear / TTT-MLP layers, ``model.ttt_seq``): a
    :class:`~ttt_jax.nn.ttt_seq_cache.TTTSeqCache` with the inner model's parameters per head as
    of the start of the open mini-batch, and that mini-batch's views and inner learning rates so
    far (each new token of the mini-batch replays them).

The model's blocks update the layer caches (``CausalLM.hidden(..., cache=, step=)``); the engine
(:mod:`ttt_jax.infer.engine`) keeps ``lengths``. Everything is a JAX pytree
(``jax.tree_util.register_dataclass``): it passes through ``jax.jit``, can be donated, and can be
sharded like any array tree.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from ttt_jax.config import ModelConfig
from ttt_jax.nn.block import init_layer_cache


@dataclasses.dataclass(frozen=True)
class Cache:
    """The inference state of ``B`` sequences: ``lengths [B]`` int32 and one
    :class:`~ttt_jax.nn.block.LayerCache` per layer."""

    lengths: jax.Array
    layers: tuple

    @property
    def batch_size(self) -> int:
        return int(self.lengths.shape[0])


jax.tree_util.register_dataclass(Cache, data_fields=["lengths", "layers"], meta_fields=[])


def init_cache(cfg: ModelConfig, batch_size: int, max_len: int, *, ring: bool = True,
               kv_dtype=None) -> Cache:
    """An empty :class:`Cache` for ``batch_size`` sequences of at most ``max_len`` tokens each.

    Args:
      cfg: the model config (layer kinds, shapes, windows, TTT chunk size and target source,
        TTT-Linear/MLP layers).
      batch_size: ``B``.
      max_len: the longest sequence (prompt + generated tokens) any full KV cache must hold.
      ring: give sliding-window layers a ring buffer of ``window`` slots (memory independent of
        the context). ``False`` gives them full caches (what query-only TTT needs to re-read old
        positions); the attention they compute is the same.
      kv_dtype: dtype of keys/values (default: the compute dtype).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    layers = tuple(init_layer_cache(cfg, i, batch_size, max_len, ring=ring, kv_dtype=kv_dtype)
                   for i in range(cfg.n_layers))
    return Cache(lengths=jnp.zeros((batch_size,), jnp.int32), layers=layers)


def cache_bytes(cache: Cache) -> int:
    """Total bytes of the arrays in ``cache``."""
    return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(cache)))
