"""Mixed-precision matmul helpers.

:func:`matmul_f32_out` is an einsum whose result is fp32 (for what must follow in fp32: SwiGLU's
gate product, the loss's log-sum-exp) while its backward matmuls stay in the operands' low
precision.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def matmul_f32_out(eq: str, x: jax.Array, y: jax.Array) -> jax.Array:
    """``einsum(eq, x, y)`` with an fp32 result (for what follows in fp32: SwiGLU's gate, the
    loss's logits) whose backward matmuls run in ``x.dtype``.

    Plain autodiff would hand both gradient matmuls the fp32 cotangent, i.e. run them in fp32
    (TF32 on an H100, half the bf16 rate). Here the cotangent is rounded to ``x.dtype`` first, as
    mixed-precision training does; the gradients come back in the operands' dtypes. With fp32
    operands this is plain ``einsum``.
    """
    return jnp.einsum(eq, x, y.astype(x.dtype), preferred_element_type=jnp.float32)


def _matmul_f32_out_fwd(eq, x, y):
    return matmul_f32_out(eq, x, y), (x, y)


def _matmul_f32_out_bwd(eq, res, g):
    x, y = res
    # The VJP of the low-precision product; its forward dot is unused and removed by XLA.
    _, vjp = jax.vjp(lambda a, b: jnp.einsum(eq, a, b, preferred_element_type=x.dtype), x, y.astype(x.dtype))
    dx, dy = vjp(g.astype(x.dtype))
    return dx.astype(x.dtype), dy.astype(y.dtype)


matmul_f32_out.defvjp(_matmul_f32_out_fwd, _matmul_f32_out_bwd)
