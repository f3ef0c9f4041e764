"""Config dicts as nested mappings: merging, dotted assignment, and the keys of older versions
(where each moved, or why it is gone)."""

from __future__ import annotations

from typing import Any

from ttt_jax.config.base import ConfigError

# Keys of configs written before the ``runtime`` section existed (checkpoints, old YAML files):
# where each moved, or why it is gone. Checkpoints are upgraded silently (:func:`upgrade_dict`);
# a YAML file or override using an old key gets an error naming the new one.
MOVED = {
    "model.attention_impl": "runtime.attention_impl",
    "model.ttt.impl": "runtime.ttt_impl",
    "model.ttt_seq.impl": "runtime.ttt_seq_impl",
    "model.ttt_seq.remat_group": "runtime.ttt_seq_remat_group",
    "model.e2e.impl": "runtime.e2e_impl",
    "model.remat": "runtime.remat",
    "model.remat_policy": "runtime.remat_policy",
    "model.scan_layers": "runtime.scan_layers",
    "train.loss_chunk": "runtime.loss_chunk",
    "model.context_layout": "runtime.context.layout",
    "model.context_attention": "runtime.context.attention",
    "model.context_kernel": "runtime.context.kernel",
}
REMOVED = {
    "model.remat_pinned": "remat always runs the backward pass block by block now (runtime.remat)",
    "model.context_scan": "the TTT summaries always travel by one all-gather now",
    "model.context_exchange_dtype": "the TTT summaries always travel in float32 now",
    "model.context_halo": "the fused sliding window always uses the split halo block now",
}


def _pop(tree: dict, dotted: str) -> tuple[bool, Any]:
    *parents, last = dotted.split(".")
    node = tree
    for p in parents:
        node = node.get(p) if isinstance(node, dict) else None
    if isinstance(node, dict) and last in node:
        return True, node.pop(last)
    return False, None


def upgrade_dict(values: dict[str, Any]) -> dict[str, Any]:
    """A copy of a config dict with the keys of older versions moved to their place (:data:`MOVED`)
    and removed settings dropped (:data:`REMOVED`). Used for configs saved in checkpoints."""
    out = merge({}, values or {})
    for old, new in MOVED.items():
        found, value = _pop(out, old)
        if found:
            set_dotted(out, new, value, create=True)
    for old in REMOVED:
        _pop(out, old)
    return out


def set_dotted(tree: dict[str, Any], dotted: str, value: Any, create: bool = True) -> None:
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"cannot set {dotted!r}: {p!r} is not a section")
    node[parts[-1]] = value


def merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        elif isinstance(v, dict):
            out[k] = merge({}, v)
        else:
            out[k] = v
    return out

