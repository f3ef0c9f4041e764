"""Device mesh and shardings of the model, its optimizer state and its batches (train, bench,
convert, infer and eval share them): data parallelism, FSDP, tensor and context parallelism.

The mesh has the four axes ``("data", "fsdp", "tensor", "context")`` of :mod:`parallel.mesh`.

* The global batch (``[B, T]`` arrays) is split over ``data`` x ``fsdp`` (:data:`BATCH_AXES`, the
  ``batch`` rule of :data:`ttt_jax.parallel.rules.DEFAULT_RULES`) and the sequence over ``context``
  (contiguous layout; the attention and In-Place TTT layers then run their context-parallel
  collectives, see :mod:`ttt_jax.nn.context`).
* Every NNX variable that carries logical axis names (``out_sharding`` metadata, see
  :mod:`ttt_jax.nn.params`) -- the parameters, and the Adam moments, which inherit the names of
  their parameter -- is placed by :data:`RULES`: ``embed`` over ``fsdp`` (ZeRO-3 style),
  ``vocab`` / ``mlp`` / ``heads`` / ``kv_heads`` over ``tensor`` (Megatron-style), ``head_dim`` /
  ``norm`` / ``conv`` / ``layers`` never split; mesh axes of size 1 are dropped. Variables without
  names (step counters, RNG keys, Adam's ``count``) are replicated.
* A dimension its mesh axes do not divide is a ``ValueError`` naming the parameter and the mesh
  sizes that would fit (:func:`state_shardings`), raised before anything is computed.
* ZeRO-1 (``train.shard_optimizer``): ``state_shardings(..., zero_axes=ZERO_AXES)`` splits every
  named variable that is not a parameter (the Adam moments) further over the mesh axes that
  replicate it, see :func:`split_further`.
* Activations are left to XLA's sharding propagation (``Auto`` axes).

With ``mesh.context > 1``, :func:`check_supported` requires every device's part of a row to be a
whole number of TTT chunks.
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ttt_jax.parallel import mesh as parallel_mesh
from ttt_jax.parallel import rules as parallel_rules
from ttt_jax.parallel.layout import to_zigzag
from ttt_jax.config import MeshConfig

# Mesh axes the batch dimension is split over.
BATCH_AXES = ("data", "fsdp")

# Logical axis name -> mesh axes for parameters and optimizer state. "layers" (the stacked axis of
# scanned layer groups) is never split; the entry is a no-op when DEFAULT_RULES already has it
# (the first rule for a name wins).
RULES: tuple[tuple[str, Any], ...] = tuple(parallel_rules.DEFAULT_RULES) + (("layers", None),)

# Mesh axes that replicate parameters; ZeRO-1 splits the optimizer moments over them.
ZERO_AXES = ("data", "context")

# The mesh setting to change, per mesh axis, in error messages.
_AXIS_HINT = {"fsdp": "mesh.fsdp must divide model.d_model (the 'embed' dimension)",
              "tensor": "mesh.tensor must divide model.vocab_size, model.n_heads, model.n_kv_heads "
                        "and model.d_ff (the 'vocab', 'heads', 'kv_heads' and 'mlp' dimensions)",
              "data": "", "context": ""}


def make_mesh(cfg: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """The 4-axis mesh of ``cfg`` over ``devices`` (default: all), via :func:`ttt_jax.parallel.mesh.make_mesh`
    (``AxisType.Auto`` axes; a ``ValueError`` naming the sizes when they do not fit the devices)."""
    return parallel_mesh.make_mesh(cfg.data, cfg.fsdp, cfg.tensor, cfg.context, devices=devices)


def check_supported(mesh: Mesh, seq_len: int, ttt_chunk: Optional[int],
                    layout: str = "contiguous") -> None:
    """Raise a ``ValueError`` unless rows of ``seq_len`` tokens split evenly over ``context``, into
    whole TTT chunks per device part when In-Place TTT is on (``ttt_chunk``), so that chunk
    boundaries are those of the unsharded sequence. The zigzag layout has two parts per device."""
    n = mesh.shape["context"]
    if n == 1:
        return
    parts = 2 if layout == "zigzag" else 1
    unit = parts * n * (ttt_chunk or 1)
    if seq_len % unit:
        what = " x ".join(([] if parts == 1 else ["2 (zigzag)"]) + [f"mesh.context={n}"]
                          + ([f"model.ttt.chunk_size={ttt_chunk}"] if ttt_chunk else []))
        raise ValueError(
            f"data.seq_len={seq_len} must be a multiple of {what} = {unit} for context parallelism "
            f"(each device holds {'a contiguous' if parts == 1 else 'two'}, whole-chunk part"
            f"{'' if parts == 1 else 's'} of every row); change data.seq_len, mesh.context or "
            "model.ttt.chunk_size")


def data_parallel_size(mesh: Mesh) -> int:
    """Number of shards the batch dimension is split into."""
    return math.prod(mesh.shape[a] for a in BATCH_AXES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding of ``[batch, seq]`` arrays: batch over data x fsdp, sequence over context."""
    return NamedSharding(mesh, P(BATCH_AXES, "context" if mesh.shape["context"] > 1 else None))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def _dotted(path: tuple[Any, ...]) -> str:
    return ".".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)


