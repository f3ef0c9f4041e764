"""``runtime.remat``: remat whose recomputation waits for the output cotangent and whose input
cotangent is released only with the parameter gradients (``ttt_jax.models.lm.pinned_remat``). Same
values and gradients as no remat; the barriers are in the backward pass."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ttt_jax.config import load_config
from ttt_jax.models.lm import CausalLM

pytestmark = pytest.mark.model

BASE = ["model.vocab_size=64", "model.d_model=32", "model.n_layers=2", "model.n_heads=4",
        "model.n_kv_heads=2", "model.d_ff=64", "model.compute_dtype=float32", "model.max_seq_len=64",
        "model.ttt.layers=[0]", "model.ttt.chunk_size=8", "data.seq_len=32"]


def _grad_fn(extra):
    cfg = load_config(None, BASE + list(extra))
    model = CausalLM(cfg.model, runtime=cfg.runtime, rngs=nnx.Rngs(0))
    conv = model.layers[0].mlp.ttt_conv          # non-zero: the fast weights change the output
    conv[...] = 0.3 * jax.random.normal(jax.random.key(5), conv[...].shape)
    graphdef, state = nnx.split(model)

    def loss(state, tokens, seg):
        logits = nnx.merge(graphdef, state)(tokens, segment_ids=seg)
        return jnp.mean(jnp.sin(logits))

    return jax.value_and_grad(loss), state


@pytest.mark.parametrize("scan_layers", [False, True])
@pytest.mark.slow
def test_pinned_remat_equals_no_remat(scan_layers):
    tokens = jax.random.randint(jax.random.key(1), (2, 32), 0, 64)
    seg = jnp.asarray([[1] * 20 + [2] * 12, [1] * 32], jnp.int32)
    common = [f"runtime.scan_layers={str(scan_layers).lower()}"]
    f0, state = _grad_fn(common + ["runtime.remat=false"])
    f1, _ = _grad_fn(common + ["runtime.remat=true"])
    (v0, g0), (v1, g1) = jax.jit(f0)(state, tokens, seg), jax.jit(f1)(state, tokens, seg)
    np.testing.assert_allclose(v1, v0, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5)
    # The pinned backward carries two optimization barriers per block that no remat lacks (one on
    # the recomputation's inputs, one on the block's gradients).
    count = {name: str(jax.make_jaxpr(f)(state, tokens, seg)).count("optimization_barrier")
             for name, f in (("plain", f0), ("pinned", f1))}
    blocks = 2                # unrolled: 2 blocks; scanned: one traced group of 2 blocks
    assert count["pinned"] >= count["plain"] + 2 * blocks, count
