"""grain pipelines: documents -> tokens -> packed rows -> batches, checkpointable and sharded.

::

    grain.MapDataset.range(n_docs)          document indices of the split (sorted order)
      .shuffle(seed)                        train + data.shuffle: a new permutation per epoch (seed + epoch;
                                            EpochShuffleMapDataset up to 4M documents)
      .repeat(None)                         train: infinite
      [process_index::process_count]        this process's disjoint share of the document stream
      .map(read + tokenize)                 [bos] + encode(text) + [eos], lazily, one document at a time
    PackedRowsDataset (grain.IterDataset)   greedy packing into [seq_len] rows (packing.py), in blocks
                                            of ``block_rows`` rows; train: rows shuffled within a block
      .batch(batch_size)                    dict of [batch_size, seq_len] arrays

The packer's state is the cursor ``(document, token offset)`` where the current block starts plus
the position in the block, so an iterator's state is a small JSON-serialisable dict, and a restored
iterator rebuilds its block deterministically and continues with exactly the batches an
uninterrupted one would give. Only the documents needed for the next block are read and tokenized;
startup only lists files (and indexes JSONL lines), ~0.2 s for the stdlib corpus.

``batch_size`` is the **per-process** batch: with ``process_count`` processes the global batch is
``batch_size * process_count``. Process ``p`` packs the documents at positions ``p, p + n, p + 2n,
...`` of the (per-epoch shuffled, repeated) document stream: each document of each epoch goes to
exactly one process.
"""

from __future__ import annotations

import atexit
import collections
import json
import time
import weakref
from typing import Any, Optional

import grain
import numpy as np

from ttt_jax.data.packing import FIELDS, RowPacker, document_tokens, empty_rows
from ttt_jax.data.sources import Corpus, corpus_from_config
from ttt_jax.data.tokenizer import load_tokenizer

__all__ = ["EpochShuffleMapDataset", "PackedRowsDataset", "BatchIterator", "make_batches", "validation_batches", "describe",
           "DEFAULT_BLOCK_ROWS"]

STATE_VERSION = 1
_LIVE_ITERATORS: "weakref.WeakSet[BatchIterator]" = weakref.WeakSet()
# Rows packed (and, for train, shuffled) together: 1024 x 512 tokens = 0.5M tokens, ~10 MB.
DEFAULT_BLOCK_ROWS = 1024


class _DocumentTokens:
    """Document index -> ``[n + 2]`` int32 tokens (empty for a skipped malformed record).

    Keeps the most recently used documents, up to ``cache_tokens`` tokens in all, so small corpora
    (``max_documents``, tests) are read and tokenized once rather than once per epoch.
    """

    def __init__(self, corpus: Corpus, tokenizer: Any, cache_tokens: int = 1 << 23):
        self.corpus = corpus
        self.tokenizer = tokenizer
        self.cache_tokens = cache_tokens
        self._cache: "collections.OrderedDict[int, np.ndarray]" = collections.OrderedDict()
        self._cached = 0

    def __call__(self, i: int) -> np.ndarray:
        i = int(i)
        hit = self._cache.get(i)
        if hit is not None:
            self._cache.move_to_end(i)
            return hit
        text = self.corpus.text(i)
        tokens = np.zeros(0, np.int32) if text is None else document_tokens(self.tokenizer, text)
        if tokens.shape[0] <= self.cache_tokens:
            self._cache[i] = tokens
            self._cached += tokens.shape[0]
            while self._cached > self.cache_tokens:
                self._cached -= self._cache.popitem(last=False)[1].shape[0]
        return tokens


class EpochShuffleMapDataset(grain.MapDataset):
    """Like ``MapDataset.shuffle``: index ``e * len + i`` of a repeated stream maps to element
    ``perm_e[i]`` of epoch ``e``, a new permutation per epoch seeded by ``seed + epoch``.

    The permutation is materialised (``np.random.default_rng(seed + epoch)``, 4 bytes per element,
    two epochs cached): grain's constant-memory ``index_shuffle`` costs milliseconds per index on
    small datasets (tests, ``max_documents``), so :func:`make_batches` uses it only above
    ``MATERIALISE_MAX`` elements.
    """

    MATERIALISE_MAX = 1 << 22

    def __init__(self, parent: grain.MapDataset, *, seed: int):
        super().__init__(parent)
        self._seed = int(seed)
        self._n = len(parent)
        self._perms: "collections.OrderedDict[int, np.ndarray]" = collections.OrderedDict()

    def __len__(self) -> int:
        return self._n

    def _perm(self, epoch: int) -> np.ndarray:
        perm = self._perms.get(epoch)
        if perm is None:
            perm = np.random.default_rng(self._seed + epoch).permutation(self._n).astype(np.int32)
            self._perms[epoch] = perm
            if len(self._perms) > 2:
                self._perms.popitem(last=False)
        return perm

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        epoch, i = divmod(int(index), self._n)
        return self._parent[int(self._perm(epoch)[i]) + epoch * self._n]

    def __str__(self) -> str:
        return f"EpochShuffleMapDataset(seed={self._seed})"


