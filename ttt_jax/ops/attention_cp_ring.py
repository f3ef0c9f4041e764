"""Full causal attention over a sequence split across the ``context`` mesh axis, in plain XLA.

Called *inside* ``jax.shard_map`` with ``axis_name`` (usually ``"context"``) manual, on per-device
blocks ``q [B, T_local, H, Dh]``, ``k, v [B, T_local, KV, Dh]``, ``segment_ids [B, T_local]``
(optional), in the ``"contiguous"`` or ``"zigzag"`` layout of :mod:`parallel.layout`. Semantics,
dtypes and the dispatcher: :mod:`ttt_jax.ops.attention_cp`; the mask is
:func:`ttt_jax.ops.attention_reference.position_mask`.

* :func:`ring_attention`: K/V blocks (and their segment ids) travel around the ring with
  ``lax.ppermute``; after ``n`` steps every query block has seen every key block, merged with an
  online softmax. Blocks entirely in the future are skipped (``lax.switch``), so in the contiguous
  layout device ``i`` computes ``i + 1`` blocks; in the zigzag layout every device computes one
  diagonal block and ``n - 1`` half blocks. Each block is processed in key sub-blocks
  (``block_size``), so scores take ``O(T_local * block_size)``. Memory per device is
  ``O(T_local)`` for K/V, in the forward *and* the backward pass: a ``jax.custom_vjp`` runs a
  second ring in the backward pass, where the K/V gradients travel with their blocks and arrive
  home after ``n`` hops. Communication: ``n - 1`` K/V block hops forward, ``n - 1`` K/V plus ``n``
  dK/dV block hops backward; each K/V hop is issued before the compute of the current block, so
  XLA can overlap the two.
* :func:`allgather_attention`: one ``all_gather`` of K/V (``[B, T, KV, Dh]`` per device) and a dense
  masked softmax of the local queries against all keys; autodiff backward (``psum_scatter`` of
  dK/dV). Lower latency for few devices and short sequences, but K/V memory ``O(T)`` and score
  memory ``O(T_local * T)`` per device -- not for long contexts.

:func:`ring_meta` and :func:`ring_source` (who sends to whom, whose block arrives at each step) are
shared with the fused ring of :mod:`ttt_jax.ops.attention_cp_fused`.
"""

from __future__ import annotations

import functools
import math
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from ttt_jax.parallel.layout import Layout, check_layout, global_positions
from ttt_jax.ops.attention_reference import (NEG_INF, check_qkv, gqa_scores, masked_attention,
                                             position_mask, split_heads)


# Online-softmax state of a query block: m (running max), l (running sum), acc (running numerator),
# m, l: [B, KV, G, Tq], acc: [B, KV, G, Tq, Dh], all float32.


def _fwd_dense(state, q5, k, v, q_pos, k_pos, q_seg, k_seg, scale):
    """Fold one key block into the online-softmax state of a query block (``[Tq, Tk]`` scores)."""
    m, l, acc = state
    s = gqa_scores(q5, k, scale)
    mask = position_mask(q_pos, k_pos, q_seg, k_seg, 0)
    s = jnp.where(mask, s, NEG_INF)
    m_new = jnp.maximum(m, jnp.max(s, axis=-1))
    corr = jnp.exp(m - m_new)
    p = jnp.where(mask, jnp.exp(s - m_new[..., None]), 0.0)
    l = l * corr + jnp.sum(p, axis=-1)
    acc = acc * corr[..., None] + jnp.einsum("bhgqk,bkhd->bhgqd", p.astype(v.dtype), v,
                                             preferred_element_type=jnp.float32)
    return m_new, l, acc


def _bwd_dense(q5, k, v, do5, lse, delta, q_pos, k_pos, q_seg, k_seg, scale):
    """Gradients of one (query block, key block) pair; returns ``(dq5, dk, dv)`` in float32.

    do5: ``[B, KV, G, Tq, Dh]`` output cotangent; lse, delta: ``[B, KV, G, Tq]``."""
    s = gqa_scores(q5, k, scale)
    mask = position_mask(q_pos, k_pos, q_seg, k_seg, 0)
    p = jnp.where(mask, jnp.exp(jnp.where(mask, s, NEG_INF) - lse[..., None]), 0.0)
    dv = jnp.einsum("bhgqk,bhgqd->bkhd", p, do5, preferred_element_type=jnp.float32)
    dp = jnp.einsum("bhgqd,bkhd->bhgqk", do5, v.astype(jnp.float32), preferred_element_type=jnp.float32)
    ds = p * (dp - delta[..., None]) * scale
    dq5 = jnp.einsum("bhgqk,bkhd->bqhgd", ds, k.astype(jnp.float32), preferred_element_type=jnp.float32)
    dk = jnp.einsum("bhgqk,bqhgd->bkhd", ds, q5.astype(jnp.float32), preferred_element_type=jnp.float32)
    return dq5, dk, dv


