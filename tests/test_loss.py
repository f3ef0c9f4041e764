"""Chunked cross-entropy == full-logits cross-entropy, in values and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ttt_jax.ops.loss import chunked_cross_entropy, cross_entropy_reference

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("t, chunk, groups", [(17, 5, 1), (16, 4, 1), (7, 32, 1), (16, 4, 2), (24, 5, 4)])
def test_chunked_matches_reference(t, chunk, groups):
    k = jax.random.split(jax.random.key(0), 4)
    h = jax.random.normal(k[0], (3, t, 8))
    head = jax.random.normal(k[1], (8, 11))
    tg = jax.random.randint(k[2], (3, t), 0, 11)
    m = (jax.random.uniform(k[3], (3, t)) > 0.3).astype(jnp.float32)
    a = chunked_cross_entropy(h, head, tg, m, chunk_size=chunk, groups=groups)
    b = cross_entropy_reference(h, head, tg, m)
    np.testing.assert_allclose(a[0], b[0], rtol=1e-5)
    assert float(a[1]) == float(b[1])
    ga = jax.grad(lambda h, w: chunked_cross_entropy(h, w, tg, m, chunk_size=chunk, groups=groups)[0],
                  argnums=(0, 1))(h, head)
    gb = jax.grad(lambda h, w: cross_entropy_reference(h, w, tg, m)[0], argnums=(0, 1))(h, head)
    for x, y in zip(ga, gb):
        np.testing.assert_allclose(x, y, atol=1e-5, rtol=1e-5)


def test_groups_must_divide_length():
    h = jnp.zeros((1, 10, 4))
    with pytest.raises(ValueError, match="groups=4"):
        chunked_cross_entropy(h, jnp.zeros((4, 5)), jnp.zeros((1, 10), jnp.int32), jnp.ones((1, 10)),
                              groups=4)


def test_train_loss_chunked_equals_full_logits():
    """The trainer's loss (``runtime.loss_chunk``) equals the full-logits loss, values and gradients."""
    from flax import nnx

    from ttt_jax.config import load_config
    from ttt_jax.models.lm import CausalLM
    from ttt_jax.train.steps import _forward_nll

    cfg = load_config("tiny", ["model.compute_dtype=float32", "model.ttt.chunk_size=8", "model.n_layers=2",
                               "model.d_model=32", "model.n_heads=2", "model.n_kv_heads=1",
                               "model.d_ff=64", "model.ttt.layers=[0,1]"]).model
    model = CausalLM(cfg, rngs=nnx.Rngs(0))
    k = jax.random.split(jax.random.key(1), 2)
    tokens = jax.random.randint(k[0], (2, 32), 0, cfg.vocab_size)
    batch = {"inputs": tokens, "targets": jnp.roll(tokens, -1, axis=1),
             "loss_mask": (jax.random.uniform(k[1], (2, 32)) > 0.2).astype(jnp.float32),
             "segment_ids": jnp.ones((2, 32), jnp.int32),
             "positions": jnp.broadcast_to(jnp.arange(32, dtype=jnp.int32), (2, 32))}

    def loss(m, chunk, groups):
        nll, n = _forward_nll(m, batch, chunk, groups)
        return nll / n

    # Jitted as the trainer runs it (op by op the two passes took ~25 s on a CI core).
    value_and_grad = nnx.jit(nnx.value_and_grad(loss), static_argnums=(1, 2))
    want, g_want = value_and_grad(model, 0, 1)
    for chunk, groups in ((8, 4),):
        got, g_got = value_and_grad(model, chunk, groups)
        np.testing.assert_allclose(got, want, rtol=1e-5)
        for x, y in zip(jax.tree.leaves(g_got), jax.tree.leaves(g_want)):
            np.testing.assert_allclose(x, y, atol=1e-5, rtol=1e-4)
