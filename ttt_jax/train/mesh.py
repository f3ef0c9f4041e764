"""Device mesh and shardings for the trainer (data parallelism).

The mesh has the four axes ``("data", "fsdp", "tensor", "context")`` of :mod:`parallel.mesh`. In
this version the global batch is split over ``data`` x ``fsdp`` and every parameter and
optimizer-state array is replicated; tensor/context axes of size > 1 are accepted but only
replicate the work (FSDP/TP/CP placement by the rules of :mod:`parallel.rules` is a later step).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from parallel import mesh as parallel_mesh
from ttt_jax.config import MeshConfig

# Mesh axes the batch dimension is split over.
BATCH_AXES = ("data", "fsdp")


def make_mesh(cfg: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """The 4-axis mesh of ``cfg`` over ``devices`` (default: all), via :func:`parallel.mesh.make_mesh`
    (``AxisType.Auto`` axes; a ``ValueError`` naming the sizes when they do not fit the devices)."""
    return parallel_mesh.make_mesh(cfg.data, cfg.fsdp, cfg.tensor, cfg.context, devices=devices)


def data_parallel_size(mesh: Mesh) -> int:
    """Number of shards the batch dimension is split into."""
    return math.prod(mesh.shape[a] for a in BATCH_AXES)


def check_batch_divisible(batch_size: int, mesh: Mesh) -> None:
    """Raise a ``ValueError`` unless the global ``batch_size`` (``data.batch_size`` per process times
    the number of processes) splits evenly over the data-parallel axes."""
    dp = data_parallel_size(mesh)
    if batch_size % dp:
        raise ValueError(
            f"data.batch_size={batch_size} (global) is not divisible by the data-parallel size {dp} "
            f"(mesh.data={mesh.shape['data']} x mesh.fsdp={mesh.shape['fsdp']}); use a batch size "
            f"that is a multiple of {dp} or set mesh.data to a divisor of {batch_size}")


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding of ``[batch, seq, ...]`` arrays: batch over data x fsdp, the rest replicated."""
    return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def state_shardings(state: Any, mesh: Mesh) -> Any:
    """Shardings for a model/optimizer state pytree: every array replicated (data parallelism)."""
    rep = replicated(mesh)
    return jax.tree.map(lambda _: rep, state)


def put_batch(batch: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
    """Place a host batch (numpy, the process-local rows of the global batch) on the mesh."""
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()}
