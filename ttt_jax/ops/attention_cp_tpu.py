"""Context-parallel attention on TPU with splash (Pallas Mosaic) blocks, inside ``jax.shard_map``.

Same semantics, shapes and layouts as :mod:`ttt_jax.ops.attention_cp` (``q [B, T_local, H, Dh]``,
``k, v [B, T_local, KV, Dh]``, optional ``segment_ids [B, T_local]``; the ``"contiguous"`` or the
load-balanced ``"zigzag"`` layout of the global sequence over the ``context`` axis).

* :func:`tpu_ring_attention` -- full causal attention by a ring: K/V blocks (with their segment
  ids) travel by ``lax.ppermute``; every (query block, key block) pair is one
  :func:`~ttt_jax.ops.kernels.tpu_splash.splash_block_fwd` call whose ``(out, lse)`` is merged
  online; a custom VJP runs a second ring in which dK/dV travel with their blocks and every pair's
  gradient comes from :func:`~ttt_jax.ops.kernels.tpu_splash.splash_block_bwd` with the merged
  statistics. The pair kinds (own block causal; earlier devices' blocks unmasked; in the zigzag
  layout the half blocks) and the step logic are those of the GPU ring
  (:mod:`ttt_jax.ops.attention_cp_fused`), with the TPU blocks plugged in.
* :func:`tpu_allgather_attention` -- the same blocks, but K/V (and ids) are all-gathered once and the
  backward pass reduce-scatters dK/dV: fewer, larger collectives, ``n`` times the K/V memory.
* :func:`tpu_window_attention` -- sliding-window layers: each device receives the previous
  device's last ``window - 1`` keys/values (the halo) and runs ONE splash call over keys
  ``[halo | local]`` with a local mask offset by the halo's (padded) length; device 0 has no left
  neighbour and runs the local-only call (``lax.cond``). Gradients reach the halo's owner through
  the ``ppermute``'s transpose.

Lengths: ``T_local`` (zigzag: each half) is padded at its end to a multiple of 128 with segment id
0 (ids of 1 are made for the real tokens when none are given), so padding is invisible to real
queries; padded rows are dropped and real padding (id 0) rows output 0.
"""

from __future__ import annotations

import functools
import math
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from ttt_jax.parallel.layout import check_layout
from ttt_jax.ops.attention_cp_fused import (RingBlocks, ring_blocks_backward, ring_blocks_forward, ring_bwd_step,
                                            ring_fwd_step)
from ttt_jax.ops.attention_reference import NEG_INF
from ttt_jax.ops.kernels.tpu_splash import (padded_length, splash_attention_call, splash_block_bwd,
                                            splash_block_fwd, vary_like)

CP_KERNELS = ("ring", "allgather")


def _blocks(scale: float, interpret: bool) -> RingBlocks:
    def fwd(q, k, v, causal, qs, ks):
        return splash_block_fwd(q, k, v, causal=causal, scale=scale, q_segment_ids=qs,
                                k_segment_ids=ks, interpret=interpret)

    def bwd(q, k, v, do, out, lse, delta, causal, qs, ks):
        del delta  # splash forms rowsum(do * out) itself from the global ``out``
        return splash_block_bwd(q, k, v, do, out, lse, causal=causal, scale=scale,
                                q_segment_ids=qs, k_segment_ids=ks, interpret=interpret)

    return RingBlocks(fwd, bwd)


def _init_state(q):
    out = jnp.zeros_like(q, jnp.float32)       # built from q: varies over the same mesh axes
    return out, jnp.moveaxis(out[..., 0], 1, 2) + NEG_INF


# --------------------------------------------------------------------------------------------------
# Ring
# --------------------------------------------------------------------------------------------------


def _ring_fwd_impl(q, k, v, seg, axis_name, layout, scale, interpret):
    return ring_blocks_forward(q, k, v, seg, axis_name, layout, _blocks(scale, interpret))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def _ring(q, k, v, seg, axis_name, layout, scale, interpret):
    return _ring_fwd_impl(q, k, v, seg, axis_name, layout, scale, interpret)[0]


def _ring_fwd(q, k, v, seg, axis_name, layout, scale, interpret):
    out, lse = _ring_fwd_impl(q, k, v, seg, axis_name, layout, scale, interpret)
    return out, (q, k, v, seg, out, lse)


def _zero_grads(q, k, v):
    return (jnp.zeros_like(q, jnp.float32), jnp.zeros_like(k, jnp.float32),
            jnp.zeros_like(v, jnp.float32))


def _ring_bwd(axis_name, layout, scale, interpret, res, dout):
    q, k, v, seg, out, lse = res
    return ring_blocks_backward(q, k, v, seg, out, lse, dout.astype(q.dtype), None, axis_name, layout,
                                _blocks(scale, interpret))


def _grads_out(q, k, v, seg, dq, dk, dv):
    dseg = None if seg is None else np.zeros(seg.shape, jax.dtypes.float0)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), dseg


_ring.defvjp(_ring_fwd, _ring_bwd)


