"""Run checkpoints: Orbax checkpoints of a training run (model + optimizer state, data-iterator
state, config), written asynchronously and restored onto any mesh.

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
  :class:`Checkpointer` on the directory removes it with a warning naming it. At a URL
  (``gs://...``) a step is written in place and completed by its commit file instead
  (:mod:`ttt_jax.checkpoint.storage`); a ``<step>/`` without it is removed the same way.
* **Corruption is detected.** Every array's checksum (two sums mod 2**32 of its raw bits, one
  position-weighted; exact integer arithmetic, so they do not depend on sharding or reduction
  order) is recorded in ``meta`` when it is saved and recomputed on the device after a restore.
  A step whose records cannot be read (deleted or garbled JSON, missing or truncated array files)
  or whose arrays do not match their checksums raises :class:`CheckpointCorruptError`;
  :meth:`Checkpointer.restore_latest` then moves it aside to ``<step>.corrupt`` with a warning
  naming it and falls back to the next older step. (Bit flips inside array files are otherwise
  invisible: TensorStore reads them back as wrong values without an error.)
* **A full disk is an error, not a hang.** Before each save the free space of the checkpoint
  directory is compared with the size of the state (:meth:`Checkpointer.check_free_space`; not at
  a URL, where an object store reports no free space), and a
  writer failing with an OS error (at the save, or later from the background write) is turned
  into :class:`CheckpointWriteError` naming the step, the path and the error (for ``ENOSPC``,
  whether the inodes or the bytes ran out). The older checkpoints are untouched (Orbax deletes the
  oldest of ``keep`` only after a save completed), and Orbax's threads of the failed save are
  released (:func:`~ttt_jax.checkpoint.quiet.abandon`), so the process can exit at once.
"""

from __future__ import annotations

import dataclasses
import errno
import warnings
from pathlib import Path
from typing import Any, Callable, Optional

import jax
import orbax.checkpoint as ocp
from flax import nnx

from ttt_jax.checkpoint.compat import config_differences
from ttt_jax.checkpoint.errors import (CheckpointCorruptError, CheckpointWarning, CheckpointWriteError,
                                       NonFiniteStateError)
from ttt_jax import fs
from ttt_jax.checkpoint.integrity import (brief, checkpoint_bytes, checksums_and_finite, describe_no_space,
                                          fmt_bytes, is_damage, prepare_checksums, state_nbytes,
                                          verify_checksums, write_failure)
from ttt_jax.checkpoint.layout import saved_layout
from ttt_jax.checkpoint.quiet import abandon, contain as contain_library_noise, current_operation
from ttt_jax.checkpoint.storage import TMP_MARKER, manager_options, unfinished
from ttt_jax.fs import describe_os_error
from ttt_jax.checkpoint.tree import abstract_of, from_saved, shape_problems, str_keys, to_saveable

