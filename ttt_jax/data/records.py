"""One record of a source: decoding and parsing, and where long text files are cut into documents.

Shared by the lazy reader (:mod:`ttt_jax.data.sources`) and the up-front check
(:mod:`ttt_jax.data.check`), so the two accept and reject exactly the same records.

* Text: a file is UTF-8. A file longer than :data:`TEXT_PIECE_BYTES` is cut into documents of about
  that size (:func:`text_pieces`), each cut just after a line end (or, in a line longer than 4 KiB,
  at a character boundary). A long file is then read and tokenized piece by piece, and the
  train/validation split can put part of it in each split.
* JSONL: a line is a JSON object whose ``field`` is a string; blank lines are no documents.
* Parquet: a value of the ``column`` is a non-null string (or UTF-8 bytes).

A malformed record raises :class:`Malformed` with a message that does not yet name the file (the
caller knows where the record is).
"""

from __future__ import annotations

import codecs
import io
import json
import math
import tokenize
from pathlib import Path
from typing import Any, BinaryIO, Optional

import numpy as np

__all__ = ["Malformed", "TEXT_PIECE_BYTES", "decode_utf8", "decode_python", "parse_jsonl",
           "parquet_value", "pyarrow_parquet", "text_pieces", "carve_point", "first_utf8_error"]

# 1 MiB: about 1M tokens of the byte tokenizer or 250k of a BPE one, longer than a training row, so
# cutting at it rarely cuts a row's context; small enough that a long file is read piecewise.
TEXT_PIECE_BYTES = 1 << 20
_CUT_WINDOW = 4096  # bytes searched for a line end after a nominal cut


class Malformed(ValueError):
    """A record that cannot be a document (bad encoding or format); the message names no file."""


class DataWarning(UserWarning):
    """Records were skipped (``data.on_error=skip``) or a file could not be read; the command line
    prints it as one ``warning: ...`` line."""


def decode_utf8(raw: bytes, offset: int = 0) -> str:
    """``raw`` as UTF-8; :class:`Malformed` names the first bad byte (``offset`` + its index)."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise Malformed(f"invalid UTF-8 at byte {offset + e.start}") from None


def decode_python(raw: bytes) -> str:
    """A Python source file: UTF-8, else its PEP 263 coding, else UTF-8 with U+FFFD; never fails."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        pass
    try:
        encoding, _ = tokenize.detect_encoding(io.BytesIO(raw).readline)
        return raw.decode(encoding)
    except (SyntaxError, LookupError, UnicodeDecodeError):
        return raw.decode("utf-8", errors="replace")


def _json_error(e: json.JSONDecodeError) -> str:
    # Some messages end in "at" ("Unterminated string starting at"); the column completes them.
    return f"invalid JSON ({e.msg}{'' if e.msg.endswith(' at') else ' at'} column {e.colno})"


def parse_jsonl(raw: bytes, field: str) -> Optional[str]:
    """The document of one JSONL line (without its ``\\n``): ``obj[field]``; ``None`` when blank."""
    text = decode_utf8(raw)
    if not text.strip():
        return None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise Malformed(_json_error(e)) from None
    if not isinstance(obj, dict):
        raise Malformed(f"expected a JSON object, got {type(obj).__name__}")
    if field not in obj:
        raise Malformed(f"missing field {field!r} (keys: {sorted(obj)[:10]}); set data.field")
    value = obj[field]
    if not isinstance(value, str):
        raise Malformed(f"field {field!r} is {type(value).__name__}, expected a string")
    return value


def parquet_value(value: Any, column: str) -> str:
    """A Parquet cell (``as_py()``) as a document."""
    if value is None:
        raise Malformed(f"column {column!r} is null")
    if isinstance(value, bytes):
        value = decode_utf8(value)
    if not isinstance(value, str):
        raise Malformed(f"column {column!r} holds {type(value).__name__}, expected a string")
    return value


def pyarrow_parquet():
    """``pyarrow.parquet``, or an ImportError saying how to install it."""
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise ImportError("data.source=parquet needs pyarrow: pip install pyarrow "
                          "(or pip install ttt-jax[dev])") from e
    return pq


def first_utf8_error(fh: BinaryIO, start: int, end: int, *, chunk: int = 1 << 24,
                     on_bytes=None) -> Optional[int]:
    """Stream bytes ``[start, end)`` of an open file through a UTF-8 decoder (``chunk`` at a time,
    memory bounded): the absolute offset of the first invalid byte, or ``None``. ``on_bytes(n)`` is
    called as bytes are consumed (progress)."""
    fh.seek(start)
    pos, pending = start, b""
    while pos < end:
        data = fh.read(min(chunk, end - pos))
        if not data:
            break
        pos += len(data)
        buf = pending + data
        try:
            _, used = codecs.utf_8_decode(buf, "strict", pos >= end)
        except UnicodeDecodeError as e:
            return pos - len(buf) + e.start
        pending = buf[used:]
        if on_bytes is not None:
            on_bytes(len(data))
    if pending:  # the file ended (shorter than `end`) inside a character
        try:
            codecs.utf_8_decode(pending, "strict", True)
        except UnicodeDecodeError as e:
            return pos - len(pending) + e.start
    return None


def _cut(fh: BinaryIO, pos: int, lo: int, hi: int) -> int:
    """A cut ``c`` with ``lo < c < hi`` near ``lo < pos < hi``: just after the first line end at or
    after ``pos - 1`` (searched ``_CUT_WINDOW`` bytes), else the character boundary at or before
    ``pos`` (UTF-8 continuation bytes are stepped over)."""
    base = max(lo, pos - 4)  # up to 3 continuation bytes before pos
    fh.seek(base)
    buf = fh.read(min(_CUT_WINDOW + 4, hi - base))
    j = buf.find(b"\n", pos - 1 - base)
    if j >= 0 and lo < base + j + 1 < hi:
        return base + j + 1
    k = pos - base
    while 0 < k < len(buf) and 0x80 <= buf[k] < 0xC0 and base + k - 1 > lo:
        k -= 1
    return base + k


def text_pieces(path: Path, size: int, piece_bytes: Optional[int] = None) -> tuple[np.ndarray, np.ndarray]:
    """Byte ranges ``(starts, ends)``, each ``[n]`` int64, of the documents of a text file of
    ``size`` bytes: one ``[0, size)`` unless the file is longer than ``piece_bytes`` (default
    :data:`TEXT_PIECE_BYTES`)."""
    piece_bytes = TEXT_PIECE_BYTES if piece_bytes is None else piece_bytes
    if size <= piece_bytes:
        return np.zeros(1, np.int64), np.array([size], np.int64)
    assert piece_bytes > _CUT_WINDOW  # so every cut lies before the next nominal one
    cuts = [0]
    with open(path, "rb") as fh:
        for nominal in range(piece_bytes, size, piece_bytes):
            cuts.append(_cut(fh, nominal, cuts[-1], size))
    cuts.append(size)
    return np.asarray(cuts[:-1], np.int64), np.asarray(cuts[1:], np.int64)


def carve_point(path: Path, start: int, end: int, fraction: float) -> Optional[int]:
    """Where to cut the last ``fraction`` off the text document ``[start, end)`` of ``path`` (at a
    line end when one is near): ``start < cut < end``, or ``None`` when the document is too short."""
    if end - start < 2:
        return None
    pos = max(start + 1, end - max(1, math.ceil(fraction * (end - start))))
    with open(path, "rb") as fh:
        return _cut(fh, pos, start, end)
