"""Causal attention over a sequence split across the ``context`` mesh axis.

All functions except :func:`reference_attention`, :func:`to_zigzag` and :func:`from_zigzag` are
called *inside* ``jax.shard_map`` with ``axis_name`` (usually ``"context"``) manual, on per-device
blocks::

    q: [B, T_local, H, Dh]    k, v: [B, T_local, KV, Dh]    segment_ids: [B, T_local] (optional)

with ``H % KV == 0`` (GQA: query head ``h`` uses kv head ``h // (H // KV)``). ``n =
axis_size(axis_name)`` devices hold a global sequence of ``T = n * T_local`` tokens.

Semantics (the same as ``ttt_jax.ops.attention``): query ``t`` sees key ``s`` iff ``s <= t`` in
*global* positions, ``s > t - window`` when ``window > 0`` (the window counts the query itself), and,
with segment ids, ``seg[s] == seg[t] != 0`` (same id, not same run; 0 = padding). A query that sees
no key (padding) outputs exactly 0, with zero gradient. Scores, softmax statistics and accumulators
are float32; matmuls take the input dtype with float32 accumulation; outputs are ``q.dtype``.

Layouts
-------
* ``"contiguous"``: device ``i`` holds global positions ``[i * T_local, (i + 1) * T_local)``.
* ``"zigzag"`` (load-balanced causal attention): the sequence is cut into ``2n`` segments of
  ``S = T_local / 2``; device ``i`` holds segment ``i`` then segment ``2n - 1 - i``, so every device
  has the same amount of causal work. :func:`to_zigzag` permutes a global ``[B, T, ...]`` array
  into this order (shard the result contiguously), :func:`from_zigzag` undoes it.
  :func:`local_positions` gives the global position of every local token (use it for RoPE).

Full causal attention
---------------------
* :func:`ring_attention` (default of :func:`context_attention`): K/V blocks (and their segment
  ids) travel around the ring with ``lax.ppermute``; after ``n`` steps every query block has seen
  every key block, merged with an online softmax. Blocks entirely in the future are skipped
  (``lax.switch``), so in the contiguous layout device ``i`` computes ``i + 1`` blocks; in the
  zigzag layout every device computes one diagonal block and ``n - 1`` half blocks. Each block is
  processed in key sub-blocks (``block_size``), so scores take ``O(T_local * block_size)``. Memory
  per device is ``O(T_local)`` for K/V, in the forward *and* the backward pass: a ``jax.custom_vjp``
  runs a second ring in the backward pass, where the K/V gradients travel with their blocks and
  arrive home after ``n`` hops. Communication: ``n - 1`` K/V block hops forward, ``n - 1`` K/V
  plus ``n`` dK/dV block hops backward; each K/V hop is issued before the compute of the current
  block, so XLA can overlap the two.
* :func:`allgather_attention`: one ``all_gather`` of K/V (``[B, T, KV, Dh]`` per device) and a dense
  masked softmax of the local queries against all keys; autodiff backward (``psum_scatter`` of
  dK/dV). Lower latency for few devices and short sequences, but K/V memory ``O(T)`` and score
  memory ``O(T_local * T)`` per device -- not for long contexts.

Sliding window
--------------
:func:`sliding_window_attention`: with ``window - 1 <= T_local`` a query needs keys from its own
block and the last ``window - 1`` keys of the left neighbour only. One ``ppermute`` moves that halo
(device 0 receives zeros, masked by their negative positions); the local attention is blocked over
queries (``block_size``) with rematerialisation, so memory is ``O(T_local * (block + window))``.

Per-device kernels (``kernel=`` of :func:`context_attention`)
------------------------------------------------------------
The functions above compute every block in plain XLA: any backend, segment ids, the reference for
the fast paths -- but on GPUs about 10x slower than a fused kernel. ``kernel="fused"``
(:mod:`parallel.fused_attention`; segment ids only in the ring, with Pallas blocks) keeps the
same collectives and replaces the
per-device compute:

* ring: each (query block, key block) pair is one fused kernel call that returns the block's
  log-sum-exp and whose backward takes the merged one -- what the ring's online softmax and its
  backward ring need, and what the public cuDNN API does not expose. cuDNN's own kernels, reached
  through JAX's private cuDNN attention functions (:mod:`parallel.cudnn_blocks`), where this JAX has
  them as expected; else the Pallas (Triton) flash kernels of :mod:`parallel.flash`
  (``kernel="pallas"`` forces them);
* sliding window: after the halo exchange, ONE cuDNN call per device on ``[halo | local]`` keys
  with ``halo`` zero queries prepended (equal lengths make cuDNN's top-left causal + window mask
  the global mask); device 0, which has no halo, runs the local-only call (``lax.cond``).

``kernel="auto"`` (the default) takes the fused path where it can run (NVIDIA GPU, bf16/fp16, no
segment ids, block lengths multiples of 16) and the XLA path otherwise -- so CPU and TPU results
are unchanged; :func:`fused_unsupported_reason` says why the fused path was not taken.
"""

