"""Full causal context-parallel attention with fused block kernels (inside ``jax.shard_map``).

Same semantics, shapes and layouts as :mod:`ttt_jax.ops.attention_cp_ring` (``q [B, T_local, H,
Dh]``, ``k, v [B, T_local, KV, Dh]``). Segment ids (packed documents): with the Pallas blocks only.

:func:`ring_flash_attention` is the ring of :func:`ttt_jax.ops.attention_cp_ring.ring_attention`
(K/V blocks travel by ``lax.ppermute``; a custom VJP runs a second ring in which dK/dV travel with
their blocks), with every (query block, key block) pair computed by one fused kernel call: cuDNN's
flash attention through :mod:`ttt_jax.ops.kernels.cudnn_blocks` where it can run (GPU, bf16/fp16,
JAX's private cuDNN functions as expected), else the Pallas (Triton) kernels of
:mod:`ttt_jax.ops.kernels.flash`. The forward state is the merged output and log-sum-exp
(``out [B, T, H, Dh]``, ``lse [B, H, T]``, float32); each block's ``(out_b, lse_b)`` is merged by
:func:`merge_partials`: ``lse' = logaddexp(lse, lse_b)``,
``out' = out * exp(lse - lse') + out_b * exp(lse_b - lse')``. The backward calls the block
backward kernel with the *merged* ``lse`` and ``delta = rowsum(dO * O)``, which is exactly the
gradient of the global softmax restricted to that block. Block kinds: the own block is ``causal``
(local order = global order in both layouts), a block from an earlier device is unmasked; in the
zigzag layout those are the half blocks of the XLA ring (all queries x the early key half, the late
query half x all keys).
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from ttt_jax.parallel.layout import check_layout
from ttt_jax.ops.attention_cp_ring import ring_meta, ring_source
from ttt_jax.ops.attention_reference import NEG_INF
from ttt_jax.ops.kernels.cudnn_blocks import (cudnn_block_bwd, cudnn_block_fwd, cudnn_unsupported_reason,
                                              private_api_problem)
from ttt_jax.ops.kernels.flash import flash_block_bwd, flash_block_fwd, flash_delta
RING_BLOCKS = ("cudnn", "pallas", "interpret")


# --------------------------------------------------------------------------------------------------
# Ring attention with flash block kernels
# --------------------------------------------------------------------------------------------------


def merge_partials(out, lse, out_b, lse_b):
    """Merge two normalised partial results of the same queries by their log-sum-exps.

    ``out, out_b [B, Tq, H, Dh]`` float32, ``lse, lse_b [B, H, Tq]`` float32 -> ``(out', lse')``
    (see the module docstring); a partial with ``lse_b = -1e30`` has weight 0."""
    new = jnp.logaddexp(lse, lse_b)                          # [B, H, Tq]
    w = lambda x: jnp.moveaxis(jnp.exp(x - new), 1, 2)[..., None]  # -> [B, Tq, H, 1]
    return out * w(lse) + out_b * w(lse_b), new


class RingBlocks(NamedTuple):
    """The per-pair kernels of one ring: ``fwd(q, k, v, causal, qs, ks) -> (out, lse)`` and
    ``bwd(q, k, v, do, out, lse, delta, causal, qs, ks) -> (dq, dk, dv)`` (global
    ``out``/``lse``/``delta``; ``qs``/``ks`` the blocks' segment ids or ``None``)."""

    fwd: Callable
    bwd: Callable


def ring_block_kernels(blocks: str, scale: float) -> RingBlocks:
    """``blocks``: ``"cudnn"`` (:mod:`ttt_jax.ops.kernels.cudnn_blocks`; no segment ids), ``"pallas"``
    (:mod:`ttt_jax.ops.kernels.flash`) or ``"interpret"`` (the Pallas kernels in interpret mode, for CPU tests)."""
    if blocks == "cudnn":
        def fwd(q, k, v, causal, qs, ks):
            assert qs is None and ks is None, "the cuDNN ring blocks take no segment ids"
            return cudnn_block_fwd(q, k, v, causal=causal, scale=scale)

        def bwd(q, k, v, do, out, lse, delta, causal, qs, ks):
            assert qs is None and ks is None, "the cuDNN ring blocks take no segment ids"
            return cudnn_block_bwd(q, k, v, do, out, lse, causal=causal, scale=scale)

        return RingBlocks(fwd, bwd)
    if blocks not in ("pallas", "interpret"):
        raise ValueError(f"ring block kernels: {blocks!r} is not one of {RING_BLOCKS}")
    interpret = blocks == "interpret"

    def fwd(q, k, v, causal, qs, ks):
        # A query may see no key of a block (another document): its lse must not count in the merge.
        return flash_block_fwd(q, k, v, causal=causal, scale=scale, interpret=interpret,
                               q_segment_ids=qs, k_segment_ids=ks, empty_lse=NEG_INF)

    def bwd(q, k, v, do, out, lse, delta, causal, qs, ks):
        return flash_block_bwd(q, k, v, do, lse, delta, causal=causal, scale=scale,
                               interpret=interpret, q_segment_ids=qs, k_segment_ids=ks)

    return RingBlocks(fwd, bwd)


def _cut(x, sl):
    """``x[:, sl]`` of an optional ``[B, T, ...]`` array."""
    return None if x is None else x[:, sl]


def ring_fwd_step(rel, state, kv, q, qs, layout, kernels: RingBlocks):
    """Fold one K/V block into ``(out, lse)``. ``rel``: 0 own, 1 earlier, 2 later device.
    ``kv = (k, v, ks)``; ``qs``/``ks``: segment ids of the queries / keys, or ``None``."""
    k, v, ks = kv
    fwd = kernels.fwd

    def own(st):
        return merge_partials(*st, *fwd(q, k, v, True, qs, ks))

    def earlier_all(st):
        return merge_partials(*st, *fwd(q, k, v, False, qs, ks))

    if layout == "contiguous":
        branches = [own, earlier_all, lambda st: st]
    else:
        half = q.shape[1] // 2
        lo, hi = slice(None, half), slice(half, None)

        def earlier(st):  # every query sees the early half of the key block
            return merge_partials(*st, *fwd(q, k[:, lo], v[:, lo], False, qs, _cut(ks, lo)))

        def later(st):  # only the late query half sees the block (all of it)
            out, lse = st
            o_hi, l_hi = merge_partials(out[:, hi], lse[:, :, hi],
                                *fwd(q[:, hi], k, v, False, _cut(qs, hi), ks))
            return out.at[:, hi].set(o_hi), lse.at[:, :, hi].set(l_hi)

        branches = [own, earlier, later]
    if isinstance(rel, int):
        return branches[rel](state)
    return lax.switch(rel, branches, state)


def ring_bwd_step(rel, grads, kv, q, qs, do, out, lse, delta, layout, kernels: RingBlocks):
    """Accumulate ``(dq, dk, dv)`` (float32) of one ring step; ``rel``, ``kv`` and ``qs`` as in
    :func:`ring_fwd_step`."""
    k, v, ks = kv
    bwd = kernels.bwd
    f32 = lambda x: x.astype(jnp.float32)

    def add(g, upd):
        return tuple(a + f32(b) for a, b in zip(g, upd))

    def own(g):
        return add(g, bwd(q, k, v, do, out, lse, delta, True, qs, ks))

    def earlier_all(g):
        return add(g, bwd(q, k, v, do, out, lse, delta, False, qs, ks))

    if layout == "contiguous":
        branches = [own, earlier_all, lambda g: g]
    else:
        half = q.shape[1] // 2
        lo, hi = slice(None, half), slice(half, None)

        def earlier(g):
            dq, dk, dv = g
            a, b, c = bwd(q, k[:, lo], v[:, lo], do, out, lse, delta, False, qs, _cut(ks, lo))
            return dq + f32(a), dk.at[:, lo].add(f32(b)), dv.at[:, lo].add(f32(c))

        def later(g):
            dq, dk, dv = g
            a, b, c = bwd(q[:, hi], k, v, do[:, hi], out[:, hi], lse[:, :, hi],
                          None if delta is None else delta[:, :, hi], False, _cut(qs, hi), ks)
            return dq.at[:, hi].add(f32(a)), dk + f32(b), dv + f32(c)

        branches = [own, earlier, later]
    if isinstance(rel, int):
        return branches[rel](grads)
    return lax.switch(rel, branches, grads)


def ring_blocks_forward(q, k, v, seg, axis_name, layout, kernels: RingBlocks):
    """The forward ring with block kernels ``kernels``: ``(out [B, T, H, Dh] in q.dtype,
    lse [B, H, T] fp32)``. K/V (and their segment ids) travel one hop per step; each step's
    ppermute is issued before the step's compute so the two can overlap. Shared by the GPU blocks
    (:func:`ring_block_kernels`) and the TPU splash blocks (``attention_cp_tpu``)."""
    n, idx, perm = ring_meta(axis_name)
    # Initial state built from q so that, inside shard_map, it varies over the same mesh axes.
    out = jnp.zeros_like(q, jnp.float32)
    lse = jnp.moveaxis(out[..., 0], 1, 2) + NEG_INF
    step = functools.partial(ring_fwd_step, q=q, qs=seg, layout=layout, kernels=kernels)
    kv = (k, v, seg)  # key segment ids travel with their block
    nxt = lax.ppermute(kv, axis_name, perm) if n > 1 else kv
    state = step(0, (out, lse), kv)

    def body(s, carry):
        state, kv = carry
        nxt = lax.ppermute(kv, axis_name, perm)  # issued before the compute: overlappable
        state = step(ring_source(idx, s, n)[1], state, kv)
        return state, nxt

    if n > 1:
        state, kv = lax.fori_loop(1, n - 1, body, (state, nxt))
        state = step(ring_source(idx, n - 1, n)[1], state, kv)
    out, lse = state
    return out.astype(q.dtype), lse


def ring_blocks_backward(q, k, v, seg, out, lse, do, delta, axis_name, layout, kernels: RingBlocks):
    """The backward ring of :func:`ring_blocks_forward`: ``(dq, dk, dv, dseg)`` in the inputs'
    dtypes. The K/V gradients travel with their block and take an n-th hop back to the owner."""
    n, idx, perm = ring_meta(axis_name)
    step = functools.partial(ring_bwd_step, q=q, qs=seg, do=do, out=out, lse=lse, delta=delta,
                             layout=layout, kernels=kernels)
    kv = (k, v, seg)
    grads = (jnp.zeros_like(q, jnp.float32), jnp.zeros_like(k, jnp.float32),
             jnp.zeros_like(v, jnp.float32))
    nxt = lax.ppermute(kv, axis_name, perm) if n > 1 else kv
    dq, dk, dv = step(0, grads, kv)

    def body(s, carry):
        dq, dkv, kv = carry
        dkv = lax.ppermute(dkv, axis_name, perm)  # the gradients follow their K/V block
        nxt = lax.ppermute(kv, axis_name, perm)
        dq, dk, dv = step(ring_source(idx, s, n)[1], (dq,) + dkv, kv)
        return dq, (dk, dv), nxt

    dkv = (dk, dv)
    if n > 1:
        dq, dkv, kv = lax.fori_loop(1, n - 1, body, (dq, dkv, nxt))
        dkv = lax.ppermute(dkv, axis_name, perm)
        dq, dk, dv = step(ring_source(idx, n - 1, n)[1], (dq,) + dkv, kv)
        dkv = lax.ppermute((dk, dv), axis_name, perm)  # n-th hop: back to the owner
    dk, dv = dkv
    dseg = None if seg is None else np.zeros(seg.shape, jax.dtypes.float0)  # integer input
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), dseg