def _axes_of(entry: Any) -> tuple[str, ...]:
    """The mesh axes of one ``PartitionSpec`` entry (``None``, a name, or a tuple of names)."""
    return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def logical_sharding(names: Optional[Sequence[Optional[str]]], shape: Sequence[int], mesh: Mesh,
                     what: str = "array", rules: Any = RULES) -> NamedSharding:
    """``NamedSharding`` of an array of ``shape`` whose dimensions carry logical ``names``.

    Args:
      names: one logical name (or ``None``) per dimension; ``None`` (no names) = replicated.
      shape: the array's shape.
      mesh: the mesh.
      what: how to name the array in an error (e.g. ``"parameter layers.0.attn.q"``).
      rules: ``(logical name, mesh axes)`` pairs (default :data:`RULES`).

    Raises:
      ValueError: names of the wrong rank, a name without a rule, or a dimension that its mesh axes
        do not divide (naming the array, the dimension and the mesh sizes that would fit).
    """
    if names is None:
        return replicated(mesh)
    names, shape = tuple(names), tuple(int(s) for s in shape)
    try:
        spec = parallel_rules.logical_to_spec(names, rules, mesh)
    except ValueError as e:
        raise ValueError(f"{what} {shape}: {e}") from None
    if len(names) != len(shape):
        raise ValueError(f"{what}: logical axis names {names} do not match its shape {shape}")
    for dim, (name, axes) in enumerate(zip(names, spec)):
        axes = _axes_of(axes)
        split = math.prod(mesh.shape[a] for a in axes)
        if shape[dim] % split:
            sizes = " x ".join(f"mesh.{a}={mesh.shape[a]}" for a in axes)
            sizes += f" (= {split})" if len(axes) > 1 else ""
            fits = [d for d in _divisors(shape[dim]) if d <= split]
            hints = "; ".join(h for h in (_AXIS_HINT.get(a, "") for a in axes) if h)
            raise ValueError(
                f"cannot shard {what} of shape {shape} (logical axes {names}) on the mesh "
                + " x ".join(f"{a}={n}" for a, n in mesh.shape.items())
                + f": its dimension {dim} ({name!r}) has size {shape[dim]}, which {sizes} "
                f"does not divide. Choose mesh sizes that divide it ({hints}; sizes that divide "
                f"{shape[dim]}: {', '.join(map(str, fits))}) and give the remaining devices to "
                f"mesh.data, or change the model shape")
    return NamedSharding(mesh, spec)


