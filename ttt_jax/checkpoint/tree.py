"""Pytree helpers shared by run checkpoints and model-only checkpoints: dotted flattening, typed
PRNG keys stored as raw key data, abstract targets for restoring, and shape comparison against what
a checkpoint's metadata records."""

from __future__ import annotations

from typing import Any

import jax


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dict -> ``{"a.b.c": leaf}``."""
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for k, v in tree.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: tree}


def is_key_array(x: Any) -> bool:
    return hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def to_saveable(tree: Any) -> Any:
    # Typed PRNG key arrays are stored as their raw uint32 key data.
    return jax.tree.map(lambda x: jax.random.key_data(x) if is_key_array(x) else x, tree)


def abstract_of(x: Any) -> Any:
    if is_key_array(x):
        x = jax.random.key_data(x)
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None))


def from_saved(restored: Any, target: Any) -> Any:
    return jax.tree.map(
        lambda r, t: jax.random.wrap_key_data(r, impl=jax.random.key_impl(t)) if is_key_array(t) else r,
        restored, target)


def shape_problems(saved_meta: Any, target: dict[str, Any]) -> list[str]:
    """Paths missing from, extra in, or of another shape in the checkpoint than in ``target``."""
    saved = {k: tuple(v.shape) for k, v in flatten(meta_tree(saved_meta)).items()}
    want = {k: tuple(abstract_of(v).shape) for k, v in flatten(target).items()}
    problems = [f"{k}: missing from checkpoint (expected shape {want[k]})" for k in sorted(want.keys() - saved.keys())]
    problems += [f"{k}: in checkpoint but not in the model (shape {saved[k]})"
                 for k in sorted(saved.keys() - want.keys())]
    problems += [f"{k}: checkpoint shape {saved[k]} != model shape {want[k]}"
                 for k in sorted(want.keys() & saved.keys()) if saved[k] != want[k]]
    return problems


def meta_tree(meta: Any) -> Any:
    tree = getattr(meta, "tree", meta)
    # Orbax stores dict keys as strings; map nested containers back to plain dicts.
    if isinstance(tree, dict):
        return {str(k): meta_tree(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return {str(i): meta_tree(v) for i, v in enumerate(tree)}
    return tree


def str_keys(tree: Any) -> Any:
    if isinstance(tree, dict):
        return {str(k): str_keys(v) for k, v in tree.items()}
    return tree
