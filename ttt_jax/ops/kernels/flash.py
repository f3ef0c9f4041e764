"""Flash-attention block kernels in Pallas (Triton lowering on NVIDIA GPUs).

Over 400 lines because the three kernels (forward, dQ, dK/dV) share their tiling, masking and
tile-skipping helpers, which must agree exactly; splitting them would spread one kernel set over
several files.

Two users: ring attention (:mod:`ttt_jax.ops.attention_cp_fused`, one call per (query block, key block)
pair) and single-device attention over packed documents (``attention(impl="flash")`` in
``ttt_jax.ops.attention``, through :func:`flash_attention`), where cuDNN's public API would need a
dense ``[B, 1, T, T]`` mask for the segment ids.

Ring attention merges the partial results of several (query block, key block) pairs with their
log-sum-exps, and its backward pass needs each pair's gradients computed from the *merged* output
and log-sum-exp. A fused kernel for one pair therefore has to expose both: the forward returns
``(out, lse)`` in float32, and the backward takes ``lse`` and ``delta = rowsum(dO * O)`` of the
global result (the standard flash-attention backward: ``P = exp(S * scale - lse)``,
``dS = P * (dO V^T - delta)``). The public cuDNN API offers neither (its residual LSE comes back in
the output dtype and its VJP ignores an LSE cotangent), hence these kernels.

Shapes (all functions)::

    q: [B, Tq, H, Dh]    k, v: [B, Tk, KV, Dh]    H % KV == 0 (GQA: head h uses kv head h // G)
    lse, delta: [B, H, Tq] float32

Masks: ``causal=False`` (every query sees every key) or ``causal=True`` (``Tq == Tk``, query ``i``
sees keys ``j <= i``: a diagonal block whose local order is the global order). Optionally, on top:

* ``window > 0`` (causal only): query ``i`` sees keys ``j > i - window`` (the query included);
  key tiles outside the band are never visited.
* segment ids ``q_segment_ids [B, Tq]``, ``k_segment_ids [B, Tk]`` int32: a query sees a key only
  when their ids are equal and non-zero -- the semantics of ``ttt_jax.ops.attention.attention_mask``
  for packed documents. A query that sees no key at all (a padding query, id 0) outputs exactly 0,
  its log-sum-exp is reported as 0, and it gets (and passes on) zero gradient. A tile whose
  query ids and key ids have disjoint ranges (``[min, max]`` of the non-zero ids) is skipped
  (``lax.cond``, an ``if`` in Triton): for packed documents with sorted ids most tiles off the
  documents' diagonal blocks cost one tiny reduction. Ids need not be sorted (the range test then
  skips fewer tiles, never a visible pair); ``_SKIP_SEGMENT_TILES = False`` turns skipping off.

Without segment ids or a window (the ring's case) tiles wholly below the diagonal run without a
mask; with either, every visited tile is masked.

GQA: the forward and dQ kernels read kv head ``h // G`` through their block index maps (K/V are
never repeated in memory); the dK/dV kernel writes one gradient per *query* head and the wrapper
sums each group of ``G`` (an ``[B, Tk, H, Dh]`` float32 temporary).

Off GPU the kernels run in Pallas interpret mode (``interpret=True``; slow, for the CPU tests).
Head dims that are not a power of two (>= 16) are zero-padded (exact: padded query/key columns add
zero to the scores, padded value columns are sliced off).
"""

from __future__ import annotations

import functools
import inspect
import math
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

from ttt_jax.platform import target_platform

