"""The In-Place TTT op compiled for TPU: no fp32-operand matmul, the context exchange compiles.

Ahead-of-time compile for a 4-chip v5p slice on this CPU host (libtpu). The op's values under
context parallelism are tested on CPU devices in ``tests/test_inplace_ttt_cp.py``; here the
compiled TPU program is inspected.
"""

import os

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from ttt_jax.parallel.mesh import make_mesh
from ttt_jax.ops.inplace_ttt_cp import inplace_ttt_sharded
from ttt_jax.ops.kernels.tpu_ttt import (f32_operand_matmuls, matmul_operand_dtypes,
                                         mxu_tiling_problem)

pytestmark = pytest.mark.structure


def test_mxu_tiling_problem():
    assert mxu_tiling_problem(1024, 9728, 2560) is None
    assert "chunk_size 64" in mxu_tiling_problem(64, 256, 256)
    assert "D=200" in mxu_tiling_problem(256, 256, 200)


def test_matmul_operand_dtypes_reads_operands_from_their_definitions():
    hlo = """
  %p0 = bf16[8,128]{1,0} parameter(0)
  %p1 = f32[128,128]{1,0} parameter(1)
  %c = bf16[128,128]{1,0} convert(%p1)
  %d0 = f32[8,128]{1,0} dot(%p0, %c), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  %d1 = f32[8,128]{1,0} convolution(%p0, %p1), dim_labels=bf_io->bf
"""
    assert matmul_operand_dtypes(hlo) == [("dot", "f32", ["bf16", "bf16"]),
                                          ("convolution", "f32", ["bf16", "f32"])]
    assert f32_operand_matmuls(hlo) == [("convolution", "f32", ["bf16", "f32"])]


@pytest.mark.slow
@pytest.mark.parametrize("mode,layout", [("allgather", "contiguous"), ("ppermute", "zigzag")])
def test_aot_v5p_sharded_ttt_has_no_f32_matmul(mode, layout):
    topologies = pytest.importorskip("jax.experimental.topologies")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # other compiles may hold libtpu
    try:
        topo = topologies.get_topology_desc(topology_name="v5p:2x2x1", platform="tpu")
    except Exception as e:  # noqa: BLE001 - no libtpu here
        pytest.skip(f"no TPU compiler (libtpu) here: {e}")
    mesh = make_mesh(data=1, context=4, devices=topo.devices)
    b, t, f, d, chunk = 1, 4 * 1024, 512, 256, 256
    spec = P(None, "context")

    def inner(z, v, w0, s):
        return inplace_ttt_sharded(z, v, w0, lr=0.1, chunk_size=chunk, axis_name="context",
                                   segment_ids=s, layout=layout, mode=mode)

    fn = jax.shard_map(inner, mesh=mesh, in_specs=(spec, spec, P(), spec), out_specs=spec)
    loss = lambda z, v, w0, s: jnp.sum(jnp.square(fn(z, v, w0, s).astype(jnp.float32)))
    sh, rep = NamedSharding(mesh, spec), NamedSharding(mesh, P())
    args = [jax.ShapeDtypeStruct((b, t, f), jnp.bfloat16, sharding=sh),
            jax.ShapeDtypeStruct((b, t, d), jnp.bfloat16, sharding=sh),
            jax.ShapeDtypeStruct((f, d), jnp.bfloat16, sharding=rep),
            jax.ShapeDtypeStruct((b, t), jnp.int32, sharding=sh)]
    hlo = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2))).lower(*args).compile().as_text()
    matmuls = matmul_operand_dtypes(hlo)
    assert len(matmuls) >= 7  # forward apply/update, backward recompute and gradients
    assert f32_operand_matmuls(hlo) == []
    collective = "collective-permute" if mode == "ppermute" else "all-gather"
    assert collective in hlo  # the summary exchange over the context axis
