"""The fast-weight state of one In-Place TTT MLP: its type, its initial value and its carry.

Semantics are those of training (DESIGN.md section 1): token ``p`` of chunk ``i = p // C`` outputs
``z_p (W0 + S_i)`` with ``S_i = sum_{j<i} clip(lr z_j^T v_j)``, and ``v`` is the chunk-local conv
target, whose last taps read up to two tokens ahead *inside* the chunk. So a chunk's update is
formed exactly when its last token arrives, from the chunk's buffered rows (:class:`TTTCache`), and
only later chunks use it. :class:`ttt_jax.nn.mlp.InPlaceTTTMLP` calls, with a cache:

* :func:`ttt_extend` with ``T > 1`` (a prefill block): every sequence's buffered rows and its new
  rows are laid out on its own absolute chunk grid and run through the training op
  :func:`ttt_jax.ops.inplace_ttt` from the carried state; only chunks that are complete contribute
  to the returned state, and the rows of the new incomplete chunk become the buffer.
* ``T == 1`` (decode): the token's output uses the carried state; its row is buffered; when it is
  the last row of its chunk, the chunk update is formed and added (under ``lax.cond``, so steps
  where no sequence completes a chunk pay nothing for it).
* :func:`ttt_fill` (empty cache, whole prompts, outputs from the full forward pass): the state after
  the complete chunks, ``sum_i clip(lr z_i^T v_i)`` (one reduction over the sequence), and the rows
  of the final partial chunk.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp

from ttt_jax.config import ModelConfig
from ttt_jax.nn.cache import gather_rows, round_up
from ttt_jax.ops import inplace_ttt
from ttt_jax.ops.inplace_ttt_layout import clip_update


@dataclasses.dataclass(frozen=True)
class TTTCache:
    """Fast-weight state of one In-Place TTT layer.

    Attributes:
      delta: ``[B, F, D]`` fp32 accumulated update ``S`` (of ``W = W0 + S``) in force for the
        current chunk.
      h: ``[B, C, D]`` compute dtype, MLP inputs of the current chunk's tokens so far (``z`` is
        recomputed from them). Row ``r`` holds position ``chunk_start + r``; rows at or after
        ``lengths % C`` are stale.
      x0: ``[B, C, D]`` compute dtype, their token embeddings (``target_source="embeddings"``), or
        ``None`` (``"hidden"``: the target source is ``h`` itself).
    """

    delta: jax.Array
    h: jax.Array
    x0: Optional[jax.Array] = None


jax.tree_util.register_dataclass(TTTCache, data_fields=["delta", "h", "x0"], meta_fields=[])


def init_ttt_cache(cfg: ModelConfig, batch_size: int) -> TTTCache:
    """The state of an In-Place TTT layer before any token: ``delta = 0``, empty row buffers."""
    cdt = jnp.dtype(cfg.compute_dtype)
    c, d = cfg.ttt.chunk_size, cfg.d_model
    return TTTCache(
        delta=jnp.zeros((batch_size, cfg.d_ff, d), jnp.float32),
        h=jnp.zeros((batch_size, c, d), cdt),
        x0=jnp.zeros((batch_size, c, d), cdt) if cfg.ttt.target_source == "embeddings" else None)


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
        return jnp.where(real, gather_rows(jnp.concatenate([buf.astype(dt), new.astype(dt)], axis=1), take), 0)

    hc = combine(st.h, h)
    xc = combine(st.x0, x0) if mlp.target_source == "embeddings" else None
    z = mlp.activation(hc)
    v = mlp.target_values(xc if xc is not None else hc)
    complete = ((r // c + 1) * c <= (offset + n_valid)[:, None])[..., None]
    out, delta = inplace_ttt(z, jnp.where(complete, v, 0), mlp.down[...].astype(dt), lr=mlp.lr,
                             chunk_size=c, impl=_op_impl(mlp), clip_tau=mlp.clip_tau,
                             initial_state=st.delta, return_state=True)
    out = gather_rows(out, offset[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :])
    # The new incomplete chunk: rows [k C, k C + C) of the combined layout.
    first = ((offset + n_valid) // c) * c
    rows = jnp.clip(first[:, None] + jnp.arange(c, dtype=jnp.int32)[None, :], 0, length - 1)
    new = TTTCache(delta=delta, h=gather_rows(hc, rows).astype(st.h.dtype),
                   x0=None if xc is None else gather_rows(xc, rows).astype(st.x0.dtype))
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


def ttt_fill(mlp, h: jax.Array, x0: Optional[jax.Array], st: TTTCache) -> TTTCache:
    """The state of an *empty* ``st`` after whole prompts ``h [B, T, D]`` (MLP inputs of positions
    ``0 .. T-1``; ``x0`` their token embeddings or ``None``): the fast weight after the complete
    chunks and the rows of the final, incomplete one. The outputs come from the module's forward."""
    b, t = h.shape[:2]
    c = mlp.chunk_size
    done = (t // c) * c
    delta = st.delta
    if done:
        n = done // c
        hc = h[:, :done].reshape(b * n, c, -1)
        xc = x0[:, :done].reshape(b * n, c, -1) if st.x0 is not None else None
        if mlp.clip_tau is None:
            # No per-chunk clipping: one reduction over all complete chunks.
            delta = delta + chunk_update(mlp, h[:, :done], None if xc is None else x0[:, :done],
                                         chunk_size=c)
        else:
            delta = delta + chunk_update(mlp, hc, xc).reshape(b, n, *delta.shape[1:]).sum(axis=1)

    def pending(rows, buf):
        # Rows of the final, incomplete chunk (positions done .. t-1) at buffer rows 0 ...
        if buf is None:
            return None
        return jnp.zeros_like(buf).at[:, :t - done].set(rows[:, done:].astype(buf.dtype))

    return TTTCache(delta=delta, h=pending(h, st.h), x0=pending(x0, st.x0))
