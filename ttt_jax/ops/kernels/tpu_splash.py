"""TPU attention kernels: JAX's Pallas (Mosaic) splash attention, wrapped for ttt-jax.

Two layers:

* :func:`tpu_attention` -- single-device causal attention (optionally a sliding window), packed
  segment ids, GQA, any length: one splash call with its own VJP.
* :func:`splash_block_fwd` / :func:`splash_block_bwd` -- one (query block, key block) pair that
  returns its log-sum-exp, and the pair's gradients given the *global* (merged) output and
  log-sum-exp. These are the TPU counterparts of ``flash_block_fwd`` / ``flash_block_bwd`` (the GPU
  Pallas-Triton blocks of the context-parallel ring): the ring merges the pairs' partial results by
  their log-sum-exps and, going backward, needs each pair's gradient of the *global* softmax
  (``P = exp(S - lse)``, ``dS = P * (dO V^T - rowsum(dO * O))``), which splash's own VJP cannot give
  (it recomputes from its own block-local statistics). The backward therefore calls splash's
  backward kernels (``_splash_attention_bwd``, a private function of
  ``jax.experimental.pallas.ops.tpu.splash_attention``) with the merged statistics;
  :func:`private_api_problem` says when that function is not as expected.

Shapes (``[B, T, H, Dh]`` like the rest of ``ttt_jax.ops``)::

    q: [B, Tq, H, Dh]   k, v: [B, Tk, KV, Dh]   H % KV == 0 (query head h uses kv head h // (H//KV))
    segment ids: [B, Tq] / [B, Tk] int32        lse: [B, H, Tq] float32 (natural log)

Masks of a block (static): ``causal=False``: every query sees every key; ``causal=True``: query
``i`` sees key ``j`` iff ``j <= i + offset`` and, with ``window > 0``, ``j > i + offset - window``
(``offset``: the key index of query 0's diagonal, so keys ``[halo | local]`` with a halo of ``h``
keys take ``offset=h``). With segment ids, on top: equal ids only. Splash's masks are lazy and
block-sparse: key tiles that a mask hides entirely are never visited.

Splash attends among equal ids, 0 included, so padding (id 0) queries see padding keys; the public
functions zero their rows. A query that sees no key of a *block* gets a log-sum-exp near splash's
mask value (about -2.4e38) and so drops out of any merge; every query sees at least itself in the
ring's and the halo's diagonal blocks, so no row of a merged result is empty.

Lengths: splash tiles are multiples of 128 (TPU lanes). Blocks must have lengths that are
multiples of 128; :func:`tpu_attention` pads. The logit scale is folded into ``q`` (splash has no
scale argument); ``dq`` is scaled back.

Off TPU the kernels run in Pallas interpret mode (``interpret=True``; slow, CPU tests). Callers
decide ``interpret`` from the platform the program is built for, not the host's backend, so an
ahead-of-time compile for TPU on a CPU host emits the Mosaic kernels.
"""

from __future__ import annotations

import functools
import inspect
import math
from typing import Optional

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as _sk
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as _sm

LANES = 128  # splash's tile granularity
_TILES = (512, 256, 128)  # preferred tile lengths, largest first


def tile_length(t: int) -> int:
    """Largest of 512 / 256 / 128 dividing ``t`` (``t`` a multiple of 128)."""
    for b in _TILES:
        if t % b == 0:
            return b
    raise ValueError(f"TPU splash blocks need lengths that are multiples of {LANES}, got {t}")


def private_api_problem() -> Optional[str]:
    """Why splash's private backward (used by :func:`splash_block_bwd`) cannot be called as this
    module expects (``None`` when it can)."""
    fn = getattr(_sk, "_splash_attention_bwd", None)
    if fn is None:
        return "jax's splash attention has no _splash_attention_bwd"
    names = list(inspect.signature(fn).parameters)
    want = ["save_residuals", "mask_value", "is_mqa", "block_sizes", "residual_checkpoint_name",
            "mask_function", "attn_logits_soft_cap", "interpret", "res", "do"]
    if names != want:
        return f"splash's _splash_attention_bwd takes {names}, expected {want}"
    return None


