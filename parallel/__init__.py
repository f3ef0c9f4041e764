"""Parallelism building blocks: mesh, logical sharding rules, sequence layouts, cross-device scans,
communication accounting.

Imports only JAX (and numpy / the standard library), never the rest of ``ttt_jax``.

* :mod:`ttt_jax.parallel.mesh`   -- ``make_mesh`` (axes ``data, fsdp, tensor, context``),
  ``maybe_initialize_distributed``.
* :mod:`ttt_jax.parallel.rules`  -- ``DEFAULT_RULES``, ``logical_to_spec``, ``shard_pytree``,
  ``with_logical_constraint``.
* :mod:`ttt_jax.parallel.layout` -- the ``contiguous`` / load-balanced ``zigzag`` sequence layouts over the
  ``context`` axis: ``to_zigzag``, ``from_zigzag``, ``local_positions``.
* :mod:`ttt_jax.parallel.scan`   -- the affine monoid ``(a, B)`` and ``exclusive_device_scan`` /
  ``exclusive_device_scan_zigzag`` (inside ``jax.shard_map``).
* :mod:`ttt_jax.parallel.comm`   -- analytic bytes communicated per device per train step.

The context-parallel attention built on these lives with the ops (``ttt_jax.ops.attention_cp``),
its per-device kernels in ``ttt_jax.ops.kernels``.
"""

from .comm import context_comm_bytes
from .layout import from_zigzag, local_positions, to_zigzag
from .mesh import MESH_AXES, make_mesh, maybe_initialize_distributed
from .rules import DEFAULT_RULES, logical_to_spec, shard_pytree, with_logical_constraint
from .scan import combine, exclusive_device_scan, exclusive_device_scan_zigzag

__all__ = [
    "DEFAULT_RULES", "MESH_AXES", "combine", "context_comm_bytes", "exclusive_device_scan",
    "exclusive_device_scan_zigzag", "from_zigzag", "local_positions", "logical_to_spec",
    "make_mesh", "maybe_initialize_distributed", "shard_pytree", "to_zigzag",
    "with_logical_constraint",
]
