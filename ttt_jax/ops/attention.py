"""Causal (optionally sliding-window) multi-head attention with GQA and packed segments.

One public function, :func:`attention`, with an ``impl=`` switch:

* ``"reference"`` -- explicit ``[B, H, T, T]`` masked softmax. The oracle; O(T^2) memory.
* ``"xla"``       -- blockwise online-softmax ("flash") attention in pure JAX, with a
  ``jax.custom_vjp`` whose backward pass recomputes the probabilities block by block, so forward
  and backward memory are O(T * block) per head, not O(T^2). Blocks are visited by their distance
  from the diagonal, so a sliding window only visits the ``ceil((window - 1) / block) + 1``
  diagonals it needs (O(T * window) work); full causal attention visits every block pair
  (fully masked pairs above the diagonal are computed and discarded).
* ``"cudnn"``     -- ``jax.nn.dot_product_attention(..., implementation="cudnn")`` (NVIDIA GPUs;
  bf16/fp16; head_dim a multiple of 8, <= 128, or <= 256 on Hopper). The causal mask and the window
  map onto cuDNN's native ``is_causal`` / ``local_window_size``. The public JAX API has no
  segment-id (packed THD) input -- cuDNN's packed layout is only reachable through the private
  ``jax._src.cudnn`` module -- so segment ids are passed as a dense boolean ``mask`` which JAX turns
  into a ``[B, 1, T, T]`` additive bias: correct, but O(B * T^2) memory and slower than the
  unmasked kernel. ``impl="auto"`` therefore uses cuDNN with segment ids only while that bias is small
  (:data:`CUDNN_MAX_MASK_ELEMENTS`) and beyond it takes ``"flash"`` (see below). Odd lengths are padded
  by one token (cuDNN's backward pass needs an even length). An explicit ``impl="cudnn"`` that
  cannot run (no GPU, fp32 inputs, head_dim) raises ``ValueError`` naming the reason.
* ``"flash"``     -- the Pallas (Triton) flash-attention kernels of :mod:`ttt_jax.ops.kernels.flash` with
  native segment ids and window: O(T) memory, no dense mask, causal (and window) tiles beyond
  the diagonal skipped. Slower than cuDNN without segment ids; meant for long packed batches,
  where the XLA path's compiled train step needs far more temporaries (figures in
  benchmarks/README.md, "Trainer at the Qwen3-4B shape"); ``"auto"`` picks it for segment ids
  that cuDNN cannot take. Tested in interpret mode on CPU and
  compiled on an H100 (GPU-marked tests).
  Lengths are padded to a multiple of the tile (padding gets segment id 0).
  GPU needs bf16/fp16 and head_dim <= 256; off GPU it runs in Pallas interpret mode (slow; CPU
  tests).
* ``"pallas"``    -- the TPU splash-attention kernel (``jax.experimental.pallas.ops.tpu.
  splash_attention``) through :func:`ttt_jax.ops.kernels.tpu_splash.tpu_attention`: lazy causal /
  local masks, native segment ids and GQA, lengths padded to 128. Off TPU it runs in Pallas
  interpret mode (slow; used by the CPU tests).
* ``"auto"``      -- on GPU: cuDNN when dtype / head_dim allow, except with segment ids whose
  dense mask would be large, which go to ``"flash"``; Pallas on TPU; XLA otherwise.

This module holds the entry point, the ``"auto"`` rule and the XLA path; the adapters of the kernel
paths (checks, padding, the per-device ``shard_map`` that Mosaic kernels need under a mesh) are in
:mod:`ttt_jax.ops.attention_kernels`.

Semantics shared by all paths (built by :func:`~ttt_jax.ops.attention_reference.attention_mask`,
which this module re-exports with the oracle :func:`attention_reference`): query ``t`` sees key ``s`` iff
``s <= t`` (causal), ``s > t - window`` when ``window > 0`` (the window counts the query itself),
and, with ``segment_ids``, ``seg[s] == seg[t] != 0``. Segment id 0 marks padding: padding queries
see nothing and their output is exactly zero (never NaN), and no gradient flows through them.
Queries attend to keys with the *same* segment id (not "the same run of ids"): a packer must give
each document of a row a distinct id.

GQA: query head ``h`` uses key/value head ``h // (H // KV)`` (the Hugging Face ``repeat_kv`` order).
Softmax statistics are fp32; matmuls take the input dtype with fp32 accumulation.
"""

