"""Packing tokenized documents into fixed-length rows with segment ids.

Each document is tokenized as ``[bos] + encode(text) + [eos]`` (:func:`document_tokens`) and the
token sequences are packed greedily, in order, into rows of ``seq_len`` tokens. A row (and a batch,
stacking rows) is a dict of numpy arrays, all ``[..., seq_len]``:

==============  =======  ==========================================================================
``inputs``      int32    token ids; ``pad_id`` where the row is empty
``targets``     int32    the next token of the *same* document; ``pad_id`` where there is none
``loss_mask``   float32  1.0 where ``targets`` is a real next token of the same document, else 0.0
``segment_ids`` int32    1, 2, 3, ... for the document pieces of the row, left to right; 0 = padding
``positions``   int32    position within the document piece, starting at 0
==============  =======  ==========================================================================

Policy: **split across rows**. The row is filled to the end; a document that does not fit is cut,
and its remainder starts the next row (and may span many rows). No token is dropped and no row is
padded except the last one of a finite stream (and the alignment gaps below). A piece holding
tokens ``doc[i:i+m]`` has targets ``doc[i+1:i+m+1]``: its last token still predicts the document's
next token when there is one (the first token of the next piece is therefore both a target and an
input); only a document's final token (its ``eos``) has ``loss_mask`` 0.

``chunk_align=C`` (the TTT chunk size; ``seq_len`` must be a multiple of it) starts every piece at
a multiple of ``C`` within its row; the gap before it is padding (segment id 0, loss mask 0). Then
In-Place TTT on a packed row equals TTT on each document separately (DESIGN.md section 1).

Guarantees (tested): every token of every document appears exactly once as an input, in order; a
piece occupies one contiguous run of one segment id; different pieces of a row have different ids.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

import numpy as np

__all__ = ["FIELDS", "document_tokens", "pack_documents", "iter_packed_rows", "RowPacker",
           "empty_rows"]

FIELDS = ("inputs", "targets", "loss_mask", "segment_ids", "positions")


def document_tokens(tokenizer: Any, text: str) -> np.ndarray:
    """``[bos] + encode(text) + [eos]`` as a ``[n + 2]`` int32 array.

    Uses ``tokenizer.encode_array`` when present (vectorised), else ``tokenizer.encode``.
    """
    enc = getattr(tokenizer, "encode_array", None)
    body = enc(text) if enc is not None else np.asarray(tokenizer.encode(text), dtype=np.int64)
    out = np.empty(len(body) + 2, dtype=np.int32)
    out[0] = tokenizer.bos_id
    out[1:-1] = body
    out[-1] = tokenizer.eos_id
    return out


def empty_rows(n_rows: int, seq_len: int, pad_id: int = 0) -> dict[str, np.ndarray]:
    """``n_rows`` all-padding rows: every field ``[n_rows, seq_len]``, loss mask 0."""
    return {
        "inputs": np.full((n_rows, seq_len), pad_id, np.int32),
        "targets": np.full((n_rows, seq_len), pad_id, np.int32),
        "loss_mask": np.zeros((n_rows, seq_len), np.float32),
        "segment_ids": np.zeros((n_rows, seq_len), np.int32),
        "positions": np.zeros((n_rows, seq_len), np.int32),
    }


def _check_args(seq_len: int, chunk_align: Optional[int]) -> None:
    if not isinstance(seq_len, (int, np.integer)) or seq_len < 2:
        raise ValueError(f"seq_len={seq_len!r}: expected an integer >= 2")
    if chunk_align is not None:
        if not isinstance(chunk_align, (int, np.integer)) or chunk_align < 1:
            raise ValueError(f"chunk_align={chunk_align!r}: expected null or an integer >= 1")
        if seq_len % chunk_align:
            raise ValueError(f"chunk_align={chunk_align} needs seq_len ({seq_len}) to be a multiple of "
                             "it so every document piece can start on a chunk boundary")


class RowPacker:
    """Stateful greedy packer over an indexed document stream.

    ``fetch(k)`` returns document ``k`` of the stream as a 1-D int array (``[bos, ..., eos]``), an
    empty array for a document to skip, or ``None`` past the end of a finite stream. A *cursor*
    ``(k, offset)`` is the first token not yet packed: token ``offset`` of document ``k``. Rows depend
    only on the cursor they start from, so packing resumes exactly from a saved cursor.
    """

    def __init__(self, fetch: Callable[[int], Optional[np.ndarray]], seq_len: int, *,
                 pad_id: int = 0, chunk_align: Optional[int] = None, max_empty: Optional[int] = None):
        _check_args(seq_len, chunk_align)
        self.fetch = fetch
        self.seq_len = int(seq_len)
        self.pad_id = int(pad_id)
        self.align = int(chunk_align) if chunk_align else 1
        self.max_empty = max_empty
        self._cached: tuple[int, Optional[np.ndarray]] = (-1, None)

    def _doc(self, k: int) -> Optional[np.ndarray]:
        if self._cached[0] != k:
            doc = self.fetch(k)
            self._cached = (k, None if doc is None else np.asarray(doc).reshape(-1))
        return self._cached[1]

    def pack(self, cursor: tuple[int, int], max_rows: int) -> tuple[dict[str, np.ndarray], tuple[int, int], bool]:
        """Pack up to ``max_rows`` rows starting at ``cursor``.

        Returns ``(rows, cursor_after, exhausted)``: ``rows`` is a dict of ``[r, seq_len]`` arrays
        (``r <= max_rows``; ``r < max_rows`` only when the stream ended, and then the last row may be
        partly padding); ``exhausted`` is true when ``fetch`` returned ``None``.
        """
        L, A = self.seq_len, self.align
        rows = empty_rows(max_rows, L, self.pad_id)
        inputs, targets, mask = rows["inputs"], rows["targets"], rows["loss_mask"]
        seg, pos = rows["segment_ids"], rows["positions"]
        ramp = np.arange(L, dtype=np.int32)
        k, off = int(cursor[0]), int(cursor[1])
        r = c = s = 0  # row, column, last segment id in the row
        exhausted = False
        empty_run = 0
        while r < max_rows:
            doc = self._doc(k)
            if doc is None:
                exhausted = True
                break
            n = doc.shape[0]
            if off >= n:  # document finished (or empty): next one
                empty_run = empty_run + 1 if n == 0 else 0
                if self.max_empty is not None and empty_run > self.max_empty:
                    raise ValueError(f"{empty_run} consecutive documents produced no tokens; the "
                                     "split has no usable documents (all skipped or empty?)")
                k, off = k + 1, 0
                continue
            if c % A:
                c += A - c % A
            if c >= L:
                r, c, s = r + 1, 0, 0
                continue
            m = min(n - off, L - c)
            s += 1
            inputs[r, c:c + m] = doc[off:off + m]
            tgt = doc[off + 1:off + m + 1]
            targets[r, c:c + tgt.shape[0]] = tgt
            mask[r, c:c + tgt.shape[0]] = 1.0
            seg[r, c:c + m] = s
            pos[r, c:c + m] = ramp[:m]
            c += m
            off += m
            if c >= L:
                r, c, s = r + 1, 0, 0
        if exhausted and c > 0:
            r += 1
        doc = self._cached[1] if self._cached[0] == k else None
        if doc is not None and off >= doc.shape[0]:
            k, off = k + 1, 0
        return {name: a[:r] for name, a in rows.items()}, (k, off), exhausted


def iter_packed_rows(docs: Iterable[Sequence[int] | np.ndarray], seq_len: int, *, pad_id: int = 0,
                     chunk_align: Optional[int] = None, block_rows: int = 256) -> Iterator[dict[str, np.ndarray]]:
    """Lazily pack an iterable of token sequences; yields rows (dict of ``[seq_len]`` arrays).

    Each element of ``docs`` is one complete document's tokens (typically :func:`document_tokens`,
    i.e. already wrapped in bos/eos). The last row is padded. Works on any (even infinite) iterator.
    """
    it = iter(docs)
    pulled = [0]

    def fetch(k: int) -> Optional[np.ndarray]:
        if k != pulled[0]:  # RowPacker caches the current document, so it never re-fetches
            raise RuntimeError(f"iter_packed_rows: document {k} requested out of order")
        pulled[0] += 1
        nxt = next(it, None)
        return None if nxt is None else np.asarray(nxt, dtype=np.int64).reshape(-1)

    packer = RowPacker(fetch, seq_len, pad_id=pad_id, chunk_align=chunk_align)
    cursor = (0, 0)
    while True:
        rows, cursor, exhausted = packer.pack(cursor, block_rows)
        for i in range(rows["inputs"].shape[0]):
            yield {name: a[i] for name, a in rows.items()}
        if exhausted:
            return


def pack_documents(docs: Iterable[Sequence[int] | np.ndarray], seq_len: int, *, pad_id: int = 0,
                   chunk_align: Optional[int] = None) -> dict[str, np.ndarray]:
    """Pack a finite list/iterator of token sequences into rows, usable without grain.

    Args:
      docs: token sequences, one per document, each already ``[bos, ..., eos]``
        (see :func:`document_tokens`); empty ones are skipped.
      seq_len: row length ``L``.
      pad_id: id written where a row has no token / no target.
      chunk_align: if set, every document piece starts at a multiple of it within its row.

    Returns:
      dict of ``[n_rows, L]`` arrays (see the module docstring); ``n_rows = 0`` for no tokens.
    """
    rows = list(iter_packed_rows(docs, seq_len, pad_id=pad_id, chunk_align=chunk_align))
    if not rows:
        return empty_rows(0, seq_len, pad_id)
    return {name: np.stack([row[name] for row in rows]) for name in FIELDS}
