"""Warm starts (``train.init_from``): a fresh run takes its initial model parameters from a
model-only checkpoint (``ttt-jax convert hf``) or from another run's checkpoint.

Only the model is read -- never the optimizer state, the step or the data position, so the run's
own schedule starts at step 0. The run's config decides how the parameters compute (RoPE scaling,
TTT chunk size and learning rate, dtypes): keys in which it differs from the checkpoint's config
are reported, not refused, so that e.g. stage 2 of a continual-training recipe can switch on YaRN.
Parameters must match by name and shape, with two exceptions that make the In-Place TTT recipe
and its baseline start from the same converted checkpoint:

* In-Place TTT parameters (``ttt_conv``, ``ttt_proj``) the checkpoint lacks keep their
  initialisation (zero conv: the model starts out computing what the checkpoint computes);
* In-Place TTT parameters the checkpoint has but the run does not (TTT switched off) are ignored.

Every other missing, extra or misshapen parameter is a ``ValueError`` naming it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import jax
import orbax.checkpoint as ocp
from flax import nnx

from ttt_jax.config import Config
from ttt_jax.checkpoint.model_io import read_checkpoint_config, resolve_checkpoint
from ttt_jax.checkpoint.storage import manager_options
from ttt_jax.checkpoint.tree import flatten as _flatten, meta_tree as _meta_tree, str_keys as _str_keys
from ttt_jax.config import checkpoint_view

TTT_PARAM_NAMES = ("ttt_conv", "ttt_proj")


def _is_ttt(key: str) -> bool:
    return key.rsplit(".", 1)[-1] in TTT_PARAM_NAMES


def model_differences(saved: Config, current: Config) -> list[str]:
    """``model.<key>: checkpoint X -> run Y`` for every architecture field that differs (runtime
    settings and the resumable model fields excluded)."""
    s, c = checkpoint_view(saved.to_dict()), checkpoint_view(current.to_dict())
    return [f"{k}: checkpoint {s[k]!r} -> run {c[k]!r}" for k in s
            if k.startswith("model.") and s[k] != c[k]]


def _unflatten_str(flat: dict[str, Any]) -> dict:
    root: dict = {}
    for dotted, v in flat.items():
        node = root
        parts = dotted.split(".")
        for k in parts[:-1]:
            node = node.setdefault(k, {})
        node[parts[-1]] = v
    return root


def restore_model_params(path: str | Path, model_state: nnx.State, cfg: Config,
                         log: Callable[[str], None] = print) -> nnx.State:
    """Overwrite the parameters of ``model_state`` (live, possibly sharded arrays of a freshly
    initialised model) with those of the checkpoint at ``path`` (as in
    :func:`~ttt_jax.checkpoint.resolve_checkpoint`), each read directly into the sharding of
    the array it replaces. Returns ``model_state``. See the module docstring for what may differ.
    """
    ckdir, step = resolve_checkpoint(path)
    where = ckdir / str(step)
    saved_cfg = read_checkpoint_config(ckdir, step)
    if saved_cfg.runtime.scan_layers != cfg.runtime.scan_layers:
        raise ValueError(f"train.init_from={path}: the checkpoint stores its layers "
                         f"{'stacked' if saved_cfg.runtime.scan_layers else 'unrolled'} "
                         f"(runtime.scan_layers={saved_cfg.runtime.scan_layers}) but this run has "
                         f"runtime.scan_layers={cfg.runtime.scan_layers}; use the same setting")
    target = _flatten(_str_keys(nnx.to_pure_dict(model_state)))
    mngr = ocp.CheckpointManager(ckdir, item_handlers={"state": ocp.PyTreeCheckpointHandler()},
                                 options=manager_options(ckdir))
    saved = {k: tuple(v.shape) for k, v in
             _flatten(_meta_tree(mngr.item_metadata(step)["state"]).get("model", {})).items()}
    missing = sorted(k for k in target.keys() - saved.keys() if not _is_ttt(k))
    extra = sorted(k for k in saved.keys() - target.keys() if not _is_ttt(k))
    shapes = [f"{k}: checkpoint {saved[k]} != model {tuple(target[k].shape)}"
              for k in sorted(target.keys() & saved.keys()) if saved[k] != tuple(target[k].shape)]
    problems = [f"{k}: missing from the checkpoint" for k in missing] + \
               [f"{k}: in the checkpoint but not in the model" for k in extra] + shapes
    if problems:
        shown = problems[:12] + ([f"... and {len(problems) - 12} more"] if len(problems) > 12 else [])
        raise ValueError(f"train.init_from={path}: checkpoint {where} does not fit the model of this "
                         "run: " + "; ".join(shown))
    fresh = sorted(target.keys() - saved.keys())
    ignored = sorted(saved.keys() - target.keys())
    keys = sorted(target.keys() & saved.keys())
    abstract = {k: jax.ShapeDtypeStruct(target[k].shape, target[k].dtype, sharding=target[k].sharding)
                for k in keys}
    restore_args = {k: ocp.ArrayRestoreArgs(sharding=target[k].sharding) for k in keys}
    out = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
        {"model": _unflatten_str(abstract)}, restore_args={"model": _unflatten_str(restore_args)},
        partial_restore=True)))
    restored = _flatten(out["state"]["model"])
    nnx.replace_by_pure_dict(model_state, _unflatten_str({k: restored[k] for k in keys}))
    log(f"initialised {len(keys)} parameters from {where}"
        + (f"; {len(fresh)} In-Place TTT parameters start at their init" if fresh else "")
        + (f"; {len(ignored)} In-Place TTT parameters of the checkpoint are not used (TTT off)"
           if ignored else ""))
    diffs = model_differences(saved_cfg, cfg)
    if diffs:
        log("model settings that differ from the checkpoint's (this run's apply): " + "; ".join(diffs))
    return model_state
