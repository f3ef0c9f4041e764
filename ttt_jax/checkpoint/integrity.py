"""Integrity of checkpoints: array checksums (computed on the devices), sizes, free disk space, and
the sorting of errors into "the checkpoint is damaged", "the disk is full" and anything else."""

from __future__ import annotations

import errno
import json
import threading
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from ttt_jax.checkpoint.errors import CheckpointCorruptError
from ttt_jax.checkpoint.tree import flatten, is_key_array
from ttt_jax.fs import free_bytes, free_inodes  # noqa: F401 - re-exported (ttt_jax.checkpoint.free_bytes)



def _as_u32(x: jax.Array) -> jax.Array:
    """The raw bits of ``x`` as uint32 (8-byte types gain a trailing axis of 2)."""
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    narrow = {1: jnp.uint8, 2: jnp.uint16}.get(x.dtype.itemsize)
    if narrow is not None:
        return jax.lax.bitcast_convert_type(x, narrow).astype(jnp.uint32)
    return jax.lax.bitcast_convert_type(x, jnp.uint32)


def _leaf_checksum(x: jax.Array) -> jax.Array:
    """``[3]`` uint32: the sum of the bit patterns and their sum weighted by ``2 * flat_index + 1``,
    both mod 2**32, and 1 if every element is finite (else 0). Integer sums are exact and
    order-free, so the result does not depend on how the array is sharded; any single changed
    element changes both sums, a swap changes the second."""
    u = _as_u32(x)
    # Flat row-major index built from per-axis iotas (partitions like the array; no reshape).
    idx = jnp.zeros(u.shape, jnp.uint32)
    stride = 1
    for axis in reversed(range(u.ndim)):
        idx = idx + jax.lax.broadcasted_iota(jnp.uint32, u.shape, axis) * jnp.uint32(stride % 2 ** 32)
        stride *= u.shape[axis]
    weight = idx * jnp.uint32(2) + jnp.uint32(1)
    finite = jnp.all(jnp.isfinite(x)) if jnp.issubdtype(x.dtype, jnp.inexact) else jnp.bool_(True)
    return jnp.stack([jnp.sum(u, dtype=jnp.uint32), jnp.sum(u * weight, dtype=jnp.uint32),
                      finite.astype(jnp.uint32)])


_checksums_jit = jax.jit(lambda tree: jax.tree.map(_leaf_checksum, tree))


def _host_value(x: jax.Array) -> np.ndarray:
    # The checksums are reductions, replicated on every device: any local copy is the value.
    return np.asarray(jax.device_get(x) if x.is_fully_addressable else x.addressable_data(0))


def _signature(tree: Any) -> tuple:
    leaves, treedef = jax.tree.flatten(tree)
    return (treedef, tuple((x.shape, x.dtype, getattr(x, "sharding", None)) for x in leaves))


# Checksum programs compiled ahead (:func:`prepare_checksums`), by the state's signature.
_PREPARED: dict[tuple, Future] = {}


def prepare_checksums(tree: Any) -> None:
    """Compile the checksum program for arrays shaped and sharded like ``tree``'s, in a background
    thread, so that the first save (a preemption's included) does not wait for that compile. The
    arrays are only read for their shapes, dtypes and shardings."""
    key = _signature(tree)
    if key in _PREPARED:
        return
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)
    future: Future = Future()
    _PREPARED[key] = future

    def compile_() -> None:
        try:
            future.set_result(_checksums_jit.lower(abstract).compile())
        except BaseException as e:   # the save then compiles through jit as before
            future.set_exception(e)

    threading.Thread(target=compile_, name="ttt-jax-checksums", daemon=True).start()


def _checksums(tree: Any) -> Any:
    future = _PREPARED.get(_signature(tree))
    if future is not None and future.exception() is None:
        return future.result()(tree)
    return _checksums_jit(tree)


def checksums_and_finite(tree: Any) -> tuple[dict[str, str], list[str]]:
    sums = {k: _host_value(s) for k, s in flatten(_checksums(tree)).items()}
    return ({k: f"{int(v[0]):08x}{int(v[1]):08x}" for k, v in sums.items()},
            sorted(k for k, v in sums.items() if not v[2]))


def state_checksums(tree: Any) -> dict[str, str]:
    """``{"model.embed.embedding": "1a2b3c4d5e6f7081", ...}`` for a nested dict of arrays (computed
    on the devices where the arrays live; only ``3 x 4`` bytes per array reach the host)."""
    return checksums_and_finite(tree)[0]


def state_nbytes(tree: Any) -> int:
    """Bytes of all arrays (or shape/dtype structs) in ``tree``: the size of their checkpoint."""
    total = 0
    for x in jax.tree.leaves(tree):
        # A typed PRNG key is stored as its uint32 key data (2 words for the default impl).
        itemsize = 8 if is_key_array(x) else np.dtype(x.dtype).itemsize
        total += int(np.prod(x.shape)) * itemsize
    return total


# What a checkpoint takes on disk beyond its arrays' bytes: Orbax's and TensorStore's metadata
# (per array: its zarr/OCDBT records and array metadata; per step: the items' JSON, the manifest).
# Arrays are stored uncompressed (so the estimate does not depend on the values).
# tests/test_fault_storage.py measures the estimate against what a save writes.
PER_ARRAY_BYTES = 1536
PER_STEP_BYTES = 64 << 10