from __future__ import annotations

import functools
import math
from typing import Literal, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.ad_checkpoint import checkpoint_name

Layout = Literal["contiguous", "zigzag"]
LAYOUTS = ("contiguous", "zigzag")
ContextImpl = Literal["ring", "allgather"]
CONTEXT_IMPLS = ("ring", "allgather")
ContextKernel = Literal["auto", "xla", "fused", "pallas"]
CONTEXT_KERNELS = ("auto", "xla", "fused", "pallas")
CONTEXT_HALOS = ("single", "split")
# Packed documents (segment ids) in full causal layers: the fused ring runs the Pallas blocks with
# the ids (``kernel="fused"`` / ``"pallas"``). ``"auto"`` takes that path when this is True. It is:
# the segmented ring's GPU-marked tests (values and gradients against the unsharded reference,
# contiguous and zigzag, 4 x H100) pass, and the Qwen3-4B-shape 128k stage-2 run trained with it
# (benchmarks/README.md). False sends packed documents to the XLA ring.
AUTO_FUSED_RING_FOR_SEGMENTS = True

_NEG = -1e30  # finite "minus infinity" for fp32 logits; masked probabilities are zeroed explicitly


# --------------------------------------------------------------------------------------------------
# Layout helpers
# --------------------------------------------------------------------------------------------------


def _zigzag_perm(n: int) -> np.ndarray:
    """Segment order of the zigzag layout: ``[0, 2n-1, 1, 2n-2, ..., n-1, n]``."""
    return np.array([s for i in range(n) for s in (i, 2 * n - 1 - i)])


def _permute_segments(x: jax.Array, n: int, axis: int, perm: np.ndarray, what: str) -> jax.Array:
    axis = axis % x.ndim
    t = x.shape[axis]
    if t % (2 * n):
        raise ValueError(f"{what}: sequence length {t} (axis {axis} of {tuple(x.shape)}) must be "
                         f"divisible by 2 * n = {2 * n} (two segments per device); pad the sequence")
    seg = t // (2 * n)
    xs = x.reshape(*x.shape[:axis], 2 * n, seg, *x.shape[axis + 1:])
    # Host (numpy) arrays stay on the host: the input pipeline permutes batches before placing them.
    xs = np.take(xs, perm, axis=axis) if isinstance(x, np.ndarray) else jnp.take(xs, jnp.asarray(perm), axis=axis)
    return xs.reshape(x.shape)


def to_zigzag(x: jax.Array, n: int, axis: int = 1) -> jax.Array:
    """Reorder a global sequence so that ``n`` contiguous shards hold segments ``i`` and ``2n-1-i``.

    Args:
      x: ``[..., T, ...]`` with the sequence on ``axis`` (default 1: ``[B, T, ...]``),
        ``T % (2n) == 0``.
      n: number of devices along the context axis.
      axis: the sequence axis.

    Returns:
      ``x`` with its ``2n`` segments in the order ``0, 2n-1, 1, 2n-2, ..., n-1, n``.

    Apply it to host or unsharded arrays (the input pipeline is the natural place), or under
    ``AxisType.Auto`` mesh axes. On an array already sharded along the sequence over
    ``AxisType.Explicit`` axes the permutation moves data between devices and JAX raises a
    ``ShardingTypeError``.
    """
    return _permute_segments(x, n, axis, _zigzag_perm(n), "to_zigzag")


