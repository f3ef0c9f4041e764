"""Causal sliding-window attention across context shards: one halo exchange, then local attention.

Called inside ``jax.shard_map`` over the context axis, contiguous layout, on per-device blocks
``q [B, T_local, H, Dh]``, ``k, v [B, T_local, KV, Dh]``. With ``window - 1 <= T_local`` a query
needs keys from its own block and the last ``window - 1`` keys of the left neighbour only. One
``ppermute`` moves that halo (device 0 has no left neighbour); its result is named
:data:`~ttt_jax.ops.checkpoint_names.CONTEXT_EXCHANGE` for remat policies.

* :func:`sliding_window_attention` (XLA, any backend, segment ids): device 0 receives zeros, masked
  by their negative positions; the local attention is blocked over queries (``block_size``) with
  rematerialisation, so memory is ``O(T_local * (block + window))``.
* :func:`halo_window_attention` (the fused single call): ONE call of a local equal-length
  causal+window kernel (cuDNN on GPU) over keys ``[halo | local]`` (length ``halo + T_local``)
  and queries ``[halo zero rows | local]`` of the same length, so the kernel's top-left aligned
  causal mask with window ``window`` is exactly the global mask; the dummy rows are sliced off
  (zero cotangent). Device 0 runs the local-only call under ``lax.cond``, so no halo key is ever
  visible there. :mod:`ttt_jax.ops.attention_cp_halo` splits the same work into two calls.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import jax
import jax.numpy as jnp
from jax import lax
from jax.ad_checkpoint import checkpoint_name

from ttt_jax.parallel.layout import global_positions
from ttt_jax.ops.attention_cp_ring import largest_divisor
from ttt_jax.ops.attention_reference import check_qkv, masked_attention
from ttt_jax.ops.checkpoint_names import CONTEXT_EXCHANGE

LocalAttention = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]



def check_window(window, t: int) -> None:
    """``ValueError`` unless ``1 <= window <= t + 1`` (the halo comes from one neighbour only)."""
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
    check_qkv(q, k, v, segment_ids, "sliding_window_attention")
    t = q.shape[1]
    check_window(window, t)
    halo = window - 1
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    n = lax.axis_size(axis_name)
    idx = lax.axis_index(axis_name)
    q_pos = global_positions(idx, t, n, "contiguous")
    if halo:
        send = (k[:, t - halo:], v[:, t - halo:], None if segment_ids is None else segment_ids[:, t - halo:])
        perm = [(j, j + 1) for j in range(n - 1)]
        hk, hv, hseg = (checkpoint_name(lax.ppermute(send, axis_name, perm), CONTEXT_EXCHANGE) if n > 1
                        else jax.tree.map(jnp.zeros_like, send))
        k = jnp.concatenate([hk, k], axis=1)
        v = jnp.concatenate([hv, v], axis=1)
        k_seg = None if segment_ids is None else jnp.concatenate([hseg, segment_ids], axis=1)
    else:
        k_seg = segment_ids
    k_pos = idx * t - halo + jnp.arange(t + halo, dtype=jnp.int32)  # device 0's halo: negative

    if block_size is None:
        block_size = largest_divisor(t, 512)
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


def halo_window_attention(q: jax.Array, k: jax.Array, v: jax.Array, axis_name: str, *, window: int,
                          local_attention: LocalAttention) -> jax.Array:
    """Sliding-window attention across context shards with one local kernel call per device.

    Args:
      q: ``[B, T_local, H, Dh]``; k, v: ``[B, T_local, KV, Dh]`` (contiguous layout, no segment ids).
      axis_name: the context mesh axis.
      window: keys per query including itself, ``1 <= window <= T_local + 1`` (checked by the caller).
      local_attention: ``(q, k, v) -> out`` causal attention with this ``window`` (and the logit
        scale) on equal-length, top-left aligned operands -- :func:`ttt_jax.ops.kernels.cudnn_blocks.cudnn_window_attention` on GPU;
        any exact implementation (e.g. the XLA one) in the CPU tests.

    Returns:
      ``[B, T_local, H, Dh]`` in ``q.dtype``. Gradients flow through the halo ``ppermute``: the
      halo's dK/dV return to the left neighbour.
    """
    halo = window - 1
    if halo == 0:
        return local_attention(q, k, v)
    n = lax.axis_size(axis_name)
    t = q.shape[1]
    with jax.named_scope("attention_halo"):
        send = (k[:, t - halo:], v[:, t - halo:])
        perm = [(j, j + 1) for j in range(n - 1)]
        hk, hv = (checkpoint_name(lax.ppermute(send, axis_name, perm), CONTEXT_EXCHANGE) if n > 1
                  else jax.tree.map(jnp.zeros_like, send))

    def with_halo(q, k, v, hk, hv):
        # [halo dummy queries | local]: equal lengths, so top-left causal + window is the global mask.
        with jax.named_scope("attention_halo"):
            qp = jnp.concatenate([jnp.zeros((q.shape[0], halo) + q.shape[2:], q.dtype), q], axis=1)
            kp, vp = jnp.concatenate([hk, k], axis=1), jnp.concatenate([hv, v], axis=1)
        out = local_attention(qp, kp, vp)
        return out[:, halo:]

    def local_only(q, k, v, hk, hv):  # device 0: no left neighbour, the halo is not there
        del hk, hv
        return local_attention(q, k, v)

    if n == 1:
        return local_only(q, k, v, hk, hv)
    return lax.cond(lax.axis_index(axis_name) == 0, local_only, with_halo, q, k, v, hk, hv)