def checkpoint_bytes(nbytes: int, n_arrays: int) -> int:
    """Estimated bytes a checkpoint of ``n_arrays`` arrays holding ``nbytes`` takes on disk."""
    return int(nbytes) + n_arrays * PER_ARRAY_BYTES + PER_STEP_BYTES


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


def describe_no_space(directory: Path, code: int) -> str:
    """What ran out, for an ``ENOSPC`` / ``EDQUOT`` met while writing into ``directory``, measured
    now (call it before the failed write's files are removed): ``"no inodes (file entries) left on
    the device (ENOSPC), though 63.9 MiB are free"`` when the inode table is full, ``"no space left
    on the device (ENOSPC): 1.2 MiB free"`` when the bytes ran out, both figures otherwise (a quota,
    or space freed since)."""
    name = errno.errorcode.get(code, str(code))
    if code == errno.EDQUOT:
        return f"the disk quota is exceeded ({name})"
    if free_bytes(directory) is None:   # a URL: no free-space figure to give
        return f"no space left (bytes or inodes) ({name})"
    free, inodes = fmt_bytes(free_bytes(directory)), free_inodes(directory)
    if inodes == 0:
        return f"no inodes (file entries) left on the device ({name}), though {free} are free"
    if free_bytes(directory) < 1 << 20:
        return f"no space left on the device ({name}): {free} free"
    left = f"{free} and {inodes:,} inodes" if inodes is not None else free
    return f"no space left on the device (bytes or inodes) ({name}); now {left} free"


# What a damaged checkpoint looks like in the errors of Orbax, TensorStore and json. Anything else
# (a permission problem, a device or sharding error, a bug) is raised as it is: it must never get
# a good checkpoint moved aside.
_DAMAGE_TYPES = (FileNotFoundError, NotADirectoryError, IsADirectoryError, json.JSONDecodeError,
                 UnicodeDecodeError, EOFError)
_DAMAGE_TEXT = ("Encountered error while reading", "DATA_LOSS", "NOT_FOUND", "OUT_OF_RANGE",
                "Error reading", "Error opening", "not found", "does not exist", "No such file",
                "corrupt", "truncat", "Unexpected end", "decod", "Expecting value", "Unterminated",
                "Unknown key")   # an item (e.g. the arrays) missing from the step
_NOT_DAMAGE_TEXT = ("PERMISSION_DENIED", "Permission denied", "RESOURCE_EXHAUSTED", "out of memory")


def is_damage(e: BaseException) -> bool:
    """Whether ``e`` (or an exception it came from) says the checkpoint's files are missing,
    truncated or unparseable."""
    chain, seen = [], set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        chain.append(e)
        e = e.__cause__ or e.__context__
    if any(isinstance(x, PermissionError) or any(t in str(x) for t in _NOT_DAMAGE_TEXT) for x in chain):
        return False
    return any(isinstance(x, _DAMAGE_TYPES) or any(t in str(x) for t in _DAMAGE_TEXT) for x in chain)


def brief(e: BaseException) -> str:
    """``"Type: first line"`` of ``e``, without the unhelpful tail Orbax appends to TensorStore
    errors (``See full TensorStore details: <bound method ...>``)."""
    text = str(e).split("See full TensorStore details")[0].rstrip(" .")
    first = text.splitlines()[0][:200] if text else ""
    return f"{type(e).__name__}: {first}"


# Write failures a user can act on (a full disk or quota, a read-only or unwritable location, a
# failing device), by errno and by the text TensorStore and Orbax put in their messages.
WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO)
_WRITE_TEXT = (("No space left on device", errno.ENOSPC), ("Disk quota exceeded", errno.EDQUOT),
               ("Read-only file system", errno.EROFS), ("Permission denied", errno.EACCES),
               ("PERMISSION_DENIED", errno.EACCES), ("Operation not permitted", errno.EPERM),
               ("Input/output error", errno.EIO), ("ENOSPC", errno.ENOSPC), ("EDQUOT", errno.EDQUOT))


def write_failure(e: BaseException) -> Optional[tuple[int, str]]:
    """``(errno, detail)`` when ``e`` (or an exception it came from) is an OS write failure of
    :data:`WRITE_ERRNOS`; ``None`` otherwise (a bug, a device error: raised as it is). ``detail``
    is the most specific message found (the OS error's, naming the file, when there is one)."""
    chain, seen = [], set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        chain.append(e)
        e = e.__cause__ or e.__context__
    for x in chain:
        if isinstance(x, OSError) and x.errno in WRITE_ERRNOS:
            return x.errno, str(x).splitlines()[0][:300]
    for x in chain:
        for text, code in _WRITE_TEXT:
            if text in str(x):
                return code, brief(x)
    return None


def verify_checksums(where: Path, restored: Any, recorded: Optional[dict[str, str]]) -> None:
    """Raise :class:`CheckpointCorruptError` naming the arrays of ``restored`` (a nested dict as
    saved) whose checksums differ from ``recorded`` (checkpoints without a record pass). Arrays of
    ``restored`` absent from ``recorded`` are not checked (a partial restore reads a subset)."""
    if not recorded:
        return
    got = state_checksums(restored)
    bad = sorted(k for k, v in got.items() if k in recorded and recorded[k] != v)
    if bad:
        raise CheckpointCorruptError(where, f"{len(bad)} array(s) do not match the checksums recorded "
                                            f"when it was written: {', '.join(bad[:5])}"
                                            + (" ..." if len(bad) > 5 else ""))
