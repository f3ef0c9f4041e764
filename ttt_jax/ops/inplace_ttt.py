"""In-Place TTT: the fast-weight down-projection, one public function with an ``impl=`` switch.

``inplace_ttt(z, v, w0, lr=..., chunk_size=...)`` computes, for chunk ``i`` of every sequence,
``O_i = Z_i (W0 + lr * sum_{j<i} Z_j^T V_j)`` — apply-then-update with one gradient step per chunk
on the loss ``-<Z W, V>`` (DESIGN.md section 1), restarted at every document when ``segment_ids``
are given. Implementations:

=================  ==================================================================  ===========
impl               how                                                                 memory
=================  ==================================================================  ===========
``reference``      sequential apply-then-update, Python loop over chunks (the oracle)   O(N F D)
``attention``      per-token block-causal linear attention (quadratic; test oracle)     O(T^2)
``associative``    chunk deltas through ``lax.associative_scan`` of the affine monoid   O(N F D)
``scan``           ``lax.scan`` with a state-recomputing custom VJP (memory-lean)       O(F D)
``pallas``         the same recursion as fused Pallas (Triton) kernels: the fp32 state   O(F D)
                   enters the matmul prologue, the update its epilogue (GPU; interpret
                   mode elsewhere); no ``clip_tau``, dims multiples of 16
``auto``           ``pallas`` on a GPU where :func:`inplace_ttt_pallas.auto_prefers_kernel`
                   says it is faster and the kernel supports the call, else ``scan``
=================  ==================================================================  ===========
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from ttt_jax.ops import inplace_ttt_pallas as pallas
from ttt_jax.ops import inplace_ttt_reference as reference
from ttt_jax.ops.inplace_ttt_layout import ChunkLayout, chunk_layout, clip_update, pad_to_chunks, unchunk
from ttt_jax.ops.inplace_ttt_scan import scan_chunks
from ttt_jax.ops.precision import matmul_f32_out
from ttt_jax.platform import target_platform

IMPLS = ("auto", "reference", "attention", "associative", "scan", "pallas")


def affine_combine(first: tuple[jax.Array, jax.Array], second: tuple[jax.Array, jax.Array]):
    """Compose ``W -> a1 W + B1`` then ``W -> a2 W + B2``: ``(a2 a1, a2 B1 + B2)``.

    ``a`` has shape ``[..., N]`` and ``B`` ``[..., N, F, D]``; associative, identity ``(1, 0)``.
    """
    a1, b1 = first
    a2, b2 = second
    return a2 * a1, a2[..., None, None] * b1 + b2


def _associative(zc: jax.Array, vm: jax.Array, w0: jax.Array, lay: ChunkLayout, lr: float,
                 clip_tau: Optional[float], s0: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Chunked form 2: exclusive prefix of chunk deltas via ``lax.associative_scan``.

    ``zc [B,N,C,F]``, ``vm [B,N,C,D]`` (pre-masked), ``s0 [B,F,D]`` -> (``[B,N,C,D]``, ``[B,F,D]``).
    """
    # fp32-result matmuls whose backward matmuls keep the inputs' dtype (no fp32 operands).
    deltas = clip_update(lr * matmul_f32_out("bncf,bncd->bnfd", zc, vm), clip_tau)
    a_incl, b_incl = jax.lax.associative_scan(affine_combine, (lay.a, deltas), axis=1)
    # State before chunk i: the composition of chunks < i applied to s0 (exclusive scan).
    a_excl = jnp.concatenate([jnp.ones_like(a_incl[:, :1]), a_incl[:, :-1]], axis=1)
    b_excl = jnp.concatenate([jnp.zeros_like(b_incl[:, :1]), b_incl[:, :-1]], axis=1)
    state = a_excl[..., None, None] * s0[:, None] + b_excl
    final = a_incl[:, -1, None, None] * s0 + b_incl[:, -1]
    cdt = zc.dtype
    out = matmul_f32_out("bncf,fd->bncd", zc, w0)
    out = out + lay.use[..., None] * matmul_f32_out("bncf,bnfd->bncd", zc, state.astype(cdt))
    return out.astype(zc.dtype), final


def _check_args(z, v, w0, lr, chunk_size, impl, clip_tau, initial_state, return_state):
    if z.ndim != 3:
        raise ValueError(f"z must be [B, T, F], got shape {z.shape}")
    b, t, f = z.shape
    if v.ndim != 3 or v.shape[:2] != (b, t):
        raise ValueError(f"v must be [B, T, D] with B, T = {(b, t)} matching z, got shape {v.shape}")
    if w0.shape != (f, v.shape[-1]):
        raise ValueError(f"w0 must be [F, D] = {(f, v.shape[-1])}, got shape {w0.shape}")
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if isinstance(lr, jax.core.Tracer):
        raise ValueError("lr must be a Python float (a static hyper-parameter), not a traced array")
    if clip_tau is not None and clip_tau <= 0:
        raise ValueError(f"clip_tau must be None (off) or > 0, got {clip_tau}")
    if clip_tau is not None and impl == "attention":
        raise ValueError("impl='attention' cannot express update clipping; use 'scan' or 'reference'")
    if impl == "attention" and (initial_state is not None or return_state):
        raise ValueError("impl='attention' has no fast-weight state; use 'scan' or 'reference'")
    if initial_state is not None and initial_state.shape != (b, f, v.shape[-1]):
        raise ValueError(f"initial_state must be [B, F, D] = {(b, f, v.shape[-1])}, got {initial_state.shape}")
    if impl == "pallas":
        why = pallas.supports(f, v.shape[-1], chunk_size, clip_tau)
        if why is not None:
            raise ValueError(f"impl='pallas' does not support this call: {why}; use impl='scan' (or 'auto')")


