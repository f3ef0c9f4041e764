"""Mixed-precision matmuls: values and gradients against plain einsum, and the dtype of every
matmul in the compiled backward pass (the point of the helpers)."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ttt_jax.nn.params import dense
from ttt_jax.ops.precision import matmul_f32_out

pytestmark = pytest.mark.structure

EQ = "btd,df->btf"


def _operands(dtype):
    kx, ky, kg = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, (2, 24, 32), jnp.float32).astype(dtype)
    y = (jax.random.normal(ky, (32, 48), jnp.float32) / 6).astype(dtype)
    w = jax.random.normal(kg, (2, 24, 48), jnp.float32)   # weights of a scalar readout
    return x, y, w


def _dot_operand_types(fn, *args):
    """Element types of the operands of every dot in ``fn``'s StableHLO."""
    text = jax.jit(fn).lower(*args).as_text()
    return re.findall(r"stablehlo\.dot_general.*: \(tensor<[0-9x]*x?(\w+)>, tensor<[0-9x]*x?(\w+)>\)", text)


def test_matmul_f32_out_fp32_is_einsum():
    x, y, w = _operands(jnp.float32)
    ref = lambda x, y: jnp.sum(jnp.tanh(jnp.einsum(EQ, x, y)) * w)
    got = lambda x, y: jnp.sum(jnp.tanh(matmul_f32_out(EQ, x, y)) * w)
    np.testing.assert_allclose(got(x, y), ref(x, y), rtol=1e-6)
    for a, b in zip(jax.grad(got, (0, 1))(x, y), jax.grad(ref, (0, 1))(x, y)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_matmul_f32_out_bf16_values_and_grads():
    x, y, w = _operands(jnp.bfloat16)
    out = matmul_f32_out(EQ, x, y)
    assert out.dtype == jnp.float32
    exact = jnp.einsum(EQ, x.astype(jnp.float32), y.astype(jnp.float32))
    np.testing.assert_allclose(out, exact, rtol=1e-5, atol=1e-5)   # fp32 accumulation
    loss = lambda f: (lambda x, y: jnp.sum(jnp.tanh(f(x, y)) * w))
    gx, gy = jax.grad(loss(lambda x, y: matmul_f32_out(EQ, x, y)), (0, 1))(x, y)
    rx, ry = jax.grad(loss(lambda x, y: jnp.einsum(EQ, x, y)), (0, 1))(x.astype(jnp.float32), y.astype(jnp.float32))
    assert gx.dtype == gy.dtype == jnp.bfloat16
    # The cotangent is rounded to bf16 once and the results once: a few bf16 ulps.
    np.testing.assert_allclose(gx.astype(jnp.float32), rx, rtol=3e-2, atol=3e-2 * float(jnp.abs(rx).max()))
    np.testing.assert_allclose(gy.astype(jnp.float32), ry, rtol=3e-2, atol=3e-2 * float(jnp.abs(ry).max()))


@pytest.mark.parametrize("which", ["matmul_f32_out", "dense", "plain_f32_accumulation"])
def test_backward_matmuls_stay_bf16(which):
    x, y, w = _operands(jnp.bfloat16)
    fwd = {
        "matmul_f32_out": lambda x, y: matmul_f32_out(EQ, x, y),
        "dense": lambda x, y: dense(x, y, EQ, jnp.bfloat16).astype(jnp.float32),
        # What the helpers replace: fp32 result, then autodiff.
        "plain_f32_accumulation": lambda x, y: jnp.einsum(EQ, x, y, preferred_element_type=jnp.float32),
    }[which]
    types = _dot_operand_types(jax.grad(lambda x, y: jnp.sum(jnp.tanh(fwd(x, y)) * w), (0, 1)), x, y)
    assert len(types) == 3, types                       # forward + two gradient matmuls
    if which == "plain_f32_accumulation":               # the check can fail: fp32 cotangent operands
        assert any("f32" in t for t in types), types
    else:
        assert all(t == ("bf16", "bf16") for t in types), types
