"""TPU (Pallas Mosaic) attention of new queries against a KV cache: the prefill / decode kernel.

Forward only (inference). :func:`tpu_cache_attention` computes exactly what
:func:`ttt_jax.ops.attention_cache.cache_attention` with ``impl="reference"`` computes: queries at
explicit positions ``q_pos`` attend to cached keys at explicit positions ``k_pos`` (``-1`` = empty
slot) causally and, with ``window > 0``, within a sliding window (key ``s`` is seen by query ``t`` iff
``0 <= s <= t`` and ``s > t - window``); slots need not be sorted (ring buffers), and a query that sees
no key outputs exactly 0. Gradients (query-only TTT differentiates through the cache attention) come
from the XLA paths: ``ttt_jax.ops.attention_cache`` wraps this kernel in a custom VJP.

Shapes::

    q: [B, Tq, H, Dh]    q_pos: [B, Tq] int    k, v: [B, S, KV, Dh]    k_pos: [B, S] int
    H % KV == 0 (GQA: query head h uses kv head h // (H // KV))

Layout, flash-decoding style:

* Query rows. The ``G = H // KV`` query heads of one kv head and the ``Tq`` queries form the rows of
  one matrix per kv head, query-major (row ``t * G + g``), ``[B, KV, R, Dh]`` with ``R = Tq * G``
  padded to the row tile: a decode step (``Tq = 1``) is one ``[G, Dh] x [Dh, block]`` product per kv
  head and key block, not ``G`` matrix-vector products, and a row tile covers consecutive query
  positions (so whole key blocks can be skipped). Row tiles are multiples of 8 sublanes (16 for 16-bit
  dtypes); padding rows have position -1 and see nothing.
* Grid ``(batch, row tile, key block)``; the key blocks are the reduction axis (``"arbitrary"``)
  with the online-softmax state (running max, sum, fp32 accumulator) in VMEM scratch. A key block
  holds every kv head of ``block`` consecutive slots, ``[block, KV, Dh]``, straight from the cache's
  ``[B, S, KV, Dh]`` layout (no transposed copy of the cache), and is read from HBM once per row tile;
  within it each kv head's keys meet that head's query rows. Key blocks are multiples of 128 slots
  (TPU lanes: the logits tile is ``[rows, block]``); a cache of at most 128 slots is one block; a
  length that is not a multiple of the block leaves the last block partial (its rows past ``S`` are
  masked: their positions are padded with -1 and their values zeroed).
* Block skipping. The wrapper computes, per row tile, the range of key blocks that some query of
  the tile may see (from the blocks' position ranges; :func:`visible_blocks`), scalar-prefetched
  into SMEM (two int32 per row tile). Steps outside the range compute nothing, and their block
  index repeats the range's nearest end, so Pallas fetches nothing for them: a decode step over a
  long, partly filled cache reads only the filled blocks, a sliding-window query only the blocks of
  its window.

Off TPU the kernel runs in Pallas interpret mode (``interpret=True``; CPU tests). Callers decide
``interpret`` from the platform the program is built for (:mod:`ttt_jax.platform`), so an
ahead-of-time compile for TPU on a CPU host emits the Mosaic kernel.
"""

from __future__ import annotations

import functools
import math
from typing import Optional

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

LANES = 128            # key blocks are multiples of this (TPU lanes)
ROWS_PER_STEP = 1024   # query rows of all kv heads held in one grid step (bounds the VMEM scratch)
MAX_ROW_TILE = 512
_NEG = -1e30           # finite "minus infinity" (as the XLA paths): masked probabilities are zeroed


