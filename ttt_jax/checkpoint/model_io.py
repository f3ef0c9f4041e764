"""Model-only checkpoints: load, save and verify the parameters of a model (inference, evaluation,
conversion, warm starts).

A model-only checkpoint has the layout of a run checkpoint (``<dir>/checkpoints/<step>/`` with the
items ``state``, ``data``, ``meta``) without optimizer or data state, so :func:`load_model` reads
both kinds. Reading never changes the directory (unlike :class:`~ttt_jax.checkpoint.Checkpointer`,
which removes unfinished saves of the run that owns it). Each of them keeps Orbax's log noise off
the console (:func:`ttt_jax.checkpoint.quiet.contain`): reading some items of a checkpoint makes
Orbax log "Item ... was found in the checkpoint, but could not be restored" for the others.

* :func:`resolve_checkpoint` -- a run directory, checkpoints directory or step directory ->
  ``(checkpoints_dir, step)``;
* :func:`read_checkpoint_config` -- the :class:`~ttt_jax.config.Config` a checkpoint was written with;
* :func:`load_model` -- ``(config, CausalLM)``, read directly into a mesh's shardings if given;
* :func:`save_model` -- write a model-only checkpoint;
* :func:`verify_checkpoint` -- read a step's arrays back and compare them with their checksums.
"""

from __future__ import annotations

import dataclasses

import warnings
from pathlib import Path
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp
from flax import nnx

from ttt_jax import fs
from ttt_jax.checkpoint.compat import config_differences
from ttt_jax.checkpoint.layout import relayout_model
from ttt_jax.checkpoint.errors import CheckpointCorruptError, CheckpointWarning
from ttt_jax.checkpoint.integrity import brief, is_damage, state_checksums, verify_checksums
from ttt_jax.checkpoint.quiet import contain as contain_library_noise
from ttt_jax.checkpoint.storage import complete_steps, is_complete, manager_options
from ttt_jax.checkpoint.tree import abstract_of, from_saved, meta_tree, shape_problems, str_keys, to_saveable
from ttt_jax.config import Config


def resolve_checkpoint(path: str | Path, step: Optional[int] = None) -> tuple[Path, int]:
    """``(checkpoints_dir, step)`` for ``path``: a run directory (holding ``checkpoints/``), a
    checkpoints directory, or one step's directory (``.../checkpoints/<step>``), local or a URL
    (:func:`ttt_jax.fs.as_path`). Without ``step`` (and unless ``path`` names a step), the newest
    complete step is used. ``ValueError`` names the path when there is no checkpoint."""
    p = fs.as_path(path, "checkpoint path")
    if not p.exists():
        raise ValueError(f"checkpoint path {p} does not exist")
    if p.name.isdigit() and is_complete(p):
        if step is not None and step != int(p.name):
            raise ValueError(f"{p} is step {p.name} but step {step} was asked for")
        return p.parent, int(p.name)
    ckdir = p / "checkpoints" if (p / "checkpoints").is_dir() else p
    steps = complete_steps(ckdir)
    if not steps:
        raise ValueError(f"no checkpoint under {p} (expected a run directory with checkpoints/<step>/, "
                         "a checkpoints directory, or a step directory)")
    if step is None:
        # The newest step whose meta record reads: an older one rather than a step whose records
        # were lost (full array checks happen when it is loaded).
        for s in reversed(steps):
            try:
                _read_json_item(ckdir / str(s), "meta")
            except ValueError as e:
                warnings.warn(f"{e}; skipped", CheckpointWarning, stacklevel=2)
                continue
            return ckdir, s
        raise ValueError(f"no intact checkpoint under {p}: the meta records of steps {steps} cannot be read")
    if step not in steps:
        raise ValueError(f"step {step} not among the checkpoints in {ckdir}: {steps}")
    return ckdir, step


def _read_json_item(step_dir: Path, item: str) -> dict[str, Any]:
    import json

    for candidate in (step_dir / item / "metadata", *sorted((step_dir / item).glob("*"))):
        if candidate.is_file():
            try:
                return json.loads(candidate.read_text())
            except ValueError:
                continue
    raise ValueError(f"checkpoint {step_dir} has no readable '{item}' record")


