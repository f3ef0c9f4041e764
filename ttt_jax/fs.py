"""Output locations: local directories and URLs (``gs://...``), and the checks made before any
compute that a directory the command will write can be written.

A location is either

* **local** -- a plain path, a :class:`pathlib.Path`; handled with the operating system's calls as
  always (``os.replace``, ``statvfs`` free-space and inode counts, ``shutil.rmtree``); or
* **a URL** -- ``gs://bucket/run``, ``s3://...``, or any scheme registered with
  ``etils.epath.register_path_cls``: an :class:`etils.epath.Path`, handled only through epath's
  API (which Orbax uses too). Object stores have no free-space figure, no inodes and no atomic
  rename of a directory, so those checks are skipped and renames are epath's copy-and-delete.

:func:`as_path` makes one of the two from what a user typed; every path of a run directory, its
checkpoints and the checkpoints read by ``eval`` / ``generate`` goes through it, and the helpers
below (:func:`ensure_writable`, :func:`free_bytes`, :func:`rmtree`, :func:`move`,
:func:`write_text`, :func:`upload_changed`) choose the local or the URL branch by the path's type.
Tests drive the URL branch with a scheme that epath maps onto a local folder (tests/mock_remote.py).

:func:`ensure_writable` is called by every command for each directory it writes (the run directory
and its checkpoints, evaluation output, export targets) before it loads a model or compiles
anything, so a read-only mount, a missing permission, a path that is a file or a full disk is one
line (:class:`UnwritablePathError`, a ``ValueError``: the command line prints ``error: ...`` and
exits 2) instead of a traceback after the work was done. For a URL it writes and deletes a small
object.
"""

from __future__ import annotations

import errno
import importlib.util
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any, Optional, Union

# A local path or an etils.epath URL path (typed loosely: epath is imported only for URLs).
AnyPath = Union[Path, Any]

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

# The package epath's fsspec backend needs for a scheme (TensorFlow's gfile serves gs:// and s3://
# instead when it is installed).
_SCHEME_PACKAGES = {"gs": ("gcsfs", "ttt-jax[gcs]"), "s3": ("s3fs", "s3fs"), "az": ("adlfs", "adlfs"),
                    "hf": ("huggingface_hub", "huggingface_hub")}


class UnwritablePathError(OSError, ValueError):
    """An output location cannot be written. An ``OSError`` carrying the real ``errno``, and a
    ``ValueError`` so that the command line reports it as one ``error:`` line (exit 2)."""

    def __init__(self, errno_: int, message: str, path: AnyPath):
        super().__init__(errno_, message)
        self.message, self.path = message, path

    def __str__(self) -> str:
        return self.message


def describe_os_error(e: OSError) -> str:
    """``"the filesystem is read-only (EROFS)"`` for an ``OSError``; its text when the errno is unknown."""
    name = errno.errorcode.get(e.errno or 0)
    reason = _REASONS.get(e.errno or 0, e.strerror or str(e))
    return f"{reason} ({name})" if name else reason


# --- local path or URL ------------------------------------------------------------------------------


def is_url(path: Any) -> bool:
    """Whether ``path`` (a string or path object) is written as a URL (``scheme://...``)."""
    return not isinstance(path, Path) and "://" in str(path)


def is_remote(path: AnyPath) -> bool:
    """Whether ``path`` (as returned by :func:`as_path`) is a URL rather than a local path."""
    return not isinstance(path, Path)


def _known_schemes() -> list[str]:
    from etils.epath import register

    return sorted(getattr(register, "_URI_PREFIXES_TO_CLS", {"gs://": None, "s3://": None}))


def as_path(path: Any, what: str = "path") -> AnyPath:
    """``path`` as a local absolute :class:`~pathlib.Path` (``~`` expanded), or, when it is a URL,
    as an :class:`etils.epath.Path`. ``file://`` URLs are local paths. ``ValueError`` (one line,
    naming ``what``) for a scheme epath does not know, or one whose client package is missing."""
    if isinstance(path, Path):
        return path.expanduser().absolute()
    text = path if isinstance(path, str) else str(path)
    if "://" not in text:
        return Path(text).expanduser().absolute()
    scheme = text.split("://", 1)[0]
    if scheme == "file":
        return Path(text[len("file://"):]).expanduser().absolute()
    from etils import epath

    if isinstance(path, epath.Path):
        return path   # already a URL path (keeps its class)
    try:
        p = epath.Path(text)
    except KeyError:
        raise ValueError(f"{what} {text!r}: unknown URL scheme '{scheme}://'; use a local path or a URL "
                         f"of a scheme etils.epath knows ({', '.join(_known_schemes())})") from None
    needs = _SCHEME_PACKAGES.get(scheme)
    if needs and importlib.util.find_spec(needs[0]) is None and importlib.util.find_spec("tensorflow") is None:
        raise ValueError(f"{what} {text!r}: reaching {scheme}:// needs the {needs[0]} package; "
                         f"pip install '{needs[1]}'")
    return p


def url_root(path: AnyPath) -> str:
    """``"gs://bucket"`` for ``gs://bucket/a/b``: the top of a URL path (its bucket)."""
    scheme, rest = str(path).split("://", 1)
    return f"{scheme}://{rest.split('/', 1)[0]}"


# --- writability -------------------------------------------------------------------------------------


def _probe(directory: Path) -> None:
    """Create and remove a file in ``directory``: the real test of writability (``os.access`` does
    not see a full disk, a quota, or some network filesystems' permissions)."""
    fd, name = tempfile.mkstemp(prefix=".ttt-jax-write-test-", dir=directory)
    try:
        os.write(fd, b"0")
    finally:
        os.close(fd)
        os.unlink(name)


