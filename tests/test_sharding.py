"""The trainer under FSDP + tensor parallelism (8 emulated CPU devices): parameters and Adam moments
sharded by the logical rules, the same training as data parallelism, clear errors, sharded
checkpoints (exact resume, restore onto another mesh)."""

import json
import os
import shutil

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from ttt_jax.config import load_config
from ttt_jax.train import train
from ttt_jax import sharding

from test_train import TOY

pytestmark = pytest.mark.integration

# The toy model of test_train with every tensor-parallel dimension even: vocab 264 (the byte
# tokenizer needs >= 259) and 2 KV heads, so that mesh.tensor=2 divides vocab / heads / kv_heads / mlp.
# One layer (the TTT layer: attention, the gated MLP and the TTT parameters, i.e. every kind of
# parameter the sharding rules place; a second, plain layer would only add compile time).
# 64-token rows (4 TTT chunks of 16), so that every run here, the zigzag layout over context=2
# included, trains on the same batches and compares with the one data-parallel reference run. The
# up-front record check (data.check, tested with the data pipeline) would re-read the corpus for
# each of the runs here.
SHARDABLE = ["model.vocab_size=264", "model.n_kv_heads=2", "model.n_layers=1", "data.seq_len=64",
             "data.check=false", "train.steps=4", "train.log_every=1", "train.eval_every=4",
             "train.checkpoint_every=2"]
SHARDED = ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"]
REPLICATED = ["mesh.data=8"]
# Context parallelism with the optimizer sharded (ZeRO-1, train.shard_optimizer).
CONTEXT = ["mesh.data=2", "mesh.fsdp=2", "mesh.context=2", "train.shard_optimizer=true"]

# Same computation, other reduction order (the gradient all-reduce is split differently): fp32
# rounding differences. Adam's normalised update turns a gradient element near 0 into an update of
# ~lr either way, so parameters get a slightly looser absolute tolerance than the losses.
LOSS_RTOL, PARAM_ATOL = 1e-5, 5e-5

needs_determinism = pytest.mark.skipif(
    jax.default_backend() == "gpu" and "--xla_gpu_deterministic_ops=true" not in os.environ.get("XLA_FLAGS", ""),
    reason="GPU reductions are non-deterministic unless XLA_FLAGS=--xla_gpu_deterministic_ops=true")


def cfg(run_dir, *extra):
    return load_config(None, TOY + SHARDABLE + [f"train.run_dir={run_dir}", *extra])


def params(model):
    state = nnx.state(model, nnx.Param)
    return {jax.tree_util.keystr(p): np.asarray(jax.device_get(x))
            for p, x in jax.tree_util.tree_flatten_with_path(state)[0]}


def train_losses(res):
    return [r["loss"] for r in map(json.loads, open(res.metrics_path)) if r["kind"] == "train"]


def assert_params_close(a, b, atol=PARAM_ATOL):
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=0, atol=atol, err_msg=k)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One data-parallel (data=8) and one FSDP x TP (data=2, fsdp=2, tensor=2) run of 4 steps."""
    tmp = tmp_path_factory.mktemp("sharding")
    return tmp, train(cfg(tmp / "replicated", *REPLICATED)), train(cfg(tmp / "sharded", *SHARDED))


@pytest.fixture(scope="module")
def context_run(runs):
    """The run of :data:`CONTEXT` (contiguous layout), for the context-parallel and zigzag tests
    (its program is also the one a checkpoint is restored onto in the resume test)."""
    tmp = runs[0]
    c = cfg(tmp / "context", *CONTEXT)
    return c, train(c)


def _program(*mesh):
    """The trainer's program for the toy on ``mesh`` (shardings only: nothing is compiled)."""
    from ttt_jax.train.trainer import train_program

    c = cfg("unused", *mesh)
    return train_program(c, sharding.make_mesh(c.mesh))


def _param_shardings(*mesh):
    """``{name: NamedSharding}`` (nested) of the toy's parameters on ``mesh``."""
    return nnx.to_pure_dict(nnx.filter_state(_program(*mesh).model_sh, nnx.Param))


def _assert_trained_shardings(sh, rep):
    """The trained parameters kept the shardings the program was built with."""
    state = nnx.state(sh.model, nnx.Param)
    down = state["layers"][0]["mlp"]["down"][...]          # [F=64, D=32]  (mlp, embed)
    assert down.sharding.spec == P("tensor", "fsdp")
    assert {s.data.shape for s in down.addressable_shards} == {(32, 16)}   # a quarter per device
    want = jax.tree_util.tree_flatten_with_path(_param_shardings(*SHARDED))[0]
    got = jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(state))[0]
    assert [jax.tree_util.keystr(p) for p, _ in got] == [jax.tree_util.keystr(p) for p, _ in want]
    assert all(x.sharding.is_equivalent_to(s, x.ndim) for (_, x), (_, s) in zip(got, want))
    # Data parallelism alone: everything replicated.
    assert all(x.sharding.is_fully_replicated for x in jax.tree.leaves(nnx.state(rep.model, nnx.Param)))


