"""Orbax checkpoints of a training run: model + optimizer state, data-iterator state, config.

Layout (``<run_dir>/checkpoints/<step>/``), one Orbax ``Composite`` per step:

* ``state`` -- ``{"model": <model nnx.State>, "optimizer": <optimizer nnx.State>}`` as pure nested
  dicts of arrays (``StandardSave``; sharded arrays are written by each host's shards). The model
  state holds every NNX variable of the model, so any RNG stream it owns is saved with it; the
  optimizer state holds the Adam moments and the step counter that drives the schedule.
* ``data`` -- the data iterator's ``get_state()`` (JSON), so a resumed run reads the same batches.
* ``meta`` -- ``{"step": int, "config": Config.to_dict(), "checksums": {path: hex}, ...}`` (JSON).

Integrity:

* **Atomic, asynchronous saves.** :meth:`Checkpointer.save` returns once the arrays are copied off
  the device; Orbax writes them in the background into ``<step>.orbax-checkpoint-tmp-<time>`` and
  renames that directory to ``<step>`` only when every item is complete. A process killed while
  saving leaves only such a temporary directory: Orbax never lists it as a step, and the next
  :class:`Checkpointer` on the directory removes it with a warning naming it.
* **Corruption is detected.** Every array's checksum (two sums mod 2**32 of its raw bits, one
  position-weighted; exact integer arithmetic, so they do not depend on sharding or reduction
  order) is recorded in ``meta`` when it is saved and recomputed on the device after a restore.
  A step whose records cannot be read (deleted or garbled JSON, missing or truncated array files)
  or whose arrays do not match their checksums raises :class:`CheckpointCorruptError`;
  :meth:`Checkpointer.restore_latest` then moves it aside to ``<step>.corrupt`` with a warning
  naming it and falls back to the next older step. (Bit flips inside array files are otherwise
  invisible: TensorStore reads them back as wrong values without an error.)
* **A full disk is an error, not a hang.** Before each save the free space of the checkpoint
  directory is compared with the size of the state (:meth:`Checkpointer.check_free_space`), and a
  writer failing with ``ENOSPC``/``EDQUOT`` (at the save, or later from the background write) is
  turned into :class:`CheckpointWriteError` naming the directory and its free space. The older
  checkpoints are untouched (Orbax deletes the oldest of ``keep`` only after a save completed).
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from ttt_jax.config import Config, checkpoint_differences, config_from_saved

# Orbax's marker in the name of a step directory that is still being (or was never fully) written.
TMP_MARKER = ".orbax-checkpoint-tmp"
# Suffix given to a step directory found corrupt; Orbax does not parse it as a step.
CORRUPT_SUFFIX = ".corrupt"


class CheckpointWarning(UserWarning):
    """A checkpoint was skipped: interrupted while being written, or corrupt on disk."""


class CheckpointCorruptError(ValueError):
    """A checkpoint on disk cannot be read back intact: an unreadable record, missing or truncated
    array files, or arrays that do not match the checksums recorded when it was written.
    ``reason`` says which."""

    def __init__(self, path: Path, reason: str):
        super().__init__(f"checkpoint {path} is corrupt: {reason}")
        self.path, self.reason = path, reason


class NonFiniteStateError(ValueError):
    """A state to be checkpointed holds NaN/inf values (``arrays`` names them); it is not written."""

    def __init__(self, step: int, arrays: list[str]):
        super().__init__(f"the state of step {step} holds non-finite values in {len(arrays)} array(s): "
                         + ", ".join(arrays[:5]) + (" ..." if len(arrays) > 5 else ""))
        self.arrays = arrays


class CheckpointWriteError(OSError, ValueError):
    """A checkpoint cannot be written for lack of disk space (or quota); the message names the
    directory and its free space. An ``OSError`` with ``errno`` ENOSPC, and a ``ValueError`` so
    that the command line reports it as one ``error:`` line (like :class:`io.UnsupportedOperation`,
    which is both)."""

    def __init__(self, message: str):
        super().__init__(errno.ENOSPC, message)
        self.message = message

    def __str__(self) -> str:
        return self.message

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
    disagree on what a checkpoint is tied to: the architecture and the data layout
    (:func:`ttt_jax.config.checkpoint_differences`). Runtime, train and mesh settings may differ."""
    return checkpoint_differences(saved, current)


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