def _probe_url(directory: AnyPath) -> None:
    """Write and delete a small object under the URL ``directory``."""
    probe = directory / f".ttt-jax-write-test-{uuid.uuid4().hex}"
    probe.write_bytes(b"0")
    probe.unlink()


def _brief(e: BaseException) -> str:
    if isinstance(e, OSError) and e.errno in _REASONS:
        return f"{describe_os_error(e)}: {str(e).splitlines()[0][:200]}"
    text = str(e).splitlines()[0][:200] if str(e) else ""
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def ensure_writable(path: Any, what: str, *, urls: bool = False) -> AnyPath:
    """Check that the directory ``path`` (the ``what``, e.g. ``"run directory (train.run_dir)"``)
    can be written, without creating it: an existing directory is probed with a small temporary
    file; a missing one is checked at its nearest existing parent (where it would be created).
    Returns ``path`` as :func:`as_path` does.

    ``urls``: whether ``path`` may be a URL (the run directory and its checkpoints); it is then
    probed by writing and deleting a small object, at the nearest existing parent below its
    bucket. Other outputs are local (a URL is a ``ValueError`` naming ``what``).

    Raises :class:`UnwritablePathError` naming the path and the reason (read-only, permission,
    no space or inodes, quota, I/O error, or a path that is a file).
    """
    p = as_path(path, what)
    if is_remote(p):
        if not urls:
            raise ValueError(f"the {what} must be a local path, got the URL {p} (URLs such as gs://... "
                             "are accepted for train.run_dir and checkpoint paths)")
        return _ensure_writable_url(p, what)
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


def _ensure_writable_url(p: AnyPath, what: str) -> AnyPath:
    probe = p
    try:
        if p.exists() and not p.is_dir():
            raise UnwritablePathError(errno.ENOTDIR, f"the {what} {p} is a file (an object), not a "
                                      "directory; choose a directory path", p)
        root = url_root(p)
        while str(probe) != root and not probe.exists():
            probe = probe.parent
        if not probe.exists():
            raise UnwritablePathError(errno.ENOENT, f"cannot write the {what} {p}: the bucket {root} does "
                                      "not exist or cannot be seen with these credentials", p)
        if not probe.is_dir():
            raise UnwritablePathError(errno.ENOTDIR, f"cannot create the {what} {p}: {probe} is a file "
                                      "(an object), not a directory", p)
        _probe_url(probe)
    except UnwritablePathError:
        raise
    except Exception as e:  # noqa: BLE001 - any client's error (credentials, bucket, network)
        where = "" if str(probe) == str(p) else f" (probed at {probe})"
        code = e.errno if isinstance(e, OSError) and e.errno else errno.EIO
        raise UnwritablePathError(code, f"cannot write the {what} {p}{where}: {_brief(e)}; check the "
                                  "URL, the bucket and the credentials", p) from e
    return p


# --- free space (local only) -------------------------------------------------------------------------


def _existing(directory: Path) -> Path:
    p = Path(directory)
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def free_bytes(directory: AnyPath) -> Optional[int]:
    """Free space (for unprivileged users) on the filesystem holding ``directory`` (or its nearest
    existing parent); ``None`` for a URL (an object store reports none)."""
    if is_remote(directory):
        return None
    return int(shutil.disk_usage(_existing(directory)).free)


def free_inodes(directory: AnyPath) -> Optional[int]:
    """Free inodes (file entries, for unprivileged users) on the filesystem holding ``directory``;
    ``None`` where the filesystem has no fixed inode table (it reports 0 inodes in all) and for a
    URL."""
    if is_remote(directory):
        return None
    try:
        st = os.statvfs(_existing(directory))
    except OSError:
        return None
    return int(st.f_favail) if st.f_files else None


# --- changing files ----------------------------------------------------------------------------------


def rmtree(path: AnyPath) -> None:
    """Remove the directory ``path`` and everything in it; errors are ignored (as
    ``shutil.rmtree(..., ignore_errors=True)``)."""
    if not is_remote(path):
        shutil.rmtree(path, ignore_errors=True)
        return
    try:
        path.rmtree(missing_ok=True)
    except Exception:  # noqa: BLE001 - as ignore_errors locally
        pass


def move(src: AnyPath, dst: AnyPath) -> None:
    """Rename ``src`` to ``dst`` (a directory: ``os.replace`` locally; epath's rename for a URL,
    which on an object store copies and deletes every object)."""
    if not is_remote(src):
        os.replace(src, dst)
    else:
        src.rename(dst)


def write_text(path: AnyPath, text: str) -> None:
    """Write ``text`` to ``path``: locally through a temporary sibling and ``os.replace`` (a reader
    never sees half a file); for a URL as one object (object writes are whole or nothing)."""
    if is_remote(path):
        path.write_text(text)
        return
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def upload_changed(local_dir: Path, dest: AnyPath, sizes: dict[str, int]) -> int:
    """Copy the files under ``local_dir`` whose size changed since the last call (``sizes``, kept
    by the caller, maps relative names to uploaded sizes) to the same names under ``dest``. For
    growing append-only files (TensorBoard events): each changed file is written whole. Returns the
    number of files copied."""
    n = 0
    for root, _, files in os.walk(local_dir):
        for name in sorted(files):
            src = Path(root) / name
            rel = src.relative_to(local_dir).as_posix()
            size = src.stat().st_size
            if sizes.get(rel) == size:
                continue
            target = dest / rel
            if rel.count("/"):
                target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(src.read_bytes())
            sizes[rel] = size
            n += 1
    return n