def read_checkpoint_config(path: str | Path, step: Optional[int] = None) -> Config:
    """The :class:`Config` a checkpoint was written with (from its ``meta`` record)."""
    from ttt_jax.config import config_from_saved

    contain_library_noise()
    ckdir, step = resolve_checkpoint(path, step)
    mngr = ocp.CheckpointManager(ckdir, item_handlers={"meta": ocp.JsonCheckpointHandler()},
                                 options=manager_options(ckdir))
    meta = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    return config_from_saved(meta.get("config", {}))


def load_model(path: str | Path, *, step: Optional[int] = None, mesh: Optional[jax.sharding.Mesh] = None,
               overrides: tuple[str, ...] | list[str] = ()) -> tuple[Config, Any]:
    """Load the model of a training or model-only checkpoint: ``(config, CausalLM)``.

    ``path`` as in :func:`resolve_checkpoint`. ``overrides`` (``"runtime.attention_impl=xla"``, ...)
    may change how the model runs (any ``runtime.*`` key, the compute dtype), never the
    architecture (``ValueError`` naming the keys). With ``mesh``, every parameter is read directly into its
    sharding under the logical rules (a large model is never whole on one device); without, onto
    the default device. Optimizer state in the checkpoint is not read.

    Without ``step`` (and unless ``path`` names a step), a newest step that cannot be read back
    intact (missing or truncated array files, checksums that do not match) is skipped with a
    :class:`CheckpointWarning` naming it and the reason, and the next older one is loaded;
    :class:`CheckpointCorruptError` when none is intact. With ``step``, that step or the error.
    """
    p = fs.as_path(path, "checkpoint path")
    if step is not None or (p.name.isdigit() and is_complete(p)):
        return _load_model(p, step, mesh, overrides)
    ckdir, newest = resolve_checkpoint(p)
    candidates = [s for s in complete_steps(ckdir) if s <= newest]
    for k in range(len(candidates) - 1, -1, -1):
        try:
            return _load_model(ckdir, candidates[k], mesh, overrides)
        except CheckpointCorruptError as e:
            if k == 0:
                raise CheckpointCorruptError(e.path, f"{e.reason}; no older step is left to fall back to") from e
            warnings.warn(f"{e}; skipped, loading step {candidates[k - 1]} instead (pass a step to choose "
                          "another)", CheckpointWarning, stacklevel=2)
    raise AssertionError("unreachable")  # pragma: no cover - resolve_checkpoint found a step


def _load_model(path: str | Path, step: Optional[int], mesh: Optional[jax.sharding.Mesh],
                overrides: tuple[str, ...] | list[str]) -> tuple[Config, Any]:
    from ttt_jax.config import apply_overrides
    from ttt_jax.models.lm import CausalLM
    from ttt_jax import sharding

    contain_library_noise()
    ckdir, step = resolve_checkpoint(path, step)
    saved_cfg = read_checkpoint_config(ckdir, step)
    cfg = apply_overrides(saved_cfg, list(overrides)) if overrides else saved_cfg
    diffs = config_differences(saved_cfg.to_dict(), cfg.to_dict())
    if diffs:
        raise ValueError("overrides may not change the model's parameters: " + "; ".join(diffs))
    # Read in the layer layout it was saved in; converted below if runtime.scan_layers changed.
    load_rt = dataclasses.replace(cfg.runtime, scan_layers=saved_cfg.runtime.scan_layers)
    abs_model = nnx.eval_shape(lambda: CausalLM(cfg.model, runtime=load_rt, rngs=nnx.Rngs(0)))
    graphdef, abs_state = nnx.split(abs_model)
    target = str_keys(nnx.to_pure_dict(abs_state))
    if mesh is not None:
        shardings = str_keys(nnx.to_pure_dict(sharding.state_shardings(abs_state, mesh)))
    else:
        dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        shardings = jax.tree.map(lambda _: dev, target)
    mngr = ocp.CheckpointManager(ckdir, item_handlers={"state": ocp.PyTreeCheckpointHandler()},
                                 options=manager_options(ckdir))
    where = ckdir / str(step)
    try:
        saved_meta = meta_tree(mngr.item_metadata(step)["state"])
    except Exception as e:  # noqa: BLE001 - sorted by is_damage
        if not is_damage(e):
            raise
        raise CheckpointCorruptError(where, f"its array metadata cannot be read ({brief(e)})") from e
    problems = shape_problems(saved_meta.get("model", {}), target)
    if problems:
        shown = problems[:20] + ([f"... and {len(problems) - 20} more"] if len(problems) > 20 else [])
        raise ValueError(f"checkpoint {ckdir / str(step)} does not match the model's parameters: "
                         + "; ".join(shown))
    abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(abstract_of(x).shape, abstract_of(x).dtype, sharding=s),
                            target, shardings)
    restore_args = jax.tree.map(lambda s: ocp.ArrayRestoreArgs(sharding=s.sharding), abstract)
    where = ckdir / str(step)
    try:
        out = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
            {"model": abstract}, restore_args={"model": restore_args}, partial_restore=True)))
    except Exception as e:  # noqa: BLE001 - missing/truncated array files
        if not is_damage(e):
            raise
        raise CheckpointCorruptError(where, f"reading it failed ({brief(e)})") from e
    verify_checksums(where, {"model": out["state"]["model"]}, _read_json_item(where, "meta").get("checksums"))
    restored = from_saved(out["state"]["model"], target)
    nnx.replace_by_pure_dict(abs_state, restored)
    model = nnx.merge(graphdef, abs_state)
    if load_rt != cfg.runtime:
        model = relayout_model(model, cfg.runtime)
    return cfg, model