# --- Integrity: checksums, sizes, disk space ------------------------------------------------------


def _as_u32(x: jax.Array) -> jax.Array:
    """The raw bits of ``x`` as uint32 (8-byte types gain a trailing axis of 2)."""
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    narrow = {1: jnp.uint8, 2: jnp.uint16}.get(x.dtype.itemsize)
    if narrow is not None:
        return jax.lax.bitcast_convert_type(x, narrow).astype(jnp.uint32)
    return jax.lax.bitcast_convert_type(x, jnp.uint32)


def _leaf_checksum(x: jax.Array) -> jax.Array:
    """``[3]`` uint32: the sum of the bit patterns and their sum weighted by ``2 * flat_index + 1``,
    both mod 2**32, and 1 if every element is finite (else 0). Integer sums are exact and
    order-free, so the result does not depend on how the array is sharded; any single changed
    element changes both sums, a swap changes the second."""
    u = _as_u32(x)
    # Flat row-major index built from per-axis iotas (partitions like the array; no reshape).
    idx = jnp.zeros(u.shape, jnp.uint32)
    stride = 1
    for axis in reversed(range(u.ndim)):
        idx = idx + jax.lax.broadcasted_iota(jnp.uint32, u.shape, axis) * jnp.uint32(stride % 2 ** 32)
        stride *= u.shape[axis]
    weight = idx * jnp.uint32(2) + jnp.uint32(1)
    finite = jnp.all(jnp.isfinite(x)) if jnp.issubdtype(x.dtype, jnp.inexact) else jnp.bool_(True)
    return jnp.stack([jnp.sum(u, dtype=jnp.uint32), jnp.sum(u * weight, dtype=jnp.uint32),
                      finite.astype(jnp.uint32)])


_checksums_jit = jax.jit(lambda tree: jax.tree.map(_leaf_checksum, tree))


def _host_value(x: jax.Array) -> np.ndarray:
    # The checksums are reductions, replicated on every device: any local copy is the value.
    return np.asarray(jax.device_get(x) if x.is_fully_addressable else x.addressable_data(0))


def _checksums_and_finite(tree: Any) -> tuple[dict[str, str], list[str]]:
    sums = {k: _host_value(s) for k, s in _flatten(_checksums_jit(tree)).items()}
    return ({k: f"{int(v[0]):08x}{int(v[1]):08x}" for k, v in sums.items()},
            sorted(k for k, v in sums.items() if not v[2]))


def state_checksums(tree: Any) -> dict[str, str]:
    """``{"model.embed.embedding": "1a2b3c4d5e6f7081", ...}`` for a nested dict of arrays (computed
    on the devices where the arrays live; only ``3 x 4`` bytes per array reach the host)."""
    return _checksums_and_finite(tree)[0]


def state_nbytes(tree: Any) -> int:
    """Bytes of all arrays (or shape/dtype structs) in ``tree``: the size of their checkpoint."""
    total = 0
    for x in jax.tree.leaves(tree):
        # A typed PRNG key is stored as its uint32 key data (2 words for the default impl).
        itemsize = 8 if _is_key_array(x) else np.dtype(x.dtype).itemsize
        total += int(np.prod(x.shape)) * itemsize
    return total


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


def free_bytes(directory: Path) -> int:
    """Free space (for unprivileged users) on the filesystem holding ``directory`` (or its nearest
    existing parent)."""
    p = Path(directory)
    while not p.exists() and p != p.parent:
        p = p.parent
    return int(shutil.disk_usage(p).free)


# What a damaged checkpoint looks like in the errors of Orbax, TensorStore and json. Anything else
# (a permission problem, a device or sharding error, a bug) is raised as it is: it must never get
# a good checkpoint moved aside.
_DAMAGE_TYPES = (FileNotFoundError, NotADirectoryError, IsADirectoryError, json.JSONDecodeError,
                 UnicodeDecodeError, EOFError)
