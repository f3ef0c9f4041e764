"""Flash-attention block kernels in Pallas (Triton lowering on NVIDIA GPUs) for ring attention.

Ring attention merges the partial results of several (query block, key block) pairs with their
log-sum-exps, and its backward pass needs each pair's gradients computed from the *merged* output
and log-sum-exp. A fused kernel for one pair therefore has to expose both: the forward returns
``(out, lse)`` in float32, and the backward takes ``lse`` and ``delta = rowsum(dO * O)`` of the
global result (the standard flash-attention backward: ``P = exp(S * scale - lse)``,
``dS = P * (dO V^T - delta)``). The public cuDNN API offers neither (its residual LSE comes back in
the output dtype and its VJP ignores an LSE cotangent), hence these kernels.

Shapes (all functions)::

    q: [B, Tq, H, Dh]    k, v: [B, Tk, KV, Dh]    H % KV == 0 (GQA: head h uses kv head h // G)
    lse, delta: [B, H, Tq] float32

Masks: ``causal=False`` (every query sees every key) or ``causal=True`` (``Tq == Tk``, query ``i``
sees keys ``j <= i``: a diagonal block whose local order is the global order). No segment ids:
callers fall back to the XLA path for packed documents.

GQA: the forward and dQ kernels read kv head ``h // G`` through their block index maps (K/V are
never repeated in memory); the dK/dV kernel writes one gradient per *query* head and the wrapper
sums each group of ``G`` (an ``[B, Tk, H, Dh]`` float32 temporary).

Off GPU the kernels run in Pallas interpret mode (``interpret=True``; slow, for the CPU tests).
Head dims that are not a power of two (>= 16) are zero-padded (exact: padded query/key columns add
zero to the scores, padded value columns are sliced off).
"""

from __future__ import annotations

import functools
import inspect
import math
from typing import Optional

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

_NEG = -1e30  # finite "minus infinity": exp2(_NEG - m) == 0 for any finite row max m
# The kernels work in base 2 (exp2 is the hardware instruction; exp would cost a multiply more per
# score): logits are scaled by scale * log2(e), and log-sum-exps cross the API in natural log.
_LOG2E = math.log2(math.e)
# A squeezed block dimension (``None`` in older Pallas, ``pl.squeezed`` where it exists).
_SQ = getattr(pl, "squeezed", None)
_LN2 = math.log(2.0)
_MIN_BLOCK = 16  # Triton's smallest matmul tile
# Default tiles (queries x keys) for head_dim <= 128. Forward: long query tiles amortise the K/V
# loads; backward: square. Halved for larger heads (register pressure of the fp32 accumulators).
_FWD_BLOCKS = (128, 64)
_BWD_BLOCKS = (64, 64)
# Triton (num_warps, num_stages) of the forward and backward kernels; None: 4 warps for
# head_dim <= 64, else 8, and 2 stages.
_LAUNCH = {"fwd": None, "bwd": None}


def _tiles(want: Optional[int], default: int, head_dim: int) -> int:
    if want is not None:
        return want
    return default if head_dim <= 128 else default // 2


def _compiler_params(head_dim: int, which: str):
    """Triton launch parameters (ignored in interpret mode)."""
    from jax.experimental.pallas import triton as plgpu
    warps, stages = _LAUNCH[which] or (4 if head_dim <= 64 else 8, 2)
    return plgpu.CompilerParams(num_warps=warps, num_stages=stages)


def _block(t: int, want: int) -> int:
    """Largest power of two ``<= want`` dividing ``t`` (``t`` a multiple of ``_MIN_BLOCK``)."""
    if want < _MIN_BLOCK or want & (want - 1):
        raise ValueError(f"flash kernel tiles must be powers of two >= {_MIN_BLOCK}, got {want}")
    b = want
    while t % b:
        b //= 2
    return b


def _pad_dim(d: int) -> int:
    return max(_MIN_BLOCK, 1 << (d - 1).bit_length())


