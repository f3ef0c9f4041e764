"""Rotary position embedding, Hugging Face ``rotate_half`` layout (Qwen3 / Llama convention).

The head dimension is split in two halves ``x = [x1, x2]``; frequency ``i`` (``i < Dh/2``) rotates
the pair ``(x1[i], x2[i])`` by angle ``pos * theta^(-2i/Dh)``::

    out = x * cos + rotate_half(x) * sin,   rotate_half(x) = [-x2, x1],
    cos = [cos(f), cos(f)],  sin = [sin(f), sin(f)]

so Hugging Face q/k projection weights convert without permuting rows. Angles and the rotation
are computed in fp32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def rope_inv_freq(head_dim: int, theta: float) -> jax.Array:
    """``[head_dim // 2]`` fp32 inverse frequencies ``theta^(-2i / head_dim)``."""
    if head_dim % 2:
        raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")
    return 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))


def rope_cos_sin(positions: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """``positions [B, T]`` int -> ``(cos, sin)``, each ``[B, T, head_dim]`` fp32."""
    freqs = positions.astype(jnp.float32)[..., None] * rope_inv_freq(head_dim, theta)
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def rotate_half(x: jax.Array) -> jax.Array:
    """``[x1, x2] -> [-x2, x1]`` on the last axis."""
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([-x2, x1], axis=-1)


def apply_rope(x: jax.Array, positions: jax.Array, *, theta: float = 10000.0) -> jax.Array:
    """Rotate ``x [B, T, H, Dh]`` by ``positions [B, T]`` (int). Returns ``x.dtype``."""
    if positions.shape != x.shape[:2]:
        raise ValueError(f"positions must be [B, T] = {x.shape[:2]}, got {positions.shape}")
    cos, sin = rope_cos_sin(positions, x.shape[-1], theta)
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    x32 = x.astype(jnp.float32)
    return (x32 * cos + rotate_half(x32) * sin).astype(x.dtype)
