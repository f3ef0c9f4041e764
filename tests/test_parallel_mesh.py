"""Mesh construction, multi-host detection and logical-axis rules (parallel/mesh.py, parallel/rules.py)."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from ttt_jax.parallel.mesh import MESH_AXES, detect_multihost, make_mesh, maybe_initialize_distributed
from ttt_jax.parallel.rules import DEFAULT_RULES, logical_to_spec, shard_pytree, with_logical_constraint

pytestmark = pytest.mark.unit


# --------------------------------------------------------------------------------------------------
# Mesh
# --------------------------------------------------------------------------------------------------


def test_make_mesh_fills_data_axis():
    mesh = make_mesh()
    assert mesh.axis_names == MESH_AXES
    assert dict(mesh.shape) == {"data": 8, "fsdp": 1, "tensor": 1, "context": 1}
    assert all(t == AxisType.Auto for t in mesh.axis_types)
    mesh = make_mesh(context=4)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 1, "tensor": 1, "context": 4}
    mesh = make_mesh(data=2, fsdp=2, tensor=-1, context=1)
    assert mesh.shape["tensor"] == 2


def test_make_mesh_sub_meshes_and_explicit():
    for n in (1, 2, 4):
        mesh = make_mesh(data=1, context=n, devices=jax.devices()[:n])
        assert mesh.devices.size == n and mesh.shape["context"] == n
    mesh = make_mesh(data=2, context=2, devices=jax.devices()[:4], axis_type=AxisType.Explicit)
    assert all(t == AxisType.Explicit for t in mesh.axis_types)


@pytest.mark.parametrize("kwargs,match", [
    (dict(data=3), r"multiply to 3 but there are 8 devices"),
    (dict(data=-1, context=3), r"multiply to 3, which does not divide the 8 devices"),
    (dict(data=-1, fsdp=-1), r"at most one axis may be -1"),
    (dict(data=0), r"sizes must be positive"),
    (dict(data=4, tensor=4), r"multiply to 16 but there are 8 devices"),
])
def test_make_mesh_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_mesh(**kwargs)


@pytest.mark.parametrize("env,want", [
    ({}, None),
    ({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"}, "JAX_COORDINATOR_ADDRESS"),
    ({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "1"}, None),
    ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1"}, None),
    ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4"}, "slurm"),
    ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4", "SLURM_STEP_NUM_TASKS": "1"}, None),
    ({"OMPI_COMM_WORLD_SIZE": "2"}, "openmpi"),
    ({"OMPI_COMM_WORLD_SIZE": "1"}, None),
    ({"TPU_WORKER_HOSTNAMES": "host0"}, None),
    ({"TPU_WORKER_HOSTNAMES": "host0,host1"}, "tpu-pod"),
    ({"MEGASCALE_COORDINATOR_ADDRESS": "h:1"}, "tpu-multislice"),
])
def test_detect_multihost(env, want):
    assert detect_multihost(env) == want


def test_maybe_initialize_distributed_is_noop_on_one_host():
    assert maybe_initialize_distributed({}) is False
    assert maybe_initialize_distributed({"SLURM_JOB_ID": "1", "SLURM_NTASKS": "1"}) is False
    assert not jax.distributed.is_initialized()


# --------------------------------------------------------------------------------------------------
# Rules
# --------------------------------------------------------------------------------------------------


def test_logical_to_spec_without_mesh():
    assert logical_to_spec(("batch", "seq", "embed")) == P(("data", "fsdp"), "context", None)
    assert logical_to_spec(("embed", "mlp")) == P("fsdp", "tensor")
    assert logical_to_spec(("heads", "kv_heads", "head_dim")) == P("tensor", None, None)  # tensor used once
    assert logical_to_spec((None, "norm", "conv")) == P(None, None, None)
    assert logical_to_spec(("length", "vocab")) == P("context", "tensor")


def test_logical_to_spec_drops_size_one_axes():
    mesh = make_mesh(data=2, fsdp=1, tensor=2, context=2)
    assert logical_to_spec(("batch", "seq", "embed"), mesh=mesh) == P("data", "context", None)
    assert logical_to_spec(("embed", "mlp"), mesh=mesh) == P(None, "tensor")
    mesh = make_mesh(data=1, fsdp=2, tensor=2, context=2)
    assert logical_to_spec(("batch", "seq", "embed"), mesh=mesh) == P("fsdp", "context", None)
    assert logical_to_spec(("embed", "mlp"), mesh=mesh) == P("fsdp", "tensor")
    mesh = make_mesh(data=8)
    assert logical_to_spec(("vocab", "embed"), mesh=mesh) == P(None, None)


def test_logical_to_spec_custom_rules_and_errors():
    rules = {"batch": "data", "embed": ("fsdp", "tensor")}
    assert logical_to_spec(("batch", "embed"), rules) == P("data", ("fsdp", "tensor"))
    with pytest.raises(ValueError, match="no sharding rule for logical axis 'embd'"):
        logical_to_spec(("embd",))
    with pytest.raises(ValueError, match="names mesh axis 'model'"):
        logical_to_spec(("embed",), {"embed": "model"}, make_mesh())
    with pytest.raises(ValueError, match="rank"):
        logical_to_spec(("embed",), mesh=make_mesh(), shape=(4, 4))


def test_logical_to_spec_indivisible(caplog):
    mesh = make_mesh(data=2, fsdp=2, tensor=2, context=1)
    # default: raise, naming the dimension, its size, the mesh axes and the fix
    with pytest.raises(ValueError, match=r"dimension 0 \('kv_heads'\) .* size 3, not divisible by mesh "
                                         r"axes \('tensor',\) of sizes \(2,\)"):
        logical_to_spec(("kv_heads", "head_dim"), mesh=mesh, shape=(3, 8))
    assert logical_to_spec(("kv_heads", "head_dim"), mesh=mesh, shape=(4, 8)) == P("tensor", None)
    # opt-in fallback: drop minor axes until the rest divides, with a warning
    with caplog.at_level(logging.WARNING, logger="ttt_jax.parallel.rules"):
        spec = logical_to_spec(("batch", "kv_heads"), mesh=mesh, shape=(2, 3), on_indivisible="replicate")
    assert spec == P("data", None)
    assert "not divisible" in caplog.text


def test_shard_pytree_and_jit():
    mesh = make_mesh(data=2, fsdp=2, tensor=2, context=1)
    params = {"embed": np.zeros((16, 8), np.float32),
              "layers": [{"w_up": np.ones((8, 12), np.float32), "scale": np.ones((8,), np.float32)}],
              "step": np.zeros((), np.int32)}
    names = {"embed": ("vocab", "embed"),
             "layers": [{"w_up": ("embed", "mlp"), "scale": ("norm",)}],
             "step": None}
    shardings = shard_pytree(params, names, mesh)
    assert shardings["embed"] == NamedSharding(mesh, P("tensor", "fsdp"))
    assert shardings["layers"][0]["w_up"] == NamedSharding(mesh, P("fsdp", "tensor"))
    assert shardings["layers"][0]["scale"].spec == P(None)
    assert shardings["step"].spec == P()

    placed = jax.device_put(params, shardings)
    assert placed["embed"].sharding == shardings["embed"]

    x = np.ones((4, 16), np.float32)
    x_sharding = shard_pytree(x, ("batch", "vocab"), mesh)
    f = jax.jit(lambda p, x: x @ p["embed"] @ p["layers"][0]["w_up"],
                in_shardings=(shardings, x_sharding))
    np.testing.assert_allclose(np.asarray(f(placed, x)), 0.0)

    bad = {"embed": ("vocab", "embed"), "layers": [{"w_up": ("embed", "mlp"), "scale": ("norm",)}],
           "step": None}
    params["layers"][0]["w_up"] = np.ones((8, 3), np.float32)
    with pytest.raises(ValueError, match=r"\['layers'\]\[0\]\['w_up'\].*size 3"):
        shard_pytree(params, bad, mesh)


def test_with_logical_constraint():
    mesh = make_mesh(data=2, context=4)
    x = jnp.ones((4, 8, 2))
    names = ("batch", "seq", "embed")
    f = jax.jit(lambda x: with_logical_constraint(x, names) * 2)
    assert f(x).shape == x.shape  # no mesh set: a no-op
    with jax.set_mesh(mesh):
        out = f(x)
    want = NamedSharding(mesh, P("data", "context", None))
    assert out.sharding.is_equivalent_to(want, x.ndim)
    out = jax.jit(lambda x: with_logical_constraint(x, names, mesh=mesh) * 2)(x)
    assert out.sharding.is_equivalent_to(want, x.ndim)


def test_default_rules_cover_model_names():
    # the logical names used by ttt_jax.nn parameters and activations all have a rule
    table = dict(DEFAULT_RULES)
    for name in ("vocab", "embed", "mlp", "heads", "kv_heads", "head_dim", "norm", "conv",
                 "batch", "seq", "length"):
        assert name in table
