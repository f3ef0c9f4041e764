"""Streaming access to (sharded) safetensors checkpoints, without PyTorch.

:class:`SafetensorsCheckpoint` indexes a Hugging Face model directory -- ``model.safetensors``, or
the shards named by ``model.safetensors.index.json`` -- and reads one tensor at a time as a numpy
array (``safetensors.safe_open(..., framework="numpy")``, memory-mapped; bfloat16 through
``ml_dtypes``). Shapes and dtypes are known from the headers before any data is read.
:func:`write_safetensors` writes a dict of numpy arrays in shards of bounded size with the index
that transformers reads.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Iterable, Mapping, Optional

import numpy as np

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"

# safetensors dtype tags -> numpy dtype names (bfloat16 via ml_dtypes, which JAX depends on).
_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
           "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}
FLOAT_DTYPES = ("F32", "F16", "BF16", "F64")


def numpy_dtype(name: str) -> np.dtype:
    """The numpy dtype for a JAX dtype name (``"bfloat16"`` through ``ml_dtypes``)."""
    if name == "bfloat16":
        import ml_dtypes
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def _header(path: Path) -> dict:
    """The JSON header of a safetensors file (``{name: {dtype, shape, data_offsets}}``)."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return header


class SafetensorsCheckpoint:
    """The tensors of a Hugging Face model directory ``path``.

    ``names()`` lists them; ``shape(name)`` / ``dtype(name)`` (safetensors tag, e.g. ``BF16``)
    come from the headers; ``get(name)`` reads one tensor as a numpy array. ``ValueError`` when the
    directory holds no safetensors checkpoint or the index names a missing shard.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path).expanduser()
        index = self.path / INDEX_NAME
        if index.is_file():
            weight_map = json.loads(index.read_text()).get("weight_map", {})
            files = sorted(set(weight_map.values()))
            missing = [f for f in files if not (self.path / f).is_file()]
            if missing:
                raise ValueError(f"{index} names shard files that do not exist: {missing}")
        elif (self.path / SINGLE_NAME).is_file():
            files = [SINGLE_NAME]
        else:
            found = sorted(p.name for p in self.path.glob("*.safetensors")) if self.path.is_dir() else []
            if len(found) == 1:
                files = found
            else:
                what = "no directory" if not self.path.is_dir() else \
                    f"no {SINGLE_NAME} or {INDEX_NAME} (safetensors files: {found or 'none'})"
                raise ValueError(f"{self.path}: {what}; expected a Hugging Face model directory "
                                 "with safetensors weights (PyTorch .bin checkpoints are not read)")
        self._file: dict[str, str] = {}
        self._meta: dict[str, dict] = {}
        for fname in files:
            for name, meta in _header(self.path / fname).items():
                self._file[name] = fname
                self._meta[name] = meta
        self._open: dict[str, object] = {}

    def names(self) -> list[str]:
        return sorted(self._file)

    def __contains__(self, name: str) -> bool:
        return name in self._file

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._meta[name]["shape"])

    def dtype(self, name: str) -> str:
        return self._meta[name]["dtype"]

    def file(self, name: str) -> str:
        return self._file[name]

    def _handle(self, fname: str):
        from safetensors import safe_open

        if fname not in self._open:
            self._open[fname] = safe_open(str(self.path / fname), framework="numpy")
        return self._open[fname]

    def get(self, name: str) -> np.ndarray:
        """Tensor ``name`` as a numpy array of its stored dtype."""
        if name not in self._file:
            raise KeyError(f"tensor {name!r} is not in {self.path}")
        fname = self._file[name]
        try:
            return self._handle(fname).get_tensor(name)
        except (TypeError, ValueError):
            # Older safetensors releases cannot hand bfloat16 to numpy: read the bytes directly.
            return self._read_raw(name)

    def _read_raw(self, name: str) -> np.ndarray:
        meta, path = self._meta[name], self.path / self._file[name]
        start, end = meta["data_offsets"]
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            f.seek(8 + n + start)
            buf = f.read(end - start)
        return np.frombuffer(buf, dtype=numpy_dtype(_DTYPES[meta["dtype"]])).reshape(meta["shape"])

    def close(self) -> None:
        self._open.clear()


def _default_mode() -> int:
    """The mode ``open()`` gives a new file under the current umask (0644 under the usual 022)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def write_safetensors(directory: str | Path, tensors: Iterable[tuple[str, np.ndarray]], *,
                      max_shard_bytes: int = 5 * 2**30,
                      metadata: Optional[Mapping[str, str]] = None) -> list[str]:
    """Write ``(name, array)`` pairs (consumed lazily) to ``directory`` as ``model.safetensors``, or
    as ``model-0000i-of-0000n.safetensors`` shards of at most ``max_shard_bytes`` (a larger single
    tensor gets a shard of its own) plus ``model.safetensors.index.json``. Holds at most one shard
    in memory (shards are written under temporary names and renamed once their number is known).
    Returns the file names."""
    from safetensors.numpy import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    meta = dict(metadata or {"format": "pt"})
    shards: list[list[str]] = []
    weight_map: dict[str, str] = {}
    pending: dict[str, np.ndarray] = {}
    size = 0
    total_size = 0

    def flush() -> None:
        nonlocal pending, size
        if not pending:
            return
        tmp = f"shard-{len(shards):05d}.tmp"
        save_file({k: np.ascontiguousarray(v) for k, v in pending.items()}, str(directory / tmp), metadata=meta)
        shards.append(list(pending))
        pending, size = {}, 0

    for name, arr in tensors:
        nbytes = arr.size * arr.dtype.itemsize
        if pending and size + nbytes > max_shard_bytes:
            flush()
        pending[name] = arr
        size += nbytes
        total_size += nbytes
    flush()
    n = len(shards)
    names = [SINGLE_NAME] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    for i, fname in enumerate(names):
        tmp = directory / f"shard-{i:05d}.tmp"
        tmp.chmod(_default_mode())   # the writer creates its files 0600; exports are shared files
        tmp.replace(directory / fname)
        for t in shards[i]:
            weight_map[t] = fname
    if n > 1:
        index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
        (directory / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    return names
