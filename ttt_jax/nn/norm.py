"""RMSNorm (Qwen3/Llama): ``y = x / sqrt(mean(x^2) + eps) * scale``, computed in fp32."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from ttt_jax.nn.params import make_param, ones_init


class RMSNorm(nnx.Module):
    """RMS normalisation over the last axis.

    Parameters: ``scale [dim]`` (logical axes ``("norm",)``), initialised to ones.
    ``__call__(x [..., dim]) -> [..., dim]`` in ``dtype`` (default: ``x.dtype``); statistics and the
    scale multiply are fp32.
    """

    def __init__(self, dim: int, *, eps: float = 1e-6, param_dtype=jnp.float32,
                 dtype=None, rngs: nnx.Rngs | None = None):
        del rngs
        self.dim = dim
        self.eps = eps
        self.dtype = dtype
        self.scale = make_param(ones_init, None, (dim,), ("norm",), param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        if x.shape[-1] != self.dim:
            raise ValueError(f"RMSNorm over {self.dim} features got input of shape {x.shape}")
        out_dtype = self.dtype or x.dtype
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        return (y * self.scale[...].astype(jnp.float32)).astype(out_dtype)
