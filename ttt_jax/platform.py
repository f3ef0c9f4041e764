"""The platform a computation is built for: ``"cpu"``, ``"gpu"`` or ``"tpu"``.

Every automatic kernel choice (attention impl, context-parallel attention kernel, TTT op impl,
exchange dtype) asks :func:`target_platform`, never ``jax.default_backend()``: the host a program is
*traced* on need not be the one it runs on. ``ttt-jax compile`` traces a TPU pod's train step on a
CPU host; a live TPU run and that ahead-of-time compile must pick the same kernels (Pallas Mosaic on
TPU, cuDNN / Pallas-Triton on GPU, XLA on CPU).

The answer, first match wins:

1. an explicit ``platform=`` argument;
2. the devices of an explicit ``mesh=`` argument;
3. :func:`target` (a context manager) around the trace;
4. the mesh the trace runs under: ``jax.set_mesh(mesh)`` (the trainer and ``ttt-jax compile`` trace
   their steps under it) and ``jax.shard_map`` both make it the abstract mesh, whose abstract
   device carries the platform;
5. ``jax.devices()[0].platform`` (the default backend).
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import re
import sys
import tempfile
from typing import Callable, Iterator, Optional

import jax

PLATFORMS = ("cpu", "gpu", "tpu")
# Device platform names that mean one of PLATFORMS (jax reports NVIDIA devices as "gpu", but
# backends can be named "cuda" / "rocm").
_ALIASES = {"cuda": "gpu", "rocm": "gpu"}

_TARGET: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar("ttt_jax_target_platform",
                                                                          default=None)


def normalise(platform: str) -> str:
    """``platform`` as one of :data:`PLATFORMS` (``ValueError`` naming the choices otherwise)."""
    p = _ALIASES.get(str(platform).lower(), str(platform).lower())
    if p not in PLATFORMS:
        raise ValueError(f"unknown platform {platform!r}; expected one of {PLATFORMS}")
    return p


def mesh_platform(mesh) -> Optional[str]:
    """Platform of a ``Mesh`` or ``AbstractMesh`` (``None`` for an empty abstract mesh)."""
    if not isinstance(mesh, jax.sharding.AbstractMesh):   # its .devices raises
        devices = getattr(mesh, "devices", None)
        if devices is not None and getattr(devices, "size", 0):
            return normalise(devices.flat[0].platform)
        mesh = getattr(mesh, "abstract_mesh", None)
    dev = getattr(mesh, "abstract_device", None)
    if dev is not None and getattr(dev, "platform", None):
        return normalise(dev.platform)
    return None


@contextlib.contextmanager
def target(platform: str) -> Iterator[str]:
    """Within the block, :func:`target_platform` answers ``platform`` (unless given explicitly)."""
    token = _TARGET.set(normalise(platform))
    try:
        yield _TARGET.get()
    finally:
        _TARGET.reset(token)


def target_platform(platform: Optional[str] = None, *, mesh=None) -> str:
    """The platform the computation being built will run on; see the module docstring for the order."""
    if platform is not None:
        return normalise(platform)
    if mesh is not None:
        p = mesh_platform(mesh)
        if p is not None:
            return p
    p = _TARGET.get()
    if p is not None:
        return p
    p = mesh_platform(jax.sharding.get_abstract_mesh())
    if p is not None:
        return p
    return normalise(jax.devices()[0].platform)


# libtpu's start-up lines on a host without TPU chips (the `tpu` extra installs it to compile for
# TPU slices anywhere): warnings about TPU_ACCELERATOR_TYPE / TPU_WORKER_HOSTNAMES, which do not apply.
_LIBTPU_NOISE = re.compile(r"TPU_ACCELERATOR_TYPE|TPU_WORKER_HOSTNAMES|Logging before InitGoogle|"
                           r"Source Location Trace|libtpu_init_utils")


@contextlib.contextmanager
def captured_stderr() -> Iterator[Callable[[], str]]:
    """Send file descriptor 2 (C++ libraries write there directly) to a temporary file for the block;
    yields a function that reads what was written. If the block raises, what was written is
    replayed first, so no real error is hidden."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as tmp:
        def read() -> str:
            tmp.seek(0)
            return tmp.read().decode(errors="replace")

        os.dup2(tmp.fileno(), 2)
        try:
            yield read
        except BaseException:
            sys.stderr.flush()
            os.dup2(saved, 2)
            sys.stderr.write(read())
            raise
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)


def start_backends() -> list:
    """Initialise JAX's backends now and return ``jax.devices()``. On a host without TPU chips,
    libtpu's start-up warnings are dropped (they would precede every one-line message of the CLI);
    anything else written during start-up is passed on."""
    with captured_stderr() as read:
        devices = jax.devices()
        text = read()
    if not any(d.platform == "tpu" for d in devices):
        text = "".join(ln for ln in text.splitlines(keepends=True) if not _LIBTPU_NOISE.search(ln))
    if text:
        sys.stderr.write(text)
        sys.stderr.flush()
    return devices