_NEG = -1e30  # finite "minus infinity": exp2(_NEG - m) == 0 for any finite row max m
# The kernels work in base 2 (exp2 is the hardware instruction; exp would cost a multiply more per
# score): logits are scaled by scale * log2(e), and log-sum-exps cross the API in natural log.
_LOG2E = math.log2(math.e)
# A squeezed block dimension (``None`` in older Pallas, ``pl.squeezed`` where it exists).
_SQ = getattr(pl, "squeezed", None)
_LN2 = math.log(2.0)
_MIN_BLOCK = 16  # Triton's smallest matmul tile
# Default tiles (queries x keys) for head_dim <= 128. Forward: long query tiles amortise the K/V
# loads; backward: square. Halved for larger heads (register pressure of the fp32 accumulators).
_FWD_BLOCKS = (128, 64)
_BWD_BLOCKS = (64, 64)
# Triton (num_warps, num_stages) of the forward and backward kernels; None: 4 warps for
# head_dim <= 64, else 8, and 2 stages.
_LAUNCH = {"fwd": None, "bwd": None}
# Skip (query tile, key tile) pairs whose segment-id ranges are disjoint (see the module docstring).
_SKIP_SEGMENT_TILES = True
_ID_MAX = 2**31 - 1


def _tiles(want: Optional[int], default: int, head_dim: int) -> int:
    if want is not None:
        return want
    return default if head_dim <= 128 else default // 2


def _compiler_params(head_dim: int, which: str):
    """Triton launch parameters (ignored in interpret mode)."""
    from jax.experimental.pallas import triton as plgpu
    warps, stages = _LAUNCH[which] or (4 if head_dim <= 64 else 8, 2)
    return plgpu.CompilerParams(num_warps=warps, num_stages=stages)


def _block(t: int, want: int) -> int:
    """Largest power of two ``<= want`` dividing ``t`` (``t`` a multiple of ``_MIN_BLOCK``)."""
    if want < _MIN_BLOCK or want & (want - 1):
        raise ValueError(f"flash kernel tiles must be powers of two >= {_MIN_BLOCK}, got {want}")
    b = want
    while t % b:
        b //= 2
    return b


def _pad_dim(d: int) -> int:
    return max(_MIN_BLOCK, 1 << (d - 1).bit_length())


def flash_unsupported_reason(q: jax.Array, k: jax.Array, *, causal: bool = False,
                             interpret: bool = False) -> Optional[str]:
    """Why the kernels cannot run on these operands (``None`` when they can).

    Needs a GPU (unless ``interpret``), lengths that are multiples of 16, ``Tq == Tk`` when causal,
    ``head_dim <= 256`` and, on GPU, bfloat16 or float16 inputs.
    """
    if not interpret and target_platform() != "gpu":
        return f"the Pallas flash kernels need an NVIDIA GPU (the target platform is {target_platform()!r})"
    if not interpret and q.dtype not in (jnp.bfloat16, jnp.float16):
        return f"the Pallas flash kernels need bfloat16/float16 inputs on GPU, got {q.dtype}"
    tq, tk, d = q.shape[1], k.shape[1], q.shape[-1]
    if tq % _MIN_BLOCK or tk % _MIN_BLOCK:
        return f"the Pallas flash kernels need block lengths that are multiples of {_MIN_BLOCK}, got {tq} and {tk}"
    if causal and tq != tk:
        return f"a causal block needs as many queries as keys, got {tq} and {tk}"
    if d > 256:
        return f"the Pallas flash kernels support head_dim <= 256, got {d}"
    return None


