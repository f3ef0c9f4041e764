"""In-Place TTT under context parallelism: call inside ``jax.shard_map`` over the context axis.

Each device holds a contiguous part of every sequence (or, in the load-balanced ``zigzag`` layout,
two parts: segment ``i`` and segment ``2n - 1 - i`` of ``2n``). For each of its segments it

1. runs the chunk scan from a zero state, which gives its outputs *without* the state carried in
   from earlier segments, and its summary ``(A, B)``: the affine map from the state entering the
   segment to the state leaving it (``A`` = product of the carry factors, 0 if a document starts
   inside; ``B`` = the state left when entering with 0);
2. gets the state carried into the segment from ``ttt_jax.parallel.scan`` (an exclusive scan of the
   summaries across devices, in sequence-position order);
3. adds the carried state's contribution ``use * A_prefix * (z @ S_in)`` to the tokens of the
   document that was open when the segment began.

The segment's outputs equal those of the unsharded op exactly (up to float rounding).
Communication: one ``[B, F, D]`` fp32 summary per segment (plus a ``[B]`` int gather of boundary
segment ids), independent of sequence length. Two implementations (``impl``):

* ``"correction"``: steps 1-3 as written, gradients by autodiff through the cross-device scan.
  Cost: the correction is one more ``[T, F] x [F, D]`` matmul forward and two backward than the
  single-device op (10 instead of 7 per token, in units of ``F x D``). The only one with
  ``clip_tau`` (a clipped update is not linear in the chunk's tokens).
* ``"fused"`` (default without clipping; a custom VJP): the summary is one matmul,
  ``B = lr * Z^T (w * VM)`` with ``w`` the product of the later chunks' carry factors; the
  carried-in state then enters the chunk scan as its initial state, so the outputs need no
  correction. Backward: ``dL/dS_in = Z^T (corr * G)`` (one matmul), the cross-device scan's
  transpose gives ``dL/dB``, and ONE backward chunk scan, whose states start from the carried-in
  state and whose final-state gradient is ``dL/dB``, yields every gradient: its apply-gradient
  covers what the correction's ``dZ`` was, its update gradients what the summary's were.
  9 instead of 10 units per token; the carried-in state is named ``"context_exchange"`` for remat
  policies in both.
"""

from __future__ import annotations

import functools
from typing import Literal, Optional

import jax
import jax.numpy as jnp
from jax import lax
from jax.ad_checkpoint import checkpoint_name

from ttt_jax.parallel.scan import exclusive_device_scan, exclusive_device_scan_zigzag
from ttt_jax.ops.inplace_ttt_layout import chunk_layout, pad_to_chunks, unchunk
from ttt_jax.ops.inplace_ttt_scan import scan_backward, scan_chunks, scan_forward

Layout = Literal["contiguous", "zigzag"]
IMPLS = ("auto", "fused", "correction")


def _segment_pass(z, v, w0, seg, continues, *, lr, chunk_size, clip_tau):
    """One contiguous segment from a zero state.

    Returns ``out0 [B,T,D]``, the summary ``(A [B], B [B,F,D])`` and ``corr [B,T]``, the factor by
    which each token sees the carried-in state (``use * prod_{j<chunk} a_j``).
    """
    b, t, _ = z.shape
    lay = chunk_layout(b, t, chunk_size, seg, continues)
    zc = pad_to_chunks(z, chunk_size)
    vm = pad_to_chunks(v, chunk_size) * lay.upd[..., None].astype(v.dtype)
    s0 = jnp.zeros((b,) + w0.shape, jnp.float32)
    out0, s_final = scan_chunks(zc, vm, w0, lay.use, lay.a, s0, lr, clip_tau, lay.segmented)
    corr = unchunk(lay.use * _earlier_product(lay.a)[:, :, None], t)
    return unchunk(out0, t), (jnp.prod(lay.a, axis=1), s_final), corr