def split_further(sharding: NamedSharding, shape: Sequence[int], axes: Sequence[str]) -> NamedSharding:
    """``sharding`` with one dimension of an array of ``shape`` also split over ``axes``.

    Only the axes of size > 1 that ``sharding`` does not use already count. They are appended to
    the largest dimension whose size stays divisible (ties: the first such dimension); if no
    dimension is, ``sharding`` is returned unchanged.

    Example: on a mesh ``data=1, fsdp=2, context=4``, ``P("fsdp", None)`` of a ``[2048, 8192]``
    moment becomes ``P("fsdp", "context")``.
    """
    mesh, spec = sharding.mesh, tuple(sharding.spec) + (None,) * (len(shape) - len(sharding.spec))
    used = {a for entry in spec for a in _axes_of(entry)}
    extra = tuple(a for a in axes if mesh.shape.get(a, 1) > 1 and a not in used)
    n = math.prod(mesh.shape[a] for a in extra)
    if n == 1:
        return sharding
    split = [math.prod(mesh.shape[a] for a in _axes_of(entry)) for entry in spec]
    fits = [d for d in range(len(shape)) if shape[d] % (split[d] * n) == 0]
    if not fits:
        return sharding
    d = max(fits, key=lambda i: (shape[i] // split[i], -i))
    new = list(spec)
    new[d] = _axes_of(spec[d]) + extra
    new[d] = new[d][0] if len(new[d]) == 1 else new[d]
    return NamedSharding(mesh, P(*new))


def state_shardings(state: Any, mesh: Mesh, rules: Any = RULES, *, zero_axes: Sequence[str] = ()) -> Any:
    """Shardings for a model/optimizer ``nnx.State`` (abstract or concrete), leaf for leaf.

    Each ``nnx.Variable`` with logical axis names (``out_sharding`` metadata: parameters and the
    optimizer moments of a parameter) gets :func:`logical_sharding` of its names; every other
    array (step counters, RNG keys, ``count``) is replicated. The result has the structure of
    ``state`` (use it as ``jax.jit`` ``in_shardings`` / ``out_shardings``).

    ``zero_axes`` (ZeRO-1, e.g. :data:`ZERO_AXES`): named variables that are not ``nnx.Param``
    (the optimizer moments) are further split over these mesh axes (:func:`split_further`).

    Raises:
      ValueError: a parameter whose shape the mesh does not divide (see :func:`logical_sharding`).
    """
    def one(path, leaf):
        if isinstance(leaf, nnx.Variable):
            names = leaf.get_metadata().get("out_sharding")
            kind = "parameter" if isinstance(leaf, nnx.Param) else "variable"
            sh = logical_sharding(names, leaf.shape, mesh, f"{kind} {_dotted(path)}", rules)
            if zero_axes and names is not None and not isinstance(leaf, nnx.Param):
                sh = split_further(sh, leaf.shape, zero_axes)
        else:
            sh = replicated(mesh)
        return jax.tree.map(lambda _: sh, leaf)

    return jax.tree_util.tree_map_with_path(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def put_batch(batch: dict[str, np.ndarray], sharding: NamedSharding,
              layout: str = "contiguous") -> dict[str, jax.Array]:
    """Place a host batch (numpy ``[B, T]`` arrays, the process-local rows of the global batch) on
    the mesh. With ``layout="zigzag"`` and a ``context`` axis of size ``n > 1`` every array is first
    permuted along ``T`` into the load-balanced order (:func:`ttt_jax.parallel.layout.to_zigzag`: device
    ``i`` receives segments ``i`` and ``2n - 1 - i``); the batch's ``positions`` travel with their
    tokens, so the model sees each token at its true position."""
    n = sharding.mesh.shape.get("context", 1)
    if layout == "zigzag" and n > 1:
        batch = {k: to_zigzag(np.asarray(v), n, axis=1) for k, v in batch.items()}
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()}