# Suffix given to a step directory found corrupt; Orbax does not parse it as a step.
CORRUPT_SUFFIX = ".corrupt"


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
        self.directory = fs.as_path(directory, "checkpoint directory")   # local, or a URL
        self._warn = warn if warn is not None else \
            (lambda msg: warnings.warn(msg, CheckpointWarning, stacklevel=3))
        self.set_aside: list[Path] = []   # corrupt steps moved to <step>.corrupt by this instance
        self._pending: Optional[int] = None   # the step of a save that may still be writing
        self._failed = False                  # a write failed: nothing more is written or waited for
        self._operation: Optional[str] = None  # Orbax's id of the latest save (its threads carry it)
        contain_library_noise()
        self._discard_unfinished()
        # Handlers named up front, so that metadata and single items of an existing checkpoint can
        # be read before (or without) a full restore.
        self._mngr = ocp.CheckpointManager(
            self.directory,
            item_handlers={"state": ocp.StandardCheckpointHandler(), "data": ocp.JsonCheckpointHandler(),
                           "meta": ocp.JsonCheckpointHandler()},
            options=manager_options(self.directory, max_to_keep=keep, create=True,
                                    enable_async_checkpointing=async_save))

    def _discard_unfinished(self) -> None:
        for p in unfinished(self.directory):
            self._warn(f"checkpoint {p} was interrupted while being written and is incomplete; "
                       "skipped and removed")
            if jax.process_index() == 0:
                fs.rmtree(p)
        sync_processes("ttt_jax_checkpoint_discard_unfinished")

    def latest_step(self) -> Optional[int]:
        return self._mngr.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._mngr.all_steps())

    # --- writing ---------------------------------------------------------------------------------

    def check_free_space(self, nbytes: int, n_arrays: int = 0) -> None:
        """Raise :class:`CheckpointWriteError` when the checkpoint directory's filesystem has less
        free space than a checkpoint of ``nbytes`` of arrays (``n_arrays`` of them) is estimated to
        take (:func:`~ttt_jax.checkpoint.integrity.checkpoint_bytes`)."""
        need = checkpoint_bytes(nbytes, n_arrays)
        free = fs.free_bytes(self.directory)
        if free is not None and free < need:   # None: a URL (an object store reports no free space)
            raise CheckpointWriteError(
                f"not enough free disk space for a checkpoint in {self.directory}: {fmt_bytes(free)} "
                f"free, a checkpoint needs about {fmt_bytes(need)}; free some space or set "
                "train.run_dir on a larger disk" + self._intact_note())

    def _intact_note(self) -> str:
        try:
            steps = [s for s in self.all_steps() if (self.directory / str(s)).is_dir()]
        except Exception:  # noqa: BLE001 - only a hint in an error message
            return ""
        return f" (the checkpoint of step {steps[-1]} in it is intact)" if steps else \
            " (no checkpoint in it is complete)"

    def _write_failed(self, e: BaseException, step: Optional[int]) -> None:
        """Raise :class:`CheckpointWriteError` (one line: step, path, OS error) when ``e`` is an OS
        write failure; remember it, so that :meth:`close` does not wait on Orbax again."""
        found = write_failure(e)
        if found is None:
            return
        code, detail = found
        self._failed = True
        abandon(self._operation)   # else its threads keep the process from exiting for minutes
        where = self.directory / str(step) if step is not None else self.directory
        # Measured before the failed save's files are removed (they hold the inodes or bytes).
        reason = describe_no_space(self.directory, code) if code in (errno.ENOSPC, errno.EDQUOT) else \
            describe_os_error(OSError(code, ""))
        self._discard_partial(step)
        hint = {errno.ENOSPC: "free some space (bytes and inodes: df -h, df -i) or set train.run_dir on a "
                              "larger disk",
                errno.EDQUOT: "free some of the quota or set train.run_dir elsewhere",
                errno.EIO: "check the disk, or set train.run_dir on another one"}.get(
            code, "make it writable or set train.run_dir to a writable location")
        what = f"saving the checkpoint of step {step}" if step is not None else "writing a checkpoint"
        raise CheckpointWriteError(
            f"{what} to {where} failed: {reason}: {detail}; {hint}"
            + self._intact_note(), code, step) from e

    def _discard_partial(self, step: Optional[int]) -> None:
        """Remove what a failed save left (its temporary directory); never a complete step."""
        if step is None or jax.process_index() != 0:
            return
        for p in unfinished(self.directory, step):
            fs.rmtree(p)

    def check(self) -> None:
        """Report a background save that failed since the last call (:class:`CheckpointWriteError`
        naming its step), without waiting for one still running. Cheap: call it every step."""
        if self._failed or self._pending is None or self._mngr.is_saving_in_progress():
            return
        self._wait_pending()

    def _wait_pending(self) -> None:
        step, self._pending = self._pending, None
        try:
            self._mngr.wait_until_finished()
        except Exception as e:
            self._write_failed(e, step)
            raise

    @staticmethod
    def _state(model_state: nnx.State, opt_state: nnx.State) -> dict[str, Any]:
        return {"model": to_saveable(nnx.to_pure_dict(model_state)),
                "optimizer": to_saveable(nnx.to_pure_dict(opt_state))}

    def prepare(self, model_state: nnx.State, opt_state: nnx.State) -> None:
        """Start compiling what a save of states shaped like these runs on the devices (the
        checksums), in the background: the first save, a preemption's included, then does not wait
        for a compile."""
        prepare_checksums(self._state(model_state, opt_state))

    def save(self, step: int, model_state: nnx.State, opt_state: nnx.State,
             data_state: dict[str, Any], config: dict[str, Any],
             extra_meta: Optional[dict[str, Any]] = None) -> None:
        """Save step ``step`` (number of optimizer updates done). Returns once the arrays have been
        copied off the device, so the caller may donate/overwrite them; writing may continue in the
        background until :meth:`wait` (:meth:`check` reports a failure without waiting).
        ``extra_meta`` (JSON) is stored in the ``meta`` record.

        Raises :class:`NonFiniteStateError` (nothing written) when an array holds NaN/inf, and
        :class:`CheckpointWriteError` when the disk lacks the space (checked first) or the writer
        fails with an OS error (that of an earlier, background save names the earlier step).
        """
        if self._failed:
            raise CheckpointWriteError(f"an earlier checkpoint write into {self.directory} failed; "
                                       f"not saving step {step}", errno.EIO, step)
        state = self._state(model_state, opt_state)
        self._wait_pending()   # an earlier save's failure is reported as that step's
        self.check_free_space(state_nbytes(state), len(jax.tree.leaves(state)))
        checksums, nonfinite = checksums_and_finite(state)   # one pass on the devices
        if nonfinite:
            raise NonFiniteStateError(step, nonfinite)
        meta = {"step": int(step), "config": config, "checksums": checksums, **(extra_meta or {})}
        try:
            self._pending = step
            self._mngr.save(step, args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=ocp.args.JsonSave(data_state if data_state is not None else {}),
                meta=ocp.args.JsonSave(meta)))
        except Exception as e:
            self._pending, self._operation = None, current_operation()
            self._write_failed(e, step)
            raise
        self._operation = current_operation()

    def wait(self) -> None:
        """Block until every pending save is durable on disk (:class:`CheckpointWriteError` naming
        the step if its write failed)."""
        if not self._failed:
            self._wait_pending()

    def close(self) -> None:
        """Wait for pending saves and release Orbax's resources. After a failed write, nothing is
        waited for (Orbax's threads would wait for signals of the failed save until their timeout)."""
        if self._failed:
            return
        try:
            self.wait()
        finally:
            if not self._failed:
                self._mngr.close()

    # --- reading ---------------------------------------------------------------------------------

    def read_meta(self, step: int) -> dict[str, Any]:
        """The ``meta`` record of ``step`` (step, config, checksums). :class:`CheckpointCorruptError`
        when it is missing or unreadable."""
        try:
            meta = self._mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        except Exception as e:  # noqa: BLE001 - sorted by is_damage
            if not is_damage(e):
                raise
            raise CheckpointCorruptError(self.directory / str(step),
                                         f"its meta record cannot be read ({brief(e)})") from e
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
        # Saved with the other runtime.scan_layers layout: read as saved, converted below.
        target, relayout = saved_layout(live, meta.get("config", {}), config)
        try:
            saved_meta = self._mngr.item_metadata(step)["state"]
            if saved_meta is None:
                raise FileNotFoundError(f"{where / 'state'} not found")
            problems = shape_problems(saved_meta, str_keys(target))
        except Exception as e:  # noqa: BLE001 - sorted by is_damage
            if not is_damage(e):
                raise
            raise CheckpointCorruptError(where, f"its array metadata cannot be read ({brief(e)})") from e
        if problems:
            shown = problems[:20] + ([f"... and {len(problems) - 20} more"] if len(problems) > 20 else [])
            raise ValueError(f"checkpoint {where} does not match the model's parameters: "
                             + "; ".join(shown))
        abstract = jax.tree.map(abstract_of, target)
        try:
            out = self._mngr.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore()))
        except Exception as e:  # noqa: BLE001 - missing/truncated array files, unreadable JSON
            if not is_damage(e):
                raise
            raise CheckpointCorruptError(where, f"reading it failed ({brief(e)})") from e
        verify_checksums(where, out["state"], meta.get("checksums"))
        restored = from_saved(out["state"], target)
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
            fs.move(src, dst)
        sync_processes(f"ttt_jax_checkpoint_set_aside_{step}")
        self.set_aside.append(dst)
        self._warn(f"checkpoint {src} is corrupt ({reason}); skipped and moved to {dst}")
        self._mngr.reload()



def sync_processes(name: str) -> None:
    """Wait until every process got here (process 0 changes the shared checkpoint directory; the
    others must not look at it before). A no-op with one process."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