@pytest.mark.slow
def test_sharded_training_matches_data_parallel(runs):
    _, rep, sh = runs
    assert sh.step == rep.step == 4
    np.testing.assert_allclose(train_losses(sh), train_losses(rep), rtol=LOSS_RTOL)
    assert len(train_losses(sh)) == 4
    np.testing.assert_allclose([v for _, v in sh.val_losses], [v for _, v in rep.val_losses], rtol=LOSS_RTOL)
    assert_params_close(params(sh.model), params(rep.model))
    _assert_trained_shardings(sh, rep)


def test_parameters_and_moments_are_sharded():
    """The shardings the trainer's program gives parameters and Adam moments (shape-only; that a
    trained model keeps them is checked after the runs above)."""
    model_sh = _param_shardings(*SHARDED)
    down = model_sh["layers"][0]["mlp"]["down"]          # [F=64, D=32]  (mlp, embed)
    assert down.spec == P("tensor", "fsdp")
    assert down.shard_shape((64, 32)) == (32, 16)        # a quarter per device
    assert model_sh["layers"][0]["attn"]["q"].spec == P("fsdp", "tensor", None)
    assert model_sh["layers"][0]["attn"]["o"].spec == P("tensor", None, "fsdp")
    assert model_sh["embed"].spec == P("tensor", "fsdp")
    assert model_sh["layers"][0]["mlp"]["ttt_proj"].spec == P("fsdp", None)
    assert model_sh["final_norm"]["scale"].spec == P(None)
    # Data parallelism alone: everything replicated.
    assert all(s.is_fully_replicated for s in jax.tree.leaves(_param_shardings(*REPLICATED)))

    # The optimizer state the trainer jits with: Adam moments sharded like their parameter,
    # counters replicated.
    flat = {jax.tree_util.keystr(p): s
            for p, s in jax.tree_util.tree_flatten_with_path(_program(*SHARDED).opt_sh)[0]}
    mu = [s for k, s in flat.items() if "'mu'" in k and "['mlp']['down']" in k]
    nu = [s for k, s in flat.items() if "'nu'" in k and "['mlp']['down']" in k]
    assert mu and nu and all(s.spec == P("tensor", "fsdp") for s in mu + nu)
    counters = [s for k, s in flat.items() if "count" in k or "step" in k]
    assert counters and all(s.is_fully_replicated for s in counters)


def test_indivisible_mesh_names_parameter_and_fix(tmp_path):
    # 2 heads / 2 KV heads cannot be split 8 ways.
    with pytest.raises(ValueError, match=r"cannot shard parameter layers\.0\.attn\.k of shape \(32, 2, 16\) "
                                         r".*dimension 1 \('kv_heads'\) has size 2.*mesh\.tensor=8.*"
                                         r"mesh\.tensor must divide .*model\.n_kv_heads.*sizes that divide 2: 1, 2"):
        train(cfg(tmp_path / "run", "mesh.data=1", "mesh.tensor=8"))
    # The vocabulary of test_train's toy (259) does not split over tensor=2.
    with pytest.raises(ValueError, match=r"parameter embed .*'vocab'.*size 259.*mesh\.tensor=2"):
        train(cfg(tmp_path / "run", "model.vocab_size=259", *SHARDED))
    assert not (tmp_path / "run" / "metrics.jsonl").exists()   # nothing ran


@pytest.mark.slow
def test_context_parallel_training_matches_data_parallel(runs, context_run):
    """mesh.context=2 (each 64-token row split into two 32-token halves = two TTT chunks per device,
    with ring attention and the cross-device fast-weight scan), with the optimizer sharded (ZeRO-1,
    train.shard_optimizer), trains like data parallelism."""
    from ttt_jax.train.trainer import train_program

    _, rep, _ = runs
    c, cp = context_run
    assert cp.step == rep.step == 4
    np.testing.assert_allclose(train_losses(cp), train_losses(rep), rtol=LOSS_RTOL)
    np.testing.assert_allclose([v for _, v in cp.val_losses], [v for _, v in rep.val_losses], rtol=LOSS_RTOL)
    assert_params_close(params(cp.model), params(rep.model))
    # The run's compiled program (cached per setup) kept the moments split over data and context
    # as well as fsdp: the down-projection's [F=64, D=32] moment is 64 / 2 x 32 / 4 per device.
    prog = train_program(c, sharding.make_mesh(c.mesh))
    flat = {jax.tree_util.keystr(p): s for p, s in jax.tree_util.tree_flatten_with_path(prog.opt_sh)[0]}
    down = [s for k, s in flat.items() if "'mu'" in k and "['layers'][0]['mlp']['down']" in k]
    assert [s.spec for s in down] == [P(("data", "context"), "fsdp")]
    assert down[0].shard_shape((64, 32)) == (16, 16)


