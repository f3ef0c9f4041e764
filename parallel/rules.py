"""Logical axis names -> mesh axes.

Arrays are annotated with one *logical* name per dimension (``("batch", "seq", "embed")``,
``("embed", "mlp")``, ...; ``None`` = never sharded). A rule table maps each logical name to mesh
axes of :data:`parallel.mesh.MESH_AXES`. The table is a sequence of ``(logical name, mesh axes)``
pairs -- the format of ``flax.nnx.logical_axis_rules`` / ``flax.linen.logical_axis_rules``, so
:data:`DEFAULT_RULES` can be handed to Flax unchanged -- where ``mesh axes`` is ``None``, one axis
name, or a tuple of axis names (the dimension is split over their product, major to minor).

:func:`logical_to_spec` resolves names left to right; for each dimension it takes the first rule
for that name and drops

* mesh axes of size 1 (when a mesh is given): they shard nothing, and dropping them keeps specs
  readable and lets one table serve every mesh shape;
* mesh axes already used by an earlier dimension of the same spec (a mesh axis may appear only once
  in a ``PartitionSpec``): ``("batch", "seq", "embed")`` gives ``P(("data", "fsdp"), "context",
  None)`` -- activations keep ``embed`` whole while parameters shard it over ``fsdp``.

When a shape is given and a dimension is not divisible by the product of its mesh axes, the default
(``on_indivisible="raise"``) is a ``ValueError`` naming the dimension and the fix: an uneven split
would either fail deep inside XLA or silently pad, and a mesh that does not divide the shapes is a
user error (DESIGN.md section 3). ``on_indivisible="replicate"`` instead drops mesh axes from the
minor end until the rest divides (down to full replication) and logs a warning -- useful for a few
small parameters such as ``kv_heads = 2`` on ``tensor = 4``.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Literal, Mapping, Optional, Sequence, Union

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

logger = logging.getLogger(__name__)

MeshAxes = Union[None, str, tuple[str, ...]]
Rules = Sequence[tuple[str, MeshAxes]]
OnIndivisible = Literal["raise", "replicate"]

DEFAULT_RULES: tuple[tuple[str, MeshAxes], ...] = (
    ("batch", ("data", "fsdp")),
    ("seq", "context"),
    ("length", "context"),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("norm", None),
    ("conv", None),
    ("layers", None),   # the stacked-layer axis of scanned layer groups: never split
)


def _as_tuple(axes: MeshAxes) -> tuple[str, ...]:
    if axes is None:
        return ()
    if isinstance(axes, str):
        return (axes,)
    return tuple(axes)


def _rules_table(rules: Union[Rules, Mapping[str, MeshAxes]]) -> dict[str, tuple[str, ...]]:
    items = rules.items() if isinstance(rules, Mapping) else rules
    table: dict[str, tuple[str, ...]] = {}
    for item in items:
        if len(item) != 2 or not isinstance(item[0], str):
            raise ValueError(f"a rule must be a (logical name, mesh axes) pair, got {item!r}")
        table.setdefault(item[0], _as_tuple(item[1]))  # the first rule for a name wins
    return table


def logical_to_spec(names: Sequence[Optional[str]],
                    rules: Union[Rules, Mapping[str, MeshAxes]] = DEFAULT_RULES,
                    mesh: Optional[Mesh] = None, *, shape: Optional[Sequence[int]] = None,
                    on_indivisible: OnIndivisible = "raise") -> PartitionSpec:
    """The ``PartitionSpec`` of an array whose dimensions carry logical ``names``.

    Args:
      names: one logical name (or ``None``) per array dimension.
      rules: ``(logical name, mesh axes)`` pairs (or a mapping); see the module docstring.
      mesh: optional ``Mesh`` / ``AbstractMesh``; with it, size-1 axes are dropped and axis names
        are checked to exist.
      shape: optional array shape (``len(shape) == len(names)``), checked for divisibility (needs
        ``mesh``).
      on_indivisible: ``"raise"`` (default) or ``"replicate"``; see the module docstring.

    Returns:
      ``PartitionSpec`` with ``len(names)`` entries, each ``None``, an axis name or a tuple of them.

    Raises:
      ValueError: a logical name without a rule, a rule naming an axis the mesh lacks, a shape of
        the wrong rank, or (``on_indivisible="raise"``) a dimension its mesh axes do not divide.
    """
    if on_indivisible not in ("raise", "replicate"):
        raise ValueError(f"on_indivisible must be 'raise' or 'replicate', got {on_indivisible!r}")
    names = tuple(names)
    table = _rules_table(rules)
    sizes = dict(mesh.shape) if mesh is not None else None
    if shape is not None and len(shape) != len(names):
        raise ValueError(f"logical names {names} ({len(names)}) do not match the rank of shape "
                         f"{tuple(shape)}")
    used: set[str] = set()
    spec: list[Any] = []
    for dim, name in enumerate(names):
        if name is None:
            spec.append(None)
            continue
        if name not in table:
            raise ValueError(f"no sharding rule for logical axis {name!r} (names {names}); known: "
                             f"{sorted(table)}. Add ({name!r}, mesh_axes) to the rules")
        axes = []
        for axis in table[name]:
            if sizes is not None and axis not in sizes:
                raise ValueError(f"rule {name!r} -> {table[name]} names mesh axis {axis!r}, but the "
                                 f"mesh has axes {tuple(sizes)}")
            if axis in used or (sizes is not None and sizes[axis] == 1):
                continue
            axes.append(axis)
        if shape is not None and sizes is not None and axes:
            size = int(shape[dim])
            split = math.prod(sizes[a] for a in axes)
            if size % split:
                detail = (f"dimension {dim} ({name!r}) of shape {tuple(shape)} has size {size}, not "
                          f"divisible by mesh axes {tuple(axes)} of sizes "
                          f"{tuple(sizes[a] for a in axes)} (product {split})")
                if on_indivisible == "raise":
                    raise ValueError(f"{detail}; change the mesh sizes or the rule for {name!r}, or "
                                     "pass on_indivisible='replicate'")
                while axes and size % math.prod(sizes[a] for a in axes):
                    axes.pop()
                logger.warning("%s: sharding it over %s instead", detail, tuple(axes) or "nothing")
        used.update(axes)
        spec.append(None if not axes else axes[0] if len(axes) == 1 else tuple(axes))
    return PartitionSpec(*spec)


def _is_names(x: Any) -> bool:
    return x is None or (isinstance(x, (tuple, list)) and all(n is None or isinstance(n, str) for n in x))


def shard_pytree(tree: Any, names: Any, mesh: Mesh,
                 rules: Union[Rules, Mapping[str, MeshAxes]] = DEFAULT_RULES, *,
                 on_indivisible: OnIndivisible = "raise") -> Any:
    """``NamedSharding`` for every array of ``tree``, from the logical names in ``names``.

    Args:
      tree: pytree of arrays (anything with ``.shape``: ``jax.Array``, ``np.ndarray``,
        ``jax.ShapeDtypeStruct``).
      names: pytree of the same structure whose leaves are tuples of logical names (one per
        dimension of the matching array), or ``None`` for a fully replicated array.
      mesh: the mesh.
      rules, on_indivisible: as in :func:`logical_to_spec` (divisibility is always checked).

    Returns:
      Pytree like ``tree`` of ``NamedSharding``; use it as ``jax.jit(in_shardings=...,
      out_shardings=...)`` or with ``jax.device_put(tree, shardings)``.
    """
    def one(path, leaf_names, x):
        if leaf_names is None:
            return NamedSharding(mesh, PartitionSpec())
        try:
            spec = logical_to_spec(leaf_names, rules, mesh, shape=x.shape, on_indivisible=on_indivisible)
        except ValueError as e:
            raise ValueError(f"{jax.tree_util.keystr(path)}: {e}") from None
        return NamedSharding(mesh, spec)

    return jax.tree_util.tree_map_with_path(one, names, tree, is_leaf=_is_names)


def with_logical_constraint(x: jax.Array, names: Sequence[Optional[str]],
                            rules: Union[Rules, Mapping[str, MeshAxes]] = DEFAULT_RULES,
                            mesh: Optional[Mesh] = None) -> jax.Array:
    """``jax.lax.with_sharding_constraint`` from logical names (outside ``shard_map``).

    Args:
      x: array of rank ``len(names)``.
      names, rules: as in :func:`logical_to_spec`.
      mesh: the mesh; default the one set by ``jax.set_mesh`` (no mesh set: ``x`` is returned as is).
    """
    if mesh is None:
        abstract = jax.sharding.get_abstract_mesh()
        if abstract.empty:
            return x
        return jax.lax.with_sharding_constraint(x, logical_to_spec(names, rules, abstract, shape=x.shape))
    spec = logical_to_spec(names, rules, mesh, shape=x.shape)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))
