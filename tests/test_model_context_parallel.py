"""The whole model under context parallelism (8 emulated CPU devices) == the unsharded model."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from ttt_jax.parallel.layout import from_zigzag, to_zigzag
from ttt_jax.parallel.mesh import make_mesh
from ttt_jax.config import load_config
from ttt_jax.models.lm import CausalLM, positions_from_segments

pytestmark = pytest.mark.model

BASE = ["model.vocab_size=64", "model.d_model=32", "model.n_layers=2", "model.n_heads=4",
        "model.n_kv_heads=2", "model.d_ff=64", "model.compute_dtype=float32", "model.max_seq_len=128",
        "model.ttt.layers=[0]", "model.ttt.chunk_size=8", "data.seq_len=64"]


def _model(extra):
    cfg = load_config(None, BASE + list(extra))
    model = CausalLM(cfg.model, runtime=cfg.runtime, rngs=nnx.Rngs(0))
    # Non-zero TTT conv so the fast weights actually change the output (the test can fail).
    conv = model.layers[0].mlp.ttt_conv
    conv[...] = 0.3 * jax.random.normal(jax.random.key(5), conv[...].shape)
    return model


def _segments(batch, length):
    rng = np.random.default_rng(0)
    rows = []
    for _ in range(batch):
        row, sid = [], 1
        while len(row) < length:
            row += [sid] * int(rng.integers(5, 40))
            sid += 1
        rows.append(row[:length])
    return jnp.asarray(rows, jnp.int32)


TOKENS = np.random.default_rng(1).integers(0, 64, (2, 64)).astype(np.int32)


def _loss(graphdef):
    def loss(state, tokens, seg, pos):
        logits = nnx.merge(graphdef, state)(tokens, segment_ids=seg, positions=pos)
        return jnp.mean(jax.nn.log_softmax(logits)[..., 0]), logits
    return loss


@pytest.fixture(scope="module")
def reference():
    """``reference(window, segs)``: the unsharded model's gradients and logits on :data:`TOKENS`,
    with explicit positions (the position within each document when packed). Compiled once per
    window and packing, and shared by the cases below: the runtime options under test (context
    attention mode, remat, layout) do not change the unsharded model's values."""
    cache = {}

    def get(window, segs):
        if (window, segs) not in cache:
            graphdef, state = nnx.split(_model([f"model.attention_window={window}"]))
            seg = _segments(2, 64) if segs else None
            pos = positions_from_segments(seg) if segs else jnp.broadcast_to(jnp.arange(64), (2, 64))
            cache[window, segs] = jax.jit(jax.grad(_loss(graphdef), has_aux=True))(state, TOKENS, seg, pos)
        return cache[window, segs]

    return get


def _assert_close(got, want):
    (got_grads, got), (want_grads, want) = got, want
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-4, rtol=2e-4)
    for a, b in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-4, rtol=2e-3)


# One case per model-level option: the op-level grids (test_inplace_ttt_cp.py, test_attention_cp*.py,
# test_parallel_scan.py) cover the combinations of device count, layout, scan mode, window and
# packing on values and gradients; here the model must wire each option through, with the same
# values and gradients. Each case compiles the model's sharded forward and backward (the unsharded
# reference is shared); the fast tier keeps the first as its one model-level context-parallel check.
_SLOW = pytest.mark.slow


@pytest.mark.parametrize("context, window, segs, impls", [
    (4, 0, False, ()),
    pytest.param(4, 0, True, ("runtime.context.attention=allgather",), marks=_SLOW),
    # Remat that keeps the exchanges' results (TTT carried-in state, halo K/V), each block's
    # recomputation pinned behind its output's gradient: same values.
    pytest.param(4, 12, False, ("runtime.remat=true", "runtime.remat_policy=save_exchanges"), marks=_SLOW),
    # Full remat, with the halo window over packed documents (positions derived from the sharded
    # segment ids inside the model).
    pytest.param(4, 12, True, ("runtime.remat=true", "runtime.remat_policy=full"), marks=_SLOW)])