def _sublanes(dtype) -> int:
    """Rows of one native TPU tile of ``dtype``: 8 for 32-bit, 16 for 16-bit (packed) types."""
    return 8 * max(1, 4 // jnp.dtype(dtype).itemsize)


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def key_block(s: int, block: int) -> int:
    """Slots per key block: the whole cache when ``s <= 128``, else ``block`` rounded down to a
    multiple of 128 (at least 128), capped at ``s`` rounded up to 128."""
    if s <= LANES:
        return s
    cap = max(LANES, block // LANES * LANES)
    return min(cap, _round_up(s, LANES))


def row_tile(rows: int, kv_heads: int, dtype) -> int:
    """Query rows per kv head and grid step: all ``rows`` (padded to the sublane tile) when they fit
    :data:`ROWS_PER_STEP` over the ``kv_heads``, else the largest sublane multiple that does."""
    sub = _sublanes(dtype)
    cap = max(sub, min(MAX_ROW_TILE, ROWS_PER_STEP // kv_heads) // sub * sub)
    return min(cap, _round_up(rows, sub))


def visible_blocks(q_rows_pos, k_pos_blocks, window: int):
    """``[B, nq, 2]`` int32: the first and last key block that some query of each row tile may see
    (``(0, -1)``: none). Blocks in between count as visible (their masks decide): a ring buffer's
    visible slots may wrap around, but the range stays two scalars per row tile in SMEM.

    ``q_rows_pos [B, nq, tr]`` (-1 for padding rows), ``k_pos_blocks [B, nk, bk]`` (-1 = empty).
    A block may be visible when it has a filled slot, its lowest position is at most the tile's
    highest query position and, with a window, its highest position is within the window of the
    tile's lowest query.
    """
    big = jnp.iinfo(jnp.int32).max
    q_ok = q_rows_pos >= 0
    q_lo = jnp.min(jnp.where(q_ok, q_rows_pos, big), axis=-1)          # [B, nq]
    q_hi = jnp.max(jnp.where(q_ok, q_rows_pos, -1), axis=-1)
    k_ok = k_pos_blocks >= 0
    k_lo = jnp.min(jnp.where(k_ok, k_pos_blocks, big), axis=-1)        # [B, nk]
    k_hi = jnp.max(jnp.where(k_ok, k_pos_blocks, -1), axis=-1)
    vis = (q_hi[:, :, None] >= 0) & (k_hi[:, None, :] >= 0) & (k_lo[:, None, :] <= q_hi[:, :, None])
    if window > 0:
        vis = vis & (k_hi[:, None, :] > q_lo[:, :, None] - window)
    j = jnp.arange(k_pos_blocks.shape[1], dtype=jnp.int32)
    first = jnp.min(jnp.where(vis, j, big), axis=-1)
    last = jnp.max(jnp.where(vis, j, -1), axis=-1)
    return jnp.stack([jnp.where(last >= 0, first, 0), last], axis=-1).astype(jnp.int32)


def fetched_block(j, first, last):
    """The key block grid step ``j`` loads: ``j`` inside ``[first, last]``, else the nearest end
    (so steps outside the range repeat an index and Pallas fetches nothing new), 0 when none."""
    return jnp.maximum(jnp.minimum(j, last), first)


def _lanes(x, n: int):
    """``x [rows, 1]`` broadcast to ``[rows, n]``."""
    return jnp.broadcast_to(x, (x.shape[0], n))


def _kernel(bounds_ref, q_ref, qp_ref, kp_ref, k_ref, v_ref, o_ref, m_sc, l_sc, acc_sc, *,
            kv_heads: int, scale: float, window: int, n_keys: int, squeeze_kv: bool):
    b, i, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    nq, nk = pl.num_programs(1), pl.num_programs(2)
    bk = kp_ref.shape[-1]

    @pl.when(j == 0)
    def _init():
        m_sc[...] = jnp.full(m_sc.shape, _NEG, jnp.float32)
        l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
        acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

    first, last = bounds_ref[2 * (b * nq + i)], bounds_ref[2 * (b * nq + i) + 1]

    @pl.when((first <= j) & (j <= last))
    def _block():
        qp = qp_ref[...]                                                # [tr, 1]
        kp = kp_ref[...]                                                # [1, bk]
        mask = (kp >= 0) & (kp <= qp)
        if window > 0:
            mask = mask & (kp > qp - window)
        for h in range(kv_heads):
            k = k_ref[...] if squeeze_kv else k_ref[:, h, :]            # [bk, Dh]
            v = v_ref[...] if squeeze_kv else v_ref[:, h, :]
            if n_keys % bk:
                # Rows past the cache's end in a partial last block hold undefined values (which
                # may be NaN): zero them, since a zero probability times NaN is NaN.
                row = jax.lax.broadcasted_iota(jnp.int32, v.shape, 0) + j * bk
                v = jnp.where(row < n_keys, v, jnp.zeros((), v.dtype))
            s = jax.lax.dot_general(q_ref[h], k, (((1,), (1,)), ((), ())),
                                    preferred_element_type=jnp.float32) * scale   # [tr, bk]
            s = jnp.where(mask, s, _NEG)
            m_prev = m_sc[h]                                            # [tr, 1]
            m_next = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
            p = jnp.where(mask, jnp.exp(s - _lanes(m_next, bk)), 0.0)
            alpha = jnp.exp(m_prev - m_next)
            l_sc[h] = alpha * l_sc[h] + jnp.sum(p, axis=1, keepdims=True)
            pv = jnp.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)
            acc_sc[h] = _lanes(alpha, pv.shape[1]) * acc_sc[h] + pv
            m_sc[h] = m_next

    @pl.when(j == nk - 1)
    def _finish():
        for h in range(kv_heads):
            l = l_sc[h]
            inv = jnp.where(l > 0, 1.0 / jnp.where(l > 0, l, 1.0), 0.0)
            o_ref[h] = (acc_sc[h] * _lanes(inv, acc_sc.shape[-1])).astype(o_ref.dtype)


def tpu_cache_attention(q: jax.Array, q_pos: jax.Array, k: jax.Array, v: jax.Array,
                        k_pos: jax.Array, *, window: int = 0, scale: Optional[float] = None,
                        block: int = 512, interpret: bool = False) -> jax.Array:
    """Cache attention by one Pallas TPU kernel (forward only; module docstring).

    Args:
      q: ``[B, Tq, H, Dh]`` queries; q_pos: ``[B, Tq]`` int positions.
      k, v: ``[B, S, KV, Dh]`` cached keys and values; k_pos: ``[B, S]`` int (-1 = empty slot).
      window: 0 (full causal) or the sliding window.
      scale: logit scale (default ``1 / sqrt(Dh)``).
      block: slots per key block (rounded to a multiple of 128; :func:`key_block`).
      interpret: Pallas interpret mode (off TPU).

    Returns:
      ``[B, Tq, H, Dh]`` in ``q.dtype``. Logits and softmax statistics are fp32; the matmuls take
      the input dtype (``k``/``v`` cast to ``q.dtype``) with fp32 accumulation.
    """
    b, tq, h, dh = q.shape
    s, kvh = k.shape[1], k.shape[2]
    g = h // kvh
    scale = 1.0 / math.sqrt(dh) if scale is None else float(scale)
    k, v = k.astype(q.dtype), v.astype(q.dtype)
    rows = tq * g
    tr = row_tile(rows, kvh, q.dtype)
    rp = _round_up(rows, tr)
    bk = key_block(s, block)
    nq, nk = rp // tr, -(-s // bk)
    # Query rows per kv head, query-major: [B, KV, Tq * G, Dh], padded to whole row tiles.
    qr = jnp.transpose(q.reshape(b, tq, kvh, g, dh), (0, 2, 1, 3, 4)).reshape(b, kvh, rows, dh)
    qr = jnp.pad(qr, [(0, 0), (0, 0), (0, rp - rows), (0, 0)])
    qp = jnp.pad(jnp.repeat(q_pos.astype(jnp.int32), g, axis=1), [(0, 0), (0, rp - rows)],
                 constant_values=-1)                                    # [B, Rp]
    kp = jnp.pad(k_pos.astype(jnp.int32), [(0, 0), (0, nk * bk - s)], constant_values=-1)
    bounds = visible_blocks(qp.reshape(b, nq, tr), kp.reshape(b, nk, bk), int(window))

    def block_of(bi, i, j, bounds_ref):
        return fetched_block(j, bounds_ref[2 * (bi * nq + i)], bounds_ref[2 * (bi * nq + i) + 1])

    def kv_index(bi, i, j, bounds_ref):
        return (bi, block_of(bi, i, j, bounds_ref), 0, 0)

    def kp_index(bi, i, j, bounds_ref):
        return (bi, 0, block_of(bi, i, j, bounds_ref))

    squeeze_kv = kvh == 1   # a lone kv head is squeezed out of the block: [bk, Dh] tiles, no padding
    kv_block = (None, bk, None, dh) if squeeze_kv else (None, bk, kvh, dh)
    kernel = functools.partial(_kernel, kv_heads=kvh, scale=scale, window=int(window), n_keys=s,
                               squeeze_kv=squeeze_kv)
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=1,
        grid=(b, nq, nk),
        in_specs=[
            pl.BlockSpec((None, kvh, tr, dh), lambda bi, i, j, f: (bi, 0, i, 0)),
            pl.BlockSpec((None, tr, 1), lambda bi, i, j, f: (bi, i, 0)),
            pl.BlockSpec((None, 1, bk), kp_index),
            pl.BlockSpec(kv_block, kv_index),
            pl.BlockSpec(kv_block, kv_index),
        ],
        out_specs=pl.BlockSpec((None, kvh, tr, dh), lambda bi, i, j, f: (bi, 0, i, 0)),
        scratch_shapes=[pltpu.VMEM((kvh, tr, 1), jnp.float32),
                        pltpu.VMEM((kvh, tr, 1), jnp.float32),
                        pltpu.VMEM((kvh, tr, dh), jnp.float32)],
    )
    # Mosaic takes its dots at the default precision: a process-wide "highest" (the CPU tests set
    # it) would ask it for fp32 passes on bf16 operands, which it rejects.
    with jax.default_matmul_precision("default"):
        out = pl.pallas_call(
            kernel, grid_spec=grid_spec,
            out_shape=jax.ShapeDtypeStruct((b, kvh, rp, dh), q.dtype),
            compiler_params=pltpu.CompilerParams(
                dimension_semantics=("parallel", "parallel", "arbitrary")),
            interpret=interpret, name="tpu_cache_attention",
        )(bounds.reshape(-1), qr, qp[:, :, None], kp[:, None, :], k, v)
    out = out[:, :, :rows].reshape(b, kvh, tq, g, dh)
    return jnp.transpose(out, (0, 2, 1, 3, 4)).reshape(b, tq, h, dh)
