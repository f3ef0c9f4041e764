"""Parallelism building blocks: mesh, logical sharding rules, cross-device scans, attention collectives.

Imports only JAX (and numpy / the standard library), never ``ttt_jax``.

* :mod:`parallel.mesh`      -- ``make_mesh`` (axes ``data, fsdp, tensor, context``),
  ``maybe_initialize_distributed``.
* :mod:`parallel.rules`     -- ``DEFAULT_RULES``, ``logical_to_spec``, ``shard_pytree``,
  ``with_logical_constraint``.
* :mod:`parallel.scan`      -- the affine monoid ``(a, B)`` and ``exclusive_device_scan`` /
  ``exclusive_device_scan_zigzag`` (inside ``jax.shard_map``).
* :mod:`parallel.attention` -- ring / all-gather causal attention and halo sliding-window attention
  over the ``context`` axis, the zigzag layout helpers, and a local reference.
* :mod:`parallel.flash`, :mod:`parallel.fused_attention` -- the fused per-device kernels of the
  same (Pallas flash blocks in the ring, one cuDNN call per device for the sliding window; GPU).
* :mod:`parallel.comm`      -- analytic bytes communicated per device per train step.
"""

from parallel.attention import (allgather_attention, context_attention, from_zigzag,
                                fused_unsupported_reason, local_positions, reference_attention,
                                ring_attention, sliding_window_attention, to_zigzag)
from parallel.comm import context_comm_bytes
from parallel.mesh import MESH_AXES, make_mesh, maybe_initialize_distributed
from parallel.rules import DEFAULT_RULES, logical_to_spec, shard_pytree, with_logical_constraint
from parallel.scan import combine, exclusive_device_scan, exclusive_device_scan_zigzag

__all__ = [
    "DEFAULT_RULES", "MESH_AXES", "allgather_attention", "combine", "context_attention",
    "context_comm_bytes", "fused_unsupported_reason",
    "exclusive_device_scan", "exclusive_device_scan_zigzag", "from_zigzag", "local_positions",
    "logical_to_spec", "make_mesh", "maybe_initialize_distributed", "reference_attention",
    "ring_attention", "shard_pytree", "sliding_window_attention", "to_zigzag",
    "with_logical_constraint",
]
