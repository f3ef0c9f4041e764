"""Output locations: check before any compute that a directory the command will write can be written.

:func:`ensure_writable` is called by every command for each directory it writes (the run directory
and its checkpoints, evaluation output, export targets) before it loads a model or compiles
anything, so a read-only mount, a missing permission, a path that is a file or a full disk is one
line (:class:`UnwritablePathError`, a ``ValueError``: the command line prints ``error: ...`` and
exits 2) instead of a traceback after the work was done.
"""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path

# What the common errors of a write mean, in words (the errno name is printed too).
_REASONS = {
    errno.EROFS: "the filesystem is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.ENOSPC: "no space left on the device (bytes or inodes)",
    errno.EDQUOT: "the disk quota is exceeded",
    errno.EIO: "input/output error",
    errno.ENOTDIR: "a part of the path is not a directory",
}


class UnwritablePathError(OSError, ValueError):
    """An output location cannot be written. An ``OSError`` carrying the real ``errno``, and a
    ``ValueError`` so that the command line reports it as one ``error:`` line (exit 2)."""

    def __init__(self, errno_: int, message: str, path: Path):
        super().__init__(errno_, message)
        self.message, self.path = message, path

    def __str__(self) -> str:
        return self.message


def describe_os_error(e: OSError) -> str:
    """``"the filesystem is read-only (EROFS)"`` for an ``OSError``; its text when the errno is unknown."""
    name = errno.errorcode.get(e.errno or 0)
    reason = _REASONS.get(e.errno or 0, e.strerror or str(e))
    return f"{reason} ({name})" if name else reason


def _probe(directory: Path) -> None:
    """Create and remove a file in ``directory``: the real test of writability (``os.access`` does
    not see a full disk, a quota, or some network filesystems' permissions)."""
    fd, name = tempfile.mkstemp(prefix=".ttt-jax-write-test-", dir=directory)
    try:
        os.write(fd, b"0")
    finally:
        os.close(fd)
        os.unlink(name)


def ensure_writable(path: str | Path, what: str) -> Path:
    """Check that the directory ``path`` (the ``what``, e.g. ``"run directory (train.run_dir)"``)
    can be written, without creating it: an existing directory is probed with a small temporary
    file; a missing one is checked at its nearest existing parent (where it would be created).
    Returns ``path`` as an absolute :class:`~pathlib.Path`.

    Raises :class:`UnwritablePathError` naming the path and the reason (read-only, permission,
    no space or inodes, quota, I/O error, or a path that is a file).
    """
    p = Path(path).expanduser().absolute()
    if p.exists() and not p.is_dir():
        raise UnwritablePathError(errno.ENOTDIR, f"the {what} {p} is a file, not a directory; "
                                  "choose a directory path", p)
    probe = p
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise UnwritablePathError(errno.ENOTDIR, f"cannot create the {what} {p}: {probe} is a file, "
                                  "not a directory", p)
    try:
        _probe(probe)
    except OSError as e:
        where = "" if probe == p else f" (its nearest existing parent {probe} cannot be written)"
        raise UnwritablePathError(e.errno or errno.EIO, f"cannot write the {what} {p}{where}: "
                                  f"{describe_os_error(e)}; choose a writable location", p) from e
    return p