def from_zigzag(x: jax.Array, n: int, axis: int = 1) -> jax.Array:
    """Inverse of :func:`to_zigzag` (zigzag order back to sequence order), same arguments."""
    return _permute_segments(x, n, axis, np.argsort(_zigzag_perm(n)), "from_zigzag")


def _positions(dev, t_local: int, n: int, layout: str):
    """Global positions ``[t_local]`` of device ``dev``'s tokens (``dev`` an int or traced scalar)."""
    xp = np if isinstance(dev, (int, np.integer)) else jnp
    local = xp.arange(t_local, dtype=np.int32)
    if layout == "contiguous":
        return dev * t_local + local
    half = t_local // 2
    late = 2 * n - 1 - dev
    return xp.where(local < half, dev * half + local, late * half + (local - half)).astype(np.int32)


def local_positions(axis_name: str, t_local: int, layout: Layout = "contiguous") -> jax.Array:
    """Global positions ``[t_local]`` int32 of this device's tokens (inside ``shard_map``).

    Args:
      axis_name: the context mesh axis.
      t_local: tokens per device (for ``"zigzag"``, even).
      layout: ``"contiguous"`` or ``"zigzag"``.
    """
    _check_layout(layout, t_local)
    return _positions(lax.axis_index(axis_name), t_local, lax.axis_size(axis_name), layout)


def _check_layout(layout: str, t_local: int) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r} is not one of {LAYOUTS}")
    if layout == "zigzag" and t_local % 2:
        raise ValueError(f"the zigzag layout needs an even number of tokens per device (two "
                         f"segments), got T_local={t_local}")


# --------------------------------------------------------------------------------------------------
# Masked attention on explicit positions (reference and local building block)
# --------------------------------------------------------------------------------------------------


def _mask(q_pos, k_pos, q_seg, k_seg, window: int) -> jax.Array:
    """``[B|1, 1, 1, Tq, Tk]`` bool: causal on global positions, keys at negative positions invalid."""
    qp = q_pos[:, None]
    kp = k_pos[None, :]
    mask = (kp <= qp) & (kp >= 0)
    if window > 0:
        mask = mask & (kp > qp - window)
    mask = mask[None]
    if q_seg is not None:
        qs = q_seg[:, :, None]
        mask = mask & (qs == k_seg[:, None, :]) & (qs != 0)
    return mask[:, None, None]


