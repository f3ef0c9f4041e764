"""Input paths and output files of the commands, checked before any work: a mistake is one line.

Each function raises ``ValueError`` naming the path and what it is for; the ``ttt-jax`` command
turns that into ``error: ...`` and exit status 2. Nothing is created here. Output directories are
checked by :func:`ttt_jax.fs.ensure_writable`.
"""

from __future__ import annotations

import os
from pathlib import Path

from ttt_jax.fs import ensure_writable

__all__ = ["ensure_writable_file", "existing_dir", "existing_file"]


def ensure_writable_file(path: str | os.PathLike, what: str) -> Path:
    """``path`` is a file we can create or replace (its directory may not exist yet)."""
    p = Path(os.path.expanduser(str(path)))
    if p.is_dir():
        raise ValueError(f"{what} {str(p)!r} is a directory, expected a file path")
    if p.exists() and not os.access(p, os.W_OK):
        raise ValueError(f"{what} {str(p)!r} is not writable")
    ensure_writable(p.parent, f"directory of {what}")
    return p


def existing_dir(path: str | os.PathLike, what: str) -> Path:
    """``path`` is an existing directory."""
    p = Path(os.path.expanduser(str(path)))
    if not p.exists():
        raise ValueError(f"{what} {str(p)!r} does not exist")
    if not p.is_dir():
        raise ValueError(f"{what} {str(p)!r} is a file, expected a directory")
    return p


def existing_file(path: str | os.PathLike, what: str) -> Path:
    """``path`` is an existing regular file."""
    p = Path(os.path.expanduser(str(path)))
    if not p.exists():
        raise ValueError(f"{what} {str(p)!r} does not exist")
    if p.is_dir():
        raise ValueError(f"{what} {str(p)!r} is a directory, expected a file")
    return p
