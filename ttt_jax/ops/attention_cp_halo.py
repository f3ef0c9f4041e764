"""Sliding-window attention across context shards as two kernel calls merged by log-sum-exp.

Call inside ``jax.shard_map`` over the context axis, contiguous layout, no segment ids. Each device
holds ``T`` local positions; with window ``W`` (keys per query, itself included) a query needs the
``h = W - 1`` last keys of the left neighbour (the halo). :func:`ttt_jax.ops.attention_cp_window.
halo_window_attention` computes that as ONE equal-length kernel call over ``[halo | local]`` keys
with ``h`` zero query rows prepended: simple, but under the causal mask those rows compute
``h^2 / 2`` query-key pairs for nothing (``h / 2T`` of the layer's ``T * W`` pairs: 6.25% at
T = 32k, W = 4k), and the call waits for the halo to arrive.

Here instead:

* **local block**: the local queries against the local keys, causal with window ``W`` -- one call,
  which needs nothing from the neighbour, so the halo ``ppermute`` can overlap it;
* **halo block**: the first ``h`` local queries against the ``h`` halo keys. Query ``i`` (global
  position ``g + i``) sees halo key ``j`` (global ``g - h + j``) iff ``(g + i) - (g - h + j) <= h``,
  i.e. ``j >= i``: an upper-triangular mask, which a causal kernel computes after reversing both
  sequences (``j' = h-1-j <= i' = h-1-i``). The reversed block is padded at its end to the kernel's
  length multiple; padded keys sit after every real query (invisible under the causal mask) and
  padded query rows are dropped;
* the two partial results of the first ``h`` rows are merged by their log-sum-exps, as ring
  attention merges blocks. Device 0 has no left neighbour: its halo block's log-sum-exp is set to
  ``-1e30`` (weight 0), so no halo key is ever visible there.

Backward (custom VJP of the two blocks, given the received halo): each block's backward kernel is
called with the *merged* output and log-sum-exp, which gives exactly the gradients of the global
softmax restricted to that block (:mod:`ttt_jax.ops.attention_cp_fused`). The halo exchange itself is an
ordinary ``ppermute`` outside the custom VJP, so autodiff sends the halo keys' gradients back to
the left neighbour, and its result is named ``"context_exchange"`` for remat policies
(``runtime.remat_policy``); so is the halo block's forward result
(:data:`ttt_jax.ops.checkpoint_names.HALO_BLOCK`), which
``save_exchanges`` keeps: the backward pass's recomputation then reruns only the local call.
Work: exactly the pairs the window needs (the local block skips the ``h^2 / 2`` pairs the halo block
computes), plus the merge of ``h`` rows.

Kernels (``blocks``): ``"cudnn"`` (:mod:`ttt_jax.ops.kernels.cudnn_blocks`, GPU), ``"pallas"`` /
``"interpret"`` (:mod:`ttt_jax.ops.kernels.flash`), or ``"dense"`` (plain ``jnp``, any backend: the
reference the CPU tests run the merge, reversal, padding and gradients with).
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.ad_checkpoint import checkpoint_name

from ttt_jax.ops.attention_cp_fused import merge_partials   # the ring's log-sum-exp merge
from ttt_jax.ops.attention_reference import NEG_INF
from ttt_jax.ops.checkpoint_names import CONTEXT_EXCHANGE, HALO_BLOCK
from ttt_jax.ops.kernels.cudnn_blocks import cudnn_block_bwd, cudnn_block_fwd
from ttt_jax.ops.kernels.flash import flash_block_bwd, flash_block_fwd, flash_delta

HALO_BLOCKS = ("cudnn", "pallas", "interpret", "dense")


class _Kernels(NamedTuple):
    """``local_*``: causal + window; ``block_*``: causal. ``fwd(q, k, v) -> (out, lse)``,
    ``bwd(q, k, v, do, out, lse, delta) -> (dq, dk, dv)`` with the *global* ``out``/``lse``/``delta``.
    ``multiple``: the length multiple the kernels need (the halo block is padded to it)."""

    local_fwd: Callable
    local_bwd: Callable
    block_fwd: Callable
    block_bwd: Callable
    multiple: int


def _dense_scores(q, k, v, *, scale, window):
    """fp32 ``(S, mask, K, V)`` of a causal (+ window) block, ``Tq == Tk``, K/V repeated for GQA."""
    rep = q.shape[2] // k.shape[2]
    kk, vv = (jnp.repeat(x.astype(jnp.float32), rep, axis=2) for x in (k, v))
    s = jnp.einsum("bqhd,bkhd->bhqk", q.astype(jnp.float32), kk) * scale
    i, j = jnp.arange(q.shape[1])[:, None], jnp.arange(k.shape[1])[None, :]
    mask = (j <= i) & ((i - j < window) if window else True)
    return s, mask, kk, vv


def _dense_fwd(q, k, v, *, scale, window):
    """Reference causal (+ window) attention with its log-sum-exp."""
    s, mask, _, vv = _dense_scores(q, k, v, scale=scale, window=window)
    s = jnp.where(mask, s, NEG_INF)
    lse = jax.nn.logsumexp(s, axis=-1)                                   # [B, H, Tq]
    p = jnp.exp(s - lse[..., None])
    return jnp.einsum("bhqk,bkhd->bqhd", p, vv).astype(q.dtype), lse


def _dense_bwd(q, k, v, do, out, lse, delta, *, scale, window):
    """Gradients of the global softmax restricted to this block (``P = exp(S - lse)``)."""
    s, mask, kk, vv = _dense_scores(q, k, v, scale=scale, window=window)
    p = jnp.where(mask, jnp.exp(s - lse[..., None]), 0.0)
    do = do.astype(jnp.float32)
    ds = p * (jnp.einsum("bqhd,bkhd->bhqk", do, vv) - delta[..., None]) * scale
    dq = jnp.einsum("bhqk,bkhd->bqhd", ds, kk)
    rep = q.shape[2] // k.shape[2]
    fold = lambda x: x.reshape(x.shape[:2] + (k.shape[2], rep, x.shape[-1])).sum(3)  # GQA heads
    dk = fold(jnp.einsum("bhqk,bqhd->bkhd", ds, q.astype(jnp.float32)))
    dv = fold(jnp.einsum("bhqk,bqhd->bkhd", p, do))
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


def halo_kernels(blocks: str, scale: float, window: int) -> _Kernels:
    """The local (causal + ``window``) and halo (causal) kernels of ``blocks`` (:data:`HALO_BLOCKS`)."""
    if blocks == "cudnn":
        return _Kernels(
            lambda q, k, v: cudnn_block_fwd(q, k, v, causal=True, scale=scale, window=window),
            lambda q, k, v, do, o, l, d: cudnn_block_bwd(q, k, v, do, o, l, causal=True, scale=scale,
                                                         window=window),
            lambda q, k, v: cudnn_block_fwd(q, k, v, causal=True, scale=scale),
            lambda q, k, v, do, o, l, d: cudnn_block_bwd(q, k, v, do, o, l, causal=True, scale=scale),
            2)   # cuDNN's backward needs even lengths
    if blocks in ("pallas", "interpret"):
        it = blocks == "interpret"
        return _Kernels(
            lambda q, k, v: flash_block_fwd(q, k, v, causal=True, scale=scale, window=window, interpret=it),
            lambda q, k, v, do, o, l, d: flash_block_bwd(q, k, v, do, l, d, causal=True, scale=scale,
                                                         window=window, interpret=it),
            lambda q, k, v: flash_block_fwd(q, k, v, causal=True, scale=scale, interpret=it),
            lambda q, k, v, do, o, l, d: flash_block_bwd(q, k, v, do, l, d, causal=True, scale=scale,
                                                         interpret=it),
            16)  # the Pallas kernels' tile multiple
    if blocks == "dense":
        return _Kernels(
            functools.partial(_dense_fwd, scale=scale, window=window),
            functools.partial(_dense_bwd, scale=scale, window=window),
            functools.partial(_dense_fwd, scale=scale, window=0),
            functools.partial(_dense_bwd, scale=scale, window=0),
            1)
    raise ValueError(f"halo attention kernels: {blocks!r} is not one of {HALO_BLOCKS}")


def _to_block(x, h: int, multiple: int):
    """``[B, h, ...]`` -> reversed along time and zero-padded at the end to a multiple."""
    pad = -h % multiple
    x = jnp.flip(x, axis=1)
    return jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2)) if pad else x


def _from_block(x, h: int):
    """Inverse of :func:`_to_block` for ``[B, T, ...]`` results."""
    return jnp.flip(x[:, :h], axis=1)


def _lse_to_block(lse, h: int, multiple: int, fill: float):
    """``[B, H, h]`` -> reversed and padded with ``fill`` (``+1e30`` zeroes the padded rows' P)."""
    pad = -h % multiple
    lse = jnp.flip(lse, axis=2)
    return jnp.pad(lse, [(0, 0), (0, 0), (0, pad)], constant_values=fill) if pad else lse


def _exchange(k, v, h: int, multiple: int, axis_name: str):
    """The left neighbour's last ``h`` keys/values (zeros on device 0), already in the halo block's
    form (:func:`_to_block`: reversed, padded): the reversal rides on the copy the send needs
    anyway, and the block's gradients go back in that form (the sender's transpose undoes it)."""
    n = lax.axis_size(axis_name)
    t = k.shape[1]
    send = (_to_block(k[:, t - h:], h, multiple), _to_block(v[:, t - h:], h, multiple))
    if n == 1:
        return jax.tree.map(jnp.zeros_like, send)
    return checkpoint_name(lax.ppermute(send, axis_name, [(j, j + 1) for j in range(n - 1)]),
                           CONTEXT_EXCHANGE)


def _fwd_impl(q, k, v, hk, hv, axis_name, window, scale, blocks):
    h = window - 1
    kern = halo_kernels(blocks, scale, window)
    out, lse = kern.local_fwd(q, k, v)
    m = kern.multiple
    with jax.named_scope("attention_halo"):
        o_h, l_h = kern.block_fwd(_to_block(q[:, :h], h, m), hk, hv)   # hk, hv: block form
        # Named for remat policies (runtime.remat_policy="save_exchanges"): [B, h, H, Dh] + [B, H, h]
        # per layer, so the backward pass's recomputation of the layer reruns only the local call
        # (the part a single device runs too), not this block, its reversals and padding.
        o_h, l_h = checkpoint_name((o_h, l_h), HALO_BLOCK)
        o_h, l_h = _from_block(o_h, h), jnp.flip(l_h[:, :, :h], axis=2)
        l_h = jnp.where(lax.axis_index(axis_name) > 0, l_h, NEG_INF)   # device 0: no halo
        o_top, l_top = merge_partials(out[:, :h].astype(jnp.float32), lse[:, :, :h], o_h.astype(jnp.float32), l_h)
        out = out.at[:, :h].set(o_top.astype(out.dtype))
        lse = lse.at[:, :, :h].set(l_top)
    return out, lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8))