def _ring_flash_fwd_impl(q, k, v, seg, axis_name, layout, scale, blocks):
    return ring_blocks_forward(q, k, v, seg, axis_name, layout, ring_block_kernels(blocks, scale))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def _ring_flash(q, k, v, seg, axis_name, layout, scale, blocks):
    return _ring_flash_fwd_impl(q, k, v, seg, axis_name, layout, scale, blocks)[0]


def _ring_flash_fwd(q, k, v, seg, axis_name, layout, scale, blocks):
    out, lse = _ring_flash_fwd_impl(q, k, v, seg, axis_name, layout, scale, blocks)
    return out, (q, k, v, seg, out, lse)


def _ring_flash_bwd(axis_name, layout, scale, blocks, res, dout):
    q, k, v, seg, out, lse = res
    # cuDNN's backward forms rowsum(dO * O) itself from ``out``; the Pallas kernels take it.
    delta = None if blocks == "cudnn" else flash_delta(out, dout)
    return ring_blocks_backward(q, k, v, seg, out, lse, dout.astype(q.dtype), delta, axis_name, layout,
                                ring_block_kernels(blocks, scale))


_ring_flash.defvjp(_ring_flash_fwd, _ring_flash_bwd)


def ring_blocks_unsupported_reason(q: jax.Array, k: jax.Array, layout: str = "contiguous"
                                   ) -> Optional[str]:
    """Why the cuDNN block kernels cannot serve this ring (``None`` when they can): a GPU,
    bfloat16/float16, a head dim cuDNN takes, even block lengths (cuDNN's backward), and the private
    JAX functions of :mod:`ttt_jax.ops.kernels.cudnn_blocks`."""
    reason = cudnn_unsupported_reason(q)
    if reason is not None:
        return reason
    t = q.shape[1]
    if t % 2 or (layout == "zigzag" and t % 4):
        return f"cuDNN's backward needs even block lengths, got T_local = {t} ({layout})"
    return private_api_problem()