def flash_unsupported_reason(q: jax.Array, k: jax.Array, *, causal: bool = False,
                             interpret: bool = False) -> Optional[str]:
    """Why the kernels cannot run on these operands (``None`` when they can).

    Needs a GPU (unless ``interpret``), lengths that are multiples of 16, ``Tq == Tk`` when causal,
    ``head_dim <= 256`` and, on GPU, bfloat16 or float16 inputs.
    """
    if not interpret and jax.default_backend() != "gpu":
        return f"the Pallas flash kernels need an NVIDIA GPU (default backend is {jax.default_backend()!r})"
    if not interpret and q.dtype not in (jnp.bfloat16, jnp.float16):
        return f"the Pallas flash kernels need bfloat16/float16 inputs on GPU, got {q.dtype}"
    tq, tk, d = q.shape[1], k.shape[1], q.shape[-1]
    if tq % _MIN_BLOCK or tk % _MIN_BLOCK:
        return f"the Pallas flash kernels need block lengths that are multiples of {_MIN_BLOCK}, got {tq} and {tk}"
    if causal and tq != tk:
        return f"a causal block needs as many queries as keys, got {tq} and {tk}"
    if d > 256:
        return f"the Pallas flash kernels support head_dim <= 256, got {d}"
    return None


def _dot_nt(a, b):
    """``a [m, d] @ b [n, d]^T -> [m, n]`` float32."""
    return lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def _dot_tn(a, b):
    """``a [m, n]^T @ b [m, d] -> [n, d]`` float32."""
    return lax.dot_general(a, b, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def _dot(a, b):
    return lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def _causal_mask(q0, k0, bq: int, bk: int):
    return (q0 + jnp.arange(bq))[:, None] >= (k0 + jnp.arange(bk))[None, :]


# --------------------------------------------------------------------------------------------------
# Kernels (one program per query tile or key tile, batch element and query head)
# --------------------------------------------------------------------------------------------------


def _fwd_kernel(q_ref, k_ref, v_ref, o_ref, lse_ref, *, scale, causal, bq, bk):
    i = pl.program_id(0)
    q = q_ref[...]                                                     # [bq, D]
    d = q.shape[-1]

    def body(j, carry, masked):
        acc, m, l = carry
        k = k_ref[pl.ds(j * bk, bk), :]
        v = v_ref[pl.ds(j * bk, bk), :]
        s = _dot_nt(q, k) * (scale * _LOG2E)                           # [bq, bk], base 2
        if masked:
            s = jnp.where(_causal_mask(i * bq, j * bk, bq, bk), s, _NEG)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        corr = jnp.exp2(m - m_new)
        p = jnp.exp2(s - m_new[:, None])
        l = l * corr + jnp.sum(p, axis=1)
        acc = acc * corr[:, None] + _dot(p.astype(v.dtype), v)
        return acc, m_new, l

    carry = (jnp.zeros((bq, d), jnp.float32), jnp.full((bq,), _NEG, jnp.float32),
             jnp.zeros((bq,), jnp.float32))
    carry = _key_loop(body, carry, i, causal, bq, bk, k_ref.shape[0] // bk)
    acc, m, l = carry
    o_ref[...] = (acc / l[:, None]).astype(o_ref.dtype)
    lse_ref[...] = (m + jnp.log2(l)) * _LN2


def _key_loop(body, carry, i, causal, bq, bk, n_k):
    """Run ``body(j, carry, masked)`` over the key tiles query tile ``i`` sees.

    Causal: tiles entirely below the diagonal without the mask, then the diagonal tiles with it;
    tiles past the query tile's last row are skipped (key 0 is always visible, so no row is empty).
    """
    if not causal:
        return lax.fori_loop(0, n_k, functools.partial(body, masked=False), carry)
    n_full = lax.div(i * bq, bk)                      # tiles ending at or before the first row
    n_seen = lax.div((i + 1) * bq + bk - 1, bk)       # tiles starting at or before the last row
    carry = lax.fori_loop(0, n_full, functools.partial(body, masked=False), carry)
    return lax.fori_loop(n_full, n_seen, functools.partial(body, masked=True), carry)


def _query_loop(body, carry, j, causal, bq, bk, n_q):
    """Run ``body(i, carry, masked)`` over the query tiles that see key tile ``j`` (causal: the
    diagonal tiles with the mask, then the tiles entirely below the diagonal without it)."""
    if not causal:
        return lax.fori_loop(0, n_q, functools.partial(body, masked=False), carry)
    first = lax.div(j * bk, bq)                                 # first tile with a row >= j * bk
    first_full = jnp.minimum(lax.div((j + 1) * bk - 1 + bq - 1, bq), n_q)  # first row >= last key
    carry = lax.fori_loop(first, first_full, functools.partial(body, masked=True), carry)
    return lax.fori_loop(first_full, n_q, functools.partial(body, masked=False), carry)


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref, *, scale, causal, bq, bk):
    i = pl.program_id(0)
    q = q_ref[...]
    do = do_ref[...]
    lse = lse_ref[...] * _LOG2E
    delta = delta_ref[...]

    def body(j, dq, masked):
        k = k_ref[pl.ds(j * bk, bk), :]
        v = v_ref[pl.ds(j * bk, bk), :]
        s = _dot_nt(q, k) * (scale * _LOG2E)
        if masked:
            s = jnp.where(_causal_mask(i * bq, j * bk, bq, bk), s, _NEG)
        p = jnp.exp2(s - lse[:, None])
        ds = p * (_dot_nt(do, v) - delta[:, None])
        return dq + _dot(ds.astype(k.dtype), k)

    dq = _key_loop(body, jnp.zeros(q.shape, jnp.float32), i, causal, bq, bk, k_ref.shape[0] // bk)
    dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


def _dkv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, *, scale, causal,
                bq, bk):
    j = pl.program_id(0)
    k = k_ref[...]                                                     # [bk, D]
    v = v_ref[...]

    def body(i, carry, masked):
        dk, dv = carry
        q = q_ref[pl.ds(i * bq, bq), :]
        do = do_ref[pl.ds(i * bq, bq), :]
        lse = lse_ref[pl.ds(i * bq, bq)] * _LOG2E
        delta = delta_ref[pl.ds(i * bq, bq)]
        s = _dot_nt(q, k) * (scale * _LOG2E)                           # [bq, bk], base 2
        if masked:
            s = jnp.where(_causal_mask(i * bq, j * bk, bq, bk), s, _NEG)
        p = jnp.exp2(s - lse[:, None])
        dv = dv + _dot_tn(p.astype(do.dtype), do)
        ds = p * (_dot_nt(do, v) - delta[:, None])
        dk = dk + _dot_tn(ds.astype(q.dtype), q)
        return dk, dv

    zeros = jnp.zeros(k.shape, jnp.float32)
    dk, dv = _query_loop(body, (zeros, zeros), j, causal, bq, bk, q_ref.shape[0] // bq)
    dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


# --------------------------------------------------------------------------------------------------
# Wrappers
# --------------------------------------------------------------------------------------------------


def _out(shape, like: jax.Array) -> jax.ShapeDtypeStruct:
    """A float32 kernel output that varies over the same manual mesh axes as ``like``.

    Inside a ``jax.shard_map`` that checks axis variance, ``pallas_call`` needs to be told how its
    outputs vary; the keyword has been renamed across JAX versions (``vma`` -> ``manual_axis_type``).
    """
    aval = jax.typeof(like)
    params = inspect.signature(jax.ShapeDtypeStruct).parameters
    for key, attr in (("manual_axis_type", "mat"), ("vma", "vma")):
        if key in params and getattr(aval, attr, None) is not None:
            return jax.ShapeDtypeStruct(shape, jnp.float32, **{key: getattr(aval, attr)})
    return jax.ShapeDtypeStruct(shape, jnp.float32)


def _pad_head(x, dp):
    d = x.shape[-1]
    return x if d == dp else jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, dp - d)])