def largest_divisor(t: int, at_most: int) -> int:
    """The largest divisor of ``t`` that is at most ``at_most`` (block lengths that tile ``t``)."""
    return max(c for c in range(1, min(t, at_most) + 1) if t % c == 0)


def _key_chunks(k, v, k_pos, k_seg, chunk):
    """Split a key block ``[B, Tk, ...]`` into ``[Tk / chunk, B, chunk, ...]`` scan operands."""
    def split(x):
        return jnp.moveaxis(x.reshape(x.shape[0], -1, chunk, *x.shape[2:]), 1, 0)
    return (split(k), split(v), jnp.asarray(k_pos).reshape(-1, chunk),
            None if k_seg is None else split(k_seg))


def _fwd_block(state, q5, k, v, q_pos, k_pos, q_seg, k_seg, scale, chunk):
    """:func:`_fwd_dense` over key sub-blocks of ``<= chunk`` keys: ``O(Tq * chunk)`` scores."""
    c = largest_divisor(k.shape[1], chunk)
    if c == k.shape[1]:
        return _fwd_dense(state, q5, k, v, q_pos, k_pos, q_seg, k_seg, scale)

    def body(st, x):
        kc, vc, pc, sc = x
        return _fwd_dense(st, q5, kc, vc, q_pos, pc, q_seg, sc, scale), None

    return lax.scan(body, state, _key_chunks(k, v, k_pos, k_seg, c))[0]


def _bwd_block(q5, k, v, do5, lse, delta, q_pos, k_pos, q_seg, k_seg, scale, chunk):
    """:func:`_bwd_dense` over key sub-blocks of ``<= chunk`` keys."""
    c = largest_divisor(k.shape[1], chunk)
    if c == k.shape[1]:
        return _bwd_dense(q5, k, v, do5, lse, delta, q_pos, k_pos, q_seg, k_seg, scale)

    def body(dq, x):
        kc, vc, pc, sc = x
        a, dk, dv = _bwd_dense(q5, kc, vc, do5, lse, delta, q_pos, pc, q_seg, sc, scale)
        return dq + a, (dk, dv)

    dq, (dk, dv) = lax.scan(body, jnp.zeros_like(q5, jnp.float32), _key_chunks(k, v, k_pos, k_seg, c))
    unsplit = lambda x: jnp.moveaxis(x, 0, 1).reshape(k.shape)
    return dq, unsplit(dk), unsplit(dv)


def _seg_slice(seg, sl):
    return None if seg is None else seg[:, sl]


def _slice_state(state, sl):
    return tuple(x[:, :, :, sl] for x in state)


def _merge_state(first, second):
    return tuple(jnp.concatenate([a, b], axis=3) for a, b in zip(first, second))


def _ring_forward_step(rel, state, q5, kv, q_pos, k_pos, q_seg, layout, scale, chunk):
    """One ring step. ``rel``: 0 = own block, 1 = block from an earlier device, 2 = later device."""
    k, v, k_seg = kv
    full = lambda st: _fwd_block(st, q5, k, v, q_pos, k_pos, q_seg, k_seg, scale, chunk)
    if layout == "contiguous":
        branches = [full, full, lambda st: st]
    else:
        half = q5.shape[1] // 2
        lo, hi = slice(0, half), slice(half, None)

        def earlier(st):  # every query sees the key block's early half only
            return _fwd_block(st, q5, k[:, lo], v[:, lo], q_pos, k_pos[lo], q_seg, _seg_slice(k_seg, lo),
                              scale, chunk)

        def later(st):  # only the late query half sees anything (all of the key block)
            upd = _fwd_block(_slice_state(st, hi), q5[:, hi], k, v, q_pos[hi], k_pos,
                             _seg_slice(q_seg, hi), k_seg, scale, chunk)
            return _merge_state(_slice_state(st, lo), upd)

        branches = [full, earlier, later]
    if isinstance(rel, int):
        return branches[rel](state)
    return lax.switch(rel, branches, state)


