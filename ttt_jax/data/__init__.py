"""Data layer: tokenizers, document sources, packing with segment ids, grain pipelines.

Quick use::

    from ttt_jax.config import DataConfig
    from ttt_jax.data import make_batches

    it = make_batches(DataConfig(seq_len=256, batch_size=8), "train")
    batch = next(it)           # dict of [8, 256] arrays: inputs, targets, loss_mask, segment_ids, positions
    state = it.get_state()     # JSON-serialisable; it.set_state(state) resumes exactly
"""

from ttt_jax.data.check import DataCheck, check_data
from ttt_jax.data.packing import (FIELDS, RowPacker, document_tokens, empty_rows, iter_packed_rows,
                                  pack_documents)
from ttt_jax.data.pipeline import (BatchIterator, PackedRowsDataset, describe, make_batches,
                                   validation_batches)
from ttt_jax.data.sources import (Corpus, DataWarning, corpus_from_config, open_corpus, read_documents,
                                  stdlib_root)
from ttt_jax.data.tokenizer import ByteTokenizer, HFTokenizer, Tokenizer, load_tokenizer

__all__ = [
    "ByteTokenizer", "HFTokenizer", "Tokenizer", "load_tokenizer",
    "Corpus", "DataWarning", "open_corpus", "corpus_from_config", "read_documents", "stdlib_root",
    "FIELDS", "RowPacker", "document_tokens", "empty_rows", "iter_packed_rows", "pack_documents",
    "BatchIterator", "PackedRowsDataset", "make_batches", "validation_batches", "describe",
    "DataCheck", "check_data",
]
