"""Rotary position embedding, Hugging Face ``rotate_half`` layout (Qwen3 / Llama convention),
with the ``yarn`` and ``llama3`` frequency scalings of long-context checkpoints.

The head dimension is split in two halves ``x = [x1, x2]``; frequency ``i`` (``i < Dh/2``) rotates
the pair ``(x1[i], x2[i])`` by angle ``pos * inv_freq[i]``::

    out = x * cos + rotate_half(x) * sin,   rotate_half(x) = [-x2, x1],
    cos = m * [cos(f), cos(f)],  sin = m * [sin(f), sin(f)],  f = pos * inv_freq

so Hugging Face q/k projection weights convert without permuting rows. Without scaling
``inv_freq[i] = theta^(-2i/Dh)`` and ``m = 1``. With a :class:`~ttt_jax.config.RopeScalingConfig`
(:func:`rope_frequencies`):

* ``llama3`` (Llama 3.1+): wavelengths ``2 pi / inv_freq`` longer than
  ``original_max_position_embeddings / low_freq_factor`` are divided by ``factor``, shorter than
  ``original / high_freq_factor`` kept, and those in between interpolated smoothly; ``m = 1``.
* ``yarn`` (Qwen3 beyond 32k): per-frequency blend of the original (extrapolated) and the
  ``factor``-interpolated frequency by a linear ramp over the dimensions whose number of rotations
  within ``original_max_position_embeddings`` lies between ``beta_slow`` and ``beta_fast``; ``m``
  is the attention factor (default ``0.1 ln(factor) + 1``), applied to cos and sin -- so q and k are
  each scaled by ``m`` and the attention logits by ``m^2``, as in transformers.

These follow transformers' ``_compute_llama3_parameters`` / ``_compute_yarn_parameters``
operation by operation in fp32, so the frequencies agree to the last bit or so (tested against
transformers). Angles and the rotation are computed in fp32.
"""

from __future__ import annotations

import math
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from ttt_jax.config import RopeScalingConfig


def rope_inv_freq(head_dim: int, theta: float) -> jax.Array:
    """``[head_dim // 2]`` fp32 inverse frequencies ``theta^(-2i / head_dim)`` (no scaling)."""
    if head_dim % 2:
        raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")
    return 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))


def _base_inv_freq(head_dim: int, theta: float) -> np.ndarray:
    """``theta^(-2i/Dh)`` in fp32, host-side (numpy), as transformers computes it."""
    if head_dim % 2:
        raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")
    return (np.float32(1.0) / _theta_pow(head_dim, theta)).astype(np.float32)


def _theta_pow(head_dim: int, theta: float) -> np.ndarray:
    """``theta^(2i/Dh)`` rounded to fp32. The fp32 exponent is formed as in transformers; the power
    is taken in fp64 and rounded once, which agrees with torch's fp32 ``pow`` far more often than
    numpy's fp32 ``power`` does (one ulp here is an angle error of ``pos * 6e-8`` at 128k)."""
    exponent = np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)
    return np.power(np.float64(theta), exponent.astype(np.float64)).astype(np.float32)


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn(head_dim: int, theta: float, s: RopeScalingConfig) -> tuple[np.ndarray, float]:
    dim, factor, orig = head_dim, float(s.factor), int(s.original_max_position_embeddings)
    if s.attention_factor is not None:
        attention_factor = float(s.attention_factor)
    elif s.mscale and s.mscale_all_dim:
        attention_factor = _yarn_mscale(factor, s.mscale) / _yarn_mscale(factor, s.mscale_all_dim)
    else:
        attention_factor = _yarn_mscale(factor)

    def correction_dim(rotations: float) -> float:
        # The dimension whose frequency makes `rotations` full turns within `orig` positions.
        return dim * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(s.beta_fast), correction_dim(s.beta_slow)
    if s.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoids a zero-width ramp
    pos_freqs = _theta_pow(dim, theta)
    extrapolation = np.float32(1.0) / pos_freqs
    interpolation = np.float32(1.0) / (np.float32(factor) * pos_freqs)
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - np.float32(low)) / np.float32(high - low),
                   0, 1).astype(np.float32)
    extrapolation_weight = np.float32(1.0) - ramp
    inv_freq = interpolation * (np.float32(1.0) - extrapolation_weight) + extrapolation * extrapolation_weight
    return inv_freq.astype(np.float32), float(attention_factor)


def _llama3(head_dim: int, theta: float, s: RopeScalingConfig) -> tuple[np.ndarray, float]:
    inv_freq = _base_inv_freq(head_dim, theta)
    factor = np.float32(s.factor)
    low_f, high_f, orig = float(s.low_freq_factor), float(s.high_freq_factor), float(s.original_max_position_embeddings)
    low_freq_wavelen, high_freq_wavelen = orig / low_f, orig / high_f
    wavelen = (np.float32(2 * math.pi) / inv_freq).astype(np.float32)
    scaled = np.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq).astype(np.float32)
    smooth = ((np.float32(orig) / wavelen - np.float32(low_f)) / np.float32(high_f - low_f)).astype(np.float32)
    smoothed = (np.float32(1.0) - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32), 1.0


def rope_frequencies(head_dim: int, theta: float,
                     scaling: Optional[RopeScalingConfig] = None) -> tuple[np.ndarray, float]:
    """``(inv_freq [head_dim // 2] fp32 numpy, attention_factor)`` for ``scaling`` (None = plain
    RoPE, factor 1). Host-side constants: computed once per trace, not per step."""
    if scaling is None:
        return _base_inv_freq(head_dim, theta), 1.0
    if head_dim % 2:
        raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")
    if scaling.type == "yarn":
        return _yarn(head_dim, theta, scaling)
    if scaling.type == "llama3":
        return _llama3(head_dim, theta, scaling)
    raise ValueError(f"unknown RoPE scaling type {scaling.type!r}; supported: yarn, llama3")


def rope_cos_sin(positions: jax.Array, head_dim: int, theta: float,
                 scaling: Optional[RopeScalingConfig] = None) -> tuple[jax.Array, jax.Array]:
    """``positions [B, T]`` int -> ``(cos, sin)``, each ``[B, T, head_dim]`` fp32, both already
    multiplied by the attention factor of ``scaling`` (1 without scaling)."""
    if scaling is None:
        inv_freq, factor = rope_inv_freq(head_dim, theta), 1.0
    else:
        inv_freq, factor = rope_frequencies(head_dim, theta, scaling)
        inv_freq = jnp.asarray(inv_freq)
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    if factor == 1.0:
        return jnp.cos(emb), jnp.sin(emb)
    return jnp.cos(emb) * factor, jnp.sin(emb) * factor


def rotate_half(x: jax.Array) -> jax.Array:
    """``[x1, x2] -> [-x2, x1]`` on the last axis."""
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([-x2, x1], axis=-1)


def apply_rope(x: jax.Array, positions: jax.Array, *, theta: float = 10000.0,
               scaling: Optional[RopeScalingConfig] = None) -> jax.Array:
    """Rotate ``x [B, T, H, Dh]`` by ``positions [B, T]`` (int), with optional ``scaling``
    (``yarn`` / ``llama3``, see the module docstring). Returns ``x.dtype``."""
    if positions.shape != x.shape[:2]:
        raise ValueError(f"positions must be [B, T] = {x.shape[:2]}, got {positions.shape}")
    cos, sin = rope_cos_sin(positions, x.shape[-1], theta, scaling)
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    x32 = x.astype(jnp.float32)
    return (x32 * cos + rotate_half(x32) * sin).astype(x.dtype)
