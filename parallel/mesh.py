"""The device mesh and multi-host start-up.

Every mesh has the four axes ``("data", "fsdp", "tensor", "context")`` (:data:`MESH_AXES`), so
sharding rules written against those names work unchanged on one CPU, one GPU and a pod:

* ``data``    -- pure data parallelism (batch split, parameters replicated).
* ``fsdp``    -- batch split *and* parameters / optimizer state sharded (ZeRO-3 style).
* ``tensor``  -- Megatron-style split of heads / MLP width / vocabulary.
* ``context`` -- the sequence split (context parallelism: ring / halo attention and the
  cross-device fast-weight scan of :mod:`parallel.scan` run inside ``jax.shard_map`` over it).

Axis types
----------
The axes are ``AxisType.Auto`` by default. The model code of this project places data with
``jax.jit(in_shardings=..., out_shardings=...)``, ``jax.lax.with_sharding_constraint`` and explicit
collectives inside ``jax.shard_map``; in between, XLA's sharding propagation decides. That is what
``Auto`` axes mean. ``Explicit`` axes ("sharding in types") would make every ``jnp`` op check and
propagate shardings at trace time, so ops whose output sharding is ambiguous (a matmul contracting
a sharded dimension, a reshape merging a sharded axis) raise unless each call site passes
``out_sharding=`` -- which none of the model code does. ``shard_map`` over ``context`` and
``jax.jit(in_shardings=...)`` work with both; pass ``axis_type=AxisType.Explicit`` to opt in.
"""

from __future__ import annotations

import logging
import math
import os
from typing import Mapping, Optional, Sequence

import jax
from jax.sharding import AxisType, Mesh

MESH_AXES = ("data", "fsdp", "tensor", "context")

logger = logging.getLogger(__name__)


def resolve_axis_sizes(sizes: Mapping[str, int], n_devices: int) -> dict[str, int]:
    """Resolve at most one ``-1`` ("all remaining devices") to a concrete size.

    Args:
      sizes: ``{axis name: size}``, each size a positive int or ``-1``.
      n_devices: the number of devices the mesh must use, exactly.

    Returns:
      ``{axis name: size}`` with every size positive and ``prod(sizes) == n_devices``.

    Raises:
      ValueError: a size that is not a positive int or -1, more than one -1, fixed sizes whose
        product does not divide ``n_devices``, or (without -1) a product other than ``n_devices``.
    """
    sizes = dict(sizes)
    for name, size in sizes.items():
        if not isinstance(size, int) or isinstance(size, bool) or (size < 1 and size != -1):
            raise ValueError(f"mesh axis {name!r} has size {size!r}; sizes must be positive ints, "
                             "or -1 for 'all remaining devices'")
    fill = [name for name, size in sizes.items() if size == -1]
    if len(fill) > 1:
        raise ValueError(f"mesh sizes {sizes}: at most one axis may be -1, got {fill}")
    fixed = math.prod(size for size in sizes.values() if size != -1)
    if fill:
        if n_devices % fixed:
            raise ValueError(
                f"mesh sizes {sizes}: the fixed axes multiply to {fixed}, which does not divide the "
                f"{n_devices} devices, so {fill[0]!r}=-1 cannot be filled; choose sizes whose product "
                f"divides {n_devices}")
        sizes[fill[0]] = n_devices // fixed
    elif fixed != n_devices:
        raise ValueError(
            f"mesh sizes {sizes} multiply to {fixed} but there are {n_devices} devices; make the "
            f"product equal {n_devices}, set one axis to -1, or pass devices=jax.devices()[:{fixed}]")
    return sizes


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, context: int = 1, *,
              devices: Optional[Sequence[jax.Device]] = None,
              axis_type: AxisType = AxisType.Auto) -> Mesh:
    """Build the ``("data", "fsdp", "tensor", "context")`` mesh.

    Args:
      data, fsdp, tensor, context: axis sizes; one of them may be ``-1`` = all remaining devices.
      devices: the devices to use (default ``jax.devices()``, every device of every process). The
        mesh uses all of them: the product of the sizes must equal ``len(devices)``.
      axis_type: ``AxisType.Auto`` (default; see the module docstring) or ``AxisType.Explicit``,
        used for all four axes.

    Returns:
      A ``jax.sharding.Mesh`` of shape ``(data, fsdp, tensor, context)``. Device order follows
      ``jax.make_mesh`` (topology-aware on TPU/GPU): the last axis, ``context``, varies fastest,
      so context neighbours (ring / halo exchange partners) are the closest devices.

    Raises:
      ValueError: sizes that do not fit the device count (the message names both).
    """
    devices = list(jax.devices() if devices is None else devices)
    if not devices:
        raise ValueError("make_mesh: no devices given")
    sizes = resolve_axis_sizes(dict(zip(MESH_AXES, (data, fsdp, tensor, context))), len(devices))
    shape = tuple(sizes[a] for a in MESH_AXES)
    types = (axis_type,) * len(MESH_AXES)
    try:
        return jax.make_mesh(shape, MESH_AXES, axis_types=types, devices=devices)
    except NotImplementedError:
        # A TPU torus whose physical axes the logical sizes do not match one to one (e.g.
        # fsdp=64 x context=4 on a 16x16 v6e slice): split physical axes, keeping each logical
        # axis on neighbouring chips where the topology allows.
        from jax.experimental import mesh_utils
        arr = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
        return Mesh(arr, MESH_AXES, axis_types=types)