class PackedRowsDataset(grain.IterDataset):
    """Packs a ``grain.MapDataset`` of token arrays into rows (a dict of ``[seq_len]`` arrays).

    Args:
      docs: element ``k`` is the ``k``-th document of the stream, a 1-D int array ``[bos, ..., eos]``.
      seq_len: row length.
      pad_id: padding id for ``inputs`` / ``targets``.
      chunk_align: start every document piece at a multiple of this (see packing.py).
      block_rows: rows packed at a time; with ``shuffle_seed`` their order is permuted within the
        block (seeded by ``(shuffle_seed, block index)``), decorrelating consecutive rows of long
        documents.
      shuffle_seed: ``None`` keeps rows in packing order.
    """

    def __init__(self, docs: grain.MapDataset, seq_len: int, *, pad_id: int = 0,
                 chunk_align: Optional[int] = None, block_rows: int = DEFAULT_BLOCK_ROWS,
                 shuffle_seed: Optional[int] = None):
        super().__init__()
        if block_rows < 1:
            raise ValueError(f"block_rows={block_rows}: expected an integer >= 1")
        self.docs = docs
        self.seq_len = seq_len
        self.pad_id = pad_id
        self.chunk_align = chunk_align
        self.block_rows = block_rows
        self.shuffle_seed = shuffle_seed

    def __iter__(self) -> "_PackedRowsIterator":
        return _PackedRowsIterator(self)

    def __str__(self) -> str:
        return (f"PackedRowsDataset(seq_len={self.seq_len}, chunk_align={self.chunk_align}, "
                f"block_rows={self.block_rows}, shuffle_seed={self.shuffle_seed})")


class _PackedRowsIterator(grain.DatasetIterator):
    """State: ``{"doc", "offset"}`` = cursor at the start of block ``"block"``; ``"row"`` = rows of
    that block already returned."""

    def __init__(self, ds: PackedRowsDataset):
        super().__init__()
        self._ds = ds
        n_docs = len(ds.docs)

        def fetch(k: int) -> Optional[np.ndarray]:
            return ds.docs[k] if k < n_docs else None

        self._packer = RowPacker(fetch, ds.seq_len, pad_id=ds.pad_id, chunk_align=ds.chunk_align,
                                 max_empty=None if n_docs > 1 << 40 else n_docs)
        self._state = {"doc": 0, "offset": 0, "block": 0, "row": 0}
        self._block: Optional[tuple[dict[str, np.ndarray], np.ndarray, tuple[int, int], bool]] = None

    def _make_block(self) -> None:
        st = self._state
        rows, nxt, exhausted = self._packer.pack((st["doc"], st["offset"]), self._ds.block_rows)
        n = rows["inputs"].shape[0]
        if self._ds.shuffle_seed is None:
            order = np.arange(n)
        else:
            order = np.random.default_rng([self._ds.shuffle_seed, st["block"]]).permutation(n)
        self._block = (rows, order, nxt, exhausted)

    def __next__(self) -> dict[str, np.ndarray]:
        while True:
            if self._block is None:
                self._make_block()
            rows, order, nxt, exhausted = self._block
            st = self._state
            if st["row"] < order.shape[0]:
                i = order[st["row"]]
                st["row"] += 1
                return {name: rows[name][i] for name in FIELDS}
            if exhausted:
                raise StopIteration
            self._state = {"doc": nxt[0], "offset": nxt[1], "block": st["block"] + 1, "row": 0}
            self._block = None

    def get_state(self) -> dict[str, int]:
        return {k: int(v) for k, v in self._state.items()}

    def set_state(self, state: dict[str, Any]) -> None:
        self._state = {k: int(state[k]) for k in ("doc", "offset", "block", "row")}
        self._block = None


@atexit.register
def _close_live_iterators() -> None:
    # grain's prefetch iterators otherwise try to stop their threads during interpreter teardown.
    # Dropping the reference lets grain's __del__ run now, while modules are still alive.
    for it in list(_LIVE_ITERATORS):
        try:
            it.close()
            it._it = None
        except Exception:  # pragma: no cover - best effort at exit
            pass


def _resolve_processes(process_index: Optional[int], process_count: Optional[int]) -> tuple[int, int]:
    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not (isinstance(process_count, int) and process_count >= 1 and 0 <= process_index < process_count):
        raise ValueError(f"process_index={process_index}, process_count={process_count}: expected "
                         "0 <= process_index < process_count")
    return int(process_index), int(process_count)