def choose_ring_blocks(q: jax.Array, k: jax.Array, layout: str = "contiguous",
                       segmented: bool = False) -> str:
    """``"cudnn"`` where :func:`ring_blocks_unsupported_reason` finds nothing and there are no
    segment ids, else ``"pallas"``."""
    if segmented:
        return "pallas"
    return "cudnn" if ring_blocks_unsupported_reason(q, k, layout) is None else "pallas"


def ring_flash_attention(q: jax.Array, k: jax.Array, v: jax.Array, axis_name: str, *,
                         layout: str = "contiguous", scale: float, interpret: bool = False,
                         blocks: Optional[str] = None,
                         segment_ids: Optional[jax.Array] = None) -> jax.Array:
    """Full causal ring attention with fused block kernels (inside ``shard_map``).

    Args:
      q: ``[B, T_local, H, Dh]``; k, v: ``[B, T_local, KV, Dh]``.
      axis_name: the context mesh axis.
      layout: ``"contiguous"`` or ``"zigzag"``.
      scale: logit scale.
      interpret: run the Pallas kernels in interpret mode (CPU tests); implies ``blocks="pallas"``.
      blocks: the per-pair kernels, ``"cudnn"`` (:mod:`ttt_jax.ops.kernels.cudnn_blocks`) or ``"pallas"``
        (:mod:`ttt_jax.ops.kernels.flash`); ``None`` picks cuDNN where it can run
        (:func:`choose_ring_blocks`).
      segment_ids: optional ``[B, T_local]`` int document ids of the local positions (packed
        documents; a query sees a key only when their ids are equal and non-zero). They travel with
        their K/V block; only the Pallas blocks take them.

    Returns:
      ``[B, T_local, H, Dh]`` in ``q.dtype``; differentiable (custom VJP, backward ring).
    """
    check_layout(layout, q.shape[1])
    if segment_ids is not None:
        if blocks == "cudnn":
            raise ValueError("ring_flash_attention: the cuDNN block kernels take no segment ids; "
                             "use blocks='pallas'")
        segment_ids = jnp.asarray(segment_ids, jnp.int32)
        if segment_ids.shape != q.shape[:2]:
            raise ValueError(f"ring_flash_attention: segment_ids must be [B, T_local] = {q.shape[:2]}, "
                             f"got {segment_ids.shape}")
    if interpret:
        if blocks not in (None, "pallas"):
            raise ValueError(f"ring_flash_attention: interpret=True runs the Pallas kernels, not {blocks!r}")
        blocks = "interpret"
    elif blocks is None:
        blocks = choose_ring_blocks(q, k, layout, segment_ids is not None)
    elif blocks == "cudnn":
        reason = ring_blocks_unsupported_reason(q, k, layout)
        if reason is not None:
            raise ValueError(f"ring_flash_attention: the cuDNN block kernels cannot run here: {reason}")
    elif blocks != "pallas":
        raise ValueError(f"ring_flash_attention: blocks={blocks!r} is not 'cudnn' or 'pallas'")
    return _ring_flash(q, k, v, segment_ids, axis_name, layout, float(scale), blocks)
