"""The errors and the warning category of checkpoint reading and writing."""

from __future__ import annotations

import errno
from pathlib import Path


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
    """A checkpoint cannot be written: too little disk space (checked before a save), or the writer
    failed with an OS error (full disk or inodes, quota, read-only, permission, I/O error). The
    message is one line naming the step, the path and the error. An ``OSError`` carrying that
    ``errno``, and a ``ValueError`` so that the command line reports it as one ``error:`` line
    (like :class:`io.UnsupportedOperation`, which is both)."""

    def __init__(self, message: str, errno_: int = errno.ENOSPC, step: int | None = None):
        super().__init__(errno_, message)
        self.message, self.step = message, step

    def __str__(self) -> str:
        return self.message