@functools.lru_cache(maxsize=256)
def _kernel(tq: int, tk: int, heads: int, causal: bool, window: int, offset: int,
            residuals: bool, interpret: bool):
    """A splash kernel for ``[heads, tq, Dh] x [KV, tk, Dh]`` with one static mask."""
    if not causal:
        head_mask = _sm.FullMask((tq, tk))
    elif window > 0:
        head_mask = _sm.LocalMask((tq, tk), window_size=(window - 1, 0), offset=offset)
    else:
        head_mask = _sm.CausalMask((tq, tk), offset=offset)
    bq, bk = tile_length(tq), tile_length(tk)
    sizes = _sk.BlockSizes(block_q=bq, block_kv=bk, block_kv_compute=bk, block_q_dkv=bq,
                           block_kv_dkv=bk, block_kv_dkv_compute=bk, block_q_dq=bq, block_kv_dq=bk)
    # Concrete mask tables even when first built inside a trace (the kernel is cached).
    with jax.ensure_compile_time_eval():
        return _sk.make_splash_mha(_sm.MultiHeadMask([head_mask] * heads), block_sizes=sizes,
                                   head_shards=1, q_seq_shards=1, save_residuals=residuals,
                                   interpret=interpret)


def _heads_major(x):
    return jnp.transpose(x, (0, 2, 1, 3))  # [B, T, H, D] <-> [B, H, T, D]


def _check_block(q, k, v, q_seg, k_seg, causal, what):
    if q.ndim != 4 or k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3] \
            or q.shape[2] % k.shape[2]:
        raise ValueError(f"{what}: expected q [B,Tq,H,Dh], k and v [B,Tk,KV,Dh] with H % KV == 0; "
                         f"got q {q.shape}, k {k.shape}, v {v.shape}")
    if q.shape[1] % LANES or k.shape[1] % LANES:
        raise ValueError(f"{what}: block lengths must be multiples of {LANES}, got {q.shape[1]} "
                         f"and {k.shape[1]}")
    if (q_seg is None) != (k_seg is None):
        raise ValueError(f"{what}: pass both q_segment_ids and k_segment_ids, or neither")
    del causal


def _segments(q_seg, k_seg):
    if q_seg is None:
        return None
    return _sk.SegmentIds(q=q_seg.astype(jnp.int32), kv=k_seg.astype(jnp.int32))


def splash_block_fwd(q: jax.Array, k: jax.Array, v: jax.Array, *, causal: bool, scale: float,
                     window: int = 0, offset: int = 0, q_segment_ids: Optional[jax.Array] = None,
                     k_segment_ids: Optional[jax.Array] = None, interpret: bool = False
                     ) -> tuple[jax.Array, jax.Array]:
    """Attention of one (query block, key block) pair with its log-sum-exp (splash forward).

    Args:
      q: ``[B, Tq, H, Dh]``; k, v: ``[B, Tk, KV, Dh]``; ``Tq``, ``Tk`` multiples of 128.
      causal, window, offset: the block's mask (module docstring).
      scale: logit scale.
      q_segment_ids, k_segment_ids: optional ``[B, Tq]`` / ``[B, Tk]`` int ids (both or neither).
      interpret: Pallas interpret mode (off TPU).

    Returns:
      ``out [B, Tq, H, Dh]`` float32 (normalised within the block) and ``lse [B, H, Tq]`` float32.
    """
    _check_block(q, k, v, q_segment_ids, k_segment_ids, causal, "splash_block_fwd")
    kernel = _kernel(q.shape[1], k.shape[1], q.shape[2], bool(causal), int(window), int(offset),
                     True, bool(interpret))
    qh = _heads_major((q.astype(jnp.float32) * scale).astype(q.dtype))
    kh, vh = _heads_major(k.astype(q.dtype)), _heads_major(v.astype(q.dtype))
    seg = _segments(q_segment_ids, k_segment_ids)
    out, (lse,) = jax.vmap(lambda q_, k_, v_, s_: kernel(q_, k_, v_, segment_ids=s_))(qh, kh, vh, seg)
    return _heads_major(out).astype(jnp.float32), lse