_DAMAGE_TEXT = ("Encountered error while reading", "DATA_LOSS", "NOT_FOUND", "OUT_OF_RANGE",
                "Error reading", "Error opening", "not found", "does not exist", "No such file",
                "corrupt", "truncat", "Unexpected end", "decod", "Expecting value", "Unterminated",
                "Unknown key")   # an item (e.g. the arrays) missing from the step
_NOT_DAMAGE_TEXT = ("PERMISSION_DENIED", "Permission denied", "RESOURCE_EXHAUSTED", "out of memory")


def _is_damage(e: BaseException) -> bool:
    """Whether ``e`` (or an exception it came from) says the checkpoint's files are missing,
    truncated or unparseable."""
    chain, seen = [], set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        chain.append(e)
        e = e.__cause__ or e.__context__
    if any(isinstance(x, PermissionError) or any(t in str(x) for t in _NOT_DAMAGE_TEXT) for x in chain):
        return False
    return any(isinstance(x, _DAMAGE_TYPES) or any(t in str(x) for t in _DAMAGE_TEXT) for x in chain)


def _brief(e: BaseException) -> str:
    first = str(e).splitlines()[0][:200] if str(e) else ""
    return f"{type(e).__name__}: {first}"


def _sync_processes(name: str) -> None:
    """Wait until every process got here (process 0 changes the shared checkpoint directory; the
    others must not look at it before). A no-op with one process."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def _is_disk_full(e: BaseException) -> bool:
    """Whether ``e`` (or an exception it was raised from) says the disk or quota is full. Orbax
    re-raises errors of its background writer; TensorStore reports ENOSPC as text."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if any(s in str(e) for s in ("No space left on device", "Disk quota exceeded", "ENOSPC")):
            return True
        e = e.__cause__ or e.__context__
    return False


@dataclasses.dataclass
class Restored:
    """What :meth:`Checkpointer.restore_latest` restored."""

    step: int
    model_state: nnx.State
    opt_state: nnx.State
    data_state: dict[str, Any]
    meta: dict[str, Any]