def _continues(seg_parts, axis_name: str, layout: Layout):
    """For each local segment: does the document open at its last token go on in the next segment?

    ``seg_parts``: list of ``[B, T_seg]`` segment ids of this device's segments (1 or 2).
    """
    n = lax.axis_size(axis_name)
    idx = lax.axis_index(axis_name)
    firsts = lax.all_gather(jnp.stack([s[:, 0] for s in seg_parts]), axis_name)  # [n, S, B]
    if layout == "contiguous":
        by_pos = firsts[:, 0]                                                     # [n, B]
        positions = [idx]
    else:
        by_pos = jnp.concatenate([firsts[:, 0], firsts[::-1, 1]], axis=0)         # [2n, B]
        positions = [idx, 2 * n - 1 - idx]
    total = by_pos.shape[0]
    padded = jnp.concatenate([by_pos, jnp.zeros_like(by_pos[:1])], axis=0)        # next of last: 0
    out = []
    for s, p in zip(seg_parts, positions):
        nxt = lax.dynamic_index_in_dim(padded, jnp.minimum(p + 1, total), axis=0, keepdims=False)
        out.append((nxt == s[:, -1]) & (s[:, -1] != 0))
    return out


def inplace_ttt_sharded(z: jax.Array, v: jax.Array, w0: jax.Array, *, lr: float, chunk_size: int,
                        axis_name: str, segment_ids: Optional[jax.Array] = None,
                        layout: Layout = "contiguous", mode: str = "allgather",
                        clip_tau: Optional[float] = None, impl: str = "auto") -> jax.Array:
    """``inplace_ttt`` on a sequence sharded along ``axis_name`` (call inside ``jax.shard_map``).

    Args:
      z: ``[B, T_local, F]`` this device's part of the gated activations.
      v: ``[B, T_local, D]`` this device's part of the targets.
      w0: ``[F, D]`` (replicated over ``axis_name``).
      lr, chunk_size, segment_ids, clip_tau: as ``inplace_ttt``; ``segment_ids`` is the local
        ``[B, T_local]`` part. Documents may span device boundaries.
      axis_name: the context mesh axis.
      layout: ``"contiguous"`` (device ``i`` holds part ``i``) or ``"zigzag"`` (device ``i`` holds
        parts ``i`` and ``2n - 1 - i`` of ``2n``, concatenated; see ``ttt_jax.parallel.layout.to_zigzag``).
      mode: cross-device scan mode, ``"allgather"`` (what the model uses) or ``"ppermute"``
        (``ttt_jax.parallel.scan``). The summaries travel in float32.
      impl: ``"fused"``, ``"correction"`` (module docstring) or ``"auto"`` (``fused``, and
        ``correction`` with ``clip_tau``).

    Returns:
      ``[B, T_local, D]`` in ``z.dtype``: exactly this device's part of the unsharded result.

    Raises:
      ValueError: when a device's part is not a whole number of chunks (chunk boundaries must be
        those of the unsharded sequence).
    """
    b, t_local, f = z.shape
    parts = 2 if layout == "zigzag" else 1
    if layout not in ("contiguous", "zigzag"):
        raise ValueError(f"layout must be 'contiguous' or 'zigzag', got {layout!r}")
    if t_local % (parts * chunk_size):
        raise ValueError(
            f"context parallelism needs each device's part of the sequence ({t_local} tokens"
            f"{', in 2 segments' if parts == 2 else ''}) to be a multiple of the TTT chunk size "
            f"({chunk_size}) so chunk boundaries match the unsharded sequence; choose "
            f"seq_len divisible by {parts} x context x chunk_size")
    pieces, t_seg = _pieces(t_local, parts)
    if segment_ids is None:
        segs = [None] * parts
        conts = [jnp.ones((b,), bool)] * parts
    else:
        segs = [segment_ids[:, p] for p in pieces]
        conts = _continues(segs, axis_name, layout)
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        impl = "correction" if clip_tau is not None else "fused"
    if impl == "fused":
        if clip_tau is not None:
            raise ValueError("impl='fused' cannot clip updates (clip_tau); use impl='correction'")
        lays = tuple(chunk_layout(b, t_seg, chunk_size, s, c) for s, c in zip(segs, conts))
        arrays = tuple((lay.use, lay.upd, lay.a) for lay in lays)
        return _fused(z, v, w0, arrays, float(lr), chunk_size, axis_name, layout, mode,
                      segment_ids is not None)
    results = [_segment_pass(z[:, p], v[:, p], w0, s, c, lr=float(lr), chunk_size=chunk_size,
                             clip_tau=clip_tau) for p, s, c in zip(pieces, segs, conts)]
    with jax.named_scope("ttt_cp_exchange"):
        states = _exchange([r[1][0] for r in results], [r[1][1] for r in results], axis_name, layout,
                           mode)
        # Named for remat policies (runtime.remat_policy="save_exchanges"): the backward pass's
        # recomputation of the block can then skip the all-gather and the local combine.
        states = [checkpoint_name(s, "context_exchange") for s in states]
    outs = []
    for (out0, _, corr), p, s_in in zip(results, pieces, states):
        zp = z[:, p]
        with jax.named_scope("ttt_cp_correction"):
            # In z.dtype (fp32 accumulation inside the matmul): an fp32 result would give the
            # backward pass an fp32 cotangent and fp32 (TF32) gradient matmuls.
            carried = jnp.einsum("btf,bfd->btd", zp, s_in.astype(zp.dtype), preferred_element_type=zp.dtype)
            outs.append((out0.astype(jnp.float32) + corr[..., None] * carried.astype(jnp.float32)).astype(z.dtype))
    return outs[0] if parts == 1 else jnp.concatenate(outs, axis=1)


