"""``mock://bucket/a/b``: an etils.epath URL scheme kept in a local folder, so that the URL branch of
:mod:`ttt_jax.fs` (and of everything that uses it) runs in tests without a network.

The path class is registered with ``epath.register_path_cls`` as gs:// is. Its ``str()`` and
``os.fspath()`` are the URL, so code that treats it as a local file (``open()``, ``os.replace``,
``shutil``, ``pathlib.Path(...)``) fails as it would on gs://; epath's operations reach the folder
through epath's local backend, handed the URLs and mapping them to the folder. Only ``as_posix()`` -- what Orbax hands TensorStore, which reads
gs:// with its own GCS driver -- is the local folder, for TensorStore's file driver.

Usage: the :func:`mock_root` fixture (tests/conftest.py) sets :data:`ROOT` to a fresh folder;
``mock://bkt/run`` is then ``<ROOT>/bkt/run``.
"""

from __future__ import annotations

import os
import sys

from etils.epath import backend, gpath, register

ROOT = {"dir": "/nonexistent-mock-root"}
SCHEME = "mock"


def _to_parts(parts):
    full = "/".join(os.fspath(p) for p in parts)
    if full.startswith(f"{SCHEME}://"):
        return (f"/{SCHEME}/" + full[len(SCHEME) + 3:],)
    return parts


def _local(path):
    text = os.fspath(path)
    return local(text) if text.startswith(f"{SCHEME}://") else text


class _Backend(backend._OsPathBackend):  # pylint: disable=protected-access
    """epath's local backend, given mock:// URLs (as the gs:// backend is given gs:// URLs)."""

    def open(self, path, mode):
        return super().open(_local(path), mode)


for _name in ("exists", "isdir", "listdir", "glob", "makedirs", "mkdir", "rmtree", "remove", "stat"):
    setattr(_Backend, _name, (lambda n: lambda self, path, *a, **k: getattr(
        backend._OsPathBackend, n)(self, _local(path), *a, **k))(_name))  # pylint: disable=protected-access
for _name in ("rename", "replace", "copy"):
    setattr(_Backend, _name, (lambda n: lambda self, path, dst, *a, **k: getattr(
        backend._OsPathBackend, n)(self, _local(path), _local(dst), *a, **k))(_name))  # pylint: disable=protected-access


def _walk(self, top, *, top_down=True, on_error=None):
    yield from backend._OsPathBackend.walk(self, _local(top), top_down=top_down, on_error=on_error)  # pylint: disable=protected-access


_Backend.walk = _walk
_BACKEND = _Backend()


@register.register_path_cls(f"{SCHEME}://")
class MockRemotePath(gpath.PosixGPath):
    """``mock://bucket/...`` (held as the parts ``/mock/bucket/...``, as epath holds gs://)."""

    if sys.version_info < (3, 12):
        def __new__(cls, *parts):
            return super().__new__(cls, *_to_parts(parts))
    else:
        def __init__(self, *parts):
            super().__init__(*_to_parts(parts))

    @property
    def _uri_scheme(self):
        return SCHEME if self.parts[:2] == ("/", SCHEME) else None

    @property
    def _backend(self):
        return _BACKEND

    @property
    def _path_str(self):
        if self._uri_scheme is None:
            raise AssertionError(f"a mock:// path lost its scheme: {self.parts}")
        return f"{SCHEME}://" + "/".join(self.parts[2:])

    def _new(self, *parts):
        # The local backend answers with local paths (glob, walk): back to mock:// URLs.
        first = os.fspath(parts[0]) if parts else ""
        if first == ROOT["dir"] or first.startswith(ROOT["dir"] + "/"):
            parts = (f"{SCHEME}://" + first[len(ROOT["dir"]) + 1:], *parts[1:])
        return type(self)(*parts)

    def __repr__(self):
        return f"MockRemotePath({str(self)!r})"

    def as_posix(self):
        return local(self._path_str)

    # A URL is absolute and has no ~ (epath's versions would make a local path of it).
    def expanduser(self):
        return self

    def absolute(self):
        return self

    def resolve(self, strict: bool = False):
        return self


def local(url: str) -> str:
    """The folder that ``url`` (``mock://...``) is kept in."""
    assert url.startswith(f"{SCHEME}://")
    return os.path.join(ROOT["dir"], url[len(SCHEME) + 3:])