class Checkpointer:
    """Save/restore training state under ``directory`` (created on first save), keeping ``keep``.

    ``warn`` receives one line per checkpoint that is skipped (default: ``warnings.warn`` with
    :class:`CheckpointWarning`). Opening a directory removes the temporary directories of saves
    that never completed (a process killed while writing), warning for each: open it from the
    run that writes there, not while another process is saving into it (to only read a
    checkpoint, use :func:`load_model` / :func:`read_checkpoint_config`).
    """

    def __init__(self, directory: str | Path, keep: int, async_save: bool = True,
                 warn: Optional[Callable[[str], None]] = None):
        self.directory = Path(directory).absolute()
        self._warn = warn if warn is not None else \
            (lambda msg: warnings.warn(msg, CheckpointWarning, stacklevel=3))
        self.set_aside: list[Path] = []   # corrupt steps moved to <step>.corrupt by this instance
        self._discard_unfinished()
        # Handlers named up front, so that metadata and single items of an existing checkpoint can
        # be read before (or without) a full restore.
        self._mngr = ocp.CheckpointManager(
            self.directory,
            item_handlers={"state": ocp.StandardCheckpointHandler(), "data": ocp.JsonCheckpointHandler(),
                           "meta": ocp.JsonCheckpointHandler()},
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                                 enable_async_checkpointing=async_save))

    def _discard_unfinished(self) -> None:
        unfinished = sorted(p for p in self.directory.iterdir() if TMP_MARKER in p.name) \
            if self.directory.is_dir() else []
        for p in unfinished:
            self._warn(f"checkpoint {p} was interrupted while being written and is incomplete; "
                       "skipped and removed")
            if jax.process_index() == 0:
                shutil.rmtree(p, ignore_errors=True)
        _sync_processes("ttt_jax_checkpoint_discard_unfinished")

    def latest_step(self) -> Optional[int]:
        return self._mngr.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._mngr.all_steps())

    # --- writing ---------------------------------------------------------------------------------

    def check_free_space(self, nbytes: int) -> None:
        """Raise :class:`CheckpointWriteError` when the checkpoint directory's filesystem has less
        free space than a checkpoint of ``nbytes`` of arrays needs (with 5% + 16 MiB to spare)."""
        need = int(nbytes * 1.05) + (16 << 20)
        free = free_bytes(self.directory)
        if free < need:
            raise CheckpointWriteError(
                f"not enough free disk space for a checkpoint in {self.directory}: {_fmt_bytes(free)} "
                f"free, a checkpoint needs about {_fmt_bytes(need)}; free some space or set "
                "train.run_dir on a larger disk" + self._intact_note())

    def _intact_note(self) -> str:
        try:
            steps = self.all_steps()
        except Exception:  # noqa: BLE001 - only a hint in an error message
            return ""
        return f" (the checkpoint of step {steps[-1]} in it is intact)" if steps else ""

    def _raise_if_disk_full(self, e: BaseException, what: str) -> None:
        if _is_disk_full(e):
            raise CheckpointWriteError(
                f"{what} in {self.directory} failed: the disk is full ({_fmt_bytes(free_bytes(self.directory))} "
                f"free): {str(e).splitlines()[0][:200]}; free some space or set train.run_dir on a "
                "larger disk" + self._intact_note()) from e

    def save(self, step: int, model_state: nnx.State, opt_state: nnx.State,
             data_state: dict[str, Any], config: dict[str, Any],
             extra_meta: Optional[dict[str, Any]] = None) -> None:
        """Save step ``step`` (number of optimizer updates done). Returns once the arrays have been
        copied off the device, so the caller may donate/overwrite them; writing may continue in the
        background until :meth:`wait`. ``extra_meta`` (JSON) is stored in the ``meta`` record.

        Raises :class:`NonFiniteStateError` (nothing written) when an array holds NaN/inf, and
        :class:`CheckpointWriteError` when the disk lacks the space (checked first) or the writer
        reports a full disk (possibly that of an earlier, background save).
        """
        state = {"model": _to_saveable(nnx.to_pure_dict(model_state)),
                 "optimizer": _to_saveable(nnx.to_pure_dict(opt_state))}
        self.check_free_space(state_nbytes(state))
        checksums, nonfinite = _checksums_and_finite(state)   # one pass on the devices
        if nonfinite:
            raise NonFiniteStateError(step, nonfinite)
        meta = {"step": int(step), "config": config, "checksums": checksums, **(extra_meta or {})}
        try:
            self._mngr.save(step, args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=ocp.args.JsonSave(data_state if data_state is not None else {}),
                meta=ocp.args.JsonSave(meta)))
        except Exception as e:
            self._raise_if_disk_full(e, f"saving the checkpoint of step {step}")
            raise

    def wait(self) -> None:
        """Block until every pending save is durable on disk (:class:`CheckpointWriteError` if the
        disk filled up while writing)."""
        try:
            self._mngr.wait_until_finished()
        except Exception as e:
            self._raise_if_disk_full(e, "writing a checkpoint")
            raise

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self._mngr.close()

    # --- reading ---------------------------------------------------------------------------------

    def read_meta(self, step: int) -> dict[str, Any]:
        """The ``meta`` record of ``step`` (step, config, checksums). :class:`CheckpointCorruptError`
        when it is missing or unreadable."""
        try:
            meta = self._mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        except Exception as e:  # noqa: BLE001 - sorted by _is_damage
            if not _is_damage(e):
                raise
            raise CheckpointCorruptError(self.directory / str(step),
                                         f"its meta record cannot be read ({_brief(e)})") from e
        if not isinstance(meta, dict) or "step" not in meta:
            raise CheckpointCorruptError(self.directory / str(step), "its meta record is malformed")
        return meta

    def check_config(self, step: int, config: dict[str, Any]) -> None:
        """Raise ``ValueError`` naming the differing keys when ``step`` was saved under another
        model config or data layout (cheap: reads only the JSON ``meta`` item)."""
        self._check_config_of(step, self.read_meta(step), config)

    def _check_config_of(self, step: int, meta: dict[str, Any], config: dict[str, Any]) -> None:
        diffs = config_differences(meta.get("config", {}), config)
        if diffs:
            raise ValueError(
                f"checkpoint {self.directory / str(step)} was written with a different config; "
                "differing keys: " + "; ".join(diffs)
                + ". Use the checkpoint's config, or a new train.run_dir to start fresh")

    def latest_readable_step(self, config: dict[str, Any]) -> Optional[int]:
        """The newest step whose ``meta`` record reads, after checking it was written under
        ``config`` (``ValueError`` naming the keys otherwise); steps with unreadable records are
        moved aside with a warning. Cheap (JSON only): a check before any compute."""
        for step in reversed(self.all_steps()):
            try:
                meta = self.read_meta(step)
            except CheckpointCorruptError as e:
                self._set_aside(step, e.reason)
                continue
            self._check_config_of(step, meta, config)
            return step
        return None

    def restore(self, step: int, model_state: nnx.State, opt_state: nnx.State,
                config: dict[str, Any]) -> tuple[nnx.State, nnx.State, dict[str, Any]]:
        """Restore ``step`` into the structure, shapes and shardings of ``model_state`` and
        ``opt_state`` (live states of a freshly built model/optimizer). The shardings may differ
        from those the checkpoint was saved with (another mesh shape): Orbax reads each device's
        part of every array in the target sharding.

        Returns ``(model_state, opt_state, data_state)``. Raises ``ValueError`` naming the keys when
        the checkpoint was written under another model config (or data layout), or when its arrays
        do not match the model's names/shapes; :class:`CheckpointCorruptError` when it cannot be
        read back intact (the live states are then left unchanged).
        """
        return self._restore(step, model_state, opt_state, config)[:3]

    def _restore(self, step, model_state, opt_state, config):
        where = self.directory / str(step)
        meta = self.read_meta(step)
        self._check_config_of(step, meta, config)
        live = {"model": nnx.to_pure_dict(model_state), "optimizer": nnx.to_pure_dict(opt_state)}
        target, relayout = _saved_layout(live, meta, config)
        try:
            saved_meta = self._mngr.item_metadata(step)["state"]
            if saved_meta is None:
                raise FileNotFoundError(f"{where / 'state'} not found")
            problems = _shape_problems(saved_meta, _str_keys(target))
        except Exception as e:  # noqa: BLE001 - sorted by _is_damage
            if not _is_damage(e):
                raise
            raise CheckpointCorruptError(where, f"its array metadata cannot be read ({_brief(e)})") from e
        if problems:
            shown = problems[:20] + ([f"... and {len(problems) - 20} more"] if len(problems) > 20 else [])
            raise ValueError(f"checkpoint {where} does not match the model's parameters: "
                             + "; ".join(shown))
        abstract = jax.tree.map(_abstract, target)
        try:
            out = self._mngr.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore()))
        except Exception as e:  # noqa: BLE001 - missing/truncated array files, unreadable JSON
            if not _is_damage(e):
                raise
            raise CheckpointCorruptError(where, f"reading it failed ({_brief(e)})") from e
        verify_checksums(where, out["state"], meta.get("checksums"))
        restored = _from_saved(out["state"], target)
        if relayout is not None:
            restored = relayout(restored)
        nnx.replace_by_pure_dict(model_state, restored["model"])
        nnx.replace_by_pure_dict(opt_state, restored["optimizer"])
        return model_state, opt_state, out["data"], meta

    def restore_latest(self, model_state: nnx.State, opt_state: nnx.State,
                       config: dict[str, Any]) -> Optional[Restored]:
        """Restore the newest intact step (see :meth:`restore`). Corrupt steps are moved aside to
        ``<step>.corrupt`` with a warning naming them (listed in :attr:`set_aside`) and the next
        older one is tried. ``None`` when no intact step is left. Config/shape mismatches raise
        ``ValueError`` at once (they are not corruption)."""
        for step in reversed(self.all_steps()):
            try:
                model_state, opt_state, data_state, meta = self._restore(step, model_state, opt_state, config)
            except CheckpointCorruptError as e:
                self._set_aside(step, e.reason)
                continue
            return Restored(step, model_state, opt_state, data_state, meta)
        return None

    def _set_aside(self, step: int, reason: str) -> None:
        src = self.directory / str(step)
        dst, i = self.directory / f"{step}{CORRUPT_SUFFIX}", 1
        while dst.exists():
            dst, i = self.directory / f"{step}{CORRUPT_SUFFIX}-{i}", i + 1
        if jax.process_index() == 0:
            os.replace(src, dst)
        _sync_processes(f"ttt_jax_checkpoint_set_aside_{step}")
        self.set_aside.append(dst)
        self._warn(f"checkpoint {src} is corrupt ({reason}); skipped and moved to {dst}")
        self._mngr.reload()