def test_context_parallel_logits_and_grads(reference, context, window, segs, impls):
    graphdef, state = nnx.split(_model([f"model.attention_window={window}", *impls]))
    seg = _segments(2, 64) if segs else None
    mesh = make_mesh(data=8 // context, context=context)
    with jax.set_mesh(mesh):
        sh = NamedSharding(mesh, P(None, "context"))
        tok_s = jax.device_put(TOKENS, sh)
        seg_s = None if seg is None else jax.device_put(seg, sh)
        traced = jax.jit(jax.grad(_loss(graphdef), has_aux=True)).trace(state, tok_s, seg_s, None)
        # The context-parallel path was taken: collectives over "context" inside shard_map.
        jaxpr = str(traced.jaxpr)
        assert "shard_map" in jaxpr and ("ppermute" in jaxpr or "all_gather" in jaxpr)
        got = traced.lower().compile()(state, tok_s, seg_s, None)
    _assert_close(got, reference(window, segs))


@pytest.mark.slow
def test_zigzag_layout_logits_and_grads(reference):
    """The load-balanced layout: the caller permutes tokens, positions and segment ids into zigzag
    order; the logits, permuted back, and the gradients equal the unsharded model's."""
    context = 4
    graphdef, state = nnx.split(_model(["runtime.context.layout=zigzag"]))
    seg = _segments(2, 64)
    pos = positions_from_segments(seg)
    mesh = make_mesh(data=8 // context, context=context)
    zz = [to_zigzag(np.asarray(x), context) for x in (TOKENS, seg, pos)]
    assert not np.array_equal(zz[0], np.asarray(TOKENS))
    with jax.set_mesh(mesh):
        sh = NamedSharding(mesh, P(None, "context"))
        got_grads, got = jax.jit(jax.grad(_loss(graphdef), has_aux=True))(
            state, *(jax.device_put(x, sh) for x in zz))
    _assert_close((got_grads, from_zigzag(np.asarray(got), context)), reference(0, True))


def test_zigzag_rejects_sliding_window():
    with pytest.raises(ValueError, match="runtime.context.layout"):
        load_config(None, BASE + ["runtime.context.layout=zigzag", "model.attention_window=8"])


def test_local_part_must_be_whole_chunks():
    model = _model([])
    tokens = jnp.zeros((2, 48), jnp.int32)       # 48 / 4 = 12 tokens per device, chunk 8
    mesh = make_mesh(data=2, context=4)
    with jax.set_mesh(mesh), pytest.raises(ValueError, match="multiple of the TTT chunk size"):
        jax.jit(lambda t: model(t))(tokens)


@pytest.mark.slow
def test_bf16_gradients_under_context_parallelism():
    """bf16 compute: the gradient of the replicated fast-weight init (the MLP's down-projection) is
    summed over the context devices (in fp32; a bf16 all-reduce there crashed XLA's CPU compiler)."""
    model = _model(["model.compute_dtype=bfloat16", "model.ttt.target_source=hidden"])
    tokens = jax.random.randint(jax.random.key(3), (2, 64), 0, 64)
    graphdef, state = nnx.split(model)

    def loss(state, tokens):
        return jnp.mean(jax.nn.log_softmax(nnx.merge(graphdef, state)(tokens).astype(jnp.float32))[..., 0])

    want = jax.jit(jax.grad(loss))(state, tokens)
    mesh = make_mesh(data=2, context=4)
    with jax.set_mesh(mesh):
        got = jax.jit(jax.grad(loss))(state, jax.device_put(tokens, NamedSharding(mesh, P("data", "context"))))
    down = lambda g: np.asarray(g["layers"][0]["mlp"]["down"][...], np.float32)
    assert np.isfinite(down(got)).all() and np.abs(down(want)).max() > 0
    np.testing.assert_allclose(down(got), down(want), atol=0.05 * np.abs(down(want)).max(), rtol=0.1)