# --------------------------------------------------------------------------------------------------
# All-gather K/V
# --------------------------------------------------------------------------------------------------


def _gathered_block(x, j, t):
    return None if x is None else lax.dynamic_slice_in_dim(x, j * t, t, axis=1)


def _rel(j, idx):
    return jnp.where(j == idx, 0, jnp.where(j < idx, 1, 2)).astype(jnp.int32)


def _ag_fwd_impl(q, k, v, seg, axis_name, layout, scale, interpret):
    n, idx, t = lax.axis_size(axis_name), lax.axis_index(axis_name), k.shape[1]
    k_all, v_all, s_all = lax.all_gather((k, v, seg), axis_name, axis=1, tiled=True)
    step = functools.partial(ring_fwd_step, q=q, qs=seg, layout=layout,
                             kernels=_blocks(scale, interpret))

    def body(j, state):
        kv = tuple(_gathered_block(x, j, t) for x in (k_all, v_all, s_all))
        return step(_rel(j, idx), state, kv)

    out, lse = lax.fori_loop(0, n, body, _init_state(q))
    return out.astype(q.dtype), lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def _allgather(q, k, v, seg, axis_name, layout, scale, interpret):
    return _ag_fwd_impl(q, k, v, seg, axis_name, layout, scale, interpret)[0]


def _ag_fwd(q, k, v, seg, axis_name, layout, scale, interpret):
    out, lse = _ag_fwd_impl(q, k, v, seg, axis_name, layout, scale, interpret)
    return out, (q, k, v, seg, out, lse)


def _ag_bwd(axis_name, layout, scale, interpret, res, dout):
    q, k, v, seg, out, lse = res
    n, idx, t = lax.axis_size(axis_name), lax.axis_index(axis_name), k.shape[1]
    k_all, v_all, s_all = lax.all_gather((k, v, seg), axis_name, axis=1, tiled=True)
    step = functools.partial(ring_bwd_step, q=q, qs=seg, do=dout.astype(q.dtype), out=out, lse=lse,
                             delta=None, layout=layout, kernels=_blocks(scale, interpret))

    def body(j, carry):
        dq, dk_all, dv_all = carry
        kv = tuple(_gathered_block(x, j, t) for x in (k_all, v_all, s_all))
        dq, dk, dv = step(_rel(j, idx), (dq, jnp.zeros_like(dk_all[:, :t]),
                                         jnp.zeros_like(dv_all[:, :t])), kv)
        add = lambda acc, g: lax.dynamic_update_slice_in_dim(
            acc, _gathered_block(acc, j, t) + g, j * t, axis=1)
        return dq, add(dk_all, dk), add(dv_all, dv)

    dq0, _, _ = _zero_grads(q, k, v)
    # Accumulators vary over the mesh like q (the gathered K/V do not): the loop carry's type.
    zeros = lambda x: vary_like(jnp.zeros(x.shape, jnp.float32), q)
    dq, dk_all, dv_all = lax.fori_loop(0, n, body, (dq0, zeros(k_all), zeros(v_all)))
    dk, dv = lax.psum_scatter((dk_all, dv_all), axis_name, scatter_dimension=1, tiled=True)
    return _grads_out(q, k, v, seg, dq, dk, dv)


_allgather.defvjp(_ag_fwd, _ag_bwd)


# --------------------------------------------------------------------------------------------------
# Public: padding to the tile, then ring or all-gather
# --------------------------------------------------------------------------------------------------