def _dot_nt(a, b):
    """``a [m, d] @ b [n, d]^T -> [m, n]`` float32."""
    return lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def _dot_tn(a, b):
    """``a [m, n]^T @ b [m, d] -> [n, d]`` float32."""
    return lax.dot_general(a, b, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def _dot(a, b):
    return lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def _causal_mask(q0, k0, bq: int, bk: int):
    return (q0 + jnp.arange(bq))[:, None] >= (k0 + jnp.arange(bk))[None, :]


def _id_range(ids):
    """``(min, max)`` of the non-zero ids of a tile (``(_ID_MAX, 0)`` when all are padding)."""
    return jnp.min(jnp.where(ids != 0, ids, _ID_MAX)), jnp.max(ids)


def _maybe_skip(compute, carry, a_range, b_ids):
    """``compute(carry)`` unless ``b_ids`` cannot hold an id in ``a_range`` (then ``carry``)."""
    if not _SKIP_SEGMENT_TILES:
        return compute(carry)
    lo, hi = a_range
    live = (jnp.max(b_ids) >= lo) & (jnp.min(b_ids) <= hi)
    return lax.cond(live, compute, lambda c: c, carry)


def _tile_mask(q0, k0, bq: int, bk: int, causal: bool, window: int, qs, ks):
    """``[bq, bk]`` visibility of a tile: causal, window and segment ids (``qs [bq]``, ``ks [bk]``
    or both ``None``)."""
    qi = (q0 + jnp.arange(bq))[:, None]
    ki = (k0 + jnp.arange(bk))[None, :]
    mask = qi >= ki if causal else jnp.ones((bq, bk), jnp.bool_)
    if window > 0:
        mask = mask & (ki > qi - window)
    if qs is not None:
        mask = mask & (qs[:, None] == ks[None, :]) & (qs[:, None] != 0)
    return mask


# --------------------------------------------------------------------------------------------------
# Kernels (one program per query tile or key tile, batch element and query head)
# --------------------------------------------------------------------------------------------------
#
# ``general`` (static) is True when segment ids or a window are given: every visited tile is then
# masked, and masked probabilities are zeroed explicitly (a row can see no key at all, so the
# "finite minus infinity" trick alone would give it uniform weights).


def _fwd_kernel(*refs, scale, causal, window, segmented, bq, bk, empty_lse=0.0):
    if segmented:
        q_ref, k_ref, v_ref, qs_ref, ks_ref, o_ref, lse_ref = refs
    else:
        (q_ref, k_ref, v_ref, o_ref, lse_ref), qs_ref, ks_ref = refs, None, None
    general = segmented or window > 0
    i = pl.program_id(0)
    q = q_ref[...]                                                     # [bq, D]
    qs = qs_ref[...] if segmented else None                            # [bq]
    q_range = _id_range(qs) if segmented else None
    d = q.shape[-1]

    def body(j, carry, masked):
        ks = ks_ref[pl.ds(j * bk, bk)] if segmented else None

        def compute(carry):
            acc, m, l = carry
            k = k_ref[pl.ds(j * bk, bk), :]
            v = v_ref[pl.ds(j * bk, bk), :]
            s = _dot_nt(q, k) * (scale * _LOG2E)                       # [bq, bk], base 2
            if masked:
                if general:
                    mask = _tile_mask(i * bq, j * bk, bq, bk, causal, window, qs, ks)
                else:
                    mask = _causal_mask(i * bq, j * bk, bq, bk)
                s = jnp.where(mask, s, _NEG)
            m_new = jnp.maximum(m, jnp.max(s, axis=1))
            corr = jnp.exp2(m - m_new)
            p = jnp.exp2(s - m_new[:, None])
            if masked and general:
                p = jnp.where(mask, p, 0.0)
            l = l * corr + jnp.sum(p, axis=1)
            acc = acc * corr[:, None] + _dot(p.astype(v.dtype), v)
            return acc, m_new, l

        return _maybe_skip(compute, carry, q_range, ks) if segmented else compute(carry)

    carry = (jnp.zeros((bq, d), jnp.float32), jnp.full((bq,), _NEG, jnp.float32),
             jnp.zeros((bq,), jnp.float32))
    carry = _key_loop(body, carry, i, causal, window, general, bq, bk, k_ref.shape[0] // bk)
    acc, m, l = carry
    if segmented:  # rows that saw no key: output 0, log-sum-exp reported as ``empty_lse``
        live = l > 0
        l_safe = jnp.where(live, l, 1.0)
        o_ref[...] = (acc / l_safe[:, None]).astype(o_ref.dtype)
        lse_ref[...] = jnp.where(live, (m + jnp.log2(l_safe)) * _LN2, empty_lse)
    else:
        o_ref[...] = (acc / l[:, None]).astype(o_ref.dtype)
        lse_ref[...] = (m + jnp.log2(l)) * _LN2


def _key_loop(body, carry, i, causal, window, general, bq, bk, n_k):
    """Run ``body(j, carry, masked)`` over the key tiles query tile ``i`` sees.

    Causal: tiles entirely below the diagonal without the mask, then the diagonal tiles with it;
    tiles past the query tile's last row are skipped (key 0 is always visible, so no row is empty).
    ``general`` (segment ids or a window): every visited tile with the mask; a window also skips
    the tiles that end before the first row's window starts.
    """
    if not causal:
        return lax.fori_loop(0, n_k, functools.partial(body, masked=general), carry)
    n_seen = lax.div((i + 1) * bq + bk - 1, bk)       # tiles starting at or before the last row
    if general:
        first = 0 if window <= 0 else lax.div(jnp.maximum(i * bq - window + 1, 0), bk)
        return lax.fori_loop(first, n_seen, functools.partial(body, masked=True), carry)
    n_full = lax.div(i * bq, bk)                      # tiles ending at or before the first row
    carry = lax.fori_loop(0, n_full, functools.partial(body, masked=False), carry)
    return lax.fori_loop(n_full, n_seen, functools.partial(body, masked=True), carry)


def _query_loop(body, carry, j, causal, window, general, bq, bk, n_q):
    """Run ``body(i, carry, masked)`` over the query tiles that see key tile ``j`` (causal: the
    diagonal tiles with the mask, then the tiles entirely below the diagonal without it;
    ``general``: every visited tile with the mask, a window stopping at its last reachable row)."""
    if not causal:
        return lax.fori_loop(0, n_q, functools.partial(body, masked=general), carry)
    first = lax.div(j * bk, bq)                                 # first tile with a row >= j * bk
    if general:
        last = n_q if window <= 0 else jnp.minimum(lax.div((j + 1) * bk + window - 2, bq) + 1, n_q)
        return lax.fori_loop(first, last, functools.partial(body, masked=True), carry)
    first_full = jnp.minimum(lax.div((j + 1) * bk - 1 + bq - 1, bq), n_q)  # first row >= last key
    carry = lax.fori_loop(first, first_full, functools.partial(body, masked=True), carry)
    return lax.fori_loop(first_full, n_q, functools.partial(body, masked=False), carry)


def _dq_kernel(*refs, scale, causal, window, segmented, bq, bk):
    if segmented:
        q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qs_ref, ks_ref, dq_ref = refs
    else:
        (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref), qs_ref, ks_ref = refs, None, None
    general = segmented or window > 0
    i = pl.program_id(0)
    q = q_ref[...]
    do = do_ref[...]
    lse = lse_ref[...] * _LOG2E
    delta = delta_ref[...]
    qs = qs_ref[...] if segmented else None
    q_range = _id_range(qs) if segmented else None

    def body(j, dq, masked):
        ks = ks_ref[pl.ds(j * bk, bk)] if segmented else None

        def compute(dq):
            k = k_ref[pl.ds(j * bk, bk), :]
            v = v_ref[pl.ds(j * bk, bk), :]
            p = _tile_probs(q, k, lse, scale, i * bq, j * bk, masked, general, causal, window, qs, ks)
            ds = p * (_dot_nt(do, v) - delta[:, None])
            return dq + _dot(ds.astype(k.dtype), k)

        return _maybe_skip(compute, dq, q_range, ks) if segmented else compute(dq)

    dq = _key_loop(body, jnp.zeros(q.shape, jnp.float32), i, causal, window, general, bq, bk,
                   k_ref.shape[0] // bk)
    dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


def _tile_probs(q, k, lse, scale, q0, k0, masked, general, causal, window, qs, ks):
    """Backward-pass probabilities of one ``[bq, bk]`` tile from the merged log-sum-exp ``lse``
    (already in base 2): ``exp2(q k^T * scale * log2(e) - lse)``, masked where the tile needs it
    (``general``: segments / window / causal via :func:`_tile_mask`; else causal only); with a
    general mask the masked entries are also set to exactly 0 after the exponential."""
    bq, bk = q.shape[0], k.shape[0]
    s = _dot_nt(q, k) * (scale * _LOG2E)                               # [bq, bk], base 2
    if masked:
        mask = (_tile_mask(q0, k0, bq, bk, causal, window, qs, ks) if general
                else _causal_mask(q0, k0, bq, bk))
        s = jnp.where(mask, s, _NEG)
    p = jnp.exp2(s - lse[:, None])
    if masked and general:
        p = jnp.where(mask, p, 0.0)
    return p


def _dkv_kernel(*refs, scale, causal, window, segmented, bq, bk):
    if segmented:
        q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qs_ref, ks_ref, dk_ref, dv_ref = refs
    else:
        (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref), qs_ref, ks_ref = \
            refs, None, None
    general = segmented or window > 0
    j = pl.program_id(0)
    k = k_ref[...]                                                     # [bk, D]
    v = v_ref[...]
    ks = ks_ref[...] if segmented else None                            # [bk]
    k_range = _id_range(ks) if segmented else None

    def body(i, carry, masked):
        qs = qs_ref[pl.ds(i * bq, bq)] if segmented else None

        def compute(carry):
            dk, dv = carry
            q = q_ref[pl.ds(i * bq, bq), :]
            do = do_ref[pl.ds(i * bq, bq), :]
            lse = lse_ref[pl.ds(i * bq, bq)] * _LOG2E
            delta = delta_ref[pl.ds(i * bq, bq)]
            p = _tile_probs(q, k, lse, scale, i * bq, j * bk, masked, general, causal, window, qs, ks)
            dv = dv + _dot_tn(p.astype(do.dtype), do)
            ds = p * (_dot_nt(do, v) - delta[:, None])
            dk = dk + _dot_tn(ds.astype(q.dtype), q)
            return dk, dv

        return _maybe_skip(compute, carry, k_range, qs) if segmented else compute(carry)

    zeros = jnp.zeros(k.shape, jnp.float32)
    dk, dv = _query_loop(body, (zeros, zeros), j, causal, window, general, bq, bk,
                         q_ref.shape[0] // bq)
    dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


# --------------------------------------------------------------------------------------------------
# Wrappers
# --------------------------------------------------------------------------------------------------


def _out(shape, like: jax.Array) -> jax.ShapeDtypeStruct:
    """A float32 kernel output that varies over the same manual mesh axes as ``like``.

    Inside a ``jax.shard_map`` that checks axis variance, ``pallas_call`` needs to be told how its
    outputs vary; the keyword has been renamed across JAX versions (``vma`` -> ``manual_axis_type``).
    """
    aval = jax.typeof(like)
    params = inspect.signature(jax.ShapeDtypeStruct).parameters
    for key, attr in (("manual_axis_type", "mat"), ("vma", "vma")):
        if key in params and getattr(aval, attr, None) is not None:
            return jax.ShapeDtypeStruct(shape, jnp.float32, **{key: getattr(aval, attr)})
    return jax.ShapeDtypeStruct(shape, jnp.float32)


def _pad_head(x, dp):
    d = x.shape[-1]
    return x if d == dp else jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, dp - d)])


def _check(q, k, v, causal, interpret, what, window=0, q_seg=None, k_seg=None):
    if k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3] or q.shape[2] % k.shape[2]:
        raise ValueError(f"{what}: expected q [B,Tq,H,Dh] and k, v [B,Tk,KV,Dh] with H % KV == 0; got "
                         f"q {q.shape}, k {k.shape}, v {v.shape}")
    reason = flash_unsupported_reason(q, k, causal=causal, interpret=interpret)
    if reason is not None:
        raise ValueError(f"{what}: {reason}")
    if window < 0 or (window > 0 and not causal):
        raise ValueError(f"{what}: window must be 0, or > 0 with causal=True; got {window}")
    if (q_seg is None) != (k_seg is None):
        raise ValueError(f"{what}: pass both q_segment_ids and k_segment_ids, or neither")
    if q_seg is not None and (tuple(q_seg.shape) != q.shape[:2] or tuple(k_seg.shape) != k.shape[:2]):
        raise ValueError(f"{what}: segment ids must be [B, Tq] = {q.shape[:2]} and [B, Tk] = "
                         f"{k.shape[:2]}; got {tuple(q_seg.shape)} and {tuple(k_seg.shape)}")