def _split_heads(q: jax.Array, kv_heads: int) -> jax.Array:
    """``[B, T, H, Dh]`` -> ``[B, T, KV, G, Dh]``."""
    b, t, h, d = q.shape
    return q.reshape(b, t, kv_heads, h // kv_heads, d)


def _scores(q5, k, scale):
    return jnp.einsum("bqhgd,bkhd->bhgqk", q5, k, preferred_element_type=jnp.float32) * scale


def masked_attention(q: jax.Array, k: jax.Array, v: jax.Array, q_pos: jax.Array, k_pos: jax.Array, *,
                     q_segment_ids: Optional[jax.Array] = None,
                     k_segment_ids: Optional[jax.Array] = None, window: int = 0,
                     scale: Optional[float] = None) -> jax.Array:
    """Dense masked softmax attention on explicit global positions (no communication).

    Args:
      q: ``[B, Tq, H, Dh]``; k, v: ``[B, Tk, KV, Dh]``.
      q_pos: ``[Tq]`` int global positions of the queries; k_pos: ``[Tk]`` of the keys (keys at
        negative positions are ignored).
      q_segment_ids, k_segment_ids: optional ``[B, Tq]`` / ``[B, Tk]`` int (both or neither).
      window: 0 = full causal; ``> 0`` = sliding window including the query.
      scale: logit scale, default ``1 / sqrt(Dh)``.

    Returns:
      ``[B, Tq, H, Dh]`` in ``q.dtype``. Memory ``O(B * H * Tq * Tk)``.
    """
    if (q_segment_ids is None) != (k_segment_ids is None):
        raise ValueError("masked_attention: pass both q_segment_ids and k_segment_ids, or neither")
    b, tq, h, d = q.shape
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    s = _scores(_split_heads(q, k.shape[2]), k, scale)  # [B, KV, G, Tq, Tk]
    mask = _mask(q_pos, k_pos, q_segment_ids, k_segment_ids, window)
    s = jnp.where(mask, s, _NEG)
    m = jnp.max(s, axis=-1, keepdims=True)
    p = jnp.where(mask, jnp.exp(s - m), 0.0)
    denom = jnp.sum(p, axis=-1, keepdims=True)
    p = p / jnp.where(denom == 0, 1.0, denom)
    out = jnp.einsum("bhgqk,bkhd->bqhgd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return out.reshape(b, tq, h, d).astype(q.dtype)


def reference_attention(q: jax.Array, k: jax.Array, v: jax.Array, *,
                        segment_ids: Optional[jax.Array] = None, window: int = 0,
                        scale: Optional[float] = None) -> jax.Array:
    """Unsharded causal attention, the oracle of the sharded paths.

    Args:
      q: ``[B, T, H, Dh]``; k, v: ``[B, T, KV, Dh]``; segment_ids: optional ``[B, T]`` int.
      window: 0 = full causal; ``> 0`` = sliding window including the query.
      scale: logit scale, default ``1 / sqrt(Dh)``.

    Returns:
      ``[B, T, H, Dh]`` in ``q.dtype``.
    """
    _check_qkv(q, k, v, segment_ids, "reference_attention")
    pos = jnp.arange(q.shape[1], dtype=jnp.int32)
    return masked_attention(q, k, v, pos, pos, q_segment_ids=segment_ids, k_segment_ids=segment_ids,
                            window=window, scale=scale)


def _check_qkv(q, k, v, segment_ids, what: str) -> None:
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"{what}: expected q [B,T,H,Dh], k/v [B,T,KV,Dh]; got q {q.shape}, "
                         f"k {k.shape}, v {v.shape}")
    b, t, h, d = q.shape
    if k.shape != v.shape or k.shape[:2] != (b, t) or k.shape[3] != d:
        raise ValueError(f"{what}: k {k.shape} and v {v.shape} must both be [B={b}, T={t}, KV, Dh={d}] "
                         f"to match q {q.shape}")
    if h % k.shape[2]:
        raise ValueError(f"{what}: query heads ({h}) must be a multiple of kv heads ({k.shape[2]})")
    if segment_ids is not None and tuple(segment_ids.shape) != (b, t):
        raise ValueError(f"{what}: segment_ids must be [B, T] = {(b, t)}, got {tuple(segment_ids.shape)}")


# --------------------------------------------------------------------------------------------------
# Ring attention
# --------------------------------------------------------------------------------------------------
#
# Online-softmax state of a query block: m (running max), l (running sum), acc (running numerator),
# m, l: [B, KV, G, Tq], acc: [B, KV, G, Tq, Dh], all float32.


def _fwd_dense(state, q5, k, v, q_pos, k_pos, q_seg, k_seg, scale):
    """Fold one key block into the online-softmax state of a query block (``[Tq, Tk]`` scores)."""
    m, l, acc = state
    s = _scores(q5, k, scale)
    mask = _mask(q_pos, k_pos, q_seg, k_seg, 0)
    s = jnp.where(mask, s, _NEG)
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
    s = _scores(q5, k, scale)
    mask = _mask(q_pos, k_pos, q_seg, k_seg, 0)
    p = jnp.where(mask, jnp.exp(jnp.where(mask, s, _NEG) - lse[..., None]), 0.0)
    dv = jnp.einsum("bhgqk,bhgqd->bkhd", p, do5, preferred_element_type=jnp.float32)
    dp = jnp.einsum("bhgqd,bkhd->bhgqk", do5, v.astype(jnp.float32), preferred_element_type=jnp.float32)
    ds = p * (dp - delta[..., None]) * scale
    dq5 = jnp.einsum("bhgqk,bkhd->bqhgd", ds, k.astype(jnp.float32), preferred_element_type=jnp.float32)
    dk = jnp.einsum("bhgqk,bqhgd->bkhd", ds, q5.astype(jnp.float32), preferred_element_type=jnp.float32)
    return dq5, dk, dv


def _largest_divisor(t: int, at_most: int) -> int:
    return max(c for c in range(1, min(t, at_most) + 1) if t % c == 0)


def _key_chunks(k, v, k_pos, k_seg, chunk):
    """Split a key block ``[B, Tk, ...]`` into ``[Tk / chunk, B, chunk, ...]`` scan operands."""
    def split(x):
        return jnp.moveaxis(x.reshape(x.shape[0], -1, chunk, *x.shape[2:]), 1, 0)
    return (split(k), split(v), jnp.asarray(k_pos).reshape(-1, chunk),
            None if k_seg is None else split(k_seg))


def _fwd_block(state, q5, k, v, q_pos, k_pos, q_seg, k_seg, scale, chunk):
    """:func:`_fwd_dense` over key sub-blocks of ``<= chunk`` keys: ``O(Tq * chunk)`` scores."""
    c = _largest_divisor(k.shape[1], chunk)
    if c == k.shape[1]:
        return _fwd_dense(state, q5, k, v, q_pos, k_pos, q_seg, k_seg, scale)

    def body(st, x):
        kc, vc, pc, sc = x
        return _fwd_dense(st, q5, kc, vc, q_pos, pc, q_seg, sc, scale), None

    return lax.scan(body, state, _key_chunks(k, v, k_pos, k_seg, c))[0]


def _bwd_block(q5, k, v, do5, lse, delta, q_pos, k_pos, q_seg, k_seg, scale, chunk):
    """:func:`_bwd_dense` over key sub-blocks of ``<= chunk`` keys."""
    c = _largest_divisor(k.shape[1], chunk)
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


def _ring_meta(axis_name):
    """``(n, this device's index, the ring permutation i -> i + 1)``."""
    n = lax.axis_size(axis_name)
    idx = lax.axis_index(axis_name)
    perm = [(j, (j + 1) % n) for j in range(n)]
    return n, idx, perm


def _source(idx, s, n):
    """Device whose K/V block this device holds at ring step ``s``, and its relation (0/1/2)."""
    j = (idx - s) % n
    rel = jnp.where(j == idx, 0, jnp.where(j < idx, 1, 2)).astype(jnp.int32)
    return j, rel


def _ring_fwd_impl(q, k, v, seg, axis_name, layout, scale, chunk):
    b, t, h, d = q.shape
    kv_heads = k.shape[2]
    n, idx, perm = _ring_meta(axis_name)
    q5 = _split_heads(q, kv_heads)
    q_pos = _positions(idx, t, n, layout)
    # Initial state built from q so that, inside shard_map, it varies over the same mesh axes.
    acc = jnp.zeros_like(jnp.moveaxis(q5, 1, 3), jnp.float32)  # [B, KV, G, T, Dh]
    state = (acc[..., 0] + _NEG, acc[..., 0], acc)
    kv = (k, v, seg)
    step = functools.partial(_ring_forward_step, q5=q5, q_pos=q_pos, q_seg=seg, layout=layout,
                             scale=scale, chunk=chunk)
    nxt = lax.ppermute(kv, axis_name, perm) if n > 1 else kv
    state = step(0, state, kv=kv, k_pos=q_pos)

    def body(s, carry):
        state, kv = carry
        nxt = lax.ppermute(kv, axis_name, perm)  # issued before the compute: overlappable
        j, rel = _source(idx, s, n)
        state = step(rel, state, kv=kv, k_pos=_positions(j, t, n, layout))
        return state, nxt

    if n > 1:
        state, kv = lax.fori_loop(1, n - 1, body, (state, nxt))
        j, rel = _source(idx, n - 1, n)
        state = step(rel, state, kv=kv, k_pos=_positions(j, t, n, layout))
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
    n, idx, perm = _ring_meta(axis_name)
    q5 = _split_heads(q, kv_heads)
    to5 = lambda x: jnp.moveaxis(_split_heads(x.astype(jnp.float32), kv_heads), 1, 3)
    do5 = to5(dout)  # [B, KV, G, T, Dh]
    delta = jnp.sum(do5 * to5(out), axis=-1)
    q_pos = _positions(idx, t, n, layout)
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
        j, rel = _source(idx, s, n)
        dq, dk, dv = step(rel, (dq,) + dkv, kv=kv, k_pos=_positions(j, t, n, layout))
        return dq, (dk, dv), nxt

    if n > 1:
        dq, dkv, kv = lax.fori_loop(1, n - 1, body, (dq, dkv, nxt))
        dkv = lax.ppermute(dkv, axis_name, perm)
        j, rel = _source(idx, n - 1, n)
        dq, dk, dv = step(rel, (dq,) + dkv, kv=kv, k_pos=_positions(j, t, n, layout))
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
      layout: ``"contiguous"`` or ``"zigzag"`` (see the module docstring; ``T_local`` even).
      scale: logit scale, default ``1 / sqrt(Dh)``.
      block_size: each K/V block is processed in sub-blocks of the largest divisor of its length
        that is ``<= block_size`` keys, so scores take ``O(B * H * T_local * block_size)`` memory.

    Returns:
      ``[B, T_local, H, Dh]`` in ``q.dtype``: this device's queries attended over the global
      causal prefix. Differentiable (custom VJP with a backward ring).
    """
    _check_qkv(q, k, v, segment_ids, "ring_attention")
    _check_layout(layout, q.shape[1])
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
    _check_qkv(q, k, v, segment_ids, "allgather_attention")
    t = q.shape[1]
    _check_layout(layout, t)
    n = lax.axis_size(axis_name)
    k_all, v_all = lax.all_gather((k, v), axis_name, axis=1, tiled=True)
    seg_all = None if segment_ids is None else lax.all_gather(segment_ids, axis_name, axis=1, tiled=True)
    k_pos = np.concatenate([_positions(j, t, n, layout) for j in range(n)])
    q_pos = _positions(lax.axis_index(axis_name), t, n, layout)
    return masked_attention(q, k_all, v_all, q_pos, jnp.asarray(k_pos), q_segment_ids=segment_ids,
                            k_segment_ids=seg_all, scale=scale)


# --------------------------------------------------------------------------------------------------
# Sliding window with a halo exchange
# --------------------------------------------------------------------------------------------------


def _check_window(window, t: int) -> None:
    if not isinstance(window, int) or window < 1:
        raise ValueError(f"sliding_window_attention: window must be an int >= 1, got {window!r}")
    if window - 1 > t:
        raise ValueError(f"sliding_window_attention: window - 1 = {window - 1} exceeds the {t} tokens "
                         f"per device, so a query would need keys from more than one neighbour; use "
                         f"fewer context devices, a longer sequence, or ring_attention")


def sliding_window_attention(q: jax.Array, k: jax.Array, v: jax.Array, axis_name: str, *, window: int,
                             segment_ids: Optional[jax.Array] = None, scale: Optional[float] = None,
                             block_size: Optional[int] = None) -> jax.Array:
    """Causal sliding-window attention across context shards (contiguous layout, inside ``shard_map``).

    Args:
      q: ``[B, T_local, H, Dh]``; k, v: ``[B, T_local, KV, Dh]``; segment_ids: optional
        ``[B, T_local]``.
      axis_name: the context mesh axis.
      window: keys per query including itself, ``1 <= window <= T_local + 1``.
      scale: logit scale, default ``1 / sqrt(Dh)``.
      block_size: query block of the local attention (default: ``T_local`` up to 512, else the
        largest divisor of ``T_local`` that is at most 512); each block is rematerialised in the
        backward pass.

    Returns:
      ``[B, T_local, H, Dh]`` in ``q.dtype``.
    """
    _check_qkv(q, k, v, segment_ids, "sliding_window_attention")
    t = q.shape[1]
    _check_window(window, t)
    halo = window - 1
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    n = lax.axis_size(axis_name)
    idx = lax.axis_index(axis_name)
    q_pos = _positions(idx, t, n, "contiguous")
    if halo:
        send = (k[:, t - halo:], v[:, t - halo:], None if segment_ids is None else segment_ids[:, t - halo:])
        perm = [(j, j + 1) for j in range(n - 1)]
        hk, hv, hseg = (checkpoint_name(lax.ppermute(send, axis_name, perm), "context_exchange") if n > 1
                        else jax.tree.map(jnp.zeros_like, send))
        k = jnp.concatenate([hk, k], axis=1)
        v = jnp.concatenate([hv, v], axis=1)
        k_seg = None if segment_ids is None else jnp.concatenate([hseg, segment_ids], axis=1)
    else:
        k_seg = segment_ids
    k_pos = idx * t - halo + jnp.arange(t + halo, dtype=jnp.int32)  # device 0's halo: negative

    if block_size is None:
        block_size = _largest_divisor(t, 512)
    if t % block_size:
        raise ValueError(f"sliding_window_attention: block_size={block_size} must divide T_local={t}")
    if block_size == t:
        return masked_attention(q, k, v, q_pos, k_pos, q_segment_ids=segment_ids, k_segment_ids=k_seg,
                                window=window, scale=scale)

    span = block_size + halo

    @jax.checkpoint
    def block(start):
        sl = lambda x: lax.dynamic_slice_in_dim(x, start, block_size, axis=1)
        kl = lambda x: lax.dynamic_slice_in_dim(x, start, span, axis=1)  # keys start `halo` earlier
        return masked_attention(
            sl(q), kl(k), kl(v), lax.dynamic_slice_in_dim(q_pos, start, block_size),
            lax.dynamic_slice_in_dim(k_pos, start, span),
            q_segment_ids=None if segment_ids is None else sl(segment_ids),
            k_segment_ids=None if k_seg is None else kl(k_seg), window=window, scale=scale)

    starts = jnp.arange(0, t, block_size, dtype=jnp.int32)
    out = lax.map(block, starts)  # [nb, B, block, H, Dh]
    return jnp.moveaxis(out, 0, 1).reshape(q.shape)


# --------------------------------------------------------------------------------------------------
# Dispatcher
# --------------------------------------------------------------------------------------------------


def fused_unsupported_reason(q: jax.Array, k: jax.Array, *, segment_ids: Optional[jax.Array] = None,
                             window: int = 0, impl: ContextImpl = "ring",
                             layout: Layout = "contiguous") -> Optional[str]:
    """Why ``kernel="fused"`` cannot run these (per-device) operands here; ``None`` when it can.

    Fused means: one cuDNN call per device for a sliding window (after the halo exchange), cuDNN or
    Pallas flash kernels per ring block for full causal attention (:mod:`parallel.fused_attention`;
    with segment ids the Pallas kernels). For the ring this checks the Pallas kernels'
    requirements: where the cuDNN blocks cannot run, the ring uses the Pallas ones.
    """
    from parallel.flash import flash_unsupported_reason
    from parallel.fused_attention import cudnn_unsupported_reason

    if segment_ids is not None and window:
        return "segment ids (packed documents) with a sliding window have no fused context-parallel kernel"
    if window:
        return cudnn_unsupported_reason(q)
    if impl != "ring":
        return f"context attention impl={impl!r} has no fused kernel (the fused kernels serve the ring)"
    t = q.shape[1]
    if layout == "zigzag":  # half blocks: all queries x the early key half
        return flash_unsupported_reason(q, k[:, : t // 2])
    return flash_unsupported_reason(q, k, causal=True)


def context_attention(q: jax.Array, k: jax.Array, v: jax.Array, axis_name: str, *,
                      segment_ids: Optional[jax.Array] = None, window: int = 0,
                      impl: ContextImpl = "ring", layout: Layout = "contiguous",
                      kernel: ContextKernel = "auto", scale: Optional[float] = None,
                      block_size: Optional[int] = None, halo: str = "single") -> jax.Array:
    """Causal attention of a context-sharded sequence (inside ``shard_map``).

    ``window > 0`` runs the sliding window (halo exchange; contiguous layout only); ``window == 0``
    runs ring attention (``impl="ring"``, the default: ``O(T_local)`` memory, communication
    overlapped with compute -- the choice for long contexts) or :func:`allgather_attention`
    (``impl="allgather"``: one collective, ``O(T)`` memory). Shapes as in :func:`ring_attention`.

    ``kernel`` picks the per-device compute: ``"xla"`` (:func:`ring_attention` /
    :func:`sliding_window_attention`: plain XLA, any backend, segment ids), ``"fused"``
    (:mod:`parallel.fused_attention`: cuDNN -- or, where JAX's private cuDNN functions are not as
    expected, Pallas -- flash kernels per ring block, one cuDNN call for the sliding window; NVIDIA
    GPU, bf16/fp16; segment ids only in the ring, by the Pallas blocks -- an explicit choice that
    cannot run raises ``ValueError`` naming why), ``"pallas"`` (fused, with the Pallas kernels per
    ring block) or ``"auto"`` (fused where it can run, XLA otherwise; so always XLA on CPU/TPU).
    ``block_size`` is passed on to the XLA paths (``None``: their default). ``halo`` picks the
    fused sliding-window computation: ``"single"`` (:func:`parallel.fused_attention.
    halo_window_attention`, one call with zero query rows) or ``"split"``
    (:func:`parallel.halo_attention.halo_split_attention`, a local call plus a halo block; with
    cuDNN blocks it needs an even ``T_local``, with the Pallas ones a multiple of 16, else the
    single call runs).
    """
    if halo not in CONTEXT_HALOS:
        raise ValueError(f"context_attention: halo={halo!r} is not one of {CONTEXT_HALOS}")
    if impl not in CONTEXT_IMPLS:
        raise ValueError(f"context_attention: impl={impl!r} is not one of {CONTEXT_IMPLS}")
    if kernel not in CONTEXT_KERNELS:
        raise ValueError(f"context_attention: kernel={kernel!r} is not one of {CONTEXT_KERNELS}")
    if window and layout != "contiguous":
        raise ValueError("context_attention: sliding-window attention needs the contiguous layout "
                         "(its work is already balanced); got layout='zigzag'")
    _check_qkv(q, k, v, segment_ids, "context_attention")
    _check_layout(layout, q.shape[1])
    if window:
        _check_window(window, q.shape[1])
    if kernel != "xla":
        reason = fused_unsupported_reason(q, k, segment_ids=segment_ids, window=window, impl=impl,
                                          layout=layout)
        if reason is None and segment_ids is not None and kernel == "auto" \
                and not AUTO_FUSED_RING_FOR_SEGMENTS:
            reason = "segment ids: 'auto' keeps packed documents on the XLA ring"
        if reason is not None and kernel != "auto":
            raise ValueError(f"context kernel {kernel!r} cannot run here: {reason}; use 'auto' or 'xla'")
        if reason is None:
            from parallel.fused_attention import (cudnn_window_attention, halo_window_attention,
                                                  ring_flash_attention)
            scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
            if window and halo == "split" and window > 1 and q.shape[1] % 2 == 0:
                from parallel.cudnn_blocks import private_api_problem
                from parallel.halo_attention import halo_split_attention
                blocks = "cudnn" if private_api_problem() is None else "pallas"
                if blocks == "cudnn" or q.shape[1] % 16 == 0:
                    return halo_split_attention(q, k, v, axis_name, window=window, scale=scale,
                                                blocks=blocks)
            if window:
                local = functools.partial(cudnn_window_attention, window=window, scale=scale)
                return halo_window_attention(q, k, v, axis_name, window=window, local_attention=local)
            return ring_flash_attention(q, k, v, axis_name, layout=layout, scale=scale,
                                        blocks="pallas" if kernel == "pallas" else None,
                                        segment_ids=segment_ids)
    if window:
        return sliding_window_attention(q, k, v, axis_name, window=window, segment_ids=segment_ids,
                                        scale=scale, block_size=block_size)
    if impl == "allgather":
        return allgather_attention(q, k, v, axis_name, segment_ids=segment_ids, layout=layout,
                                   scale=scale)
    kwargs = {} if block_size is None else {"block_size": block_size}
    return ring_attention(q, k, v, axis_name, segment_ids=segment_ids, layout=layout, scale=scale,
                          **kwargs)
