"""The per-sequence inference state: KV caches, In-Place TTT fast weights, TTT-Linear/MLP states.

A :class:`Cache` holds, for a batch of ``B`` independent sequences,

* ``lengths [B]`` int32: how many tokens of each sequence have been consumed (the next token of
  sequence ``b`` sits at position ``lengths[b]``);
* per decoder layer a :class:`LayerCache`:

  - ``kv``: a :class:`KVCache` of keys and values after RoPE, ``[B, S, KV, Dh]``. A *full* cache
    stores position ``p`` at slot ``p`` (``S`` = capacity, at least the longest sequence). A *ring*
    cache, for a sliding-window layer of window ``W``, has ``S = W`` slots and stores position ``p``
    at slot ``p % W``: exactly the keys a query may still see, so its memory does not grow with
    the context.
  - ``ttt`` (In-Place TTT layers only): a :class:`TTTCache` with the fast-weight state ``delta``
    ``[B, F, D]`` fp32 (the accumulated ``S`` of ``W = W0 + S``, DESIGN.md section 1) as of the start
    of the current chunk, and the rows of the current, incomplete chunk that its update will need:
    the MLP inputs ``h [B, C, D]`` (``z = silu(h W_gate) * (h W_up)`` is recomputed from them) and,
    for ``target_source="embeddings"``, the token embeddings ``x0 [B, C, D]``. Row ``r`` holds
    position ``chunk_start + r``; rows at or after ``lengths % C`` are stale. Because the target conv
    looks two tokens ahead inside the chunk, a chunk's update can only be formed once its last
    token is known; it is folded into ``delta`` exactly then (apply-then-update, as in training).
  - ``seq`` (TTT-Linear / TTT-MLP layers, ``model.ttt_seq``): a :class:`TTTSeqCache` with the inner
    model's parameters per head (``[B, H, ...]`` fp32) as of the start of the open mini-batch, and
    the train/label views and inner learning rates of that mini-batch's tokens so far (within a
    mini-batch every token's gradient is taken at the start parameters, so each new token of the
    mini-batch replays them; ``ttt_jax.infer.ttt_seq``). Layers whose TTT layer replaces attention
    (``ttt_seq.mode="replace"``) have no KV cache (``kv`` is ``None``).

Everything is a JAX pytree (``jax.tree_util.register_dataclass``): it passes through ``jax.jit``,
can be donated, and can be sharded like any array tree.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import jax
import jax.numpy as jnp

from ttt_jax.config import ModelConfig


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


jax.tree_util.register_dataclass(KVCache, data_fields=["k", "v"], meta_fields=["window", "ring"])


@dataclasses.dataclass(frozen=True)
class TTTCache:
    """Fast-weight state of one In-Place TTT layer.

    Attributes:
      delta: ``[B, F, D]`` fp32 accumulated update ``S`` in force for the current chunk.
      h: ``[B, C, D]`` compute dtype, MLP inputs of the current chunk's tokens so far.
      x0: ``[B, C, D]`` compute dtype, their token embeddings (``target_source="embeddings"``), or
        ``None`` (``"hidden"``: the target source is ``h`` itself).
    """

    delta: jax.Array
    h: jax.Array
    x0: Optional[jax.Array] = None


jax.tree_util.register_dataclass(TTTCache, data_fields=["delta", "h", "x0"], meta_fields=[])


@dataclasses.dataclass(frozen=True)
class TTTSeqCache:
    """State of one TTT-Linear / TTT-MLP layer (``ttt_jax.ops.ttt_layer``).

    Attributes:
      params: the inner model's parameters per sequence and head at the start of the open
        mini-batch, fp32: ``{"w1": [B, H, Dh, F], "b1": [B, H, F]}`` (+ ``"w2" [B, H, F, Dh]``,
        ``"b2" [B, H, Dh]`` for TTT-MLP). Read only once the sequence has completed a mini-batch
        (``lengths >= M``); before that the layer's learned initial parameters are in force (a
        cache built from the config alone cannot hold them, so it starts at zeros).
      k, v: ``[B, M, H, Dh]`` compute dtype, train and label views (after RoPE) of the open
        mini-batch's tokens so far (``M`` = mini-batch size); row ``r`` holds position
        ``mini_batch_start + r``, rows at or after ``lengths % M`` are stale.
      lr: ``[B, M, H]`` fp32, their inner learning rates.
    """

    params: dict
    k: jax.Array
    v: jax.Array
    lr: jax.Array


jax.tree_util.register_dataclass(TTTSeqCache, data_fields=["params", "k", "v", "lr"], meta_fields=[])


@dataclasses.dataclass(frozen=True)
class LayerCache:
    """What one decoder layer keeps: its KV cache (``None`` where a TTT-Linear/MLP layer replaces
    attention), on In-Place TTT layers the fast weight, on TTT-Linear/MLP layers their state."""

    kv: Optional[KVCache]
    ttt: Optional[TTTCache] = None
    seq: Optional[TTTSeqCache] = None


jax.tree_util.register_dataclass(LayerCache, data_fields=["kv", "ttt", "seq"], meta_fields=[])


@dataclasses.dataclass(frozen=True)
class Cache:
    """The inference state of ``B`` sequences: ``lengths [B]`` int32 and one :class:`LayerCache` per layer."""

    lengths: jax.Array
    layers: tuple

    @property
    def batch_size(self) -> int:
        return int(self.lengths.shape[0])


jax.tree_util.register_dataclass(Cache, data_fields=["lengths", "layers"], meta_fields=[])


def round_up(n: int, multiple: int) -> int:
    return int(math.ceil(n / multiple) * multiple)


def cache_capacity(max_len: int, block: int = 512) -> int:
    """Slots of a full KV cache for sequences of up to ``max_len`` tokens (a multiple of ``block``
    once it exceeds one block, so that blockwise attention needs no padding copy)."""
    if max_len < 1:
        raise ValueError(f"max_len must be >= 1, got {max_len}")
    return max_len if max_len <= block else round_up(max_len, block)


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
    cdt = jnp.dtype(cfg.compute_dtype)
    kvdt = jnp.dtype(kv_dtype) if kv_dtype is not None else cdt
    kv_heads, dh = cfg.n_kv_heads, cfg.resolved_head_dim
    ttt_ids = set(cfg.ttt.layer_ids(cfg.n_layers))
    seq_ids = set(cfg.ttt_seq.layer_ids(cfg.n_layers))
    full_slots = cache_capacity(max_len)
    layers = []
    for i in range(cfg.n_layers):
        window = cfg.layer_window(i)
        use_ring = ring and 0 < window < max_len
        slots = window if use_ring else full_slots
        shape = (batch_size, slots, kv_heads, dh)
        kv = KVCache(jnp.zeros(shape, kvdt), jnp.zeros(shape, kvdt), window=window, ring=use_ring)
        seq = None
        if i in seq_ids:
            seq = _seq_cache(cfg, batch_size)
            if cfg.ttt_seq.mode == "replace":
                kv = None
        ttt = None
        if i in ttt_ids:
            c, d = cfg.ttt.chunk_size, cfg.d_model
            ttt = TTTCache(
                delta=jnp.zeros((batch_size, cfg.d_ff, d), jnp.float32),
                h=jnp.zeros((batch_size, c, d), cdt),
                x0=jnp.zeros((batch_size, c, d), cdt) if cfg.ttt.target_source == "embeddings" else None)
        layers.append(LayerCache(kv=kv, ttt=ttt, seq=seq))
    return Cache(lengths=jnp.zeros((batch_size,), jnp.int32), layers=tuple(layers))


def _seq_cache(cfg: ModelConfig, batch_size: int) -> TTTSeqCache:
    """An empty :class:`TTTSeqCache` (``params`` zeros: unread until a mini-batch completes)."""
    from ttt_jax.ops.ttt_layer import param_shapes

    s = cfg.ttt_seq
    h, dh, m = cfg.n_heads, cfg.resolved_head_dim, s.mini_batch
    shapes = param_shapes(s.kind, h, dh)
    params = {n: jnp.zeros((batch_size,) + shape, jnp.float32) for n, shape in shapes.items()}
    cdt = jnp.dtype(cfg.compute_dtype)
    return TTTSeqCache(params=params, k=jnp.zeros((batch_size, m, h, dh), cdt),
                       v=jnp.zeros((batch_size, m, h, dh), cdt),
                       lr=jnp.zeros((batch_size, m, h), jnp.float32))


def cache_bytes(cache: Cache) -> int:
    """Total bytes of the arrays in ``cache``."""
    return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(cache)))