def _halo_split(q, k, v, hk, hv, axis_name, window, scale, blocks):
    return _fwd_impl(q, k, v, hk, hv, axis_name, window, scale, blocks)[0]


def _halo_split_fwd(q, k, v, hk, hv, axis_name, window, scale, blocks):
    out, lse = _fwd_impl(q, k, v, hk, hv, axis_name, window, scale, blocks)
    return out, (q, k, v, hk, hv, out, lse)


def _halo_split_bwd(axis_name, window, scale, blocks, res, dout):
    q, k, v, hk, hv, out, lse = res
    h = window - 1
    kern = halo_kernels(blocks, scale, window)
    m = kern.multiple
    do = dout.astype(q.dtype)
    # rowsum(dO * O), [B, H, T]: the Pallas and dense kernels take it; cuDNN forms it itself.
    delta = None if blocks == "cudnn" else flash_delta(out, dout)
    dq, dk, dv = kern.local_bwd(q, k, v, do, out, lse, delta)
    with jax.named_scope("attention_halo"):  # the halo block's backward
        blk = lambda x: _to_block(x[:, :h], h, m)
        dq_h, dhk, dhv = kern.block_bwd(blk(q), hk, hv, blk(do), blk(out),
                                        _lse_to_block(lse[:, :, :h], h, m, -NEG_INF),
                                        None if delta is None else _lse_to_block(delta[:, :, :h], h, m, 0.0))
        # Device 0's halo keys are zeros: its dq_h is zero already; masked for clarity and safety.
        has_left = (lax.axis_index(axis_name) > 0).astype(jnp.float32)
        # Sums in fp32 on the h rows only, written back in place (no full-length fp32 copies).
        dq = _add_rows(dq, slice(0, h), _from_block(dq_h, h).astype(jnp.float32) * has_left, q.dtype)
        # The halo's gradients, in block form like the halo itself: autodiff of the exchange
        # returns them to the left neighbour.
        dhk, dhv = dhk * has_left, dhv * has_left
        return (dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), dhk.astype(hk.dtype),
                dhv.astype(hv.dtype))


