"""Attention of new queries against a KV cache: the op of cached inference.

:func:`cache_attention`: queries at explicit positions attend to cached keys at explicit positions
(``-1`` = empty slot), causally and optionally within a sliding window -- the same pattern as
:func:`ttt_jax.ops.attention.attention_mask` (a query at ``t`` sees keys ``s <= t`` and, with
``window > 0``, ``s > t - window``; :func:`cache_mask`). Implementations:

* ``reference`` -- explicit softmax over all slots, the oracle;
* ``blockwise`` -- online softmax over key blocks in a ``lax.scan``: memory ``O(Tq * block)`` per
  head, for long prefills;
* ``pallas``    -- the TPU (Pallas Mosaic) kernel of :mod:`ttt_jax.ops.kernels.tpu_cache`: GQA
  groups' query heads together, key blocks of ``block`` slots read once, blocks that no query can
  see skipped, run once per device under a mesh
  (:func:`~ttt_jax.ops.attention_kernels.per_device`). The kernel is forward only; gradients (query-
  only TTT differentiates the cache attention) recompute through the XLA path ``auto`` would take
  off TPU. Off TPU it runs in Pallas interpret mode (slow; CPU tests);
* ``auto``      -- ``pallas`` when the program is built for TPU (:func:`ttt_jax.platform.target_platform`
  with the ``platform`` argument: the platform of the devices the computation is placed on, not the
  host's backend); elsewhere the reference when the cache fits in one block or the logits are small,
  else ``blockwise``.

The KV cache it reads and how new keys are written into it: :mod:`ttt_jax.nn.kv_cache`.
"""

from __future__ import annotations

import functools
import math
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from ttt_jax.ops.attention_kernels import per_device
from ttt_jax.ops.kernels.tpu_cache import tpu_cache_attention
from ttt_jax.platform import target_platform

_NEG = -1e30
# Largest [B, H, Tq, S] fp32 logits array impl="auto" materialises (1 GiB); longer caches are read
# blockwise.
AUTO_MAX_LOGITS = 2**28
IMPLS = ("auto", "reference", "blockwise", "pallas")


def cache_mask(q_pos: jax.Array, k_pos: jax.Array, window: int) -> jax.Array:
    """``q_pos [B, Tq]``, ``k_pos [B, S]`` (``-1`` = empty) -> ``[B, Tq, S]`` bool "may attend"."""
    q = q_pos[:, :, None]
    k = k_pos[:, None, :]
    mask = (k >= 0) & (k <= q)
    if window > 0:
        mask = mask & (k > q - window)
    return mask


def _check(q, q_pos, k, v, k_pos):
    if q.ndim != 4 or k.ndim != 4 or v.shape != k.shape:
        raise ValueError(f"q must be [B, Tq, H, Dh] and k, v [B, S, KV, Dh], got {q.shape}, {k.shape}, "
                         f"{v.shape}")
    b, tq, h, dh = q.shape
    if k.shape[0] != b or k.shape[3] != dh or h % k.shape[2]:
        raise ValueError(f"k {k.shape} does not match q {q.shape} (batch, head_dim, GQA groups)")
    if q_pos.shape != (b, tq) or k_pos.shape != k.shape[:2]:
        raise ValueError(f"q_pos must be [B, Tq] = {(b, tq)} and k_pos [B, S] = {k.shape[:2]}, got "
                         f"{q_pos.shape}, {k_pos.shape}")


