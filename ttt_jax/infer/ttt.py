"""The In-Place TTT MLP over new tokens with its fast-weight state (prefill blocks and decode).

Semantics are those of training (DESIGN.md section 1): token ``p`` of chunk ``i = p // C`` outputs
``z_p (W0 + S_i)`` with ``S_i = sum_{j<i} clip(lr z_j^T v_j)``, and ``v`` is the chunk-local conv
target, whose last taps read up to two tokens ahead *inside* the chunk. So a chunk's update is
formed exactly when its last token arrives, from the chunk's buffered rows
(:class:`~ttt_jax.infer.cache.TTTCache`), and only later chunks use it.

* :func:`ttt_extend` with ``T > 1`` (a prefill block): every sequence's buffered rows and its new
  rows are laid out on its own absolute chunk grid and run through the training op
  :func:`ttt_jax.ops.inplace_ttt` from the carried state; only chunks that are complete contribute
  to the returned state, and the rows of the new incomplete chunk become the buffer.
* ``T == 1`` (decode): the token's output uses the carried state; its row is buffered; when it is
  the last row of its chunk, the chunk update is formed and added (under ``lax.cond``, so steps
  where no sequence completes a chunk pay nothing for it).
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from ttt_jax.infer.cache import TTTCache, round_up
from ttt_jax.ops import inplace_ttt
from ttt_jax.ops.inplace_ttt_layout import clip_update

_F32 = jnp.float32


def _op_impl(mlp) -> str:
    # impl="attention" (a test oracle) carries no state; everything else supports initial_state.
    return "scan" if mlp.impl == "attention" else mlp.impl


def chunk_update(mlp, h_rows: jax.Array, x0_rows: Optional[jax.Array], *,
                 chunk_size: Optional[int] = None) -> jax.Array:
    """``clip(lr * z^T v)`` of one whole chunk per row: ``h_rows [B, C, D]`` (and ``x0_rows``) ->
    ``[B, F, D]`` fp32. With ``chunk_size``, rows may hold several whole chunks (``[B, n C, D]``)
    and the result is their unclipped sum (only valid without ``clip_tau``)."""
    z = mlp.activation(h_rows)
    src = x0_rows if mlp.target_source == "embeddings" else h_rows
    v = mlp.target_values(src, chunk_size=chunk_size or h_rows.shape[1])
    dw = jnp.einsum("bcf,bcd->bfd", z, v.astype(z.dtype), preferred_element_type=_F32)
    if chunk_size is not None:
        assert mlp.clip_tau is None
        return mlp.lr * dw
    return clip_update(mlp.lr * dw, mlp.clip_tau)


def _gather_rows(x: jax.Array, idx: jax.Array) -> jax.Array:
    """``x [B, S, D]``, ``idx [B, T]`` -> ``x[b, idx[b, t]]`` as ``[B, T, D]``."""
    return jnp.take_along_axis(x, idx[..., None], axis=1)


def _extend_block(mlp, h, x0, start, n_valid, st: TTTCache):
    b, t, _ = h.shape
    c = mlp.chunk_size
    dt = mlp.dtype
    offset = start % c                                                   # buffered rows
    length = c + round_up(t, c)                                          # >= offset + t
    r = jnp.arange(length, dtype=jnp.int32)[None, :]
    # Row r of the combined layout is position (chunk start + r): buffer rows, then new rows.
    take = jnp.where(r < offset[:, None], r, c + r - offset[:, None])
    take = jnp.clip(take, 0, c + t - 1)
    real = (r < (offset + n_valid)[:, None])[..., None]

    def combine(buf, new):
        return jnp.where(real, _gather_rows(jnp.concatenate([buf.astype(dt), new.astype(dt)], axis=1), take), 0)

    hc = combine(st.h, h)
    xc = combine(st.x0, x0) if mlp.target_source == "embeddings" else None
    z = mlp.activation(hc)
    v = mlp.target_values(xc if xc is not None else hc)
    complete = ((r // c + 1) * c <= (offset + n_valid)[:, None])[..., None]
    out, delta = inplace_ttt(z, jnp.where(complete, v, 0), mlp.down[...].astype(dt), lr=mlp.lr,
                             chunk_size=c, impl=_op_impl(mlp), clip_tau=mlp.clip_tau,
                             initial_state=st.delta, return_state=True)
    out = _gather_rows(out, offset[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :])
    # The new incomplete chunk: rows [k C, k C + C) of the combined layout.
    first = ((offset + n_valid) // c) * c
    rows = jnp.clip(first[:, None] + jnp.arange(c, dtype=jnp.int32)[None, :], 0, length - 1)
    new = TTTCache(delta=delta, h=_gather_rows(hc, rows).astype(st.h.dtype),
                   x0=None if xc is None else _gather_rows(xc, rows).astype(st.x0.dtype))
    return out, new


def _extend_one(mlp, h, x0, start, n_valid, st: TTTCache):
    b = h.shape[0]
    c = mlp.chunk_size
    dt = mlp.dtype
    z = mlp.activation(h)                                                # [B, 1, F]
    # z W0 (shared weight) + z S (per sequence): a batched mat-vec that reads the fp32 state once,
    # rather than materialising W0 + S for every sequence at every step.
    out = (jnp.einsum("btf,fd->btd", z, mlp.down[...].astype(dt), preferred_element_type=_F32)
           + jnp.einsum("btf,bfd->btd", z.astype(_F32), st.delta, preferred_element_type=_F32)).astype(dt)
    active = n_valid > 0
    offset = start % c
    slot = jnp.where(active, offset, c)
    bidx = jnp.arange(b)
    hb = st.h.at[bidx, slot].set(h[:, 0].astype(st.h.dtype), mode="drop")
    xb = None if st.x0 is None else st.x0.at[bidx, slot].set(x0[:, 0].astype(st.x0.dtype), mode="drop")
    complete = active & (offset == c - 1)

    def fold(delta):
        upd = chunk_update(mlp, hb, xb)
        return delta + jnp.where(complete[:, None, None], upd, 0.0)

    delta = jax.lax.cond(jnp.any(complete), fold, lambda d: d, st.delta)
    return out, TTTCache(delta=delta, h=hb, x0=xb)


def ttt_extend(mlp, h: jax.Array, x0: Optional[jax.Array], start: jax.Array, n_valid: jax.Array,
               st: TTTCache) -> tuple[jax.Array, TTTCache]:
    """Run an :class:`ttt_jax.nn.mlp.InPlaceTTTMLP` over ``T`` new tokens per sequence.

    Args:
      mlp: the module (its ``gate``, ``up``, ``down`` = ``W0``, ``ttt_conv``, ``ttt_proj``).
      h: ``[B, T, D]`` MLP inputs of the new tokens (row ``i`` is position ``start[b] + i``).
      x0: ``[B, T, D]`` their token embeddings (``target_source="embeddings"``) or ``None``.
      start: ``[B]`` int32 tokens consumed before this call.
      n_valid: ``[B]`` int32 real rows per sequence; later rows are padding (garbage outputs,
        never buffered or learned from).
      st: the layer's :class:`TTTCache`.

    Returns:
      ``([B, T, D]`` outputs in the compute dtype, the updated state).
    """
    if mlp.target_source == "embeddings" and (x0 is None or st.x0 is None):
        raise ValueError("an In-Place TTT layer with target_source='embeddings' needs x0 and a cache "
                         "built for it (init_cache with the model's config)")
    if h.shape[1] == 1:
        return _extend_one(mlp, h, x0, start, n_valid, st)
    return _extend_block(mlp, h, x0, start, n_valid, st)
