"""Document sources: the embedded stdlib corpus, text files, JSON Lines and Parquet.

A source is opened as a :class:`Corpus`: a random-access, lazily read list of the documents of one
split. Opening only lists files (and, for JSONL, indexes line offsets; for Parquet, reads row
counts), so it is fast; a document's text is read when it is asked for.

Sources (``data.source``):

* ``stdlib`` — the running Python's standard-library sources: every ``*.py`` under
  ``sysconfig.get_paths()["stdlib"]`` (recursively; ``site-packages``, ``dist-packages`` and
  ``__pycache__`` excluded), sorted by relative path, one document per file (~1800 files, ~30 MB on
  CPython 3.11). Files are decoded as UTF-8, else with their PEP 263 coding, else with U+FFFD
  replacement, so the default corpus never errors.
* ``text`` — ``paths``: files, directories or globs; one document per file, except that a file
  longer than 1 MiB is cut at line ends into documents of about 1 MiB (``records.text_pieces``; its
  record index is the piece's). A listed file is always used. A directory (or a directory matched by a glob) contributes, recursively, every regular file
  with no hidden component (``.git``, ``.cache``, ``.DS_Store``...) that does not look binary (no NUL
  byte in its first 8 KiB, git's heuristic). A file that is then not valid UTF-8 is a malformed record.
* ``jsonl`` — one JSON object per line; the document is ``obj[field]`` (a string). Blank lines are
  ignored. Directories contribute ``*.jsonl`` / ``*.ndjson`` files.
* ``parquet`` — the string ``column`` of every row (needs ``pyarrow``). Directories contribute
  ``*.parquet`` files. A file's column is loaded into memory the first time one of its rows is read.

Train/validation split: each document has a machine-independent key — the file's path relative to
the directory or glob root it was found under (its base name when listed directly; for ``stdlib``
the path relative to the stdlib root) plus the record's index in the file — and is in
``validation`` iff ``hash(key) / 2**64 < validation_fraction`` (sha1 of the file key, mixed with the
record index by splitmix64). The split is the same on every machine and does not change when other
files are added. When the hash puts no document in ``validation`` (a corpus of a few documents, e.g.
one text file), validation is carved from the end of the corpus instead: the last
``validation_fraction`` of the last document's bytes for ``text`` (cut at a line end when one is
near), the whole last document for the other sources (when there are at least two); train keeps
the rest. ``max_documents`` then keeps the first ``max_documents`` documents of the split.

Malformed records (invalid UTF-8, invalid JSON, a line that is not an object, a missing or
non-string field, a null Parquet value, an unreadable Parquet file) raise ``ValueError`` naming the
file and line/row when ``on_error="raise"`` (default); with ``on_error="skip"`` they are dropped,
counted in :attr:`Corpus.skipped`, and reported with a :class:`DataWarning` (a ``UserWarning``).
:mod:`ttt_jax.data.check` finds them all in one pass before training.
"""

from __future__ import annotations

import dataclasses
import hashlib
import warnings
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import numpy as np

from ttt_jax.data.discovery import expand_paths as _expand
from ttt_jax.data.discovery import stdlib_root
from ttt_jax.data.discovery import walk as _walk
from ttt_jax.data.records import (DataWarning, Malformed, carve_point, decode_python, decode_utf8,
                                  parquet_value, parse_jsonl, pyarrow_parquet, text_pieces)

__all__ = ["Corpus", "DataWarning", "open_corpus", "read_documents", "stdlib_root", "SOURCES", "SPLITS"]

SOURCES = ("stdlib", "text", "jsonl", "parquet")
SPLITS = ("train", "validation", "all")
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


# --------------------------------------------------------------------------------------------------
# Split hashing
# --------------------------------------------------------------------------------------------------


