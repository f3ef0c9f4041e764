"""Chunked cross-entropy == full-logits cross-entropy, in values and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ttt_jax.ops.loss import chunked_cross_entropy, cross_entropy_reference


@pytest.mark.parametrize("t, chunk", [(17, 5), (16, 4), (7, 32)])
def test_chunked_matches_reference(t, chunk):
    k = jax.random.split(jax.random.key(0), 4)
    h = jax.random.normal(k[0], (3, t, 8))
    head = jax.random.normal(k[1], (8, 11))
    tg = jax.random.randint(k[2], (3, t), 0, 11)
    m = (jax.random.uniform(k[3], (3, t)) > 0.3).astype(jnp.float32)
    a = chunked_cross_entropy(h, head, tg, m, chunk_size=chunk)
    b = cross_entropy_reference(h, head, tg, m)
    np.testing.assert_allclose(a[0], b[0], rtol=1e-5)
    assert float(a[1]) == float(b[1])
    ga = jax.grad(lambda h, w: chunked_cross_entropy(h, w, tg, m, chunk_size=chunk)[0], argnums=(0, 1))(h, head)
    gb = jax.grad(lambda h, w: cross_entropy_reference(h, w, tg, m)[0], argnums=(0, 1))(h, head)
    for x, y in zip(ga, gb):
        np.testing.assert_allclose(x, y, atol=1e-5, rtol=1e-5)