def _ring_backward_step(rel, grads, q5, do5, lse, delta, kv, q_pos, k_pos, q_seg, layout, scale,
                        chunk):
    """Accumulate ``(dq5, dk, dv)`` for one ring step (``rel`` as in the forward step)."""
    k, v, k_seg = kv

    def full(g):
        dq, dk, dv = g
        a, b, c = _bwd_block(q5, k, v, do5, lse, delta, q_pos, k_pos, q_seg, k_seg, scale, chunk)
        return dq + a, dk + b, dv + c

    if layout == "contiguous":
        branches = [full, full, lambda g: g]
    else:
        half = q5.shape[1] // 2
        lo, hi = slice(0, half), slice(half, None)

        def earlier(g):
            dq, dk, dv = g
            a, b, c = _bwd_block(q5, k[:, lo], v[:, lo], do5, lse, delta, q_pos, k_pos[lo], q_seg,
                                 _seg_slice(k_seg, lo), scale, chunk)
            return dq + a, dk.at[:, lo].add(b), dv.at[:, lo].add(c)

        def later(g):
            dq, dk, dv = g
            a, b, c = _bwd_block(q5[:, hi], k, v, do5[:, :, :, hi], lse[:, :, :, hi],
                                 delta[:, :, :, hi], q_pos[hi], k_pos, _seg_slice(q_seg, hi), k_seg,
                                 scale, chunk)
            return dq.at[:, hi].add(a), dk + b, dv + c

        branches = [full, earlier, later]
    if isinstance(rel, int):
        return branches[rel](grads)
    return lax.switch(rel, branches, grads)


def ring_meta(axis_name):
    """``(n, this device's index, the ring permutation i -> i + 1)``."""
    n = lax.axis_size(axis_name)
    idx = lax.axis_index(axis_name)
    perm = [(j, (j + 1) % n) for j in range(n)]
    return n, idx, perm


def ring_source(idx, s, n):
    """Device whose K/V block this device holds at ring step ``s``, and its relation (0/1/2)."""
    j = (idx - s) % n
    rel = jnp.where(j == idx, 0, jnp.where(j < idx, 1, 2)).astype(jnp.int32)
    return j, rel


def _ring_fwd_impl(q, k, v, seg, axis_name, layout, scale, chunk):
    b, t, h, d = q.shape
    kv_heads = k.shape[2]
    n, idx, perm = ring_meta(axis_name)
    q5 = split_heads(q, kv_heads)
    q_pos = global_positions(idx, t, n, layout)
    # Initial state built from q so that, inside shard_map, it varies over the same mesh axes.
    acc = jnp.zeros_like(jnp.moveaxis(q5, 1, 3), jnp.float32)  # [B, KV, G, T, Dh]
    state = (acc[..., 0] + NEG_INF, acc[..., 0], acc)
    kv = (k, v, seg)
    step = functools.partial(_ring_forward_step, q5=q5, q_pos=q_pos, q_seg=seg, layout=layout,
                             scale=scale, chunk=chunk)
    nxt = lax.ppermute(kv, axis_name, perm) if n > 1 else kv
    state = step(0, state, kv=kv, k_pos=q_pos)

    def body(s, carry):
        state, kv = carry
        nxt = lax.ppermute(kv, axis_name, perm)  # issued before the compute: overlappable
        j, rel = ring_source(idx, s, n)
        state = step(rel, state, kv=kv, k_pos=global_positions(j, t, n, layout))
        return state, nxt

    if n > 1:
        state, kv = lax.fori_loop(1, n - 1, body, (state, nxt))
        j, rel = ring_source(idx, n - 1, n)
        state = step(rel, state, kv=kv, k_pos=global_positions(j, t, n, layout))
    m, l, acc = state
    out5 = acc / jnp.where(l == 0, 1.0, l)[..., None]  # [B, KV, G, T, Dh]
    lse = jnp.where(l == 0, 0.0, m + jnp.log(jnp.where(l == 0, 1.0, l)))
    out = jnp.moveaxis(out5, 3, 1).reshape(b, t, h, d).astype(q.dtype)
    return out, lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def _ring_attention(q, k, v, seg, axis_name, layout, scale, chunk):
    return _ring_fwd_impl(q, k, v, seg, axis_name, layout, scale, chunk)[0]


def _ring_attention_fwd(q, k, v, seg, axis_name, layout, scale, chunk):
    out, lse = _ring_fwd_impl(q, k, v, seg, axis_name, layout, scale, chunk)
    return out, (q, k, v, seg, out, lse)


