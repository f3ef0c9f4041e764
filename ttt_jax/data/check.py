"""The data check: every document a run will read, validated in one streaming pass before training.

:func:`check_data` reads each file the train and validation splits use once, front to back, and
applies the same per-record rules as the lazy reader (:mod:`ttt_jax.data.records`): a text
document is valid UTF-8 (streamed through an incremental decoder, so memory stays bounded); a JSONL
line parses and has the string ``field``; a Parquet ``column`` value is a non-null string. Time is
linear in the bytes read; a tqdm bar counts them. Nothing is tokenized.

With ``data.on_error=raise`` the first malformed record raises ``ValueError`` naming the file and
line (or row), before any compute; with ``skip`` the malformed records are counted and one warning
names the first. The stdlib corpus is not checked: its decoding cannot fail. ``data.check=false``
skips the pass (records are then still checked as they are read).
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import numpy as np

from ttt_jax.data.records import (DataWarning, Malformed, first_utf8_error, parquet_value, parse_jsonl,
                                  pyarrow_parquet)
from ttt_jax.data.sources import Corpus, corpus_from_config

__all__ = ["DataCheck", "check_data", "check_corpora"]


@dataclasses.dataclass
class DataCheck:
    """What :func:`check_data` read: files, documents, bytes, malformed records (the first one)."""

    files: int = 0
    documents: int = 0
    bytes: int = 0
    malformed: int = 0
    first_malformed: Optional[str] = None
    seconds: float = 0.0

    def summary(self) -> str:
        bad = ("no malformed record" if not self.malformed else
               f"{self.malformed} malformed record(s) skipped (first: {self.first_malformed})")
        return (f"data check: {self.files} file(s), {self.documents:,} document(s), "
                f"{_size(self.bytes)} read in {self.seconds:.1f} s; {bad}")


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


def check_data(cfg: Any, *, progress: bool = True, log: Optional[Callable[[str], None]] = None) -> DataCheck:
    """Check every record the train and validation splits of a ``DataConfig`` use.

    Raises ``ValueError`` ("file:line N: reason ...") for the first malformed record when
    ``cfg.on_error == "raise"``; otherwise counts them and warns once. ``log`` gets a one-line
    summary.
    """
    corpora = [corpus_from_config(cfg, split) for split in ("train", "validation")]
    result = check_corpora(corpora, on_error=cfg.on_error, progress=progress)
    if log is not None and corpora[0].source != "stdlib":
        log(result.summary())
    return result


def check_corpora(corpora: list[Corpus], *, on_error: str = "raise", progress: bool = True) -> DataCheck:
    """:func:`check_data` on opened corpora of one source (the same file list)."""
    t0 = time.perf_counter()
    out = DataCheck()
    first = corpora[0]
    if first.source == "stdlib":
        out.seconds = time.perf_counter() - t0
        return out
    # The documents of all splits, by file, in file order (a document is listed once).
    cols = [np.concatenate([getattr(c, a) for c in corpora])
            for a in ("doc_file", "doc_start", "doc_record", "doc_end")]
    table = np.stack(cols, axis=1)[np.lexsort(cols[::-1])]
    if table.shape[0] > 1:
        table = table[np.concatenate([[True], np.any(table[1:] != table[:-1], axis=1)])]
    groups = np.split(table, np.flatnonzero(np.diff(table[:, 0])) + 1) if table.shape[0] else []
    total = sum(_planned_bytes(first, g) for g in groups)

    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc="check data", unit="B", unit_scale=True, unit_divisor=1024,
               disable=not progress, leave=False)
    try:
        for g in groups:
            path = first.files[int(g[0, 0])]
            out.files += 1
            out.documents += g.shape[0]
            for where, reason in _file_errors(first, path, g, bar.update):
                if on_error == "raise":
                    raise ValueError(f"{where}: {reason} (set data.on_error=skip to drop malformed "
                                     "records)")
                out.malformed += 1
                if out.first_malformed is None:
                    out.first_malformed = f"{where}: {reason}"
    finally:
        bar.close()
    out.bytes = total
    out.seconds = time.perf_counter() - t0
    if out.malformed:
        warnings.warn(f"data check: {out.malformed} malformed record(s) will be skipped "
                      f"(data.on_error=skip); the first: {out.first_malformed}", DataWarning, stacklevel=3)
    return out


def _planned_bytes(corpus: Corpus, g: np.ndarray) -> int:
    if corpus.source == "parquet":
        try:
            return corpus.files[int(g[0, 0])].stat().st_size
        except OSError:
            return 0
    return int((g[:, 3] - g[:, 1]).sum())


def _file_errors(corpus: Corpus, path: Path, g: np.ndarray, advance: Callable[[int], Any]
                 ) -> Iterator[tuple[str, str]]:
    """``(where, reason)`` of each malformed record among documents ``g`` (rows of file, start,
    record, end) of one file."""
    if corpus.source == "parquet":
        yield from _parquet_errors(path, corpus.column, g[:, 2], advance)
        return
    try:
        fh = open(path, "rb")
    except OSError as e:
        yield str(path), f"cannot read file: {e}"
        return
    with fh:
        if corpus.source == "text":
            for _, start, _, end in g:
                bad = first_utf8_error(fh, int(start), int(end), on_bytes=advance)
                if bad is not None:
                    yield f"{path}:line {_line_of(fh, bad)}", f"invalid UTF-8 at byte {bad}"
        else:
            yield from _jsonl_errors(fh, path, corpus.field, g, advance)


def _line_of(fh, offset: int) -> int:
    """1-based line number of byte ``offset`` of an open file."""
    fh.seek(0)
    lines, pos = 1, 0
    while pos < offset:
        block = fh.read(min(1 << 24, offset - pos))
        if not block:
            break
        lines += block.count(b"\n")
        pos += len(block)
    return lines


def _jsonl_errors(fh, path: Path, field: str, g: np.ndarray, advance) -> Iterator[tuple[str, str]]:
    used = np.zeros(int(g[:, 2].max()) + 1, bool)
    used[g[:, 2]] = True
    pending = 0
    for line, raw in enumerate(fh):  # binary mode: split at b"\n" only, as the index is
        pending += len(raw)
        if pending >= 1 << 20:
            advance(pending)
            pending = 0
        if line >= used.shape[0]:
            break
        if not used[line]:
            continue
        try:
            parse_jsonl(raw[:-1] if raw.endswith(b"\n") else raw, field)
        except Malformed as e:
            yield f"{path}:line {line + 1}", str(e)
    advance(pending)


def _parquet_errors(path: Path, column: str, rows: np.ndarray, advance) -> Iterator[tuple[str, str]]:
    pq = pyarrow_parquet()
    used = np.zeros(int(rows.max()) + 1, bool)
    used[rows] = True
    try:  # pyarrow raises several exception types for corrupt files
        pf = pq.ParquetFile(path)
        size, n_rows = path.stat().st_size, max(int(pf.metadata.num_rows), 1)
        batches = pf.iter_batches(columns=[column], batch_size=1 << 16)
    except Exception as e:
        yield str(path), f"unreadable Parquet file: {e}"
        return
    offset = 0
    while True:
        try:
            batch = next(batches, None)
        except Exception as e:
            yield f"{path}:row {offset}", f"unreadable Parquet file: {e}"
            return
        if batch is None:
            return
        arr = batch.column(0)
        n = len(arr)
        mine = np.zeros(n, bool)
        part = used[offset:offset + n]
        mine[:part.shape[0]] = part
        # Only nulls can be bad unless pyarrow's own check finds invalid UTF-8 (rare: then every
        # row of the batch is decoded to find which).
        bad = arr.is_null().to_numpy(zero_copy_only=False) if _all_valid(arr) else np.ones(n, bool)
        for i in np.flatnonzero(bad & mine):
            try:
                parquet_value(arr[int(i)].as_py(), column)
            except UnicodeDecodeError as e:
                yield f"{path}:row {offset + int(i)}", f"invalid UTF-8 at byte {e.start}"
            except Malformed as e:
                yield f"{path}:row {offset + int(i)}", str(e)
        advance(size * n // n_rows)
        offset += n


def _all_valid(arr) -> bool:
    """Every non-null value of a string/binary column decodes as UTF-8 (fast path: pyarrow's check)."""
    import pyarrow as pa

    if pa.types.is_binary(arr.type) or pa.types.is_large_binary(arr.type):
        try:
            arr.cast(pa.large_string())  # validates UTF-8
            return True
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            return False
    try:
        arr.validate(full=True)
        return True
    except pa.ArrowInvalid:
        return False
