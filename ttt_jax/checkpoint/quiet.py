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
"""

from __future__ import annotations

import collections
import logging
import sys
from typing import Any

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
