"""How a training run stops early: SIGTERM / SIGINT (:class:`StopSignals`, then
:class:`TrainingInterrupted` once the step in flight is checkpointed) and non-finite losses
(:class:`NonFiniteLossError`). The loop that uses them is :mod:`ttt_jax.train.trainer`."""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path
from typing import Any, Callable, Optional


class NonFiniteLossError(RuntimeError):
    """The training loss (or gradient norm) became NaN/inf (``train.on_nonfinite=stop``), or more
    than ``train.max_nonfinite_steps`` updates were skipped for it (``skip``). No checkpoint of a
    state after a skipped update is written; the last good checkpoint (if any) is left as it was."""


class TrainingInterrupted(RuntimeError):
    """SIGTERM / SIGINT arrived: the step in flight finished, a checkpoint of it was written (and
    waited for), and training stopped. Running the same command again resumes from it."""

    def __init__(self, step: int, checkpoint: Path, signame: str):
        super().__init__(f"{signame} received: stopped after step {step} and saved {checkpoint}; "
                         "run the same command again to resume")
        self.step = step
        self.checkpoint = checkpoint


class StopSignals:
    """Turns SIGTERM / SIGINT into a flag the loop checks after every step (main thread only;
    other threads keep the default handlers).

    The flag is set at once, even while the main thread waits on the device or compiles: a
    watcher thread reads the signal numbers Python's C-level handler writes to a wakeup pipe. A
    second signal (of either kind) ends the process at once from that thread, with one line on
    stderr and status 128 + the signal number; the newest complete checkpoint stays as it is.
    """

    SIGNALS = ("SIGTERM", "SIGINT")

    def __init__(self, where: Callable[[], str] = lambda: ""):
        self.received: Optional[str] = None
        self._where = where
        self._old: dict[int, Any] = {}
        self._old_fd: Optional[int] = None
        self._pipe: Optional[tuple[int, int]] = None

    def __enter__(self):
        if threading.current_thread() is not threading.main_thread():
            return self
        self._pipe = os.pipe()
        os.set_blocking(self._pipe[1], False)
        self._old_fd = signal.set_wakeup_fd(self._pipe[1], warn_on_full_buffer=False)
        for name in self.SIGNALS:
            sig = getattr(signal, name)
            self._old[sig] = signal.signal(sig, self._handle)
        threading.Thread(target=self._watch, args=(self._pipe[0],), name="ttt-jax-signals", daemon=True).start()
        return self

    def _handle(self, signum, frame):
        # Python-level handler (runs in the main thread when it next runs bytecode): the watcher
        # has already seen the signal; this one only keeps the default action from killing us.
        self.received = self.received or signal.Signals(signum).name

    def _watch(self, fd: int) -> None:
        try:
            self._read(fd)
        finally:
            os.close(fd)

    def _read(self, fd: int) -> None:
        seen = 0
        while True:
            try:
                data = os.read(fd, 64)
            except OSError:
                return
            if not data:
                return
            for signum in data:
                if signum not in self._old:
                    continue
                seen += 1
                name = signal.Signals(signum).name
                if seen == 1:
                    self.received = name
                    continue
                where = self._where()
                # A newline first ends a progress bar's line on a terminal; elsewhere the message
                # is the one line written.
                lead = "\n" if os.isatty(2) else ""
                os.write(2, (f"{lead}{name} received again: exiting at once without a checkpoint of the "
                             f"step in flight{'; ' + where if where else ''}\n").encode())
                os._exit(128 + signum)

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        if self._pipe is not None:
            signal.set_wakeup_fd(self._old_fd if self._old_fd is not None else -1)
            os.close(self._pipe[1])   # the watcher's read returns b"" and it ends
            self._pipe = None
        return False