def splash_block_bwd(q: jax.Array, k: jax.Array, v: jax.Array, do: jax.Array, out: jax.Array,
                     lse: jax.Array, *, causal: bool, scale: float, window: int = 0,
                     offset: int = 0, q_segment_ids: Optional[jax.Array] = None,
                     k_segment_ids: Optional[jax.Array] = None, interpret: bool = False
                     ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Gradients of one (query block, key block) pair given the *global* softmax statistics.

    Args:
      q, k, v, causal, scale, window, offset, q_segment_ids, k_segment_ids, interpret: as in
        :func:`splash_block_fwd`.
      do: ``[B, Tq, H, Dh]`` cotangent of the global attention output.
      out: ``[B, Tq, H, Dh]`` the global (merged) output (for ``rowsum(do * out)``).
      lse: ``[B, H, Tq]`` float32 log-sum-exp of each query over all the keys it sees.

    Returns:
      ``dq [B, Tq, H, Dh]``, ``dk, dv [B, Tk, KV, Dh]``, float32: this pair's contributions.
    """
    _check_block(q, k, v, q_segment_ids, k_segment_ids, causal, "splash_block_bwd")
    problem = private_api_problem()
    if problem is not None:
        raise RuntimeError(f"splash_block_bwd: {problem}")
    kernel = _kernel(q.shape[1], k.shape[1], q.shape[2], bool(causal), int(window), int(offset),
                     True, bool(interpret))
    kw = kernel.kwargs
    qh = _heads_major((q.astype(jnp.float32) * scale).astype(q.dtype))
    kh, vh = _heads_major(k.astype(q.dtype)), _heads_major(v.astype(q.dtype))
    doh = _heads_major(do.astype(q.dtype))
    oh = _heads_major(out.astype(jnp.float32))
    seg = _segments(q_segment_ids, k_segment_ids)
    dq_info, dkv_info = _collapse(kernel.dq_mask_info), _collapse(kernel.dkv_mask_info)

    def one(q_, k_, v_, s_, o_, l_, do_):
        res = (q_, k_, v_, s_, None, o_, l_, dq_info, dkv_info)
        grads = _sk._splash_attention_bwd(False, kw["mask_value"], kw["is_mqa"], kw["block_sizes"],
                                          None, kw["mask_function"], kw["attn_logits_soft_cap"],
                                          kw["interpret"], res, do_)
        return grads[3:6]

    dq, dk, dv = jax.vmap(one)(qh, kh, vh, seg, oh, lse, doh)
    f32 = lambda x: _heads_major(x).astype(jnp.float32)
    return f32(dq) * scale, f32(dk), f32(dv)


def _collapse(info):
    """Splash's mask info as its jitted entry point hands it to the kernels (partial mask blocks
    flattened to ``[n, bq, bk]``)."""
    if info is None or info.partial_mask_blocks is None:
        return info
    pmb = info.partial_mask_blocks
    return info._replace(partial_mask_blocks=pmb.reshape(-1, *pmb.shape[-2:]))


# --------------------------------------------------------------------------------------------------
# Single-device attention
# --------------------------------------------------------------------------------------------------


def padded_length(t: int) -> int:
    """``t`` rounded up to splash's tile granularity (128)."""
    return -(-t // LANES) * LANES


def tpu_attention(q: jax.Array, k: jax.Array, v: jax.Array, *,
                  segment_ids: Optional[jax.Array] = None, window: int = 0,
                  scale: Optional[float] = None, interpret: bool = False) -> jax.Array:
    """Causal self-attention by one splash kernel (TPU; Pallas interpret mode elsewhere).

    Args:
      q: ``[B, T, H, Dh]``; k, v: ``[B, T, KV, Dh]`` (GQA natively: K/V are never repeated).
      segment_ids: optional ``[B, T]`` int, 0 = padding (output 0, no gradient); a query sees only
        keys with its own id.
      window: 0 = full causal; ``> 0``: the query and the ``window - 1`` keys before it.
      scale: logit scale (default ``1 / sqrt(Dh)``).
      interpret: Pallas interpret mode (off TPU).

    Returns:
      ``[B, T, H, Dh]`` in ``q.dtype``. Any ``T``: padded to a multiple of 128 at the end (padding
      is invisible to real queries under the causal mask, or has segment id 0).
    """
    b, t, h, d = q.shape
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    tp = padded_length(t)
    pad = [(0, 0), (0, tp - t), (0, 0), (0, 0)]
    qh = _heads_major(jnp.pad((q.astype(jnp.float32) * scale).astype(q.dtype), pad))
    kh, vh = (_heads_major(jnp.pad(x.astype(q.dtype), pad)) for x in (k, v))
    kernel = _kernel(tp, tp, h, True, int(window), 0, False, bool(interpret))
    if segment_ids is None:
        out = jax.vmap(kernel)(qh, kh, vh)
    else:
        seg = jnp.pad(segment_ids.astype(jnp.int32), [(0, 0), (0, tp - t)])
        out = jax.vmap(lambda q_, k_, v_, s_: kernel(q_, k_, v_, segment_ids=_sk.SegmentIds(s_, s_)))(
            qh, kh, vh, seg)
    out = _heads_major(out)[:, :t].astype(q.dtype)
    if segment_ids is not None:
        out = jnp.where((segment_ids != 0)[:, :, None, None], out, jnp.zeros((), out.dtype))
    return out
