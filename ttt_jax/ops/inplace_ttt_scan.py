"""Memory-lean In-Place TTT: a chunk ``lax.scan`` with a custom VJP that recomputes states.

Autodiff of a ``lax.scan`` carrying the fast weight stores every chunk's ``[F, D]`` state for the
backward pass (``N * F * D * 4`` bytes per layer and sequence). Here the backward pass instead runs

1. a forward scan that recomputes ``S_i`` and produces ``dz_i = g_i (W0 + S_i)^T`` (the gradient
   through the apply), and
2. a reverse scan carrying ``G_{i+1} = dL/dS_{i+1}`` that produces the gradients through the
   update (``dz``, ``dv``) and accumulates ``dW0``,

so the only residuals are the inputs themselves: extra memory is a few ``[B, F, D]`` carries,
independent of the number of chunks. Matmul work (per token, ``F x D`` each): forward 2 (apply,
update), backward 5 (recompute update, apply-grad, ``z^T g``, ``v dK^T``, ``z dK``) — 7 against 3 for
a plain down-projection, the ideal ratio 2.33 of DESIGN.md.

Layout: time-major chunks ``[N, B, C, ...]`` inside the scans; the public wrapper takes
``[B, N, C, ...]``. State and gradients of the state are fp32; matmuls run in the input dtype with
fp32 accumulation.
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp

from ttt_jax.ops.inplace_ttt_layout import clip_update

_F32 = jnp.float32


def _mm(eq: str, x: jax.Array, y: jax.Array) -> jax.Array:
    return jnp.einsum(eq, x, y.astype(x.dtype), preferred_element_type=_F32)


def _apply(zi, ui, state, w0, segmented: bool):
    """Chunk output ``[B, C, D]`` (fp32): ``z W0 + use * z S`` (one matmul when unsegmented)."""
    if segmented:
        return _mm("bcf,fd->bcd", zi, w0) + ui[..., None] * _mm("bcf,bfd->bcd", zi, state)
    return _mm("bcf,bfd->bcd", zi, w0.astype(_F32)[None] + state)


def _apply_grad(gi, ui, state, w0, segmented: bool):
    """``dL/dz`` through the apply, ``[B, C, F]`` (fp32)."""
    if segmented:
        return _mm("bcd,fd->bcf", gi, w0) + _mm("bcd,bfd->bcf", gi * ui[..., None].astype(gi.dtype), state)
    return _mm("bcd,bfd->bcf", gi, w0.astype(_F32)[None] + state)


def _update(zi, vmi, lr: float, clip_tau: Optional[float]):
    """``K_i = clip(lr * z_i^T vm_i)``: ``[B, F, D]`` fp32."""
    return clip_update(lr * _mm("bcf,bcd->bfd", zi, vmi), clip_tau)


def _advance(state, ai, k, segmented: bool):
    """``S_{i+1} = a_i S_i + K_i``.

    Unsegmented, ``a`` is 1 before the last chunk (:func:`chunk_layout`), so the step is
    ``S + K``, which XLA turns into one GEMM accumulating into the state (``beta = 1``) instead of
    a GEMM writing ``K`` and a pass reading ``S`` and ``K``: the ``[F, D]`` fp32 traffic is what
    bounds this loop. The last chunk's ``a`` is applied after the loop (its ``K`` is 0 whenever
    that ``a`` is: the masks drop updates no later token reads).
    """
    return ai[:, None, None] * state + k if segmented else state + k


def _clip_grad(dk, p, clip_tau: float):
    """Gradient w.r.t. ``p`` of ``<dk, clip(p)>`` for per-example Frobenius-norm clipping."""
    sq = jnp.sum(jnp.square(p), axis=(-2, -1), keepdims=True)
    norm = jnp.sqrt(sq)
    scale = jnp.minimum(1.0, clip_tau / jnp.maximum(norm, 1e-30))
    radial = jnp.sum(dk * p, axis=(-2, -1), keepdims=True) / jnp.maximum(sq, 1e-30)
    return jnp.where(norm > clip_tau, scale * (dk - radial * p), dk)


def _varying_axes(x) -> set:
    """Manual mesh axes along which ``x`` varies inside ``shard_map`` (JAX 0.6-0.9: ``aval.vma``;
    0.10+: ``aval.manual_axis_type.varying``)."""
    aval = jax.typeof(x) if hasattr(jax, "typeof") else None
    if aval is None:
        return set()
    vma = getattr(aval, "vma", None)
    if vma is None:
        vma = getattr(getattr(aval, "manual_axis_type", None), "varying", None)
    return set(vma or ())


def _vary_like(x, *likes):
    """Inside ``shard_map``, give ``x`` the varying manual axes of ``likes`` (a ``lax.scan`` carry
    must have the same type in and out; a zero initial state is otherwise "replicated")."""
    axes = set()
    for like in likes:
        axes |= _varying_axes(like)
    missing = tuple(sorted(axes - _varying_axes(x)))
    if not missing:
        return x
    if hasattr(jax.lax, "pcast"):
        return jax.lax.pcast(x, missing, to="varying")
    return jax.lax.pvary(x, missing)


def _reduce_like(ct, primal):
    """Cotangent of an input that is replicated over some manual axes but used by varying
    computation: sum it over those axes (the transpose of the implicit broadcast)."""
    axes = tuple(sorted(_varying_axes(ct) - _varying_axes(primal)))
    return jax.lax.psum(ct, axes) if axes else ct


def _time_major(*xs):
    return tuple(jnp.moveaxis(x, 1, 0) for x in xs)


def _tied_zero(tie: jax.Array, dtype) -> jax.Array:
    """A scalar zero computed from ``tie``: one element times zero, which XLA does not fold for
    floats (NaN semantics). See :func:`_zeros_tied`."""
    return (tie.reshape(-1)[0] * 0).astype(dtype)


def _zeros_tied(shape, dtype, tie: jax.Array, likes) -> jax.Array:
    """A zero buffer ``shape`` that XLA cannot materialise before ``tie`` exists.

    ``lax.scan`` starts its stacked outputs (and our zero initial states) from constant zero
    broadcasts. In a model of several rematerialised layers these are identical across layers, so
    XLA merges them and creates every layer's loop buffers at once, ahead of the backward pass,
    where they stay live for the whole backward pass (the figures: benchmarks/history/). Built from
    the layer's own ``tie``, each buffer depends on its
    layer's data. Stacked outputs have every slot overwritten, so the start value never reaches an
    output.
    """
    return _vary_like(jnp.broadcast_to(_tied_zero(tie, dtype), shape), *likes)


def _tie(x: jax.Array, tie: jax.Array) -> jax.Array:
    """``x`` (unchanged in value) made to depend on ``tie``, for loop carries that start as
    constants (:func:`_zeros_tied`)."""
    return x + _tied_zero(tie, x.dtype)


def _scan_stacked(step, carry, xs, *, tie: jax.Array, likes, reverse: bool = False):
    """``lax.scan(step, carry, xs, reverse=reverse)`` whose stacked outputs are carried buffers
    written in place, started from :func:`_zeros_tied` zeros."""
    n = jax.tree.leaves(xs)[0].shape[0]
    x0 = jax.tree.map(lambda x: x[0], xs)
    ys_shape = jax.eval_shape(lambda c, x: step(c, x)[1], carry, x0)
    bufs = jax.tree.map(lambda y: _zeros_tied((n,) + y.shape, y.dtype, tie, likes), ys_shape)

    def body(c, ixs):
        inner, bufs = c
        i, x = ixs
        inner, ys = step(inner, x)
        bufs = jax.tree.map(lambda b, y: jax.lax.dynamic_update_index_in_dim(b, y, i, 0), bufs, ys)
        return (inner, bufs), None

    (carry, bufs), _ = jax.lax.scan(body, (carry, bufs), (jnp.arange(n), xs), reverse=reverse)
    return carry, bufs


def _forward(z, vm, w0, use, a, s0, lr, clip_tau, segmented):
    zt, vt, ut, at = _time_major(z, vm, use, a)

    def step(state, xs):
        zi, vi, ui, ai = xs
        out = _apply(zi, ui, state, w0, segmented).astype(z.dtype)
        state = _advance(state, ai, _update(zi, vi, lr, clip_tau), segmented)
        return state, out

    likes = (z, vm, use, a, w0)
    state0 = _vary_like(_tie(s0.astype(_F32), z), *likes)
    state, out = _scan_stacked(step, state0, (zt, vt, ut, at), tie=z, likes=likes)
    if not segmented:
        state = a[:, -1, None, None] * state  # see _advance
    return jnp.moveaxis(out, 0, 1), state


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8))
def scan_chunks(z, vm, w0, use, a, s0, lr, clip_tau, segmented):
    """In-Place TTT over chunks with a state-recomputing backward pass.

    Args:
      z: ``[B, N, C, F]`` gated activations (chunk-padded with zeros).
      vm: ``[B, N, C, D]`` targets already multiplied by the ``upd`` mask.
      w0: ``[F, D]`` initial fast weight (the slow down-projection).
      use: ``[B, N, C]`` float, 1 where a token reads the carried state.
      a: ``[B, N]`` float carry factor (1 = same document continues, 0 = reset).
      s0: ``[B, F, D]`` fp32 initial accumulated delta (zeros at a sequence start; the carried-in
        state of a context-parallel shard or of a decoding cache otherwise).
      lr: fast-weight learning rate (static).
      clip_tau: optional per-chunk update norm bound (static).
      segmented: whether ``use``/``a`` can differ from 1 (static; picks one-matmul applies).

    Returns:
      ``(out, s_final)``: ``[B, N, C, D]`` in ``z.dtype`` and the ``[B, F, D]`` fp32 state after the
      last chunk (``a``/``vm`` of the last chunk decide whether its update is kept).
    """
    return _forward(z, vm, w0, use, a, s0, lr, clip_tau, segmented)


def _scan_fwd(z, vm, w0, use, a, s0, lr, clip_tau, segmented):
    out = _forward(z, vm, w0, use, a, s0, lr, clip_tau, segmented)
    return out, (z, vm, w0, use, a, s0)


def _scan_bwd(lr, clip_tau, segmented, res, cotangents):
    z, vm, w0, use, a, s0 = res
    g, g_state = cotangents
    zt, vt, ut, at, gt = _time_major(z, vm, use, a, g)

    # Pass 1 (forward): recompute S_i, gradient through the apply.
    def fwd_step(state, xs):
        zi, vi, ui, ai, gi = xs
        dz_apply = _apply_grad(gi, ui, state, w0, segmented).astype(z.dtype)
        state = _advance(state, ai, _update(zi, vi, lr, clip_tau), segmented)
        return state, dz_apply

    likes = (z, vm, use, a, w0, g)
    state0 = _vary_like(_tie(s0.astype(_F32), g), *likes)
    _, dz_apply = _scan_stacked(fwd_step, state0, (zt, vt, ut, at, gt), tie=g, likes=likes)

    # Pass 2 (reverse): G = dL/dS_{i+1} flows back through the updates. ``dz`` is accumulated in
    # place in pass 1's buffer (carried, read and rewritten per chunk), so the backward pass holds
    # one chunk-major [T, F] buffer, not two.
    def bwd_step(carry, xs):
        grad_next, dw0, dz_buf = carry
        i, zi, vi, ui, ai, gi = xs
        dk = grad_next
        if clip_tau is not None:
            dk = _clip_grad(dk, lr * _mm("bcf,bcd->bfd", zi, vi), clip_tau)
        dk = (lr * dk).astype(z.dtype)                               # d/d(z^T vm), [B, F, D]
        dzi = jax.lax.dynamic_index_in_dim(dz_buf, i, 0, keepdims=False)
        dz = dzi.astype(_F32) + _mm("bcd,bfd->bcf", vi, dk)
        dz_buf = jax.lax.dynamic_update_index_in_dim(dz_buf, dz.astype(z.dtype), i, 0)
        dv = _mm("bcf,bfd->bcd", zi, dk)  # w.r.t. vm; the caller's mask product routes it to v
        if segmented:
            g_state = _mm("bcf,bcd->bfd", zi, gi * ui[..., None].astype(gi.dtype))
            dw0 = dw0 + _mm("bcf,bcd->fd", zi, gi)
            grad = ai[:, None, None] * grad_next + g_state
        else:
            # One GEMM accumulating into the carry (as _advance); dw0 comes from the carry below.
            grad = grad_next + _mm("bcf,bcd->bfd", zi, gi)
        return (grad, dw0, dz_buf), dv.astype(vm.dtype)

    likes = (z, vm, use, a, w0, g, g_state)
    grad0 = _vary_like(_tie(g_state.astype(_F32), g), *likes)
    if not segmented:
        grad0 = a[:, -1, None, None] * grad0  # the forward's final a (see _advance)
    # Unsegmented, dw0 = sum_i z_i^T g_i is the carry's growth: no [F, D] accumulator in the loop.
    dw0_0 = _zeros_tied(w0.shape, _F32, g, likes) if segmented else jnp.zeros((), _F32)
    idx = jnp.arange(zt.shape[0])
    (ds0, dw0, dz), dv = _scan_stacked(
        bwd_step, (grad0, dw0_0, dz_apply), (idx, zt, vt, ut, at, gt), tie=g, likes=likes, reverse=True)
    if not segmented:
        dw0 = jnp.sum(ds0 - grad0, axis=0)
    dz, dv = jnp.moveaxis(dz, 0, 1), jnp.moveaxis(dv, 0, 1)
    zeros = jnp.zeros_like
    # dw0 is summed over devices in fp32 (then cast): more accurate, and XLA's CPU compiler crashes
    # on a bf16 all-reduce of this gradient under context parallelism.
    return (_reduce_like(dz, z), _reduce_like(dv, vm), _reduce_like(dw0, w0).astype(w0.dtype),
            zeros(use), zeros(a), _reduce_like(ds0.astype(s0.dtype), s0))


scan_chunks.defvjp(_scan_fwd, _scan_bwd)

# The two halves as plain functions, for ops that build a larger custom VJP around the chunk scan
# (``ttt_jax.ops.inplace_ttt_cp``, impl="fused"): ``scan_forward(z, vm, w0, use, a, s0, lr,
# clip_tau, segmented) -> (out, s_final)`` and ``scan_backward(lr, clip_tau, segmented,
# (z, vm, w0, use, a, s0), (d_out, d_s_final)) -> (dz, dvm, dw0, 0, 0, ds0)``.
scan_forward = _forward
scan_backward = _scan_bwd

# Loop-buffer helpers for other chunk loops (``ttt_jax.ops.inplace_ttt_pallas``): zeros and carries
# that XLA cannot create before the layer's own data exists (see :func:`_zeros_tied`).
zeros_tied = _zeros_tied
tie = _tie