def _saved_layout(live: dict[str, Any], meta: dict[str, Any], config: dict[str, Any]):
    """``(target, relayout)``: the abstract tree to restore a step into, and None -- or, when the
    step was saved with the other ``runtime.scan_layers`` layout, that layout's abstract tree and
    the function converting the restored tree into ``live``'s layout and shardings."""
    from ttt_jax.config import config_from_dict, upgrade_dict
    from ttt_jax.train.layer_layout import convert_layers, put_like

    saved_scan = bool(upgrade_dict(meta.get("config", {})).get("runtime", {}).get("scan_layers", False))
    want_scan = bool(config.get("runtime", {}).get("scan_layers", False))
    if saved_scan == want_scan:
        return live, None
    mcfg = config_from_dict(config).model
    target = convert_layers(jax.tree.map(_abstract, live), mcfg, to_scanned=saved_scan)
    return target, lambda tree: put_like(convert_layers(tree, mcfg, to_scanned=want_scan), live)


def verify_checksums(where: Path, restored: Any, recorded: Optional[dict[str, str]]) -> None:
    """Raise :class:`CheckpointCorruptError` naming the arrays of ``restored`` (a nested dict as
    saved) whose checksums differ from ``recorded`` (checkpoints without a record pass). Arrays of
    ``restored`` absent from ``recorded`` are not checked (a partial restore reads a subset)."""
    if not recorded:
        return
    got = state_checksums(restored)
    bad = sorted(k for k, v in got.items() if k in recorded and recorded[k] != v)
    if bad:
        raise CheckpointCorruptError(where, f"{len(bad)} array(s) do not match the checksums recorded "
                                            f"when it was written: {', '.join(bad[:5])}"
                                            + (" ..." if len(bad) > 5 else ""))


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
    ckdir, step = resolve_checkpoint(path, step)
    mngr = ocp.CheckpointManager(ckdir, item_handlers={"meta": ocp.JsonCheckpointHandler()})
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
    # Read in the layer layout it was saved in; converted below if runtime.scan_layers changed.
    load_rt = dataclasses.replace(cfg.runtime, scan_layers=saved_cfg.runtime.scan_layers)
    abs_model = nnx.eval_shape(lambda: CausalLM(cfg.model, runtime=load_rt, rngs=nnx.Rngs(0)))
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
    where = ckdir / str(step)
    try:
        out = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
            {"model": abstract}, restore_args={"model": restore_args}, partial_restore=True)))
    except Exception as e:  # noqa: BLE001 - missing/truncated array files
        if not _is_damage(e):
            raise
        raise CheckpointCorruptError(where, f"reading it failed ({_brief(e)})") from e
    verify_checksums(where, {"model": out["state"]["model"]}, _read_json_item(where, "meta").get("checksums"))
    restored = _from_saved(out["state"]["model"], target)
    nnx.replace_by_pure_dict(abs_state, restored)
    model = nnx.merge(graphdef, abs_state)
    if load_rt != cfg.runtime:
        from ttt_jax.train.layer_layout import convert_layers

        graphdef, abs_state = nnx.split(nnx.eval_shape(
            lambda: CausalLM(cfg.model, runtime=cfg.runtime, rngs=nnx.Rngs(0))))
        values = convert_layers(nnx.to_pure_dict(nnx.state(model)), cfg.model,
                                to_scanned=cfg.runtime.scan_layers)
        nnx.replace_by_pure_dict(abs_state, values)
        model = nnx.merge(graphdef, abs_state)
    return cfg, model


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
        meta=ocp.args.JsonSave({"step": int(step), "config": cfg.to_dict(),
                                "checksums": state_checksums(state)})), force=True)
    mngr.wait_until_finished()
    mngr.close()
    (directory / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    return directory / "checkpoints" / str(step)