# --------------------------------------------------------------------------------------------------
# impl="fused": the carried-in state enters the chunk scan; one backward scan gives every gradient.
# --------------------------------------------------------------------------------------------------


def _exchange(a_parts, b_parts, axis_name: str, layout: Layout, mode: str):
    """States carried into this device's segments: ``[S_in [B, F, D]]`` (one per segment),
    linear in ``b_parts`` for fixed ``a_parts``."""
    if layout == "contiguous":
        (a,), (b,) = a_parts, b_parts
        return [exclusive_device_scan(a, b, axis_name, mode=mode)[1]]
    _, state_in = exclusive_device_scan_zigzag(jnp.stack(a_parts), jnp.stack(b_parts), axis_name, mode=mode)
    return [state_in[0], state_in[1]]


def _later_product(a):
    """``[B, N]`` -> ``w[:, c] = prod(a[:, c + 1:])``: how much of chunk ``c``'s update survives
    to the segment's end."""
    incl = jnp.flip(jnp.cumprod(jnp.flip(a, axis=1), axis=1), axis=1)
    return jnp.concatenate([incl[:, 1:], jnp.ones_like(a[:, :1])], axis=1)


def _earlier_product(a):
    """``[B, N]`` -> ``prod(a[:, :c])``: how much of the carried-in state chunk ``c`` sees."""
    return jnp.cumprod(jnp.concatenate([jnp.ones_like(a[:, :1]), a[:, :-1]], axis=1), axis=1)


def _pieces(t_local: int, parts: int):
    t_seg = t_local // parts
    return [slice(i * t_seg, (i + 1) * t_seg) for i in range(parts)], t_seg


