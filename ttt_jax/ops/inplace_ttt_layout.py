"""Chunk layout shared by every In-Place TTT implementation.

The op works on sequences split into ``N = ceil(T / C)`` chunks of ``C = chunk_size`` tokens. Packed
documents (``segment_ids``) make the fast-weight recursion an affine scan (DESIGN.md section 1):

    S_0 = 0,   S_{i+1} = a_i * S_i + K_i,     K_i = clip(lr * sum_{s in chunk i, upd_s} z_s^T v_s)
    out_s = z_s W0 + use_s * z_s S_i          (s in chunk i)

where ``S_i`` is the accumulated delta of the document that is open at the start of chunk ``i``.

* ``use_s``  = 1 when token ``s`` belongs to the document open at its chunk's start; a document
  that begins inside chunk ``i`` has no earlier updates, so its tokens see ``W0`` only.
* ``upd_s``  = 1 when token ``s`` is a real token (segment id != 0, not chunk padding) of the
  document open at the start of the *next* chunk: only those tokens' updates are ever read.
* ``a_i``    = 1 when the same document is open at the start of chunks ``i`` and ``i + 1``,
  0 when a new one starts (a reset).

Documents are maximal runs of equal segment ids, so ids may repeat across a row without merging
two documents. Without ``segment_ids`` everything is one document: ``use = 1``, ``a = 1`` and
``upd`` only masks the padding added to reach a whole number of chunks.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class ChunkLayout:
    """Masks of the chunked recursion for one batch.

    Attributes:
      doc: ``[B, N, C]`` int32 document index of every (padded) position.
      valid: ``[B, N, C]`` bool, real tokens (not padding, not segment id 0).
      use: ``[B, N, C]`` float32, see module docstring.
      upd: ``[B, N, C]`` float32, see module docstring.
      a: ``[B, N]`` float32 carry factor from chunk ``i`` to ``i + 1`` (last entry unused, 0).
      segmented: whether segment ids were given (static; selects the cheaper unsegmented path).
      length: the unpadded sequence length ``T``.
    """

    doc: jax.Array
    valid: jax.Array
    use: jax.Array
    upd: jax.Array
    a: jax.Array
    segmented: bool
    length: int


def num_chunks(length: int, chunk_size: int) -> int:
    return max(1, math.ceil(length / chunk_size))


def pad_to_chunks(x: jax.Array, chunk_size: int) -> jax.Array:
    """``[B, T, ...]`` -> ``[B, N, C, ...]``, zero-padding the sequence to ``N * C`` positions."""
    b, t = x.shape[:2]
    n = num_chunks(t, chunk_size)
    pad = n * chunk_size - t
    if pad:
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
    return x.reshape(b, n, chunk_size, *x.shape[2:])


def unchunk(x: jax.Array, length: int) -> jax.Array:
    """``[B, N, C, ...]`` -> ``[B, length, ...]`` (drops chunk padding)."""
    b, n, c = x.shape[:3]
    return x.reshape(b, n * c, *x.shape[3:])[:, :length]


def document_index(segment_ids: jax.Array) -> jax.Array:
    """``[B, T]`` segment ids -> ``[B, T]`` int32 index of the maximal run of equal ids."""
    change = jnp.concatenate(
        [jnp.zeros_like(segment_ids[:, :1], dtype=bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
    return jnp.cumsum(change.astype(jnp.int32), axis=1)


def check_segment_ids(segment_ids: Optional[jax.Array], batch: int, length: int) -> None:
    if segment_ids is None:
        return
    if segment_ids.shape != (batch, length):
        raise ValueError(f"segment_ids must have shape [B, T] = {(batch, length)}, got {segment_ids.shape}")
    if not jnp.issubdtype(segment_ids.dtype, jnp.integer):
        raise ValueError(f"segment_ids must be integers (0 = padding), got dtype {segment_ids.dtype}")


def chunk_layout(batch: int, length: int, chunk_size: int,
                 segment_ids: Optional[jax.Array] = None,
                 continues: Optional[jax.Array] = None) -> ChunkLayout:
    """Build the masks for ``[B, T]`` tokens in chunks of ``chunk_size`` (see module docstring).

    ``continues``: optional ``[B]`` bool, whether the document open at position ``T - 1`` goes on
    after this sequence (a context-parallel shard, or a prefill followed by decoding). Then the last
    chunk's update is kept (``upd``/``a`` of the last chunk refer to that document) so that the final
    state is the carried-out state; by default the sequence ends there and the last update is dropped.
    """
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    check_segment_ids(segment_ids, batch, length)
    n = num_chunks(length, chunk_size)
    pos = jnp.arange(n * chunk_size).reshape(n, chunk_size)
    in_range = jnp.broadcast_to(pos < length, (batch, n, chunk_size))
    if segment_ids is None:
        doc = jnp.zeros((batch, n, chunk_size), jnp.int32)
        valid = in_range
    else:
        # Chunk padding gets segment id 0, i.e. it is padding like any other id-0 token.
        seg = pad_to_chunks(segment_ids.astype(jnp.int32), chunk_size).reshape(batch, -1)
        doc = document_index(seg).reshape(batch, n, chunk_size)
        valid = seg.reshape(batch, n, chunk_size) != 0
    doc_start = doc[:, :, 0]                                            # [B, N]
    last = jnp.full_like(doc_start[:, :1], -1)
    if continues is not None:
        last_doc = doc.reshape(batch, -1)[:, length - 1:length]
        last = jnp.where(jnp.asarray(continues, bool).reshape(batch, 1), last_doc, last)
    doc_next = jnp.concatenate([doc_start[:, 1:], last], axis=1)
    use = (doc == doc_start[:, :, None]).astype(jnp.float32)
    upd = ((doc == doc_next[:, :, None]) & valid).astype(jnp.float32)
    a = (doc_next == doc_start).astype(jnp.float32)
    return ChunkLayout(doc=doc, valid=valid, use=use, upd=upd, a=a,
                       segmented=segment_ids is not None, length=length)


def clip_update(k: jax.Array, clip_tau: Optional[float]) -> jax.Array:
    """Rescale each ``[..., F, D]`` update to Frobenius norm at most ``clip_tau`` (None: identity)."""
    if clip_tau is None:
        return k
    sq = jnp.sum(jnp.square(k), axis=(-2, -1), keepdims=True)
    # Double-where keeps the gradient finite for an all-zero update (sqrt'(0) is infinite).
    positive = sq > 0
    norm = jnp.where(positive, jnp.sqrt(jnp.where(positive, sq, 1.0)), 0.0)
    return k * jnp.where(norm > clip_tau, clip_tau / jnp.where(positive, norm, 1.0), 1.0)
