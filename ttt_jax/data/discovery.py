"""Finding the files of a source: the stdlib corpus, and ``data.paths`` (files, directories, globs).

Rules (see :mod:`ttt_jax.data.sources`): a listed file is always used; a directory contributes,
recursively and sorted by relative path, the files of its source's kind -- ``*.jsonl``/``*.ndjson``,
``*.parquet``, ``*.py`` for stdlib, and for text every file with no hidden path component that does
not look binary (a NUL byte in its first 8 KiB). Each file gets a key (its path relative to the
directory or glob root, its base name when listed) that seeds the train/validation split.
"""

from __future__ import annotations

import glob as globlib
import os
import sysconfig
from pathlib import Path
from typing import Sequence

__all__ = ["stdlib_root", "walk", "expand_paths"]

_EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})
_DIR_SUFFIXES = {"jsonl": (".jsonl", ".ndjson"), "parquet": (".parquet",)}


def stdlib_root() -> Path:
    """The directory of the running Python's standard library."""
    return Path(sysconfig.get_paths()["stdlib"])


def _is_hidden(rel: Path) -> bool:
    return any(part.startswith(".") for part in rel.parts)


def _looks_binary(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return b"\0" in f.read(8192)
    except OSError:
        return False  # let the read report it


def walk(root: Path, source: str) -> list[tuple[Path, Path]]:
    """(absolute path, path relative to root) of the files a directory contributes, sorted."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".") and d not in _EXCLUDED_DIRS]
        for name in filenames:
            path = Path(dirpath) / name
            rel = path.relative_to(root)
            if _is_hidden(rel) or not path.is_file():
                continue
            if source in _DIR_SUFFIXES:
                if not name.endswith(_DIR_SUFFIXES[source]):
                    continue
            elif source == "stdlib":
                if not name.endswith(".py"):
                    continue
            elif _looks_binary(path):
                continue
            found.append((path, rel))
    found.sort(key=lambda x: x[1].as_posix())
    return found


def _glob_root(pattern: str) -> Path:
    """The longest leading part of a glob pattern without wildcards."""
    parts = []
    for part in Path(pattern).parts:
        if globlib.has_magic(part):
            break
        parts.append(part)
    return Path(*parts) if parts else Path(".")


def expand_paths(paths: Sequence[str], source: str) -> tuple[list[Path], list[str]]:
    """Resolve files / directories / globs to (files, keys) in a deterministic order."""
    files: list[Path] = []
    keys: list[str] = []
    seen: set[Path] = set()

    def add(path: Path, key: str) -> None:
        real = path.resolve()
        if real not in seen:
            seen.add(real)
            files.append(path)
            keys.append(key)

    for spec in paths:
        p = Path(os.path.expanduser(str(spec)))
        if p.is_file():
            add(p, p.name)
        elif p.is_dir():
            found = walk(p, source)
            if not found:
                raise ValueError(f"data.paths: directory {str(spec)!r} contains no usable files for "
                                 f"data.source={source!r}")
            for path, rel in found:
                add(path, rel.as_posix())
        elif globlib.has_magic(str(p)):
            root = _glob_root(str(p))
            matches = sorted(globlib.glob(str(p), recursive=True))
            n_before = len(files)
            for m in matches:
                mp = Path(m)
                if mp.is_file():
                    add(mp, mp.relative_to(root).as_posix() if mp.is_relative_to(root) else mp.name)
                elif mp.is_dir():
                    for path, rel in walk(mp, source):
                        add(path, path.relative_to(root).as_posix())
            if len(files) == n_before:
                raise ValueError(f"data.paths: glob {str(spec)!r} matches no files")
        else:
            raise ValueError(f"data.paths: {str(spec)!r} does not exist (expected a file, directory "
                             "or glob pattern)")
    return files, keys