def test_split_further_places_zero_axes():
    """ZeRO-1's layout rule: the free replicating axes go to the largest dimension they divide."""
    from ttt_jax.parallel.mesh import make_mesh

    mesh = make_mesh(data=2, fsdp=1, tensor=2, context=2)
    ns = lambda *spec: jax.sharding.NamedSharding(mesh, P(*spec))
    axes = sharding.ZERO_AXES
    # [F, D] with F over tensor: F / 2 = 32 >= D = 16, so F takes data x context.
    assert sharding.split_further(ns("tensor", None), (64, 16), axes).spec == P(("tensor", "data", "context"), None)
    assert sharding.split_further(ns("tensor", None), (16, 64), axes).spec == P("tensor", ("data", "context"))
    # A dimension the axes do not divide is skipped; none at all: unchanged.
    assert sharding.split_further(ns(None, None), (6, 8), axes).spec == P(None, ("data", "context"))
    assert sharding.split_further(ns(None,), (6,), axes).spec == P(None,)
    # Axes of size 1 and axes already used do not count.
    assert sharding.split_further(ns("context", None), (8, 8), ("fsdp", "context")).spec == P("context", None)
    assert sharding.split_further(ns(None,), (8,), ("context",)).spec == P("context",)


@pytest.mark.slow
def test_zigzag_training_matches_contiguous(context_run, tmp_path):
    """The load-balanced layout trains like the contiguous one (64-token rows over context=2:
    four 16-token segments, one TTT chunk each)."""
    _, contiguous = context_run
    zigzag = train(cfg(tmp_path / "zigzag", *CONTEXT, "runtime.context.layout=zigzag"))
    assert zigzag.step == contiguous.step == 4
    np.testing.assert_allclose(train_losses(zigzag), train_losses(contiguous), rtol=LOSS_RTOL)
    np.testing.assert_allclose([v for _, v in zigzag.val_losses], [v for _, v in contiguous.val_losses],
                               rtol=LOSS_RTOL)
    assert_params_close(params(zigzag.model), params(contiguous.model))
    with pytest.raises(ValueError, match=r"multiple of 2 \(zigzag\) x mesh\.context=2 x model\.ttt\.chunk_size=16"):
        train(cfg(tmp_path / "bad", *CONTEXT, "data.seq_len=32", "runtime.context.layout=zigzag"))


def test_context_layout_error(tmp_path):
    # seq_len 32 over context=4 leaves 8 tokens per device, half a 16-token TTT chunk.
    with pytest.raises(ValueError, match=r"data\.seq_len=32 must be a multiple of mesh\.context=4 x "
                                         r"model\.ttt\.chunk_size=16"):
        train(cfg(tmp_path / "run", "data.seq_len=32", "mesh.data=2", "mesh.context=4"))


@needs_determinism
@pytest.mark.slow
def test_sharded_resume_is_bitwise_exact_and_restores_on_other_meshes(runs, tmp_path):
    _, rep, straight = runs
    first = train(cfg(tmp_path / "resumed", *SHARDED, "train.stop_after=2"))
    assert first.step == 2
    # The step-2 checkpoint (written from sharded arrays), for restores onto other meshes.
    for name in ("on_replicated", "on_context"):
        shutil.copytree(tmp_path / "resumed", tmp_path / name)

    resumed = train(cfg(tmp_path / "resumed", *SHARDED))
    assert resumed.step == 4
    a, b = params(resumed.model), params(straight.model)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    assert resumed.val_losses[-1] == straight.val_losses[-1]
    assert resumed.train_loss == straight.train_loss

    # Orbax reshards on restore: the same checkpoint continues under data parallelism (every array
    # whole on every device) and under context parallelism with ZeRO-1 (the tensor-parallel
    # parameters' halves joined, the Adam moments' shards split over data x context), and the
    # result is the same training (to fp32 rounding). Both programs are the ones compiled above.
    for name, mesh in (("on_replicated", REPLICATED), ("on_context", CONTEXT)):
        other = train(cfg(tmp_path / name, *mesh))
        assert other.step == 4
        assert_params_close(params(other.model), b)
        np.testing.assert_allclose(train_losses(other)[-2:], train_losses(straight)[-2:], rtol=LOSS_RTOL)
    down = nnx.state(other.model, nnx.Param)["layers"][0]["mlp"]["down"][...]
    assert down.sharding.spec == P(None, "fsdp")