def _splitmix64(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.uint64)
    x = x + _GOLDEN
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _split_unit(key: str, records: np.ndarray) -> np.ndarray:
    """Uniform [0, 1) values, one per record of the file with key ``key``: [n] float64."""
    base = np.uint64(int.from_bytes(hashlib.sha1(key.encode("utf-8")).digest()[:8], "little"))
    with np.errstate(over="ignore"):
        h = _splitmix64(base + records.astype(np.uint64) * _GOLDEN)
    return (h >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


# --------------------------------------------------------------------------------------------------
# Per-format indexing and reading
# --------------------------------------------------------------------------------------------------


def _index_jsonl(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Non-empty lines of a JSONL file: (line index 0-based, byte start, byte end), each [n] int64."""
    newlines = []
    pos = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            newlines.append(np.flatnonzero(np.frombuffer(chunk, dtype=np.uint8) == 10) + pos)
            pos += len(chunk)
    nl = np.concatenate(newlines) if newlines else np.zeros(0, np.int64)
    starts = np.concatenate([[0], nl + 1]).astype(np.int64)
    ends = np.concatenate([nl, [pos]]).astype(np.int64)
    keep = ends > starts
    return np.flatnonzero(keep).astype(np.int64), starts[keep], ends[keep]


# --------------------------------------------------------------------------------------------------
# Corpus
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Corpus:
    """The documents of one split of one source, read lazily.

    ``len(corpus)`` documents; ``corpus.text(i)`` is document ``i`` (``None`` when it is a skipped
    malformed record or a blank JSONL line); ``corpus.where(i)`` names its file and line/row.
    Arrays ``doc_file``, ``doc_record``, ``doc_start``, ``doc_end`` are ``[len]`` int64 locators.
    """

    source: str
    split: str
    files: list[Path]
    keys: list[str]
    doc_file: np.ndarray
    doc_record: np.ndarray
    doc_start: np.ndarray
    doc_end: np.ndarray
    field: str = "text"
    column: str = "text"
    on_error: str = "raise"
    skipped: int = 0
    _columns: dict = dataclasses.field(default_factory=dict, repr=False)
    _warned: bool = dataclasses.field(default=False, repr=False)

    def __len__(self) -> int:
        return int(self.doc_file.shape[0])

    def where(self, i: int) -> str:
        """``"path:line N"`` (JSONL, 1-based), ``"path:row N"`` (Parquet, 0-based) or ``"path"``."""
        path = self.files[int(self.doc_file[i])]
        rec = int(self.doc_record[i])
        if self.source == "jsonl":
            return f"{path}:line {rec + 1}"
        if self.source == "parquet":
            return f"{path}:row {rec}"
        return str(path)

    def text(self, i: int) -> Optional[str]:
        """Document ``i`` as a string (``None``: skipped malformed record or blank line)."""
        if not 0 <= i < len(self):
            raise IndexError(f"document {i} out of range for a corpus of {len(self)} documents")
        try:
            return self._read(i)
        except Malformed as e:
            if self.on_error == "raise":
                raise ValueError(f"{self.where(i)}: {e} (set data.on_error=skip to drop malformed "
                                 "records)") from None
            self.skipped += 1
            if not self._warned:
                self._warned = True
                warnings.warn(f"skipping malformed record {self.where(i)}: {e} (further skips are "
                              "counted in Corpus.skipped)", DataWarning, stacklevel=2)
            return None

    def __iter__(self) -> Iterator[str]:
        """All documents in order, skipped ones left out."""
        for i in range(len(self)):
            t = self.text(i)
            if t is not None:
                yield t

    def _read(self, i: int) -> Optional[str]:
        f = int(self.doc_file[i])
        if self.source == "parquet":
            return self._parquet_value(f, int(self.doc_record[i]))
        start, end = int(self.doc_start[i]), int(self.doc_end[i])
        try:
            with open(self.files[f], "rb") as fh:
                if self.source == "stdlib":
                    raw = fh.read()
                else:
                    fh.seek(start)
                    raw = fh.read(end - start)
        except OSError as e:
            raise Malformed(f"cannot read file: {e}") from None
        if self.source == "stdlib":
            return decode_python(raw)
        if self.source == "text":
            return decode_utf8(raw, start)
        return parse_jsonl(raw, self.field)

    def _parquet_value(self, f: int, row: int) -> str:
        col = self._columns.get(f)
        if col is None:
            pq = pyarrow_parquet()
            try:
                table = pq.read_table(self.files[f], columns=[self.column], memory_map=True)
                col = table.column(self.column).combine_chunks()
            except Exception as e:  # pyarrow raises several exception types for corrupt files
                col = e
            self._columns[f] = col
        if isinstance(col, Exception):
            raise Malformed(f"unreadable Parquet file: {col}")
        try:
            value = col[row].as_py()
        except UnicodeDecodeError as e:  # a string column holding invalid UTF-8
            raise Malformed(f"invalid UTF-8 at byte {e.start}") from None
        return parquet_value(value, self.column)

    def describe(self) -> dict[str, Any]:
        """Cheap summary (no document is read): source, split, files, documents, skipped so far."""
        return {"source": self.source, "split": self.split, "files": len(self.files),
                "documents": len(self), "skipped": self.skipped}


def _parquet_rows(files: list[Path], column: str, on_error: str) -> tuple[list[int], int]:
    pq = pyarrow_parquet()
    rows, bad = [], 0
    for path in files:
        try:  # pyarrow raises ArrowInvalid (a ValueError), OSError, ... for corrupt files
            pf = pq.ParquetFile(path)
            schema, num_rows = pf.schema_arrow, int(pf.metadata.num_rows)
        except Exception as e:
            if on_error == "raise":
                raise ValueError(f"{path}: unreadable Parquet file ({e}) (set data.on_error=skip to "
                                 "drop it)") from None
            warnings.warn(f"skipping unreadable Parquet file {path}: {e}", DataWarning, stacklevel=3)
            rows.append(0)
            bad += 1
            continue
        if column not in schema.names:
            raise ValueError(f"{path}: no column {column!r} (columns: {schema.names}); set data.column")
        ctype = str(schema.field(column).type)
        if ctype not in ("string", "large_string", "string_view", "binary", "large_binary"):
            raise ValueError(f"{path}: column {column!r} has type {ctype}, expected string")
        rows.append(num_rows)
    return rows, bad


def open_corpus(source: str = "stdlib", paths: Sequence[str] = (), *, split: str = "train",
                field: str = "text", column: str = "text", validation_fraction: float = 0.05,
                max_documents: Optional[int] = None, on_error: str = "raise") -> Corpus:
    """List the documents of ``split`` (``"train"``, ``"validation"`` or ``"all"``) of a source.

    Only metadata is read (file lists, JSONL line offsets, Parquet row counts); see the module
    docstring for the sources, the split rule and the error policy. Raises ``ValueError`` for an
    unknown source/split/policy, a path that does not exist and a glob or directory with no files.
    """
    if source not in SOURCES:
        raise ValueError(f"data.source={source!r}: expected one of {list(SOURCES)}")
    if split not in SPLITS:
        raise ValueError(f"split={split!r}: expected one of {list(SPLITS)}")
    if on_error not in ("raise", "skip"):
        raise ValueError(f"data.on_error={on_error!r}: expected 'raise' or 'skip'")
    if not 0.0 <= validation_fraction <= 1.0:
        raise ValueError(f"data.validation_fraction={validation_fraction!r}: expected a float in [0, 1]")
    if source == "stdlib":
        root = stdlib_root()
        found = _walk(root, "stdlib")
        files, keys = [p for p, _ in found], [r.as_posix() for _, r in found]
    else:
        if not paths:
            raise ValueError(f"data.paths is empty: data.source={source!r} needs at least one file, "
                             "directory or glob")
        files, keys = _expand(paths, source)

    skipped = 0
    parquet_rows: list[int] = []
    if source == "parquet":
        parquet_rows, skipped = _parquet_rows(files, column, on_error)
    doc_file, doc_record, doc_start, doc_end = [], [], [], []
    n_all = n_val = 0            # documents of the whole corpus / hashed into validation
    last = None                  # (file, record, start, end) of the corpus's last document
    complete = True              # every file was indexed (no early stop at max_documents)
    for f, (path, key) in enumerate(zip(files, keys)):
        if source == "jsonl":
            rec, start, end = _index_jsonl(path)
        elif source == "parquet":
            rec = np.arange(parquet_rows[f], dtype=np.int64)
            start = end = np.zeros_like(rec)
        elif source == "text":
            start, end = text_pieces(path, _file_size(path))
            rec = np.arange(start.shape[0], dtype=np.int64)
        else:  # stdlib: one whole file per document
            rec = start = end = np.zeros(1, np.int64)
        n_all += rec.shape[0]
        if rec.shape[0]:
            last = (f, int(rec[-1]), int(start[-1]), int(end[-1]))
        if split != "all":
            is_val = _split_unit(key, rec) < validation_fraction
            n_val += int(is_val.sum())
            keep = is_val if split == "validation" else ~is_val
            rec, start, end = rec[keep], start[keep], end[keep]
        doc_file.append(np.full(rec.shape, f, np.int64))
        doc_record.append(rec)
        doc_start.append(start)
        doc_end.append(end)
        if max_documents is not None and sum(len(r) for r in doc_record) >= max_documents:
            complete = f == len(files) - 1
            break

    if split != "all" and complete and n_val == 0 and validation_fraction > 0 and last is not None:
        # Too few documents for the hash to pick any: validation is carved from the end of the
        # corpus (all of whose documents are now in train, the last one appended last).
        f, r, s, e = last
        cut = carve_point(files[f], s, e, validation_fraction) if source == "text" else None
        if cut is not None or n_all >= 2:
            if split == "validation":
                doc_file, doc_record = [np.array([f], np.int64)], [np.array([r], np.int64)]
                doc_start = [np.array([s if cut is None else cut], np.int64)]
                doc_end = [np.array([e], np.int64)]
            elif cut is None:  # part f holds file f's documents
                doc_file[f], doc_record[f] = doc_file[f][:-1], doc_record[f][:-1]
                doc_start[f], doc_end[f] = doc_start[f][:-1], doc_end[f][:-1]
            else:
                doc_end[f] = doc_end[f].copy()
                doc_end[f][-1] = cut

    def cat(parts: list[np.ndarray]) -> np.ndarray:
        out = np.concatenate(parts) if parts else np.zeros(0, np.int64)
        return out[:max_documents] if max_documents is not None else out

    return Corpus(source=source, split=split, files=files, keys=keys, doc_file=cat(doc_file),
                  doc_record=cat(doc_record), doc_start=cat(doc_start), doc_end=cat(doc_end),
                  field=field, column=column, on_error=on_error, skipped=skipped)


def _file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0  # the read reports it


def corpus_from_config(cfg: Any, split: str) -> Corpus:
    """:func:`open_corpus` with the fields of a :class:`ttt_jax.config.DataConfig`."""
    return open_corpus(cfg.source, cfg.paths, split=split, field=cfg.field, column=cfg.column,
                       validation_fraction=cfg.validation_fraction, max_documents=cfg.max_documents,
                       on_error=getattr(cfg, "on_error", "raise"))


def read_documents(source: str = "stdlib", paths: Sequence[str] = (), *, split: str = "train",
                   field: str = "text", column: str = "text", validation_fraction: float = 0.05,
                   max_documents: Optional[int] = None, on_error: str = "raise") -> Iterator[str]:
    """Yield the documents (``str``) of a split in a deterministic order.

    Same arguments as :func:`open_corpus`. With ``on_error="skip"``, a :class:`DataWarning` at the end
    reports how many malformed records were dropped.
    """
    corpus = open_corpus(source, paths, split=split, field=field, column=column,
                         validation_fraction=validation_fraction, max_documents=max_documents,
                         on_error=on_error)
    corpus._warned = True  # one summary warning below instead of the first-skip one
    for i in range(len(corpus)):
        text = corpus.text(i)
        if text is not None:
            yield text
    if corpus.skipped:
        warnings.warn(f"read_documents: skipped {corpus.skipped} malformed record(s) in "
                      f"{source} {split} split (on_error='skip')", DataWarning, stacklevel=2)