def _resolve_auto(f: int, d: int, chunk_size: int, segmented: bool, clip_tau) -> str:
    """``impl="auto"``: the kernel on a GPU where it is supported and measured faster, else the scan."""
    if (target_platform() == "gpu" and pallas.supports(f, d, chunk_size, clip_tau) is None
            and pallas.auto_prefers_kernel(f, d, chunk_size, segmented)):
        return "pallas"
    return "scan"


def inplace_ttt(z: jax.Array, v: jax.Array, w0: jax.Array, *, lr: float, chunk_size: int,
                segment_ids: Optional[jax.Array] = None, impl: str = "auto",
                clip_tau: Optional[float] = None, initial_state: Optional[jax.Array] = None,
                return_state: bool = False):
    """In-Place TTT down-projection with chunk-wise fast-weight updates.

    Args:
      z: ``[B, T, F]`` gated MLP activation ``silu(H W_gate) * (H W_up)``.
      v: ``[B, T, D]`` LM-aligned target (see ``inplace_ttt_target``).
      w0: ``[F, D]`` slow down-projection (initial fast weight); plain MLP output is ``z @ w0``.
      lr: fast-weight learning rate (Python float).
      chunk_size: update every ``chunk_size`` positions; ``T`` need not be a multiple (padding is
        internal and never affects real tokens).
      segment_ids: optional ``[B, T]`` int packed-document ids, 0 = padding. A token only sees
        updates from earlier chunks of its own document; chunk boundaries stay those of the
        packed row.
      impl: ``"auto" | "reference" | "attention" | "associative" | "scan" | "pallas"`` (module
        docstring).
      clip_tau: if set, each chunk's update ``lr * dW_i`` is rescaled to Frobenius norm <= clip_tau.
      initial_state: optional ``[B, F, D]`` fp32 accumulated delta ``S`` (``W = W0 + S``) carried in
        from earlier tokens of the document open at position 0; zeros by default.
      return_state: also return the ``[B, F, D]`` fp32 state after the last chunk (a final partial
        chunk counts as complete) for the document open at position ``T - 1``, as a context-parallel
        shard or a prefill hands it on.

    Returns:
      ``[B, T, D]`` in ``z.dtype`` (and the state when ``return_state``): chunk ``i`` uses
      ``W0 + lr * sum_{j<i} z_j^T v_j``. Fast-weight state and prefix sums are fp32; matmuls run in
      ``z.dtype`` with fp32 accumulation.
    """
    _check_args(z, v, w0, lr, chunk_size, impl, clip_tau, initial_state, return_state)
    lr = float(lr)
    if impl == "attention":
        return reference.linear_attention(z, v, w0, lr=lr, chunk_size=chunk_size, segment_ids=segment_ids)
    b, t, f = z.shape
    s0 = (jnp.zeros((b, f, v.shape[-1]), jnp.float32) if initial_state is None
          else initial_state.astype(jnp.float32))
    continues = jnp.ones((b,), bool) if return_state else None
    if impl == "reference":
        out, final = reference.sequential(z, v, w0, lr=lr, chunk_size=chunk_size, segment_ids=segment_ids,
                                          clip_tau=clip_tau, initial_state=s0, continues=continues)
        return (out, final) if return_state else out
    lay = chunk_layout(b, t, chunk_size, segment_ids, continues)
    zc = pad_to_chunks(z, chunk_size)
    if impl == "auto":
        impl = _resolve_auto(f, v.shape[-1], chunk_size, lay.segmented, clip_tau)
    if impl == "pallas":  # masks v inside its kernels (no masked copy of v)
        out, final = pallas.pallas_chunks(zc, pad_to_chunks(v, chunk_size), w0, lay.use, lay.upd, lay.a, s0, lr,
                                          lay.segmented)
        out = unchunk(out, t)
        return (out, final) if return_state else out
    vm = pad_to_chunks(v, chunk_size) * lay.upd[..., None].astype(v.dtype)
    if impl == "associative":
        out, final = _associative(zc, vm, w0, lay, lr, clip_tau, s0)
    else:
        out, final = scan_chunks(zc, vm, w0, lay.use, lay.a, s0, lr, clip_tau, lay.segmented)
    out = unchunk(out, t)
    return (out, final) if return_state else out