from __future__ import annotations

import functools
import math
from typing import Literal, Optional

import jax
import jax.numpy as jnp
import numpy as np

from ttt_jax.ops.attention_kernels import (attention_cudnn, attention_flash, attention_splash,
                                           per_device, zero_padding_rows)
from ttt_jax.ops.attention_reference import attention_mask, attention_reference
from ttt_jax.ops.kernels import cudnn_blocks
from ttt_jax.platform import target_platform

AttentionImpl = Literal["auto", "reference", "xla", "cudnn", "pallas", "flash"]
IMPLS = ("auto", "reference", "xla", "cudnn", "pallas", "flash")

# Largest dense segment mask (B * T * T elements) that impl="auto" hands to cuDNN as a bias; above
# it, segment ids go to the Pallas flash kernels, which take them natively (the XLA blockwise path
# keeps far more temporaries per rematerialised layer: benchmarks/README.md).
CUDNN_MAX_MASK_ELEMENTS = 2**27
_NEG = -1e30  # finite "minus infinity" for fp32 logits; masked probabilities are zeroed explicitly


# --------------------------------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------------------------------


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *,
              segment_ids: Optional[jax.Array] = None, window: int = 0,
              impl: AttentionImpl = "auto", scale: Optional[float] = None,
              block_size: Optional[int] = None) -> jax.Array:
    """Causal self-attention.

    Args:
      q: ``[B, T, H, Dh]`` queries.
      k: ``[B, T, KV, Dh]`` keys, ``H % KV == 0`` (GQA; query head h uses kv head ``h // (H//KV)``).
      v: ``[B, T, KV, Dh]`` values.
      segment_ids: optional ``[B, T]`` int; 0 = padding (output 0), otherwise a query only sees
        keys with the same id.
      window: 0 = full causal; ``> 0`` = sliding window of ``window`` keys (the query included).
      impl: ``"auto" | "reference" | "xla" | "cudnn" | "pallas" | "flash"`` (see module
        docstring).
      scale: logit scale; default ``1 / sqrt(Dh)``.
      block_size: tile length for ``"xla"`` (default: chosen from T); ``"pallas"`` picks its own.

    Returns:
      ``[B, T, H, Dh]`` in ``q.dtype``.
    """
    _check_args(q, k, v, segment_ids, window, impl)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    scale = float(scale)
    window = int(window)
    if impl == "auto":
        impl = _auto_impl(q, segment_ids)
    if impl == "reference":
        return attention_reference(q, k, v, segment_ids=segment_ids, window=window, scale=scale)
    if impl == "xla":
        return _attention_xla(q, k, v, segment_ids, window=window, scale=scale, block_size=block_size)
    if impl == "cudnn":
        return attention_cudnn(q, k, v, segment_ids, window=window, scale=scale)
    if impl == "flash":
        return attention_flash(q, k, v, segment_ids, window=window, scale=scale)
    if impl == "pallas":
        fn = functools.partial(attention_splash, window=window, scale=scale, block_size=block_size)
        return per_device(fn, q, k, v, segment_ids)
    raise AssertionError(impl)


def _check_args(q, k, v, segment_ids, window, impl) -> None:
    if impl not in IMPLS:
        raise ValueError(f"attention impl={impl!r} is not one of {IMPLS}")
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"attention expects q [B,T,H,Dh], k/v [B,T,KV,Dh]; got q {q.shape}, "
                         f"k {k.shape}, v {v.shape}")
    b, t, h, d = q.shape
    if k.shape != v.shape or k.shape[:2] != (b, t) or k.shape[3] != d:
        raise ValueError(f"attention: k {k.shape} and v {v.shape} must both be [B={b}, T={t}, KV, "
                         f"Dh={d}] to match q {q.shape}")
    if h % k.shape[2] != 0:
        raise ValueError(f"attention: query heads ({h}) must be a multiple of kv heads "
                         f"({k.shape[2]}) for grouped-query attention")
    if segment_ids is not None and tuple(segment_ids.shape) != (b, t):
        raise ValueError(f"attention: segment_ids must be [B, T] = {(b, t)}, got "
                         f"{tuple(segment_ids.shape)}")
    if window < 0:
        raise ValueError(f"attention: window must be >= 0 (0 = full causal), got {window}")