def _fused_forward(z, v, w0, arrays, lr, chunk_size, axis_name, layout, mode, segmented):
    pieces, t_seg = _pieces(z.shape[1], len(arrays))
    zcs, vms, a_sums, b_sums = [], [], [], []
    for p, (use, upd, a) in zip(pieces, arrays):
        zc = pad_to_chunks(z[:, p], chunk_size)
        vm = pad_to_chunks(v[:, p], chunk_size) * upd[..., None].astype(v.dtype)
        w = _later_product(a)
        # The segment's summary from a zero state: sum_c prod(a_{c'>c}) * lr * z_c^T vm_c, one matmul
        # (w is 0/1 from document boundaries, exact in any dtype).
        b_sum = lr * jnp.einsum("bncf,bncd->bfd", zc, vm * w[:, :, None, None].astype(vm.dtype),
                                preferred_element_type=jnp.float32)
        zcs.append(zc)
        vms.append(vm)
        a_sums.append(jnp.prod(a, axis=1))
        b_sums.append(b_sum)
    with jax.named_scope("ttt_cp_exchange"):
        states = [checkpoint_name(st, "context_exchange")
                  for st in _exchange(a_sums, b_sums, axis_name, layout, mode)]
    outs = []
    for zc, vm, (use, _, a), s_in in zip(zcs, vms, arrays, states):
        out, _ = scan_forward(zc, vm, w0, use, a, s_in, lr, None, segmented)
        outs.append(unchunk(out, t_seg))
    out = outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=1)
    return out, (a_sums, states)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7, 8, 9))
def _fused(z, v, w0, arrays, lr, chunk_size, axis_name, layout, mode, segmented):
    return _fused_forward(z, v, w0, arrays, lr, chunk_size, axis_name, layout, mode, segmented)[0]


def _fused_fwd(z, v, w0, arrays, lr, chunk_size, axis_name, layout, mode, segmented):
    out, (a_sums, states) = _fused_forward(z, v, w0, arrays, lr, chunk_size, axis_name, layout,
                                           mode, segmented)
    return out, (z, v, w0, arrays, a_sums, states)


def _fused_bwd(lr, chunk_size, axis_name, layout, mode, segmented, res, dout):
    z, v, w0, arrays, a_sums, states = res
    pieces, t_seg = _pieces(z.shape[1], len(arrays))
    chunked, d_states = [], []
    for p, (use, upd, a) in zip(pieces, arrays):
        zc = pad_to_chunks(z[:, p], chunk_size)
        vm = pad_to_chunks(v[:, p], chunk_size) * upd[..., None].astype(v.dtype)
        g = pad_to_chunks(dout[:, p].astype(z.dtype), chunk_size)
        corr = (use * _earlier_product(a)[:, :, None]).astype(g.dtype)
        # dL/dS_in through this segment's outputs: sum_i corr_i z_i^T g_i, one matmul.
        d_states.append(jnp.einsum("bncf,bncd->bfd", zc, g * corr[..., None],
                                   preferred_element_type=jnp.float32))
        chunked.append((zc, vm, g))
    with jax.named_scope("ttt_cp_exchange"):
        # The cross-device scan is linear in the summaries: its transpose sends each segment's
        # dL/dS_in back to the summaries of the segments before it. (The states stand in for the
        # summaries' shapes and types, which are the same; their values are not used.)
        transpose = jax.linear_transpose(lambda bs: _exchange(a_sums, bs, axis_name, layout, mode),
                                         list(states))
        (d_sums,) = transpose(d_states)
    dzs, dvs, dw0 = [], [], None
    for (use, upd, a), (zc, vm, g), s_in, d_sum in zip(arrays, chunked, states, d_sums):
        # One backward chunk scan from the carried-in state, with dL/d(final state) = dL/dB: the
        # final state is A * S_in + B, so its gradient w.r.t. z and vm is the summary's.
        dz, dvm, dw, *_ = scan_backward(lr, None, segmented, (zc, vm, w0, use, a, s_in), (g, d_sum))
        dzs.append(unchunk(dz, t_seg))
        dvs.append(unchunk(dvm * upd[..., None].astype(dvm.dtype), t_seg))
        dw0 = dw if dw0 is None else dw0 + dw
    cat = (lambda xs: xs[0]) if len(dzs) == 1 else (lambda xs: jnp.concatenate(xs, axis=1))
    zeros = jax.tree.map(jnp.zeros_like, arrays)
    return cat(dzs).astype(z.dtype), cat(dvs).astype(v.dtype), dw0.astype(w0.dtype), zeros


_fused.defvjp(_fused_fwd, _fused_bwd)