# --------------------------------------------------------------------------------------------------
# Multi-host
# --------------------------------------------------------------------------------------------------


def _int_env(env: Mapping[str, str], key: str) -> Optional[int]:
    try:
        return int(env[key])
    except (KeyError, ValueError):
        return None


def detect_multihost(env: Optional[Mapping[str, str]] = None) -> Optional[str]:
    """Name the launcher that started this process as one of several, or ``None`` on one host.

    Reads only environment variables (no network, no metadata server):

    * ``JAX_COORDINATOR_ADDRESS`` -- a manual launch; multi-process unless ``JAX_NUM_PROCESSES=1``.
    * SLURM: ``SLURM_JOB_ID`` with ``SLURM_NTASKS`` (or ``SLURM_STEP_NUM_TASKS``) > 1.
    * Open MPI: ``OMPI_COMM_WORLD_SIZE`` > 1.
    * TPU pods / GKE: ``MEGASCALE_COORDINATOR_ADDRESS`` (multislice), or ``TPU_PROCESS_ADDRESSES`` /
      ``TPU_WORKER_HOSTNAMES`` listing more than one host.

    Args:
      env: the environment to read (default ``os.environ``).
    """
    env = os.environ if env is None else env
    if env.get("JAX_COORDINATOR_ADDRESS"):
        n = _int_env(env, "JAX_NUM_PROCESSES")
        return None if n == 1 else "JAX_COORDINATOR_ADDRESS"
    if "SLURM_JOB_ID" in env:
        n = _int_env(env, "SLURM_STEP_NUM_TASKS") or _int_env(env, "SLURM_NTASKS")
        if n is not None and n > 1:
            return "slurm"
    n = _int_env(env, "OMPI_COMM_WORLD_SIZE")
    if n is not None and n > 1:
        return "openmpi"
    if env.get("MEGASCALE_COORDINATOR_ADDRESS"):
        return "tpu-multislice"
    hosts = env.get("TPU_PROCESS_ADDRESSES") or env.get("TPU_WORKER_HOSTNAMES")
    if hosts and len([h for h in hosts.split(",") if h.strip()]) > 1:
        return "tpu-pod"
    return None


def maybe_initialize_distributed(env: Optional[Mapping[str, str]] = None) -> bool:
    """Call ``jax.distributed.initialize()`` when this process is one of several; else do nothing.

    Call it first thing in ``main``, before any other JAX call (``jax.distributed.initialize`` must
    run before the backends start). On one host (laptop, one GPU box, CI) it is a no-op, so the same
    entry point runs everywhere. The launcher is detected by :func:`detect_multihost`; the
    coordinator address, process count and process id are then taken by JAX's own cluster
    detection (SLURM, Open MPI, Cloud TPU / GKE), or, for a manual launch, from
    ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID``.

    Args:
      env: the environment to read (default ``os.environ``).

    Returns:
      ``True`` if it initialised the distributed runtime, ``False`` if it was a no-op (one host, or
      already initialised).
    """
    if jax.distributed.is_initialized():
        return False
    env = os.environ if env is None else env
    launcher = detect_multihost(env)
    if launcher is None:
        return False
    kwargs = {}
    if launcher == "JAX_COORDINATOR_ADDRESS":
        kwargs["coordinator_address"] = env["JAX_COORDINATOR_ADDRESS"]
        for key, arg in (("JAX_NUM_PROCESSES", "num_processes"), ("JAX_PROCESS_ID", "process_id")):
            value = _int_env(env, key)
            if value is not None:
                kwargs[arg] = value
    logger.info("multi-host launch detected (%s): jax.distributed.initialize(%s)", launcher, kwargs)
    jax.distributed.initialize(**kwargs)
    return True