def _seg_args(q_seg, k_seg):
    return () if q_seg is None else (q_seg.astype(jnp.int32), k_seg.astype(jnp.int32))


@functools.partial(jax.jit, static_argnames=("causal", "scale", "interpret", "block_q", "block_k",
                                             "window", "empty_lse"))
def flash_block_fwd(q: jax.Array, k: jax.Array, v: jax.Array, *, causal: bool, scale: float,
                    interpret: bool = False, block_q: Optional[int] = None,
                    block_k: Optional[int] = None, window: int = 0,
                    q_segment_ids: Optional[jax.Array] = None,
                    k_segment_ids: Optional[jax.Array] = None,
                    empty_lse: float = 0.0) -> tuple[jax.Array, jax.Array]:
    """Attention of one (query block, key block) pair with its log-sum-exp.

    Args:
      q: ``[B, Tq, H, Dh]``; k, v: ``[B, Tk, KV, Dh]`` (same dtype).
      causal: ``False`` (no mask) or ``True`` (``Tq == Tk``, top-left aligned causal mask).
      scale: logit scale.
      interpret: run in Pallas interpret mode (any backend; slow).
      block_q, block_k: tile sizes (powers of two, reduced to divide the lengths; default 128 x 64,
        halved for head_dim > 128).
      window: 0, or (causal only) a sliding window of ``window`` keys, the query included.
      q_segment_ids, k_segment_ids: optional ``[B, Tq]`` / ``[B, Tk]`` int ids (both or neither);
        a query sees a key only when the ids are equal and non-zero.
      empty_lse: the log-sum-exp reported for rows that see no key (with segment ids). 0 by
        default; ring attention passes a large negative number so that merging ignores the block
        for those rows.

    Returns:
      ``out [B, Tq, H, Dh]`` float32 (normalised within this block) and ``lse [B, H, Tq]`` float32
      (natural log of each row's sum of ``exp(scale * q.k)``; ``empty_lse`` for rows that see no
      key, whose output is 0).
    """
    _check(q, k, v, causal, interpret, "flash_block_fwd", window, q_segment_ids, k_segment_ids)
    segmented = q_segment_ids is not None
    b, tq, h, d = q.shape
    tk, g = k.shape[1], h // k.shape[2]
    dp = _pad_dim(d)
    q, k, v = (_pad_head(x, dp) for x in (q, k, v))
    bq = _block(tq, _tiles(block_q, _FWD_BLOCKS[0], dp))
    bk = _block(tk, _tiles(block_k, _FWD_BLOCKS[1], dp))
    kernel = functools.partial(_fwd_kernel, scale=scale, causal=causal, window=window,
                               segmented=segmented, bq=bq, bk=bk, empty_lse=float(empty_lse))
    seg_specs = [pl.BlockSpec((_SQ, bq), lambda i, bi, hi: (bi, i)),
                 pl.BlockSpec((_SQ, tk), lambda i, bi, hi: (bi, 0))] if segmented else []
    out, lse = pl.pallas_call(
        kernel,
        grid=(tq // bq, b, h),
        in_specs=[pl.BlockSpec((_SQ, bq, _SQ, dp), lambda i, bi, hi: (bi, i, hi, 0)),
                  pl.BlockSpec((_SQ, tk, _SQ, dp), lambda i, bi, hi: (bi, 0, hi // g, 0)),
                  pl.BlockSpec((_SQ, tk, _SQ, dp), lambda i, bi, hi: (bi, 0, hi // g, 0))]
                 + seg_specs,
        out_specs=[pl.BlockSpec((_SQ, bq, _SQ, dp), lambda i, bi, hi: (bi, i, hi, 0)),
                   pl.BlockSpec((_SQ, _SQ, bq), lambda i, bi, hi: (bi, hi, i))],
        out_shape=[_out((b, tq, h, dp), q), _out((b, h, tq), q)],
        compiler_params=None if interpret else _compiler_params(dp, "fwd"),
        interpret=interpret,
        name="ring_flash_fwd",
    )(q, k, v, *_seg_args(q_segment_ids, k_segment_ids))
    return out[..., :d], lse


@functools.partial(jax.jit, static_argnames=("causal", "scale", "interpret", "block_q", "block_k",
                                             "window"))
def flash_block_bwd(q: jax.Array, k: jax.Array, v: jax.Array, do: jax.Array, lse: jax.Array,
                    delta: jax.Array, *, causal: bool, scale: float, interpret: bool = False,
                    block_q: Optional[int] = None, block_k: Optional[int] = None, window: int = 0,
                    q_segment_ids: Optional[jax.Array] = None,
                    k_segment_ids: Optional[jax.Array] = None
                    ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Gradients of one (query block, key block) pair given the *global* softmax statistics.

    Args:
      q, k, v, causal, scale, interpret, window, q_segment_ids, k_segment_ids: as in
        :func:`flash_block_fwd`.
      do: ``[B, Tq, H, Dh]`` cotangent of the (global) attention output, cast to ``q.dtype``.
      lse: ``[B, H, Tq]`` float32 log-sum-exp of each query row over *all* the keys it sees.
      delta: ``[B, H, Tq]`` float32 ``rowsum(do * out)`` with the global output.
      block_q, block_k: tile sizes of both backward kernels (default 64 x 64, halved for
        head_dim > 128).

    Returns:
      ``dq [B, Tq, H, Dh]``, ``dk, dv [B, Tk, KV, Dh]``, all float32: this pair's contributions
      (zero for queries / keys that see nothing).
    """
    _check(q, k, v, causal, interpret, "flash_block_bwd", window, q_segment_ids, k_segment_ids)
    segmented = q_segment_ids is not None
    b, tq, h, d = q.shape
    tk, kvh = k.shape[1], k.shape[2]
    g = h // kvh
    dp = _pad_dim(d)
    q, k, v, do = (_pad_head(x, dp) for x in (q, k, v, do.astype(q.dtype)))
    bq = _block(tq, _tiles(block_q, _BWD_BLOCKS[0], dp))
    bk = _block(tk, _tiles(block_k, _BWD_BLOCKS[1], dp))
    params = None if interpret else _compiler_params(dp, "bwd")
    static = dict(scale=scale, causal=causal, window=window, segmented=segmented, bq=bq, bk=bk)
    segs = _seg_args(q_segment_ids, k_segment_ids)
    qspec = pl.BlockSpec((_SQ, bq, _SQ, dp), lambda i, bi, hi: (bi, i, hi, 0))
    kfull = pl.BlockSpec((_SQ, tk, _SQ, dp), lambda i, bi, hi: (bi, 0, hi // g, 0))
    rowspec = pl.BlockSpec((_SQ, _SQ, bq), lambda i, bi, hi: (bi, hi, i))
    seg_specs = [pl.BlockSpec((_SQ, bq), lambda i, bi, hi: (bi, i)),
                 pl.BlockSpec((_SQ, tk), lambda i, bi, hi: (bi, 0))] if segmented else []
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, **static),
        grid=(tq // bq, b, h),
        in_specs=[qspec, kfull, kfull, qspec, rowspec, rowspec] + seg_specs,
        out_specs=qspec,
        out_shape=_out((b, tq, h, dp), q),
        compiler_params=params, interpret=interpret, name="ring_flash_dq",
    )(q, k, v, do, lse, delta, *segs)

    qfull = pl.BlockSpec((_SQ, tq, _SQ, dp), lambda j, bi, hi: (bi, 0, hi, 0))
    kspec = pl.BlockSpec((_SQ, bk, _SQ, dp), lambda j, bi, hi: (bi, j, hi // g, 0))
    rowfull = pl.BlockSpec((_SQ, _SQ, tq), lambda j, bi, hi: (bi, hi, 0))
    dkvspec = pl.BlockSpec((_SQ, bk, _SQ, dp), lambda j, bi, hi: (bi, j, hi, 0))  # per query head
    seg_specs = [pl.BlockSpec((_SQ, tq), lambda j, bi, hi: (bi, 0)),
                 pl.BlockSpec((_SQ, bk), lambda j, bi, hi: (bi, j))] if segmented else []
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, **static),
        grid=(tk // bk, b, h),
        in_specs=[qfull, kspec, kspec, qfull, rowfull, rowfull] + seg_specs,
        out_specs=[dkvspec, dkvspec],
        out_shape=[_out((b, tk, h, dp), q)] * 2,
        compiler_params=params, interpret=interpret, name="ring_flash_dkv",
    )(q, k, v, do, lse, delta, *segs)
    if g > 1:  # sum the query heads of each kv group
        dk, dv = (x.reshape(b, tk, kvh, g, dp).sum(axis=3) for x in (dk, dv))
    return dq[..., :d], dk[..., :d], dv[..., :d]


def flash_delta(out: jax.Array, do: jax.Array) -> jax.Array:
    """``rowsum(do * out)`` as ``[B, H, T]`` float32 (``out``, ``do``: ``[B, T, H, Dh]``)."""
    return jnp.einsum("bthd,bthd->bht", out.astype(jnp.float32), do.astype(jnp.float32))


def flash_attention(q: jax.Array, k: jax.Array, v: jax.Array, causal: bool = True,
                    scale: Optional[float] = None, interpret: bool = False,
                    segment_ids: Optional[jax.Array] = None, window: int = 0) -> jax.Array:
    """Single-device attention through the block kernels (``[B, T, H, Dh]`` out in ``q.dtype``).

    ``segment_ids``: optional ``[B, T]`` int (0 = padding: output 0, zero gradient); a query sees
    a key only with the same non-zero id. ``window``: 0 or a causal sliding window. Lengths must be
    multiples of 16 (``ttt_jax.ops.attention`` pads). Used by ``attention(impl="flash")`` and as the
    kernels' test harness and op benchmark; the ring in :mod:`ttt_jax.ops.attention_cp_fused` calls
    :func:`flash_block_fwd` / :func:`flash_block_bwd` directly.
    """
    return _flash_attention(q, k, v, segment_ids, causal, int(window), scale, interpret)


def _scale(q, scale):
    return 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def _flash_attention(q, k, v, seg, causal, window, scale, interpret):
    return _flash_attention_fwd(q, k, v, seg, causal, window, scale, interpret)[0]


def _flash_attention_fwd(q, k, v, seg, causal, window, scale, interpret):
    out, lse = flash_block_fwd(q, k, v, causal=causal, scale=_scale(q, scale), interpret=interpret,
                               window=window, q_segment_ids=seg, k_segment_ids=seg)
    out = out.astype(q.dtype)
    return out, (q, k, v, seg, out, lse)


def _flash_attention_bwd(causal, window, scale, interpret, res, do):
    q, k, v, seg, out, lse = res
    dq, dk, dv = flash_block_bwd(q, k, v, do, lse, flash_delta(out, do), causal=causal,
                                 scale=_scale(q, scale), interpret=interpret, window=window,
                                 q_segment_ids=seg, k_segment_ids=seg)
    dseg = None if seg is None else np.zeros(seg.shape, jax.dtypes.float0)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), dseg


_flash_attention.defvjp(_flash_attention_fwd, _flash_attention_bwd)
