"""Reference forms of In-Place TTT: the oracles every fast path is tested against.

* :func:`sequential` — form 1 of DESIGN.md: apply-then-update, one chunk after another (a Python
  loop over chunks: slow to compile for many chunks, obviously right).
* :func:`linear_attention` — form 3: block-strictly-causal linear attention written per token,
  ``out_s = z_s W0 + lr * sum_{r: chunk(r) < chunk(s), doc(r) = doc(s), r real} (z_s . z_r) v_r``.
  It shares no code path with the chunk recursion (no state, no carries), which makes it the
  independent oracle; it is O(T^2) and cannot express update clipping.
* :func:`target_reference` — the target conv written per token with an explicit gather.

All compute in fp32 and return the input dtype.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from ttt_jax.ops.inplace_ttt_layout import (chunk_layout, clip_update, document_index, pad_to_chunks,
                                            unchunk)


def sequential(z: jax.Array, v: jax.Array, w0: jax.Array, *, lr: float, chunk_size: int,
               segment_ids: Optional[jax.Array] = None, clip_tau: Optional[float] = None,
               initial_state: Optional[jax.Array] = None, continues: Optional[jax.Array] = None):
    """Form 1: ``z [B,T,F]``, ``v [B,T,D]``, ``w0 [F,D]`` -> ``[B,T,D]``.

    With ``initial_state`` (``[B,F,D]``) given, returns ``(out, final_state)``.
    """
    b, length, _ = z.shape
    lay = chunk_layout(b, length, chunk_size, segment_ids, continues)
    zc = pad_to_chunks(z, chunk_size).astype(jnp.float32)               # [B, N, C, F]
    vc = pad_to_chunks(v, chunk_size).astype(jnp.float32)               # [B, N, C, D]
    w0f = w0.astype(jnp.float32)
    state = (jnp.zeros((b,) + w0.shape, jnp.float32) if initial_state is None   # S_i: [B, F, D]
             else initial_state.astype(jnp.float32))
    outs = []
    for i in range(zc.shape[1]):
        zi, vi = zc[:, i], vc[:, i]
        # Apply: tokens of the document open at the chunk start see W0 + S_i, others see W0.
        w_eff = w0f[None] + lay.use[:, i, :, None, None] * state[:, None]  # [B, C, F, D]
        outs.append(jnp.einsum("bcf,bcfd->bcd", zi, w_eff))
        # Update: the next chunk's document accumulates this chunk's (masked) gradient step.
        delta = lr * jnp.einsum("bcf,bcd->bfd", zi, vi * lay.upd[:, i, :, None])
        state = lay.a[:, i, None, None] * state + clip_update(delta, clip_tau)
    out = unchunk(jnp.stack(outs, axis=1), length).astype(z.dtype)
    return out if initial_state is None else (out, state)


def linear_attention(z: jax.Array, v: jax.Array, w0: jax.Array, *, lr: float, chunk_size: int,
                     segment_ids: Optional[jax.Array] = None) -> jax.Array:
    """Form 3 (per-token, quadratic): ``z [B,T,F]``, ``v [B,T,D]``, ``w0 [F,D]`` -> ``[B,T,D]``."""
    b, length, _ = z.shape
    zf, vf = z.astype(jnp.float32), v.astype(jnp.float32)
    pos = jnp.arange(length)
    chunk = pos // chunk_size
    mask = jnp.broadcast_to(chunk[None, :, None] > chunk[None, None, :], (b, length, length))
    if segment_ids is not None:
        doc = document_index(segment_ids)
        mask = mask & (doc[:, :, None] == doc[:, None, :]) & (segment_ids[:, None, :] != 0)
    scores = jnp.einsum("bsf,brf->bsr", zf, zf) * mask
    out = zf @ w0.astype(jnp.float32) + lr * jnp.einsum("bsr,brd->bsd", scores, vf)
    return out.astype(z.dtype)


def target_reference(t: jax.Array, conv_w: jax.Array, proj: jax.Array, *, chunk_size: int,
                     segment_ids: Optional[jax.Array] = None) -> jax.Array:
    """Per-token gather form of ``inplace_ttt_target``: ``t [B,T,D]`` -> ``[B,T,D]``."""
    b, length, d = t.shape
    k = conv_w.shape[0]
    half = (k - 1) // 2
    pos = jnp.arange(length)
    doc = document_index(segment_ids) if segment_ids is not None else jnp.zeros((b, length), jnp.int32)
    out = jnp.zeros((b, length, d), jnp.float32)
    for j in range(k):
        src = pos + j - half
        ok = (src >= 0) & (src < length) & (src // chunk_size == pos // chunk_size)
        src_c = jnp.clip(src, 0, length - 1)
        same_doc = jnp.take_along_axis(doc, jnp.broadcast_to(src_c, (b, length)), axis=1) == doc
        gathered = t[:, src_c].astype(jnp.float32)
        out = out + jnp.where((ok[None] & same_doc)[..., None], gathered, 0.0) * conv_w[j].astype(jnp.float32)
    return (out @ proj.astype(jnp.float32)).astype(t.dtype)


__all__ = ["sequential", "linear_attention", "target_reference"]
