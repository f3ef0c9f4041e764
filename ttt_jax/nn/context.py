"""Context parallelism inside the layers: sequence-mixing ops run per device over ``context``.

When the ambient mesh (``jax.set_mesh``) has a ``context`` axis of size ``n > 1``, the sequence
dimension is split over it in the contiguous layout (device ``i`` holds positions
``[i T/n, (i+1) T/n)``). Position-wise work (projections, norms, the MLP's gate/up, RoPE with global
positions, the TTT target conv, whose chunks never cross a device boundary) needs nothing special:
XLA partitions it. The two sequence-mixing ops run inside ``jax.shard_map`` with only ``context``
manual (the other mesh axes stay automatic, so FSDP/TP sharding of weights and batch is unchanged):

* attention: ring attention with online softmax (full causal) or a halo exchange of the left
  neighbour's last ``window - 1`` keys/values (sliding window) -- :mod:`ttt_jax.ops.attention_cp`;
* In-Place TTT: a per-device ``(a, B)`` summary, one cross-device exclusive scan of the summaries,
  and the chunk scan from the carried-in state -- :mod:`ttt_jax.ops.inplace_ttt_cp`.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import jax
from jax.sharding import PartitionSpec as P

AXIS = "context"


def context_size() -> int:
    """Size of the ambient mesh's ``context`` axis (1 without a mesh or without the axis)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or getattr(mesh, "empty", False) or AXIS not in mesh.axis_names:
        return 1
    return int(mesh.shape[AXIS])


# Mesh axes that split the batch and the heads of ``[B, T, H, Dh]`` operands (ttt_jax.sharding).
_BATCH_AXES, _HEAD_AXIS = ("data", "fsdp"), "tensor"


def _whole_mesh_spec(seq_args: tuple, mesh) -> tuple[P, frozenset]:
    """The ``[B, T, H, ...]`` spec and the axis names of a ``shard_map`` manual over every mesh
    axis: rows over ``data`` x ``fsdp`` and heads over ``tensor`` where they divide (else those
    axes see whole operands), ``T`` over ``context``."""
    manual = set(getattr(mesh, "manual_axes", ()))
    axes = frozenset(a for a in mesh.axis_names if a not in manual)
    batch = tuple(a for a in _BATCH_AXES if a in axes and mesh.shape[a] > 1)
    if seq_args[0].shape[0] % math.prod(mesh.shape[a] for a in batch):
        batch = ()
    heads = _HEAD_AXIS if _HEAD_AXIS in axes and mesh.shape[_HEAD_AXIS] > 1 else None
    if heads and any(x.ndim < 3 or x.shape[2] % mesh.shape[heads] for x in seq_args):
        heads = None
    return P(batch or None, AXIS, heads), axes


def run_over_context(fn: Callable, seq_args: tuple, replicated_args: tuple = (),
                     segment_ids: Optional[jax.Array] = None, *,
                     whole_mesh: bool = False) -> jax.Array:
    """Call ``fn(*seq_args, *replicated_args, segment_ids)`` per device inside ``shard_map``.

    ``seq_args``: ``[B, T, ...]`` arrays split along ``T`` over ``context``; ``replicated_args``
    (weights) whole on every context device; ``segment_ids``: ``[B, T]`` or ``None``. Returns the
    ``[B, T, ...]`` result, split along ``T`` like the inputs.

    ``whole_mesh``: make every mesh axis manual, not only ``context`` (``seq_args`` are then
    ``[B, T, H, ...]``, split per row and head, and ``replicated_args`` must be empty). A Pallas
    Mosaic (TPU) kernel lowers only where no mesh axis is left to XLA's partitioner, and a nested
    per-device ``shard_map`` around it cannot hold the ring's collectives over ``context``.
    """
    n = context_size()
    length = seq_args[0].shape[1]
    if length % n:
        raise ValueError(f"sequence length {length} is not divisible by mesh.context={n}; "
                         "change data.seq_len or mesh.context")
    axes = frozenset({AXIS})
    seq = P(None, AXIS)
    if whole_mesh:
        if replicated_args:
            raise ValueError("run_over_context: whole_mesh takes no replicated arguments")
        seq, axes = _whole_mesh_spec(seq_args, jax.sharding.get_abstract_mesh())
    if segment_ids is None:
        def call(*args):
            return fn(*args, None)
        args = (*seq_args, *replicated_args)
        specs = (seq,) * len(seq_args) + (P(),) * len(replicated_args)
    else:
        call = fn
        args = (*seq_args, *replicated_args, segment_ids)
        specs = (seq,) * len(seq_args) + (P(),) * len(replicated_args) + (P(*seq[:2]),)
    mapped = jax.shard_map(call, in_specs=specs, out_specs=seq, axis_names=axes)
    return mapped(*args)