def cudnn_unsupported_reason(q: jax.Array, segment_ids: Optional[jax.Array] = None,
                             *, for_auto: bool = False) -> Optional[str]:
    """Why the cuDNN path cannot run these inputs here (``None`` when it can). With ``for_auto``,
    segment ids whose dense mask would exceed :data:`CUDNN_MAX_MASK_ELEMENTS` count as a reason."""
    reason = cudnn_blocks.cudnn_unsupported_reason(q, backend=_default_backend())
    if reason is not None:
        return reason
    if for_auto and segment_ids is not None:
        b, t = segment_ids.shape
        if b * t * t > CUDNN_MAX_MASK_ELEMENTS:
            return ("segment ids reach cuDNN only as a dense [B,1,T,T] bias through the public "
                    f"JAX API; B*T*T={b * t * t} exceeds {CUDNN_MAX_MASK_ELEMENTS}")
    return None


def _default_backend() -> str:
    """The target platform of the computation being traced (:func:`ttt_jax.platform.target_platform`:
    the mesh's devices, not the host's backend), one name for the tests to substitute."""
    return target_platform()


def _auto_impl(q: jax.Array, segment_ids: Optional[jax.Array]) -> str:
    backend = _default_backend()
    if backend == "gpu" and cudnn_unsupported_reason(q, segment_ids, for_auto=True) is None:
        return "cudnn"
    if (backend == "gpu" and segment_ids is not None
            and cudnn_unsupported_reason(q) is None):
        # cuDNN could run but only with the dense [B,1,T,T] segment bias: the Pallas kernels take
        # the ids natively (every dtype / head_dim cuDNN accepts, they accept too).
        return "flash"
    if backend == "tpu":
        return "pallas"
    return "xla"




# --------------------------------------------------------------------------------------------------
# XLA blockwise (flash) attention with a recomputing backward
# --------------------------------------------------------------------------------------------------