def _check(q, k, v, causal, interpret, what):
    if k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3] or q.shape[2] % k.shape[2]:
        raise ValueError(f"{what}: expected q [B,Tq,H,Dh] and k, v [B,Tk,KV,Dh] with H % KV == 0; got "
                         f"q {q.shape}, k {k.shape}, v {v.shape}")
    reason = flash_unsupported_reason(q, k, causal=causal, interpret=interpret)
    if reason is not None:
        raise ValueError(f"{what}: {reason}")


@functools.partial(jax.jit, static_argnames=("causal", "scale", "interpret", "block_q", "block_k"))
def flash_block_fwd(q: jax.Array, k: jax.Array, v: jax.Array, *, causal: bool, scale: float,
                    interpret: bool = False, block_q: Optional[int] = None,
                    block_k: Optional[int] = None) -> tuple[jax.Array, jax.Array]:
    """Attention of one (query block, key block) pair with its log-sum-exp.

    Args:
      q: ``[B, Tq, H, Dh]``; k, v: ``[B, Tk, KV, Dh]`` (same dtype).
      causal: ``False`` (no mask) or ``True`` (``Tq == Tk``, top-left aligned causal mask).
      scale: logit scale.
      interpret: run in Pallas interpret mode (any backend; slow).
      block_q, block_k: tile sizes (powers of two, reduced to divide the lengths; default 128 x 64,
        halved for head_dim > 128).

    Returns:
      ``out [B, Tq, H, Dh]`` float32 (normalised within this block) and ``lse [B, H, Tq]`` float32
      (natural log of each row's sum of ``exp(scale * q.k)``).
    """
    _check(q, k, v, causal, interpret, "flash_block_fwd")
    b, tq, h, d = q.shape
    tk, g = k.shape[1], h // k.shape[2]
    dp = _pad_dim(d)
    q, k, v = (_pad_head(x, dp) for x in (q, k, v))
    bq = _block(tq, _tiles(block_q, _FWD_BLOCKS[0], dp))
    bk = _block(tk, _tiles(block_k, _FWD_BLOCKS[1], dp))
    kernel = functools.partial(_fwd_kernel, scale=scale, causal=causal, bq=bq, bk=bk)
    out, lse = pl.pallas_call(
        kernel,
        grid=(tq // bq, b, h),
        in_specs=[pl.BlockSpec((_SQ, bq, _SQ, dp), lambda i, bi, hi: (bi, i, hi, 0)),
                  pl.BlockSpec((_SQ, tk, _SQ, dp), lambda i, bi, hi: (bi, 0, hi // g, 0)),
                  pl.BlockSpec((_SQ, tk, _SQ, dp), lambda i, bi, hi: (bi, 0, hi // g, 0))],
        out_specs=[pl.BlockSpec((_SQ, bq, _SQ, dp), lambda i, bi, hi: (bi, i, hi, 0)),
                   pl.BlockSpec((_SQ, _SQ, bq), lambda i, bi, hi: (bi, hi, i))],
        out_shape=[_out((b, tq, h, dp), q), _out((b, h, tq), q)],
        compiler_params=None if interpret else _compiler_params(dp, "fwd"),
        interpret=interpret,
        name="ring_flash_fwd",
    )(q, k, v)
    return out[..., :d], lse


@functools.partial(jax.jit, static_argnames=("causal", "scale", "interpret", "block_q", "block_k"))
def flash_block_bwd(q: jax.Array, k: jax.Array, v: jax.Array, do: jax.Array, lse: jax.Array,
                    delta: jax.Array, *, causal: bool, scale: float, interpret: bool = False,
                    block_q: Optional[int] = None, block_k: Optional[int] = None
                    ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Gradients of one (query block, key block) pair given the *global* softmax statistics.

    Args:
      q, k, v, causal, scale, interpret: as in :func:`flash_block_fwd`.
      do: ``[B, Tq, H, Dh]`` cotangent of the (global) attention output, cast to ``q.dtype``.
      lse: ``[B, H, Tq]`` float32 log-sum-exp of each query row over *all* the keys it sees.
      delta: ``[B, H, Tq]`` float32 ``rowsum(do * out)`` with the global output.
      block_q, block_k: tile sizes of both backward kernels (default 64 x 64, halved for
        head_dim > 128).

    Returns:
      ``dq [B, Tq, H, Dh]``, ``dk, dv [B, Tk, KV, Dh]``, all float32: this pair's contributions.
    """
    _check(q, k, v, causal, interpret, "flash_block_bwd")
    b, tq, h, d = q.shape
    tk, kvh = k.shape[1], k.shape[2]
    g = h // kvh
    dp = _pad_dim(d)
    q, k, v, do = (_pad_head(x, dp) for x in (q, k, v, do.astype(q.dtype)))
    bq = _block(tq, _tiles(block_q, _BWD_BLOCKS[0], dp))
    bk = _block(tk, _tiles(block_k, _BWD_BLOCKS[1], dp))
    params = None if interpret else _compiler_params(dp, "bwd")
    qspec = pl.BlockSpec((_SQ, bq, _SQ, dp), lambda i, bi, hi: (bi, i, hi, 0))
    kfull = pl.BlockSpec((_SQ, tk, _SQ, dp), lambda i, bi, hi: (bi, 0, hi // g, 0))
    rowspec = pl.BlockSpec((_SQ, _SQ, bq), lambda i, bi, hi: (bi, hi, i))
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, scale=scale, causal=causal, bq=bq, bk=bk),
        grid=(tq // bq, b, h),
        in_specs=[qspec, kfull, kfull, qspec, rowspec, rowspec],
        out_specs=qspec,
        out_shape=_out((b, tq, h, dp), q),
        compiler_params=params, interpret=interpret, name="ring_flash_dq",
    )(q, k, v, do, lse, delta)

    qfull = pl.BlockSpec((_SQ, tq, _SQ, dp), lambda j, bi, hi: (bi, 0, hi, 0))
    kspec = pl.BlockSpec((_SQ, bk, _SQ, dp), lambda j, bi, hi: (bi, j, hi // g, 0))
    rowfull = pl.BlockSpec((_SQ, _SQ, tq), lambda j, bi, hi: (bi, hi, 0))
    dkvspec = pl.BlockSpec((_SQ, bk, _SQ, dp), lambda j, bi, hi: (bi, j, hi, 0))  # per query head
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, scale=scale, causal=causal, bq=bq, bk=bk),
        grid=(tk // bk, b, h),
        in_specs=[qfull, kspec, kspec, qfull, rowfull, rowfull],
        out_specs=[dkvspec, dkvspec],
        out_shape=[_out((b, tk, h, dp), q)] * 2,
        compiler_params=params, interpret=interpret, name="ring_flash_dkv",
    )(q, k, v, do, lse, delta)
    if g > 1:  # sum the query heads of each kv group
        dk, dv = (x.reshape(b, tk, kvh, g, dp).sum(axis=3) for x in (dk, dv))
    return dq[..., :d], dk[..., :d], dv[..., :d]


def flash_delta(out: jax.Array, do: jax.Array) -> jax.Array:
    """``rowsum(do * out)`` as ``[B, H, T]`` float32 (``out``, ``do``: ``[B, T, H, Dh]``)."""
    return jnp.einsum("bthd,bthd->bht", out.astype(jnp.float32), do.astype(jnp.float32))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def flash_attention(q: jax.Array, k: jax.Array, v: jax.Array, causal: bool = True,
                    scale: Optional[float] = None, interpret: bool = False) -> jax.Array:
    """Single-device attention through the block kernels (``[B, T, H, Dh]`` out in ``q.dtype``).

    The kernels' own test harness and op benchmark; the ring in :mod:`parallel.fused_attention` calls
    :func:`flash_block_fwd` / :func:`flash_block_bwd` directly.
    """
    return _flash_attention_fwd(q, k, v, causal, scale, interpret)[0]


def _scale(q, scale):
    return 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)


def _flash_attention_fwd(q, k, v, causal, scale, interpret):
    out, lse = flash_block_fwd(q, k, v, causal=causal, scale=_scale(q, scale), interpret=interpret)
    out = out.astype(q.dtype)
    return out, (q, k, v, out, lse)


def _flash_attention_bwd(causal, scale, interpret, res, do):
    q, k, v, out, lse = res
    dq, dk, dv = flash_block_bwd(q, k, v, do, lse, flash_delta(out, do), causal=causal,
                                 scale=_scale(q, scale), interpret=interpret)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


flash_attention.defvjp(_flash_attention_fwd, _flash_attention_bwd)
