"""Containment of the library noise that checkpoint faults cause.

A failed read or write leaves Orbax's and TensorStore's pending coroutines to be collected, and
their loggers report each one: absl errors with tracebacks from Orbax's writer threads ("Item
meta/data could not be restored", "_SignalingThread.run() raised an exception"), asyncio's "Task
exception was never retrieved", and "Exception ignored ... RuntimeError: Event loop is closed" when
the collected coroutines find their event loop gone. The checkpoint code turns the failure itself
into one warning or one error line; this module keeps the echoes out of the console.

:func:`contain` installs a ``logging`` filter on the ``absl`` and ``asyncio`` loggers that drops
records coming from Orbax or TensorStore (and Orbax's routine "Waiting for previous save" notes),
and an unraisable-exception hook that drops the "Event loop is closed" echoes of collected
coroutines; everything else passes. The dropped records are kept (the last :data:`KEPT` of them)
in :data:`dropped` for debugging. Idempotent and process-wide: a training run enters it once.

:func:`abandon` ends what a failed save leaves running. A save that fails before its writes start
(a read-only directory) leaves Orbax's signalling threads waiting for the signals of its steps;
they are not daemon threads, so the process could not exit until their timeout (300 s) ran out.
:func:`abandon` cancels them and sets the signals they wait for, so they return at once, and keeps
the failed save's never-run coroutines from warning ("coroutine ... was never awaited") at exit.
"""

from __future__ import annotations

import collections
import gc
import inspect
import logging
import sys
import threading
import types
import warnings
from typing import Any, Optional

KEPT = 50
dropped: collections.deque = collections.deque(maxlen=KEPT)

_LIBRARIES = ("/orbax/", "orbax.checkpoint", "tensorstore", "RESOURCE_EXHAUSTED", "DATA_LOSS",
              "OUT_OF_RANGE", "ocdbt")


def _from_library(text: str) -> bool:
    return any(t in text for t in _LIBRARIES)


class _LibraryNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        try:
            text = f"{record.pathname} {record.getMessage()}"
        except Exception:  # noqa: BLE001 - a malformed record is not ours to judge
            return True
        if record.exc_info and record.exc_info[1] is not None:
            text += f" {record.exc_info[1]!r}"
        if _from_library(text) and (record.levelno >= logging.WARNING or record.name == "asyncio"):
            dropped.append(f"{record.levelname}:{record.name}:{record.getMessage()[:500]}")
            return False
        return True


_FILTER = _LibraryNoise()
_installed = False
_previous_hook = None


def _unraisable(unraisable: Any) -> None:
    exc, obj = unraisable.exc_value, getattr(unraisable, "object", None)
    if isinstance(exc, RuntimeError) and "Event loop is closed" in str(exc) or \
            _from_library(f"{obj!r} {exc!r}"):
        dropped.append(f"unraisable: {exc!r} in {obj!r}"[:500])
        return
    (_previous_hook or sys.__unraisablehook__)(unraisable)


def contain() -> None:
    """Install the filters (once per process)."""
    global _installed, _previous_hook
    if _installed:
        return
    for name in ("absl", "asyncio"):
        logging.getLogger(name).addFilter(_FILTER)
    _previous_hook = sys.unraisablehook
    sys.unraisablehook = _unraisable
    _installed = True


def current_operation() -> Optional[str]:
    """The id of Orbax's latest save operation (its signalling threads carry it); ``None`` when
    this Orbax version has no such id."""
    try:
        from orbax.checkpoint._src.futures import synchronization

        return synchronization.OperationIdGenerator.get_current_operation_id()
    except Exception:  # noqa: BLE001 - an Orbax without signalled saves has nothing to end
        return None


def _close_unstarted_coroutines() -> None:
    """Close Orbax's coroutines that were created for the failed save and will never run: each
    would warn "coroutine ... was never awaited" when collected (at exit). Closing a coroutine that
    never started runs none of its code."""
    for obj in gc.get_objects():
        # type(), not isinstance(): some objects warn when their __class__ is read.
        if type(obj) is types.CoroutineType and "/orbax/" in obj.cr_code.co_filename.replace("\\", "/") \
                and inspect.getcoroutinestate(obj) == inspect.CORO_CREATED:
            obj.close()


def abandon(operation: Optional[str]) -> int:
    """After the save of Orbax ``operation`` failed: end its signalling threads still waiting (see
    the module docstring) and silence its never-run coroutines. Returns how many threads were
    released. Call it only once nothing more will be written by this process's checkpointer."""
    # Belt and braces: the filter for coroutines collected later (a test harness may reset it).
    warnings.filterwarnings("ignore", message=r"coroutine '.*' was never awaited", category=RuntimeWarning)
    if operation is None:
        return 0
    try:  # private API: another Orbax version degrades to waiting for the timeout, never worse
        from orbax.checkpoint._src.futures import future

        thread_cls, set_signals = future._SignalingThread, future.set_signals
    except (ImportError, AttributeError):
        return 0
    released = 0
    for t in threading.enumerate():
        if isinstance(t, thread_cls) and t.is_alive() and getattr(t, "_operation_id", None) == operation:
            t.cancel()   # once its signals are set, it returns without running its step
            set_signals(getattr(t, "_receive_signals", ()), operation_id=operation)
            released += 1
    _close_unstarted_coroutines()
    return released