def _default_block(t: int) -> int:
    return min(512, max(8, -(-t // 8) * 8))


def _attention_xla(q, k, v, segment_ids, *, window: int, scale: float,
                   block_size: Optional[int]) -> jax.Array:
    b, t, h, d = q.shape
    kv = k.shape[2]
    g = h // kv
    blk = int(block_size) if block_size else _default_block(t)
    if blk < 1:
        raise ValueError(f"attention: block_size must be >= 1, got {blk}")
    nb = -(-t // blk)
    tp = nb * blk
    pad = tp - t
    # Padding at the end is invisible to real queries (causal), and padded queries are dropped.
    qp = jnp.pad(q, [(0, 0), (0, pad), (0, 0), (0, 0)]).reshape(b, nb, blk, kv, g, d)
    kp = jnp.pad(k, [(0, 0), (0, pad), (0, 0), (0, 0)]).reshape(b, nb, blk, kv, d)
    vp = jnp.pad(v, [(0, 0), (0, pad), (0, 0), (0, 0)]).reshape(b, nb, blk, kv, d)
    seg = None
    if segment_ids is not None:
        seg = jnp.pad(segment_ids.astype(jnp.int32), [(0, 0), (0, pad)]).reshape(b, nb, blk)
    # number of block diagonals any query can reach
    n_diag = nb if window <= 0 else min(nb, -(-(window - 1) // blk) + 1)
    out = _flash(qp, kp, vp, seg, window, scale, n_diag)                 # [B,nb,blk,KV,G,Dh]
    out = out.reshape(b, tp, h, d)[:, :t]
    return zero_padding_rows(out, segment_ids)


def _block_mask(nb: int, blk: int, r, seg, window: int) -> jax.Array:
    """Mask between query block i and key block (i - r) mod nb, for all i: [B|1, nb, 1, 1, bq, bk]."""
    pos = jnp.arange(nb * blk, dtype=jnp.int32).reshape(nb, blk)
    kpos = jnp.roll(pos, r, axis=0)
    if seg is None:
        m = attention_mask(pos, kpos, window=window)[None]
    else:
        m = attention_mask(pos[None], kpos[None], window=window, q_segment_ids=seg,
                           k_segment_ids=jnp.roll(seg, r, axis=1))
    return m[:, :, None, None]


def _flash_fwd_impl(q, k, v, seg, window, scale, n_diag):
    b, nb, blk, kv, g, d = q.shape

    def step(r, carry):
        o, m, l = carry
        ks = jnp.roll(k, r, axis=1)
        vs = jnp.roll(v, r, axis=1)
        s = jnp.einsum("bnqkgd,bnskd->bnkgqs", q, ks, preferred_element_type=jnp.float32) * scale
        mask = _block_mask(nb, blk, r, seg, window)
        s = jnp.where(mask, s, _NEG)
        m_new = jnp.maximum(m, jnp.max(s, axis=-1))
        alpha = jnp.exp(m - m_new)
        p = jnp.exp(s - m_new[..., None]) * mask
        l = alpha * l + jnp.sum(p, axis=-1)
        pv = jnp.einsum("bnkgqs,bnskd->bnkgqd", p.astype(v.dtype), vs,
                        preferred_element_type=jnp.float32)
        o = alpha[..., None] * o + pv
        return o, m_new, l

    o0 = jnp.zeros((b, nb, kv, g, blk, d), jnp.float32)
    m0 = jnp.full((b, nb, kv, g, blk), _NEG, jnp.float32)
    l0 = jnp.zeros((b, nb, kv, g, blk), jnp.float32)
    o, m, l = jax.lax.fori_loop(0, n_diag, step, (o0, m0, l0))
    live = l > 0
    o = o / jnp.where(live, l, 1.0)[..., None]
    lse = jnp.where(live, m + jnp.log(jnp.where(live, l, 1.0)), 0.0)
    out = jnp.transpose(o, (0, 1, 4, 2, 3, 5)).astype(q.dtype)          # [B,nb,blk,KV,G,Dh]
    return out, lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _flash(q, k, v, seg, window, scale, n_diag):
    return _flash_fwd_impl(q, k, v, seg, window, scale, n_diag)[0]


def _flash_fwd(q, k, v, seg, window, scale, n_diag):
    out, lse = _flash_fwd_impl(q, k, v, seg, window, scale, n_diag)
    return out, (q, k, v, seg, out, lse)


def _flash_bwd(window, scale, n_diag, res, dout):
    q, k, v, seg, out, lse = res
    b, nb, blk, kv, g, d = q.shape
    dout_t = jnp.transpose(dout, (0, 1, 3, 4, 2, 5))                       # [B,nb,KV,G,blk,Dh]
    delta = jnp.sum(dout_t.astype(jnp.float32) *
                    jnp.transpose(out, (0, 1, 3, 4, 2, 5)).astype(jnp.float32), axis=-1)
    do_c = dout_t.astype(v.dtype)

    def step(r, carry):
        dq, dk, dv = carry
        ks = jnp.roll(k, r, axis=1)
        vs = jnp.roll(v, r, axis=1)
        s = jnp.einsum("bnqkgd,bnskd->bnkgqs", q, ks, preferred_element_type=jnp.float32) * scale
        mask = _block_mask(nb, blk, r, seg, window)
        p = jnp.exp(jnp.where(mask, s - lse[..., None], _NEG)) * mask
        dv_s = jnp.einsum("bnkgqs,bnkgqd->bnskd", p.astype(v.dtype), do_c,
                          preferred_element_type=jnp.float32)
        dp = jnp.einsum("bnkgqd,bnskd->bnkgqs", do_c, vs, preferred_element_type=jnp.float32)
        ds = (p * (dp - delta[..., None])) * scale
        dsc = ds.astype(q.dtype)
        dq = dq + jnp.einsum("bnkgqs,bnskd->bnqkgd", dsc, ks, preferred_element_type=jnp.float32)
        dk_s = jnp.einsum("bnkgqs,bnqkgd->bnskd", dsc, q, preferred_element_type=jnp.float32)
        dk = dk + jnp.roll(dk_s, -r, axis=1)
        dv = dv + jnp.roll(dv_s, -r, axis=1)
        return dq, dk, dv

    dq0 = jnp.zeros(q.shape, jnp.float32)
    dk0 = jnp.zeros(k.shape, jnp.float32)
    dv0 = jnp.zeros(v.shape, jnp.float32)
    dq, dk, dv = jax.lax.fori_loop(0, n_diag, step, (dq0, dk0, dv0))
    dseg = None if seg is None else np.zeros(seg.shape, jax.dtypes.float0)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), dseg


_flash.defvjp(_flash_fwd, _flash_bwd)

