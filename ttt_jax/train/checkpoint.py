"""Orbax checkpoints of a training run: model + optimizer state, data-iterator state, config.

Layout (``<run_dir>/checkpoints/<step>/``), one Orbax ``Composite`` per step:

* ``state`` -- ``{"model": <model nnx.State>, "optimizer": <optimizer nnx.State>}`` as pure nested
  dicts of arrays (``StandardSave``; sharded arrays are written by each host's shards). The model
  state holds every NNX variable of the model, so any RNG stream it owns is saved with it; the
  optimizer state holds the Adam moments and the step counter that drives the schedule.
* ``data`` -- the data iterator's ``get_state()`` (JSON), so a resumed run reads the same batches.
* ``meta`` -- ``{"step": int, "config": Config.to_dict()}`` (JSON).

Orbax writes each step into a temporary directory and renames it when complete, so a crash while
saving never leaves a half-written step that ``latest_step`` would pick; only the newest
``keep`` steps are kept.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp
from flax import nnx

from ttt_jax.config import Config

# Sections of the config a checkpoint must agree with before it is restored: the model
# (parameter shapes and semantics) and the data fields that define the saved iterator position.
_DATA_KEYS_TIED_TO_ITERATOR = ("source", "paths", "field", "column", "tokenizer", "seq_len",
                               "batch_size", "chunk_align", "validation_fraction", "max_documents",
                               "shuffle", "seed")


# Model fields that choose how the same parameters are computed, not what they are: a run may
# resume with other values (e.g. moving from CPU to GPU, turning on remat to save memory).
_MODEL_RUNTIME_KEYS = ("attention_impl", "ttt.impl", "remat", "compute_dtype", "max_seq_len",
                       "context_layout")


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dict -> ``{"a.b.c": leaf}``."""
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for k, v in tree.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: tree}


