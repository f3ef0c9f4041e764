"""The In-Place TTT target: a per-chunk, per-document depthwise Conv1D followed by a projection."""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from ttt_jax.ops.inplace_ttt_layout import chunk_layout, pad_to_chunks, unchunk


def _check_target_args(t: jax.Array, conv_w: jax.Array, proj: jax.Array) -> None:
    if t.ndim != 3:
        raise ValueError(f"target source t must be [B, T, D], got shape {t.shape}")
    d = t.shape[-1]
    if conv_w.ndim != 2 or conv_w.shape[1] != d:
        raise ValueError(f"conv_w must be [K, D] with D={d}, got shape {conv_w.shape}")
    if conv_w.shape[0] % 2 != 1:
        raise ValueError(f"conv kernel size must be odd (centred taps), got K={conv_w.shape[0]}")
    if proj.shape != (d, d):
        raise ValueError(f"proj must be [D, D] = {(d, d)}, got shape {proj.shape}")


def chunked_depthwise_conv(t: jax.Array, conv_w: jax.Array, *, chunk_size: int,
                           segment_ids: Optional[jax.Array] = None) -> jax.Array:
    """Depthwise "same" convolution applied inside each chunk and each document separately.

    Args:
      t: ``[B, T, D]`` input.
      conv_w: ``[K, D]``; tap ``j`` multiplies ``t[c + j - (K - 1) // 2]``.
      chunk_size: chunk length ``C``; positions outside the token's chunk read as zero.
      segment_ids: optional ``[B, T]`` int; positions of another document (or padding) read as zero.

    Returns:
      ``[B, T, D]`` in ``t.dtype`` (accumulated in fp32).
    """
    b, length, d = t.shape
    k = conv_w.shape[0]
    half = (k - 1) // 2
    x = pad_to_chunks(t, chunk_size).astype(jnp.float32)                 # [B, N, C, D]
    c = chunk_size
    xp = jnp.pad(x, [(0, 0), (0, 0), (half, half), (0, 0)])
    w = conv_w.astype(jnp.float32)
    if segment_ids is not None:
        doc = chunk_layout(b, length, chunk_size, segment_ids).doc          # [B, N, C]
        docp = jnp.pad(doc, [(0, 0), (0, 0), (half, half)], constant_values=-1)
    out = jnp.zeros_like(x)
    for j in range(k):
        tap = xp[:, :, j:j + c]
        if segment_ids is not None:
            same = docp[:, :, j:j + c] == doc
            tap = jnp.where(same[..., None], tap, 0.0)
        out = out + tap * w[j]
    return unchunk(out, length).astype(t.dtype)


def inplace_ttt_target(t: jax.Array, conv_w: jax.Array, proj: jax.Array, *, chunk_size: int,
                       segment_ids: Optional[jax.Array] = None) -> jax.Array:
    """The LM-aligned target ``V = Conv1D(t) @ P`` of In-Place TTT.

    Args:
      t: ``[B, T, D]`` target source (token embeddings or the MLP input).
      conv_w: ``[K, D]`` depthwise kernel; tap ``j`` multiplies ``t[c + j - (K - 1) // 2]``, with
        zero padding at chunk edges and document boundaries (never reads across either).
      proj: ``[D, D]`` projection ``P`` (JAX layout: ``v = conv @ proj``).
      chunk_size: TTT chunk size ``C``.
      segment_ids: optional ``[B, T]`` int packed-document ids (0 = padding).

    Returns:
      ``[B, T, D]`` in ``t.dtype``; matmul in ``t.dtype`` with fp32 accumulation.
    """
    _check_target_args(t, conv_w, proj)
    conv = chunked_depthwise_conv(t, conv_w, chunk_size=chunk_size, segment_ids=segment_ids)
    # Result asked for in t.dtype (fp32 accumulation inside the matmul): keeps the backward
    # matmuls in t.dtype too (see ttt_jax.nn.params.dense).
    return jnp.einsum("btd,de->bte", conv, proj.astype(t.dtype), preferred_element_type=t.dtype)
