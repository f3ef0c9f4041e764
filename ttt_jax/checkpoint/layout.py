"""Checkpoints across ``runtime.scan_layers``: a state saved with the layers unrolled
(``layers/{i}/...``) restored into a model that stacks them (``layers/{p}/...`` over groups), or
the other way round. The layout is a runtime choice; the parameters are the same
(:func:`ttt_jax.models.layers.stack_layer_params`).

Works on the pure nested dicts a checkpoint holds: the model state and every model-shaped subtree
of the optimizer state (Adam's moments), i.e. every dict holding a ``layers`` entry.
"""

from __future__ import annotations

from typing import Any

import jax
from jax.sharding import NamedSharding, PartitionSpec

from ttt_jax.config import ModelConfig
from ttt_jax.models.layers import stack_layer_params, unstack_layer_params


def _convert_sharding(sharding: Any, to_scanned: bool) -> Any:
    """The sharding of a stacked leaf (a leading unsharded ``layers`` axis) from that of one layer's
    leaf, or back."""
    if not isinstance(sharding, NamedSharding):
        return sharding
    spec = tuple(sharding.spec)
    spec = (None, *spec) if to_scanned else spec[1:]
    return NamedSharding(sharding.mesh, PartitionSpec(*spec))


def _struct(x: Any, to_scanned: bool) -> Any:
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=_convert_sharding(x.sharding, to_scanned))


def convert_layers(tree: Any, cfg: ModelConfig, to_scanned: bool) -> Any:
    """``tree`` with every model-shaped subtree converted to the stacked (``to_scanned``) or the
    unrolled layout. Leaves: arrays or ``jax.ShapeDtypeStruct`` (whose shardings are converted too).
    """
    if not isinstance(tree, dict):
        return tree
    if isinstance(tree.get("layers"), dict):
        structs = jax.tree.leaves(tree["layers"])
        abstract = bool(structs) and isinstance(structs[0], jax.ShapeDtypeStruct)
        src_sharding = {}
        if abstract:   # keep each leaf's sharding, converted: stack_layer_params drops it
            flat = jax.tree_util.tree_flatten_with_path(tree)[0]
            src_sharding = {jax.tree_util.keystr(p): x for p, x in flat}
        fn = stack_layer_params if to_scanned else unstack_layer_params
        out = fn(tree, cfg)
        if abstract:
            out = _restore_structs(out, src_sharding, to_scanned)
        return out
    return {k: convert_layers(v, cfg, to_scanned) for k, v in tree.items()}


def _restore_structs(out: Any, src: dict[str, Any], to_scanned: bool) -> Any:
    """Give the converted abstract leaves the converted sharding of any source leaf of the same
    name pattern (all layers of a slot share a sharding)."""
    by_suffix = {}
    for key, x in src.items():
        parts = key.split("]")
        suffix = "]".join(parts[2:]) if key.startswith("['layers']") else key
        by_suffix.setdefault(suffix, x)
    flat, treedef = jax.tree_util.tree_flatten_with_path(out)
    leaves = []
    for path, x in flat:
        key = jax.tree_util.keystr(path)
        suffix = "]".join(key.split("]")[2:]) if key.startswith("['layers']") else key
        s = by_suffix.get(suffix)
        if s is not None and key.startswith("['layers']"):
            leaves.append(jax.ShapeDtypeStruct(x.shape, x.dtype,
                                               sharding=_convert_sharding(s.sharding, to_scanned)))
        elif s is not None:
            leaves.append(s)
        else:
            leaves.append(x)
    return jax.tree_util.tree_unflatten(treedef, leaves)


def saved_layout(live: dict[str, Any], saved_config: dict[str, Any], config: dict[str, Any]):
    """``(target, relayout)`` for restoring a run checkpoint into the pure-dict states ``live``:
    ``(live, None)`` when the step was saved in the layout ``config`` asks for; else the abstract
    tree of the saved layout and the function converting a restored tree into ``live``'s layout
    and shardings. ``saved_config`` / ``config``: the step's recorded config dict and this run's."""
    from ttt_jax.checkpoint.tree import abstract_of
    from ttt_jax.config import config_from_dict, upgrade_dict

    saved_scan = bool(upgrade_dict(saved_config).get("runtime", {}).get("scan_layers", False))
    want_scan = bool(config.get("runtime", {}).get("scan_layers", False))
    if saved_scan == want_scan:
        return live, None
    mcfg = config_from_dict(config).model
    target = convert_layers(jax.tree.map(abstract_of, live), mcfg, to_scanned=saved_scan)
    return target, lambda tree: put_like(convert_layers(tree, mcfg, to_scanned=want_scan), live)


def relayout_model(model: Any, runtime: Any) -> Any:
    """A copy of ``model`` (a :class:`~ttt_jax.models.lm.CausalLM`) built for ``runtime``, its
    parameters converted to that runtime's layer layout."""
    from flax import nnx

    from ttt_jax.models.lm import CausalLM

    graphdef, abs_state = nnx.split(nnx.eval_shape(
        lambda: CausalLM(model.cfg, runtime=runtime, rngs=nnx.Rngs(0))))
    values = convert_layers(nnx.to_pure_dict(nnx.state(model)), model.cfg,
                            to_scanned=runtime.scan_layers)
    nnx.replace_by_pure_dict(abs_state, values)
    return nnx.merge(graphdef, abs_state)


def rekey_like(tree: Any, like: Any) -> Any:
    """``tree``'s values under ``like``'s exact keys (dict keys matched as strings), so the two
    pytrees have the same structure (layer indices may come back as ``int`` or ``str``)."""
    if not isinstance(like, dict):
        return tree
    by_str = {str(k): v for k, v in tree.items()}
    return {k: rekey_like(by_str[str(k)], v) for k, v in like.items()}


def put_like(tree: Any, like: Any) -> Any:
    """``tree`` (converted arrays) placed in the shardings of ``like`` (the live target state)."""
    tree = rekey_like(tree, like)
    return jax.tree.map(lambda x, t: jax.device_put(x, t.sharding) if hasattr(t, "sharding") else x,
                        tree, like)