def _grouped(q: jax.Array, kv_heads: int) -> jax.Array:
    b, t, h, dh = q.shape
    return q.reshape(b, t, kv_heads, h // kv_heads, dh)


def _reference(q, q_pos, k, v, k_pos, window, scale):
    b, tq, h, dh = q.shape
    qg = _grouped(q, k.shape[2])
    logits = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32) * scale
    mask = cache_mask(q_pos, k_pos, window)[:, None, None]             # [B, 1, 1, Tq, S]
    logits = jnp.where(mask, logits, _NEG)
    m = jnp.max(logits, axis=-1, keepdims=True)
    p = jnp.where(mask, jnp.exp(logits - m), 0.0)
    denom = jnp.sum(p, axis=-1, keepdims=True)
    p = p / jnp.where(denom > 0, denom, 1.0)
    out = jnp.einsum("bkgts,bskd->btkgd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return out.reshape(b, tq, h, dh).astype(q.dtype)


def _blockwise(q, q_pos, k, v, k_pos, window, scale, block):
    b, tq, h, dh = q.shape
    kvh = k.shape[2]
    s = k.shape[1]
    pad = (-s) % block
    if pad:
        k = jnp.pad(k, [(0, 0), (0, pad), (0, 0), (0, 0)])
        v = jnp.pad(v, [(0, 0), (0, pad), (0, 0), (0, 0)])
        k_pos = jnp.pad(k_pos, [(0, 0), (0, pad)], constant_values=-1)
    nb = (s + pad) // block
    kb = jnp.moveaxis(k.reshape(b, nb, block, kvh, dh), 1, 0)
    vb = jnp.moveaxis(v.reshape(b, nb, block, kvh, dh), 1, 0)
    pb = jnp.moveaxis(k_pos.reshape(b, nb, block), 1, 0)
    qg = _grouped(q, kvh)
    g = h // kvh
    f32 = jnp.float32

    def body(carry, xs):
        m, l, acc = carry
        kj, vj, pj = xs
        logits = jnp.einsum("btkgd,bskd->bkgts", qg, kj, preferred_element_type=f32) * scale
        mask = cache_mask(q_pos, pj, window)[:, None, None]
        logits = jnp.where(mask, logits, _NEG)
        m_new = jnp.maximum(m, jnp.max(logits, axis=-1))
        p = jnp.where(mask, jnp.exp(logits - m_new[..., None]), 0.0)
        corr = jnp.exp(m - m_new)
        l = l * corr + jnp.sum(p, axis=-1)
        acc = acc * corr[..., None] + jnp.einsum("bkgts,bskd->bkgtd", p.astype(vj.dtype), vj,
                                                 preferred_element_type=f32)
        return (m_new, l, acc), None

    init = (jnp.full((b, kvh, g, tq), _NEG, f32), jnp.zeros((b, kvh, g, tq), f32),
            jnp.zeros((b, kvh, g, tq, dh), f32))
    (_, l, acc), _ = jax.lax.scan(body, init, (kb, vb, pb))
    out = acc / jnp.where(l > 0, l, 1.0)[..., None]                     # [B, KV, G, Tq, Dh]
    out = jnp.moveaxis(out.reshape(b, h, tq, dh), 2, 1)
    return out.astype(q.dtype)


def _xla_impl(q, k, block) -> str:
    """The XLA implementation ``auto`` picks off TPU: the reference while its logits are small."""
    small = q.shape[0] * q.shape[1] * q.shape[2] * k.shape[1] <= AUTO_MAX_LOGITS
    return "reference" if k.shape[1] <= block or small else "blockwise"


def _xla(impl, q, q_pos, k, v, k_pos, window, scale, block):
    if impl == "reference":
        return _reference(q, q_pos, k, v, k_pos, window, scale)
    return _blockwise(q, q_pos, k, v, k_pos, window, scale, block)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _pallas(q, q_pos, k, v, k_pos, static):
    window, scale, block, interpret = static

    def kernel(q_, k_, v_, qp, kp):
        return tpu_cache_attention(q_, qp, k_, v_, kp, window=window, scale=scale, block=block,
                                   interpret=interpret)

    return per_device(kernel, q, k, v, q_pos, k_pos)


def _pallas_fwd(q, q_pos, k, v, k_pos, static):
    return _pallas(q, q_pos, k, v, k_pos, static), (q, q_pos, k, v, k_pos)


def _pallas_bwd(static, res, ct):
    # The kernel is forward only: the gradient recomputes the attention through the XLA path.
    window, scale, block, _ = static
    q, q_pos, k, v, k_pos = res
    impl = _xla_impl(q, k, block)
    _, pullback = jax.vjp(lambda q_, k_, v_: _xla(impl, q_, q_pos, k_, v_, k_pos, window, scale, block),
                          q, k, v)
    dq, dk, dv = pullback(ct)
    zero = lambda x: np.zeros(x.shape, jax.dtypes.float0)
    return dq, zero(q_pos), dk, dv, zero(k_pos)


_pallas.defvjp(_pallas_fwd, _pallas_bwd)


def cache_attention(q: jax.Array, q_pos: jax.Array, k: jax.Array, v: jax.Array, k_pos: jax.Array, *,
                    window: int = 0, impl: str = "auto", block: int = 512,
                    scale: Optional[float] = None, platform: Optional[str] = None) -> jax.Array:
    """Queries attend to cached keys by position (GQA: query head ``h`` uses kv head ``h // (H/KV)``).

    Args:
      q: ``[B, Tq, H, Dh]`` queries (after RoPE).
      q_pos: ``[B, Tq]`` int positions of the queries.
      k, v: ``[B, S, KV, Dh]`` cached keys (after RoPE) and values.
      k_pos: ``[B, S]`` int position of every slot, ``-1`` for an empty slot.
      window: 0 (full causal) or the sliding window (keys ``q_pos - window < s <= q_pos``).
      impl: ``"auto" | "reference" | "blockwise" | "pallas"`` (module docstring).
      block: keys per block of the blockwise implementation and of the kernel (which rounds it to
        a multiple of 128).
      scale: logit scale (default ``1 / sqrt(Dh)``).
      platform: the platform the computation is built for (``"cpu" | "gpu" | "tpu"``; default:
        :func:`ttt_jax.platform.target_platform`): ``auto`` takes the kernel on TPU, and the
        kernel runs compiled (not interpreted) on TPU.

    Returns:
      ``[B, Tq, H, Dh]`` in ``q.dtype``; a query that sees no key outputs exactly 0. Softmax
      statistics are fp32; matmuls take the input dtype with fp32 accumulation.
    """
    _check(q, q_pos, k, v, k_pos)
    if impl not in IMPLS:
        raise ValueError(f"cache_attention impl={impl!r} is not one of {IMPLS}")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    target = target_platform(platform) if impl in ("auto", "pallas") else None
    if impl == "auto":
        impl = "pallas" if target == "tpu" else _xla_impl(q, k, block)
    if impl == "pallas":
        return _pallas(q, q_pos, k, v, k_pos, (int(window), scale, int(block), target != "tpu"))
    return _xla(impl, q, q_pos, k, v, k_pos, window, scale, block)
