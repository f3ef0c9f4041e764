"""The benchmarks measure what they claim: read the matmuls of the lowered programs.

* The op benchmark's plain row (a fwd+bwd dense layer) has three matmuls (its forward pass is not
  dropped) and, in bf16, none with an fp32 operand.
* No benchmarked op row and no implementation of the op has an fp32-operand matmul in bf16.
* A tiny model's bf16 train step: the dense layers' matmuls take bf16 operands.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ttt_jax.bench import op as op_bench
from ttt_jax.bench.hlo_dots import dots, f32_operand_dots
from ttt_jax.config import ModelConfig, RuntimeConfig, TTTConfig
from ttt_jax.models import CausalLM

pytestmark = pytest.mark.structure

B, T, F, D, C = 1, 64, 32, 16, 16


def _args(dtype=jnp.bfloat16):
    k = jax.random.split(jax.random.key(0), 4)
    return (jax.random.normal(k[0], (B, T, F), dtype), jax.random.normal(k[1], (B, T, D), dtype),
            jax.random.normal(k[2], (F, D), dtype), jax.random.normal(k[3], (B, T, D), dtype))


def test_hlo_dots_parser_sees_f32_result_cast_flaw():
    """The flaw the check exists for: an fp32-result dot cast to bf16 gives fp32 backward matmuls."""
    f = lambda z, w: jnp.einsum("btf,fd->btd", z, w, preferred_element_type=jnp.float32).astype(z.dtype)
    z, _, w0, cot = _args()

    def run(z, w, c):
        out, vjp = jax.vjp(f, z, w)
        return out, vjp(c.astype(out.dtype))

    text = jax.jit(run).lower(z, w0, cot).as_text()
    assert len(dots(text)) == 3 and len(f32_operand_dots(text)) == 2


def test_plain_row_three_bf16_matmuls():
    assert op_bench.check_plain_row(*_args()) == {"dots": 3, "f32_operand_dots": 0}


def test_linear_loss_would_drop_the_forward():
    """Why the benchmark returns the output: with a loss linear in it, the forward matmul is gone."""
    z, v, w0, cot = _args()
    loss = lambda z, w0: jnp.sum(op_bench.plain(z, v, w0).astype(jnp.float32) * cot.astype(jnp.float32))
    assert len(dots(jax.jit(jax.grad(loss, argnums=(0, 1))).lower(z, w0).as_text())) == 2


@pytest.mark.parametrize("name", ["scan", "associative", "naive_scan", "official_cumsum", "pallas"])
def test_op_rows_have_no_f32_operand_matmuls(name):
    """bf16 rows: every matmul (forward and backward) takes bf16 operands. The scan's and the
    kernel's fp32 state enters its matmuls rounded to bf16, like the weights (off the GPU the
    kernel runs in interpret mode, so its matmuls are in the lowered program too)."""
    text = op_bench.fwd_bwd(name, 0.1, C).lower(*_args()).as_text()
    assert len(dots(text)) >= 3
    assert not f32_operand_dots(text), f32_operand_dots(text)


def test_bf16_model_train_step_dense_layers_are_bf16():
    """A tiny In-Place TTT model's bf16 train step (chunked loss, as training runs it): no matmul
    with an fp32 operand, the TTT op's and the loss head's included."""
    from ttt_jax.ops.loss import chunked_cross_entropy

    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64,
                      max_seq_len=64, compute_dtype="bfloat16",
                      ttt=TTTConfig(enabled=True, every=2, start=0, chunk_size=8, lr=1.0))
    model = CausalLM(cfg, runtime=RuntimeConfig(attention_impl="auto", ttt_impl="auto"), rngs=nnx.Rngs(0))
    graph, state = nnx.split(model)
    tokens = jnp.asarray(np.arange(2 * 33).reshape(2, 33) % 64, jnp.int32)

    def step(state, tokens):
        def loss(state):
            m = nnx.merge(graph, state)
            h = m.hidden(tokens[:, :-1])
            nll, n = chunked_cross_entropy(h, m.head(), tokens[:, 1:], jnp.ones_like(tokens[:, 1:]),
                                           chunk_size=16)
            return nll / n
        return jax.value_and_grad(loss)(state)

    text = jax.jit(step).lower(state, tokens).as_text()
    assert len(dots(text)) > 10
    assert not f32_operand_dots(text), f32_operand_dots(text)
