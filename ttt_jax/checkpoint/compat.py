"""The compatibility policy: which differences between the config a checkpoint was written with and
the current config forbid restoring it (a resumed run, a model loaded with overrides).

:func:`config_differences` compares the model section and the data fields that define the saved
iterator position; implementation-only model fields may differ.
"""

from __future__ import annotations

from typing import Any

from ttt_jax.checkpoint.tree import flatten as _flatten
from ttt_jax.config import Config

# Sections of the config a checkpoint must agree with before it is restored: the model
# (parameter shapes and semantics) and the data fields that define the saved iterator position.
_DATA_KEYS_TIED_TO_ITERATOR = ("source", "paths", "field", "column", "tokenizer", "seq_len",
                               "batch_size", "chunk_align", "validation_fraction", "max_documents",
                               "shuffle", "seed")


# Model fields that choose how the same parameters are computed, not what they are: a run may
# resume with other values (e.g. moving from CPU to GPU, turning on remat to save memory).
MODEL_RUNTIME_KEYS = ("attention_impl", "ttt.impl", "remat", "remat_policy", "compute_dtype", "max_seq_len",
                       "context_layout", "context_attention", "context_scan", "context_kernel",
                       "context_halo")


def config_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Dotted keys (``model.d_model: checkpoint 128 != config 192``) where two config dicts
    disagree on the model section or on the data fields tied to the iterator state.

    A key absent from the saved config (written before that field existed) counts as its default.
    Implementation-only model fields (:data:`MODEL_RUNTIME_KEYS`) may differ.
    """
    defaults = Config().to_dict()
    diffs = []
    for section in ("model", "data"):
        s, c, d = (_flatten(x.get(section, {})) for x in (saved, current, defaults))
        keep = (lambda k: k not in MODEL_RUNTIME_KEYS) if section == "model" else \
            (lambda k: k in _DATA_KEYS_TIED_TO_ITERATOR)
        s, c = ({k: v for k, v in x.items() if keep(k)} for x in (s, c))
        for key in sorted(set(s) | set(c)):
            old, new = s.get(key, d.get(key, "<missing>")), c.get(key, d.get(key, "<missing>"))
            if old != new:
                diffs.append(f"{section}.{key}: checkpoint {old!r} != config {new!r}")
    return diffs