def save_model(directory: str | Path, model: Any, cfg: Config, *, step: int = 0) -> Path:
    """Write a model-only checkpoint (no optimizer or data state) that :func:`load_model` reads and
    that ``train.init_from`` style warm starts can use: ``<directory>/checkpoints/<step>/`` plus
    ``<directory>/config.yaml``. Returns the step directory. Blocks until written."""
    import yaml

    contain_library_noise()
    directory = fs.as_path(directory, "checkpoint directory")
    directory.mkdir(parents=True, exist_ok=True)
    mngr = ocp.CheckpointManager(
        directory / "checkpoints",
        item_handlers={"state": ocp.StandardCheckpointHandler(), "data": ocp.JsonCheckpointHandler(),
                       "meta": ocp.JsonCheckpointHandler()},
        options=manager_options(directory, create=True, enable_async_checkpointing=False))
    state = {"model": to_saveable(nnx.to_pure_dict(nnx.state(model)))}
    mngr.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave({}),
        meta=ocp.args.JsonSave({"step": int(step), "config": cfg.to_dict(),
                                "checksums": state_checksums(state)})), force=True)
    mngr.wait_until_finished()
    mngr.close()
    fs.write_text(directory / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    return directory / "checkpoints" / str(step)


def verify_checkpoint(path: str | Path, step: Optional[int] = None) -> Path:
    """Read every array of a checkpoint (model and, for a run checkpoint, optimizer state) back and
    compare it with the checksums recorded when it was written. Returns the step directory;
    :class:`CheckpointCorruptError` names the reason when a record or an array file is missing,
    truncated or unreadable, or an array does not match its checksum. ``path`` and ``step`` as in
    :func:`resolve_checkpoint`. The arrays are read onto the default device, one checkpoint at a
    time (a check for a model that fits one device; :func:`load_model` with a mesh verifies a
    sharded model as it loads it)."""
    contain_library_noise()
    ckdir, step = resolve_checkpoint(path, step)
    where = ckdir / str(step)
    meta = _read_json_item(where, "meta")
    mngr = ocp.CheckpointManager(ckdir, item_handlers={"state": ocp.PyTreeCheckpointHandler()},
                                 options=manager_options(ckdir))
    try:
        saved_meta = mngr.item_metadata(step)["state"]
        if saved_meta is None:
            raise FileNotFoundError(f"{where / 'state'} not found")
        target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype), meta_tree(saved_meta))
        dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        restore_args = jax.tree.map(lambda _: ocp.ArrayRestoreArgs(sharding=dev), target)
        out = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
            target, restore_args=restore_args)))
    except Exception as e:  # noqa: BLE001 - sorted by is_damage
        if not is_damage(e):
            raise
        raise CheckpointCorruptError(where, f"reading it failed ({brief(e)})") from e
    finally:
        mngr.close()
    verify_checksums(where, out["state"], meta.get("checksums"))
    return where
