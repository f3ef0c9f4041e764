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

import concurrent.futures
import functools
import inspect
import math
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as _sk
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as _sm
from jax._src import config as _jax_config

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
    def build():
        # Concrete mask tables even when first built inside a trace (the kernel is cached).
        with jax.ensure_compile_time_eval():
            return _sk.make_splash_mha(_sm.MultiHeadMask([head_mask] * heads), block_sizes=sizes,
                                       head_shards=1, q_seq_shards=1, save_residuals=residuals,
                                       interpret=interpret)

    # On a thread of its own: JAX's trace and mesh contexts are per thread, so the tables are plain
    # host arrays also when the first call is traced under a mesh of TPU devices that a CPU host
    # only describes (`ttt-jax compile`), where placing an array on the mesh fails.
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(build).result()


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
    out, (lse,) = _unchecked(jax.vmap(lambda q_, k_, v_, s_: kernel(q_, k_, v_, segment_ids=s_)),
                             qh, kh, vh, seg)
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

    dq, dk, dv = _unchecked(jax.vmap(one), qh, kh, vh, seg, oh, lse, doh)
    f32 = lambda x: _heads_major(x).astype(jnp.float32)
    return f32(dq) * scale, f32(dk), f32(dv)


def vary_like(x: jax.Array, *likes: jax.Array) -> jax.Array:
    """Inside ``shard_map``, ``x`` typed as varying over every manual axis any of ``likes`` varies
    over (unchanged elsewhere)."""
    def axes(a):
        aval = jax.typeof(a)
        vma = getattr(aval, "vma", None)
        if vma is None:
            vma = getattr(getattr(aval, "manual_axis_type", None), "varying", None)
        return set(vma or ())

    missing = tuple(sorted(set().union(*map(axes, likes)) - axes(x))) if likes else ()
    if not missing:
        return x
    if hasattr(jax.lax, "pcast"):
        return jax.lax.pcast(x, missing, to="varying")
    return jax.lax.pvary(x, missing)


def _unchecked(fn, *args):
    """``fn(*args)`` (splash's ``pallas_call``s) with ``shard_map``'s axis-variance check off, its
    results then typed as varying over the manual axes its inputs vary over.

    Splash declares its outputs without a variance, which a checking ``shard_map`` (the model's)
    rejects; the kernels are per-device computations, so their results vary as their inputs do.
    Every caller sits under a custom VJP, so no transpose rule sees the unchecked region.
    """
    # Mosaic takes its dots at the default precision: a process-wide "highest" (the CPU tests set
    # it) would ask it for fp32 passes on bf16 operands, which it rejects ("Bad lhs type").
    with _jax_config._check_vma(False), jax.default_matmul_precision("default"):
        out = fn(*args)
    likes = [x for x in jax.tree.leaves(args) if isinstance(x, jax.Array)]
    return jax.tree.map(lambda x: vary_like(x, *likes), out)


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


def splash_attention_call(q: jax.Array, k: jax.Array, v: jax.Array, *, causal: bool,
                          scale: float, window: int = 0, offset: int = 0,
                          q_segment_ids: Optional[jax.Array] = None,
                          k_segment_ids: Optional[jax.Array] = None,
                          interpret: bool = False) -> jax.Array:
    """One differentiable splash call: :func:`splash_block_fwd` forward and
    :func:`splash_block_bwd` backward with its own statistics. Arguments as
    :func:`splash_block_fwd`; returns ``[B, Tq, H, Dh]`` in ``q.dtype``."""
    static = (bool(causal), float(scale), int(window), int(offset), bool(interpret))
    return _call(q, k, v, q_segment_ids, k_segment_ids, static)


def _static_kw(static):
    causal, scale, window, offset, interpret = static
    return dict(causal=causal, scale=scale, window=window, offset=offset, interpret=interpret)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _call(q, k, v, qs, ks, static):
    out, _ = splash_block_fwd(q, k, v, q_segment_ids=qs, k_segment_ids=ks, **_static_kw(static))
    return out.astype(q.dtype)


def _call_fwd(q, k, v, qs, ks, static):
    out, lse = splash_block_fwd(q, k, v, q_segment_ids=qs, k_segment_ids=ks, **_static_kw(static))
    out = out.astype(q.dtype)
    return out, (q, k, v, qs, ks, out, lse)


def _call_bwd(static, res, do):
    q, k, v, qs, ks, out, lse = res
    dq, dk, dv = splash_block_bwd(q, k, v, do, out, lse, q_segment_ids=qs, k_segment_ids=ks,
                                  **_static_kw(static))
    zero = lambda s: None if s is None else np.zeros(s.shape, jax.dtypes.float0)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), zero(qs), zero(ks)


_call.defvjp(_call_fwd, _call_bwd)


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
    qp, kp, vp = (jnp.pad(x, pad) for x in (q, k.astype(q.dtype), v.astype(q.dtype)))
    seg = None
    if segment_ids is not None:
        seg = jnp.pad(segment_ids.astype(jnp.int32), [(0, 0), (0, tp - t)])
    out = splash_attention_call(qp, kp, vp, causal=True, scale=scale, window=window,
                                q_segment_ids=seg, k_segment_ids=seg, interpret=interpret)[:, :t]
    if segment_ids is not None:
        out = jnp.where((segment_ids != 0)[:, :, None, None], out, jnp.zeros((), out.dtype))
    return out