def _add_rows(x, rows: slice, y, dtype):
    """``x`` with ``y`` added to ``x[:, rows]`` (summed in fp32), in ``dtype``."""
    x = x.astype(dtype)
    return x.at[:, rows].set((x[:, rows].astype(jnp.float32) + y.astype(jnp.float32)).astype(dtype))


_halo_split.defvjp(_halo_split_fwd, _halo_split_bwd)


def halo_split_attention(q: jax.Array, k: jax.Array, v: jax.Array, axis_name: str, *, window: int,
                         scale: float, blocks: str) -> jax.Array:
    """Causal sliding-window attention across context shards (inside ``jax.shard_map``).

    Args:
      q: ``[B, T_local, H, Dh]``; k, v: ``[B, T_local, KV, Dh]`` (contiguous layout).
      axis_name: the context mesh axis.
      window: keys per query including itself, ``2 <= window <= T_local + 1``.
      scale: logit scale.
      blocks: kernels, one of :data:`HALO_BLOCKS`.

    Returns:
      ``[B, T_local, H, Dh]`` in ``q.dtype``; differentiable (custom VJP).
    """
    t = q.shape[1]
    if not 2 <= window <= t + 1:
        raise ValueError(f"halo_split_attention: window {window} must be in [2, T_local + 1 = {t + 1}]")
    multiple = halo_kernels(blocks, 1.0, window).multiple
    if t % multiple:
        raise ValueError(f"halo_split_attention: T_local = {t} must be a multiple of {multiple} "
                         f"for the {blocks!r} kernels")
    with jax.named_scope("attention_halo"):
        hk, hv = _exchange(k, v, window - 1, multiple, axis_name)   # first: overlaps the local call
    return _halo_split(q, k, v, hk, hv, axis_name, int(window), float(scale), blocks)