def _ring_attention_bwd(axis_name, layout, scale, chunk, res, dout):
    q, k, v, seg, out, lse = res
    b, t, h, d = q.shape
    kv_heads = k.shape[2]
    n, idx, perm = ring_meta(axis_name)
    q5 = split_heads(q, kv_heads)
    to5 = lambda x: jnp.moveaxis(split_heads(x.astype(jnp.float32), kv_heads), 1, 3)
    do5 = to5(dout)  # [B, KV, G, T, Dh]
    delta = jnp.sum(do5 * to5(out), axis=-1)
    q_pos = global_positions(idx, t, n, layout)
    step = functools.partial(_ring_backward_step, q5=q5, do5=do5, lse=lse, delta=delta, q_pos=q_pos,
                             q_seg=seg, layout=layout, scale=scale, chunk=chunk)
    kv = (k, v, seg)
    dq = jnp.zeros_like(q5, jnp.float32)
    dkv = (jnp.zeros_like(k, jnp.float32), jnp.zeros_like(v, jnp.float32))
    nxt = lax.ppermute(kv, axis_name, perm) if n > 1 else kv
    dq, dk, dv = step(0, (dq,) + dkv, kv=kv, k_pos=q_pos)
    dkv = (dk, dv)

    def body(s, carry):
        dq, dkv, kv = carry
        dkv = lax.ppermute(dkv, axis_name, perm)  # the gradients follow their K/V block
        nxt = lax.ppermute(kv, axis_name, perm)
        j, rel = ring_source(idx, s, n)
        dq, dk, dv = step(rel, (dq,) + dkv, kv=kv, k_pos=global_positions(j, t, n, layout))
        return dq, (dk, dv), nxt

    if n > 1:
        dq, dkv, kv = lax.fori_loop(1, n - 1, body, (dq, dkv, nxt))
        dkv = lax.ppermute(dkv, axis_name, perm)
        j, rel = ring_source(idx, n - 1, n)
        dq, dk, dv = step(rel, (dq,) + dkv, kv=kv, k_pos=global_positions(j, t, n, layout))
        dkv = lax.ppermute((dk, dv), axis_name, perm)  # n-th hop: back to the owner
    dk, dv = dkv
    dq = dq.reshape(q.shape).astype(q.dtype)
    return dq, dk.astype(k.dtype), dv.astype(v.dtype), None


_ring_attention.defvjp(_ring_attention_fwd, _ring_attention_bwd)


def ring_attention(q: jax.Array, k: jax.Array, v: jax.Array, axis_name: str, *,
                   segment_ids: Optional[jax.Array] = None, layout: Layout = "contiguous",
                   scale: Optional[float] = None, block_size: int = 512) -> jax.Array:
    """Full causal attention across context shards by ring exchange of K/V (inside ``shard_map``).

    Args:
      q: ``[B, T_local, H, Dh]`` this device's queries; k, v: ``[B, T_local, KV, Dh]``.
      axis_name: the context mesh axis.
      segment_ids: optional ``[B, T_local]`` int (0 = padding); documents may span devices.
      layout: ``"contiguous"`` or ``"zigzag"`` (:mod:`parallel.layout`; ``T_local`` even).
      scale: logit scale, default ``1 / sqrt(Dh)``.
      block_size: each K/V block is processed in sub-blocks of the largest divisor of its length
        that is ``<= block_size`` keys, so scores take ``O(B * H * T_local * block_size)`` memory.

    Returns:
      ``[B, T_local, H, Dh]`` in ``q.dtype``: this device's queries attended over the global
      causal prefix. Differentiable (custom VJP with a backward ring).
    """
    check_qkv(q, k, v, segment_ids, "ring_attention")
    check_layout(layout, q.shape[1])
    if not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"ring_attention: block_size must be a positive int, got {block_size!r}")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    return _ring_attention(q, k, v, segment_ids, axis_name, layout, scale, block_size)


# --------------------------------------------------------------------------------------------------
# All-gather attention
# --------------------------------------------------------------------------------------------------


def allgather_attention(q: jax.Array, k: jax.Array, v: jax.Array, axis_name: str, *,
                        segment_ids: Optional[jax.Array] = None, layout: Layout = "contiguous",
                        scale: Optional[float] = None) -> jax.Array:
    """Full causal attention across context shards by all-gathering K/V (inside ``shard_map``).

    Same arguments and result as :func:`ring_attention`. Gathers ``[B, T, KV, Dh]`` K/V on every
    device and builds ``[B, H, T_local, T]`` scores: for few devices / short sequences.
    """
    check_qkv(q, k, v, segment_ids, "allgather_attention")
    t = q.shape[1]
    check_layout(layout, t)
    n = lax.axis_size(axis_name)
    k_all, v_all = lax.all_gather((k, v), axis_name, axis=1, tiled=True)
    seg_all = None if segment_ids is None else lax.all_gather(segment_ids, axis_name, axis=1, tiled=True)
    k_pos = np.concatenate([global_positions(j, t, n, layout) for j in range(n)])
    q_pos = global_positions(lax.axis_index(axis_name), t, n, layout)
    return masked_attention(q, k_all, v_all, q_pos, jnp.asarray(k_pos), q_segment_ids=segment_ids,
                            k_segment_ids=seg_all, scale=scale)