def config_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Dotted keys (``model.d_model: checkpoint 128 != config 192``) where two config dicts
    disagree on the model section or on the data fields tied to the iterator state.

    A key absent from the saved config (written before that field existed) counts as its default.
    Implementation-only model fields (:data:`_MODEL_RUNTIME_KEYS`) may differ.
    """
    defaults = Config().to_dict()
    diffs = []
    for section in ("model", "data"):
        s, c, d = (_flatten(x.get(section, {})) for x in (saved, current, defaults))
        keep = (lambda k: k not in _MODEL_RUNTIME_KEYS) if section == "model" else \
            (lambda k: k in _DATA_KEYS_TIED_TO_ITERATOR)
        s, c = ({k: v for k, v in x.items() if keep(k)} for x in (s, c))
        for key in sorted(set(s) | set(c)):
            old, new = s.get(key, d.get(key, "<missing>")), c.get(key, d.get(key, "<missing>"))
            if old != new:
                diffs.append(f"{section}.{key}: checkpoint {old!r} != config {new!r}")
    return diffs


def _is_key_array(x: Any) -> bool:
    return hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _to_saveable(tree: Any) -> Any:
    # Typed PRNG key arrays are stored as their raw uint32 key data.
    return jax.tree.map(lambda x: jax.random.key_data(x) if _is_key_array(x) else x, tree)


def _abstract(x: Any) -> Any:
    if _is_key_array(x):
        x = jax.random.key_data(x)
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None))


def _from_saved(restored: Any, target: Any) -> Any:
    return jax.tree.map(
        lambda r, t: jax.random.wrap_key_data(r, impl=jax.random.key_impl(t)) if _is_key_array(t) else r,
        restored, target)


def _shape_problems(saved_meta: Any, target: dict[str, Any]) -> list[str]:
    """Paths missing from, extra in, or of another shape in the checkpoint than in ``target``."""
    saved = {k: tuple(v.shape) for k, v in _flatten(_meta_tree(saved_meta)).items()}
    want = {k: tuple(_abstract(v).shape) for k, v in _flatten(target).items()}
    problems = [f"{k}: missing from checkpoint (expected shape {want[k]})" for k in sorted(want.keys() - saved.keys())]
    problems += [f"{k}: in checkpoint but not in the model (shape {saved[k]})"
                 for k in sorted(saved.keys() - want.keys())]
    problems += [f"{k}: checkpoint shape {saved[k]} != model shape {want[k]}"
                 for k in sorted(want.keys() & saved.keys()) if saved[k] != want[k]]
    return problems


def _meta_tree(meta: Any) -> Any:
    tree = getattr(meta, "tree", meta)
    # Orbax stores dict keys as strings; map nested containers back to plain dicts.
    if isinstance(tree, dict):
        return {str(k): _meta_tree(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return {str(i): _meta_tree(v) for i, v in enumerate(tree)}
    return tree


def _str_keys(tree: Any) -> Any:
    if isinstance(tree, dict):
        return {str(k): _str_keys(v) for k, v in tree.items()}
    return tree


class Checkpointer:
    """Save/restore training state under ``directory`` (created on first save), keeping ``keep``."""

    def __init__(self, directory: str | Path, keep: int, async_save: bool = True):
        self.directory = Path(directory).absolute()
        # Handlers named up front, so that metadata and single items of an existing checkpoint can
        # be read before (or without) a full restore.
        self._mngr = ocp.CheckpointManager(
            self.directory,
            item_handlers={"state": ocp.StandardCheckpointHandler(), "data": ocp.JsonCheckpointHandler(),
                           "meta": ocp.JsonCheckpointHandler()},
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                                 enable_async_checkpointing=async_save))

    def latest_step(self) -> Optional[int]:
        return self._mngr.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._mngr.all_steps())

    def save(self, step: int, model_state: nnx.State, opt_state: nnx.State,
             data_state: dict[str, Any], config: dict[str, Any]) -> None:
        """Save step ``step`` (number of optimizer updates done). Returns once the arrays have been
        copied off the device, so the caller may donate/overwrite them; writing may continue in the
        background until :meth:`wait`."""
        state = {"model": _to_saveable(nnx.to_pure_dict(model_state)),
                 "optimizer": _to_saveable(nnx.to_pure_dict(opt_state))}
        self._mngr.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave(data_state if data_state is not None else {}),
            meta=ocp.args.JsonSave({"step": int(step), "config": config})))

    def read_meta(self, step: int) -> dict[str, Any]:
        """The ``meta`` record of ``step`` (step and config)."""
        return self._mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def check_config(self, step: int, config: dict[str, Any]) -> None:
        """Raise ``ValueError`` naming the differing keys when ``step`` was saved under another
        model config or data layout (cheap: reads only the JSON ``meta`` item)."""
        diffs = config_differences(self.read_meta(step).get("config", {}), config)
        if diffs:
            raise ValueError(
                f"checkpoint {self.directory / str(step)} was written with a different config; "
                "differing keys: " + "; ".join(diffs)
                + ". Use the checkpoint's config, or a new train.run_dir to start fresh")

    def restore(self, step: int, model_state: nnx.State, opt_state: nnx.State,
                config: dict[str, Any]) -> tuple[nnx.State, nnx.State, dict[str, Any]]:
        """Restore ``step`` into the structure, shapes and shardings of ``model_state`` and
        ``opt_state`` (live states of a freshly built model/optimizer). The shardings may differ
        from those the checkpoint was saved with (another mesh shape): Orbax reads each device's
        part of every array in the target sharding.

        Returns ``(model_state, opt_state, data_state)``. Raises ``ValueError`` naming the keys when
        the checkpoint was written under another model config (or data layout), or when its arrays
        do not match the model's names/shapes.
        """
        where = self.directory / str(step)
        self.check_config(step, config)
        target = {"model": nnx.to_pure_dict(model_state), "optimizer": nnx.to_pure_dict(opt_state)}
        problems = _shape_problems(self._mngr.item_metadata(step)["state"], _str_keys(target))
        if problems:
            shown = problems[:20] + ([f"... and {len(problems) - 20} more"] if len(problems) > 20 else [])
            raise ValueError(f"checkpoint {where} does not match the model's parameters: "
                             + "; ".join(shown))
        abstract = jax.tree.map(_abstract, target)
        out = self._mngr.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore()))
        restored = _from_saved(out["state"], target)
        nnx.replace_by_pure_dict(model_state, restored["model"])
        nnx.replace_by_pure_dict(opt_state, restored["optimizer"])
        return model_state, opt_state, out["data"]

    def wait(self) -> None:
        """Block until every pending save is durable on disk."""
        self._mngr.wait_until_finished()

    def close(self) -> None:
        self._mngr.wait_until_finished()
        self._mngr.close()


# --- Model-only loading and saving (inference, evaluation, conversion, warm starts) ---------------


def resolve_checkpoint(path: str | Path, step: Optional[int] = None) -> tuple[Path, int]:
    """``(checkpoints_dir, step)`` for ``path``: a run directory (holding ``checkpoints/``), a
    checkpoints directory, or one step's directory (``.../checkpoints/<step>``). Without ``step``
    (and unless ``path`` names a step), the newest complete step is used. ``ValueError`` names the
    path when there is no checkpoint."""
    p = Path(path).expanduser().absolute()
    if not p.exists():
        raise ValueError(f"checkpoint path {p} does not exist")
    if p.name.isdigit() and (p / "state").exists():
        if step is not None and step != int(p.name):
            raise ValueError(f"{p} is step {p.name} but step {step} was asked for")
        return p.parent, int(p.name)
    ckdir = p / "checkpoints" if (p / "checkpoints").is_dir() else p
    steps = sorted(int(c.name) for c in ckdir.iterdir() if c.name.isdigit() and (c / "state").exists()) \
        if ckdir.is_dir() else []
    if not steps:
        raise ValueError(f"no checkpoint under {p} (expected a run directory with checkpoints/<step>/, "
                         "a checkpoints directory, or a step directory)")
    if step is None:
        return ckdir, steps[-1]
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
    from ttt_jax.config import config_from_dict

    ckdir, step = resolve_checkpoint(path, step)
    mngr = ocp.CheckpointManager(ckdir, item_handlers={"meta": ocp.JsonCheckpointHandler()})
    meta = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    return config_from_dict(meta.get("config", {}))


def load_model(path: str | Path, *, step: Optional[int] = None, mesh: Optional[jax.sharding.Mesh] = None,
               overrides: tuple[str, ...] | list[str] = ()) -> tuple[Config, Any]:
    """Load the model of a training or model-only checkpoint: ``(config, CausalLM)``.

    ``path`` as in :func:`resolve_checkpoint`. ``overrides`` (``"model.attention_impl=xla"``, ...)
    may change how the model computes (implementation, dtype, remat), never its parameters' shapes
    (``ValueError`` naming the keys). With ``mesh``, every parameter is read directly into its
    sharding under the logical rules (a large model is never whole on one device); without, onto
    the default device. Optimizer state in the checkpoint is not read.
    """
    from ttt_jax.config import apply_overrides
    from ttt_jax.models.lm import CausalLM
    from ttt_jax.train import mesh as mesh_lib

    ckdir, step = resolve_checkpoint(path, step)
    saved_cfg = read_checkpoint_config(ckdir, step)
    cfg = apply_overrides(saved_cfg, list(overrides)) if overrides else saved_cfg
    diffs = config_differences(saved_cfg.to_dict(), cfg.to_dict())
    if diffs:
        raise ValueError("overrides may not change the model's parameters: " + "; ".join(diffs))
    abs_model = nnx.eval_shape(lambda: CausalLM(cfg.model, rngs=nnx.Rngs(0)))
    graphdef, abs_state = nnx.split(abs_model)
    target = _str_keys(nnx.to_pure_dict(abs_state))
    if mesh is not None:
        shardings = _str_keys(nnx.to_pure_dict(mesh_lib.state_shardings(abs_state, mesh)))
    else:
        dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        shardings = jax.tree.map(lambda _: dev, target)
    mngr = ocp.CheckpointManager(ckdir, item_handlers={"state": ocp.PyTreeCheckpointHandler()})
    saved_meta = _meta_tree(mngr.item_metadata(step)["state"])
    problems = _shape_problems(saved_meta.get("model", {}), target)
    if problems:
        shown = problems[:20] + ([f"... and {len(problems) - 20} more"] if len(problems) > 20 else [])
        raise ValueError(f"checkpoint {ckdir / str(step)} does not match the model's parameters: "
                         + "; ".join(shown))
    abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(_abstract(x).shape, _abstract(x).dtype, sharding=s),
                            target, shardings)
    restore_args = jax.tree.map(lambda s: ocp.ArrayRestoreArgs(sharding=s.sharding), abstract)
    out = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
        {"model": abstract}, restore_args={"model": restore_args}, partial_restore=True)))
    restored = _from_saved(out["state"]["model"], target)
    nnx.replace_by_pure_dict(abs_state, restored)
    return cfg, nnx.merge(graphdef, abs_state)


def save_model(directory: str | Path, model: Any, cfg: Config, *, step: int = 0) -> Path:
    """Write a model-only checkpoint (no optimizer or data state) that :func:`load_model` reads and
    that ``train.init_from`` style warm starts can use: ``<directory>/checkpoints/<step>/`` plus
    ``<directory>/config.yaml``. Returns the step directory. Blocks until written."""
    import yaml

    directory = Path(directory).expanduser().absolute()
    directory.mkdir(parents=True, exist_ok=True)
    mngr = ocp.CheckpointManager(
        directory / "checkpoints",
        item_handlers={"state": ocp.StandardCheckpointHandler(), "data": ocp.JsonCheckpointHandler(),
                       "meta": ocp.JsonCheckpointHandler()},
        options=ocp.CheckpointManagerOptions(create=True, enable_async_checkpointing=False))
    state = {"model": _to_saveable(nnx.to_pure_dict(nnx.state(model)))}
    mngr.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave({}),
        meta=ocp.args.JsonSave({"step": int(step), "config": cfg.to_dict()})), force=True)
    mngr.wait_until_finished()
    mngr.close()
    (directory / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    return directory / "checkpoints" / str(step)