def _pad_local(x, layout: str, tp: int, value=0):
    """Pad ``x [B, T_local, ...]`` at the end of each local segment (zigzag: each half)."""
    if x is None or x.shape[1] == tp:
        return x
    if layout == "zigzag":
        b, t = x.shape[:2]
        halves = x.reshape(b, 2, t // 2, *x.shape[2:])
        pad = [(0, 0), (0, 0), (0, (tp - t) // 2)] + [(0, 0)] * (x.ndim - 2)
        return jnp.pad(halves, pad, constant_values=value).reshape(b, tp, *x.shape[2:])
    return jnp.pad(x, [(0, 0), (0, tp - x.shape[1])] + [(0, 0)] * (x.ndim - 2),
                   constant_values=value)


def _unpad_local(x, layout: str, t: int):
    if x.shape[1] == t:
        return x
    if layout == "zigzag":
        b, tp = x.shape[:2]
        return x.reshape(b, 2, tp // 2, *x.shape[2:])[:, :, :t // 2].reshape(b, t, *x.shape[2:])
    return x[:, :t]


def tpu_context_attention(q: jax.Array, k: jax.Array, v: jax.Array, axis_name: str, *,
                          kernel: str = "ring", layout: str = "contiguous",
                          segment_ids: Optional[jax.Array] = None, scale: Optional[float] = None,
                          interpret: bool = False) -> jax.Array:
    """Full causal attention across context shards with splash blocks (inside ``shard_map``).

    Args:
      q: ``[B, T_local, H, Dh]``; k, v: ``[B, T_local, KV, Dh]`` (``H % KV == 0``).
      axis_name: the context mesh axis.
      kernel: ``"ring"`` (K/V travel by ``ppermute``) or ``"allgather"`` (K/V gathered once).
      layout: ``"contiguous"`` or ``"zigzag"``.
      segment_ids: optional ``[B, T_local]`` int document ids (0 = padding: output 0).
      scale: logit scale (default ``1 / sqrt(Dh)``).
      interpret: Pallas interpret mode (off TPU; CPU tests).

    Returns:
      ``[B, T_local, H, Dh]`` in ``q.dtype``; differentiable (custom VJPs).
    """
    if kernel not in CP_KERNELS:
        raise ValueError(f"tpu_context_attention: kernel={kernel!r} is not one of {CP_KERNELS}")
    t = q.shape[1]
    check_layout(layout, t)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    per = 2 if layout == "zigzag" else 1
    tp = per * padded_length(t // per)
    seg = None if segment_ids is None else jnp.asarray(segment_ids, jnp.int32)
    if tp != t and seg is None:
        seg = jnp.ones(q.shape[:2], jnp.int32)  # real tokens one document; the padding id 0
    qp, kp, vp, sp = (_pad_local(x, layout, tp) for x in (q, k, v, seg))
    fn = _ring if kernel == "ring" else _allgather
    out = _unpad_local(fn(qp, kp, vp, sp, axis_name, layout, scale, bool(interpret)), layout, t)
    if segment_ids is not None:
        out = jnp.where((segment_ids != 0)[:, :, None, None], out, jnp.zeros((), out.dtype))
    return out


def tpu_ring_attention(q, k, v, axis_name, **kw) -> jax.Array:
    """:func:`tpu_context_attention` with ``kernel="ring"`` (same arguments)."""
    return tpu_context_attention(q, k, v, axis_name, kernel="ring", **kw)


def tpu_allgather_attention(q, k, v, axis_name, **kw) -> jax.Array:
    """:func:`tpu_context_attention` with ``kernel="allgather"`` (same arguments)."""
    return tpu_context_attention(q, k, v, axis_name, kernel="allgather", **kw)


# --------------------------------------------------------------------------------------------------
# Sliding window: the halo and one splash call
# --------------------------------------------------------------------------------------------------


def tpu_window_attention(q: jax.Array, k: jax.Array, v: jax.Array, axis_name: str, *, window: int,
                         segment_ids: Optional[jax.Array] = None, scale: Optional[float] = None,
                         interpret: bool = False) -> jax.Array:
    """Causal sliding-window attention across context shards (contiguous layout; ``shard_map``).

    Args:
      q: ``[B, T_local, H, Dh]``; k, v: ``[B, T_local, KV, Dh]``.
      axis_name: the context mesh axis.
      window: keys per query including itself, ``1 <= window <= T_local + 1``.
      segment_ids: optional ``[B, T_local]`` int ids (0 = padding: output 0); the halo's ids come
        with it.
      scale: logit scale (default ``1 / sqrt(Dh)``).
      interpret: Pallas interpret mode (off TPU).

    Returns:
      ``[B, T_local, H, Dh]`` in ``q.dtype``.
    """
    t = q.shape[1]
    halo = int(window) - 1
    if window < 1 or halo > t:
        raise ValueError(f"tpu_window_attention: window must be in [1, T_local + 1 = {t + 1}], "
                         f"got {window}")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    n = lax.axis_size(axis_name)
    tp = padded_length(t)
    seg = None if segment_ids is None else jnp.asarray(segment_ids, jnp.int32)
    k, v = k.astype(q.dtype), v.astype(q.dtype)
    qp, kp, vp, sp = (_pad_local(x, "contiguous", tp) for x in (q, k, v, seg))
    call = functools.partial(splash_attention_call, causal=True, scale=scale, window=window,
                             interpret=interpret)

    def local_only(*_):
        return call(qp, kp, vp, q_segment_ids=sp, k_segment_ids=sp)

    if halo == 0 or n == 1:
        out = local_only()
    else:
        hp = padded_length(halo)
        send = tuple(None if x is None else x[:, t - halo:] for x in (k, v, seg))
        hk, hv, hs = lax.ppermute(send, axis_name, [(j, j + 1) for j in range(n - 1)])
        front = lambda x: None if x is None else jnp.pad(
            x, [(0, 0), (hp - halo, 0)] + [(0, 0)] * (x.ndim - 2))  # never inside a window

        def with_halo(*_):
            keys = [jnp.concatenate([front(a), b], axis=1) if b is not None else None
                    for a, b in ((hk, kp), (hv, vp), (hs, sp))]
            return call(qp, keys[0], keys[1], q_segment_ids=sp, k_segment_ids=keys[2], offset=hp)

        out = lax.cond(lax.axis_index(axis_name) == 0, local_only, with_halo)
    out = out[:, :t].astype(q.dtype)
    if segment_ids is not None:
        out = jnp.where((segment_ids != 0)[:, :, None, None], out, jnp.zeros((), out.dtype))
    return out