def _stack_batch(rows: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {name: np.stack([r[name] for r in rows]) for name in FIELDS}


class BatchIterator:
    """Iterator of packed batches: ``next(it)`` is a dict of ``[batch_size, seq_len]`` numpy arrays
    (``inputs``/``targets``/``segment_ids``/``positions`` int32, ``loss_mask`` float32; packing.py).

    ``get_state()`` returns a JSON-serialisable dict; ``set_state(state)`` on an iterator built from
    the same data config continues with exactly the batches the saved one would have produced next.
    """

    def __init__(self, dataset: grain.IterDataset, corpus: Corpus, meta: dict[str, Any], *,
                 batch_size: int, seq_len: int, pad_id: int, finite: bool):
        self._dataset = dataset
        self._it = iter(dataset)
        self.corpus = corpus
        self.meta = meta
        self.batch_size = batch_size
        self.seq_len = seq_len
        self.pad_id = pad_id
        self.finite = finite
        self.batches = 0
        _LIVE_ITERATORS.add(self)

    def __iter__(self) -> "BatchIterator":
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        batch = next(self._it)
        n = batch["inputs"].shape[0]
        if n < self.batch_size:  # last batch of a finite split: pad with empty rows (loss mask 0)
            pad = empty_rows(self.batch_size - n, self.seq_len, self.pad_id)
            batch = {k: np.concatenate([batch[k], pad[k]]) for k in FIELDS}
        self.batches += 1
        return {k: batch[k] for k in FIELDS}

    def get_state(self) -> dict[str, Any]:
        """``{"version", "meta", "batches", "pipeline"}``; plain ints/strings/lists (JSON-safe)."""
        state = {"version": STATE_VERSION, "meta": self.meta, "batches": self.batches,
                 "pipeline": self._it.get_state()}
        return json.loads(json.dumps(state))  # a detached, JSON-clean copy

    def set_state(self, state: dict[str, Any], *, strict: bool = True) -> None:
        """Restore a :meth:`get_state` dict. With ``strict`` (default) the state must come from the same
        data config, split and process layout; otherwise ``ValueError`` names the differences."""
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            raise ValueError(f"not a ttt-jax data iterator state (version {STATE_VERSION}): "
                             f"{str(state)[:200]}")
        saved = state.get("meta", {})
        diff = {k: (saved.get(k), v) for k, v in self.meta.items() if saved.get(k) != v}
        if strict and diff:
            detail = ", ".join(f"{k}: saved {a!r} vs now {b!r}" for k, (a, b) in diff.items())
            raise ValueError(f"data iterator state does not match this pipeline ({detail}); resume with "
                             "the data config the checkpoint was written with, or pass strict=False")
        self._it.set_state(state["pipeline"])
        self.batches = int(state.get("batches", 0))

    def close(self) -> None:
        """Stop background prefetch threads (``data.worker_count > 0``); idempotent."""
        close = getattr(self._it, "close", None)
        if close is not None:
            close()

    def __enter__(self) -> "BatchIterator":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def describe(self) -> dict[str, Any]:
        """Cheap summary for logging (no document is read)."""
        return {**self.corpus.describe(), "process_index": self.meta["process_index"],
                "process_count": self.meta["process_count"], "batch_size": self.batch_size,
                "seq_len": self.seq_len, "batches_returned": self.batches}


def make_batches(cfg: Any, split: str = "train", *, tokenizer: Any = None,
                 chunk_size: Optional[int] = None, process_index: Optional[int] = None,
                 process_count: Optional[int] = None, block_rows: int = DEFAULT_BLOCK_ROWS,
                 repeat: Optional[bool] = None) -> BatchIterator:
    """Batches of split ``"train"`` (infinite, reshuffled each epoch) or ``"validation"`` (one pass).

    Args:
      cfg: a :class:`ttt_jax.config.DataConfig`.
      split: ``"train"`` or ``"validation"``.
      tokenizer: defaults to ``load_tokenizer(cfg.tokenizer)``.
      chunk_size: the TTT chunk size; required when ``cfg.chunk_align`` is true (document pieces then
        start at multiples of it), ignored otherwise.
      process_index, process_count: this process's shard; default ``jax.process_index()`` /
        ``jax.process_count()``. ``cfg.batch_size`` is per process.
      block_rows: rows packed together (and shuffled together for train).
      repeat: override the default (train: infinite, validation: one pass, last batch padded with
        empty rows whose ``loss_mask`` is 0).

    Returns:
      a :class:`BatchIterator` of dicts of ``[cfg.batch_size, cfg.seq_len]`` arrays.
    """
    if split not in ("train", "validation"):
        raise ValueError(f"split={split!r}: expected 'train' or 'validation'")
    if hasattr(cfg, "validate"):
        cfg.validate()
    p, n = _resolve_processes(process_index, process_count)
    align = None
    if cfg.chunk_align:
        if chunk_size is None:
            raise ValueError("data.chunk_align=true needs chunk_size (pass model.ttt.chunk_size to "
                             "make_batches)")
        if chunk_size < 1 or cfg.seq_len % chunk_size:
            raise ValueError(f"data.chunk_align=true needs data.seq_len ({cfg.seq_len}) to be a multiple "
                             f"of the chunk size ({chunk_size})")
        align = int(chunk_size)
    if not 0 <= cfg.seed < 2**32:
        raise ValueError(f"data.seed={cfg.seed}: expected an integer in [0, 2**32)")
    tok = load_tokenizer(cfg.tokenizer) if tokenizer is None else tokenizer
    corpus = corpus_from_config(cfg, split)
    train = split == "train"
    repeat = train if repeat is None else repeat
    if len(corpus) < (n if repeat else 1):
        raise ValueError(f"the {split} split of data.source={cfg.source!r} has {len(corpus)} "
                         f"document(s), fewer than needed for {n} process(es); add data, raise "
                         "data.max_documents or adjust data.validation_fraction")
    shuffle = train and cfg.shuffle
    docs = grain.MapDataset.range(len(corpus))
    if shuffle:
        if len(corpus) <= EpochShuffleMapDataset.MATERIALISE_MAX:
            docs = EpochShuffleMapDataset(docs, seed=cfg.seed)
        else:
            docs = docs.shuffle(seed=cfg.seed)  # constant memory, same per-epoch semantics
    if repeat:
        docs = docs.repeat(None)
    if n > 1:
        docs = docs[p::n]
    docs = docs.map(_DocumentTokens(corpus, tok))
    rows = PackedRowsDataset(docs, cfg.seq_len, pad_id=tok.pad_id, chunk_align=align,
                             block_rows=block_rows, shuffle_seed=cfg.seed if shuffle else None)
    ds = rows.batch(cfg.batch_size, drop_remainder=False, batch_fn=_stack_batch)
    if cfg.worker_count > 0:
        ds = grain.experimental.ThreadPrefetchIterDataset(ds, prefetch_buffer_size=2 * cfg.worker_count)
    meta = {"source": cfg.source, "paths": list(cfg.paths), "field": cfg.field, "column": cfg.column,
            "tokenizer": str(cfg.tokenizer), "vocab_size": int(tok.vocab_size), "seq_len": cfg.seq_len,
            "batch_size": cfg.batch_size, "chunk_align": align, "shuffle": shuffle, "seed": cfg.seed,
            "validation_fraction": cfg.validation_fraction, "max_documents": cfg.max_documents,
            "split": split, "repeat": bool(repeat), "documents": len(corpus), "block_rows": block_rows,
            "process_index": p, "process_count": n}
    return BatchIterator(ds, corpus, meta, batch_size=cfg.batch_size, seq_len=cfg.seq_len,
                         pad_id=tok.pad_id, finite=not repeat)


def validation_batches(cfg: Any, n_batches: int, **kwargs: Any) -> list[dict[str, np.ndarray]]:
    """The first ``n_batches`` validation batches (the same ones on every call).

    The validation documents are cycled if they run out, so every process always returns exactly
    ``n_batches`` full batches of shape ``[cfg.batch_size, cfg.seq_len]`` (multi-host evaluation
    stays in lock-step). Keyword arguments go to :func:`make_batches`.
    """
    if n_batches < 1:
        raise ValueError(f"n_batches={n_batches}: expected an integer >= 1")
    kwargs.setdefault("repeat", True)
    it = make_batches(cfg, "validation", **kwargs)
    return [next(it) for _ in range(n_batches)]


def describe(cfg: Any, split: str = "train", *, tokenizer: Any = None,
             count_tokens: bool = True) -> dict[str, Any]:
    """Corpus statistics for logging: documents, files, skipped records and (``count_tokens``) tokens
    including bos/eos, plus ``rows`` = tokens / seq_len, and the seconds it took.

    Counting tokens reads and tokenizes the whole split (~1 s for the stdlib corpus with the byte
    tokenizer); ``count_tokens=False`` only lists files.
    """
    t0 = time.perf_counter()
    corpus = corpus_from_config(cfg, split)
    out = corpus.describe()
    if count_tokens:
        tok = load_tokenizer(cfg.tokenizer) if tokenizer is None else tokenizer
        fn = _DocumentTokens(corpus, tok, cache_tokens=0)
        tokens = sum(int(fn(i).shape[0]) for i in range(len(corpus)))
        out.update(tokens=tokens, rows=tokens / cfg.seq_len, skipped=corpus.skipped)
    out["seconds"] = round(time.perf_counter() - t0, 3)
    return out
