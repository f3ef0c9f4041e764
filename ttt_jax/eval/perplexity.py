"""Sliding-window perplexity: the loss on a fixed final block as the preceding context grows.

For each evaluation span ``s`` of ``L_max + 1`` tokens (``L_max`` = the longest context length)
and each context length ``L``, the model reads ``s[L_max - L : L_max]`` (``L`` tokens, RoPE
positions ``0 .. L-1``) and is scored on its last ``block_size`` positions, whose targets are
``s[L_max - block_size + 1 : L_max + 1]``. The scored tokens are the same for every ``L``; only
the context before them grows, so a model that uses long context shows a loss falling with ``L``
(and a sliding-window model one that stops falling at its window).

Besides, at the longest length the mean loss at every position of the window is kept (the
per-position loss curve; averaged over spans, and over geometrically growing position bins in the JSON).

Spans come from a corpus (:func:`evaluation_spans`): by default the first ``L_max + 1`` tokens
(``[bos] + text``) of every document long enough, in corpus order; with ``concat=True`` the
documents of the split are concatenated (``[bos] text [eos] [bos] text ...``) into one stream cut
into consecutive spans, read as single sequences (the model then attends across document
boundaries, as in the usual concatenated-corpus evaluation).

Usage::

    from ttt_jax.eval import evaluation_spans, sliding_window_perplexity
    spans = evaluation_spans(tokenizer, length=4096, num_samples=8)        # [8, 4097]
    result = sliding_window_perplexity(model, spans, context_lengths=[256, 1024, 4096],
                                       block_size=256)
    result.loss            # mean NLL (nats/token) on the final block, one per context length
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Any, Callable, Optional, Sequence

import numpy as np

from ttt_jax.data.packing import document_tokens
from ttt_jax.data.sources import open_corpus
from ttt_jax.eval.scoring import Scorer

__all__ = ["PerplexityResult", "default_context_lengths", "evaluation_spans",
           "sliding_window_perplexity"]


def default_context_lengths(max_length: int, block_size: int) -> list[int]:
    """``block_size, 2 block_size, 4 block_size, ...`` up to ``max_length``, which is always last."""
    if block_size < 1 or max_length < block_size:
        raise ValueError(f"need 1 <= block_size ({block_size}) <= max_length ({max_length})")
    out, n = [], block_size
    while n < max_length:
        out.append(n)
        n *= 2
    return out + [max_length]


def evaluation_spans(tokenizer: Any, length: int, num_samples: int, *, source: str = "stdlib",
                     paths: Sequence[str] = (), split: str = "validation", field: str = "text",
                     column: str = "text", concat: bool = False,
                     max_documents: Optional[int] = None) -> np.ndarray:
    """Up to ``num_samples`` token spans of ``length + 1`` tokens: ``[N, length + 1]`` int32.

    Without ``concat``, one span per document of at least ``length + 1`` tokens (its beginning,
    ``bos`` first), in corpus order; fewer than ``num_samples`` such documents gives fewer spans
    (with a warning), none a ``ValueError`` naming the fix. With ``concat``, consecutive spans of
    the concatenated split. ``source``/``paths``/``split``/``field``/``column`` as in
    :func:`ttt_jax.data.open_corpus`.
    """
    if length < 1 or num_samples < 1:
        raise ValueError(f"length ({length}) and num_samples ({num_samples}) must be >= 1")
    corpus = open_corpus(source, paths, split=split, field=field, column=column,
                         validation_fraction=0.05, max_documents=max_documents)
    need = length + 1
    spans: list[np.ndarray] = []
    stream: list[np.ndarray] = []
    have = 0
    for i in range(len(corpus)):
        text = corpus.text(i)
        if not text:
            continue
        toks = document_tokens(tokenizer, text)
        if not concat:
            if len(toks) >= need:
                spans.append(toks[:need])
        else:
            stream.append(toks)
            have += len(toks)
            while have >= need:
                flat = np.concatenate(stream)
                spans.append(flat[:need])
                stream, have = [flat[need:]], len(flat) - need
        if len(spans) >= num_samples:
            break
    if not spans:
        hint = ("use concat=True (--concat) to concatenate documents, a shorter length, or "
                "another corpus" if not concat else "use a shorter length or a larger corpus")
        raise ValueError(f"no evaluation span of {need} tokens in the {split} split of the "
                         f"{source} corpus ({len(corpus)} documents); {hint}")
    if len(spans) < num_samples:
        warnings.warn(f"only {len(spans)} of the {num_samples} requested spans of {need} tokens "
                      f"exist in the {split} split of the {source} corpus", stacklevel=2)
    return np.stack(spans[:num_samples]).astype(np.int32)


@dataclasses.dataclass
class PerplexityResult:
    """Sliding-window perplexity of one model on one set of spans.

    ``loss[i]``: mean NLL (nats/token) over the final ``block_size`` positions of every span with
    ``context_lengths[i]`` tokens of input; ``perplexity[i] = exp(loss[i])``; ``loss_per_span``:
    ``[len(context_lengths)][num_samples]``. ``position_loss``: the mean NLL at every position of
    the longest window (``[context_lengths[-1]]``), averaged over spans.
    """

    context_lengths: list[int]
    block_size: int
    num_samples: int
    loss: list[float]
    perplexity: list[float]
    loss_per_span: list[list[float]]
    position_loss: np.ndarray

    def binned_position_loss(self, bins: int = 64) -> dict[str, list[float]]:
        """The per-position curve averaged over about ``bins`` geometrically growing bins of
        positions (fine near the start, coarse far out; suits a log-scale plot):
        ``{"start": [...], "end": [...], "loss": [...]}`` (``end`` exclusive)."""
        n = len(self.position_loss)
        edges = np.unique(np.concatenate([[0], np.geomspace(1, n, max(bins, 2)).astype(int), [n]]))
        loss = [float(self.position_loss[a:b].mean()) for a, b in zip(edges[:-1], edges[1:])]
        return {"start": edges[:-1].tolist(), "end": edges[1:].tolist(), "loss": loss}

    def to_dict(self, bins: int = 64) -> dict[str, Any]:
        return {"context_lengths": self.context_lengths, "block_size": self.block_size,
                "num_samples": self.num_samples, "loss": self.loss, "perplexity": self.perplexity,
                "loss_per_span": self.loss_per_span,
                "position_loss": self.binned_position_loss(bins)}

    def markdown(self) -> str:
        rows = ["| context length | loss (nats/token) | perplexity |", "|---:|---:|---:|"]
        rows += [f"| {n} | {l:.4f} | {p:.3f} |"
                 for n, l, p in zip(self.context_lengths, self.loss, self.perplexity)]
        return "\n".join(rows)


def sliding_window_perplexity(model: Any, spans: np.ndarray, *, context_lengths: Sequence[int],
                              block_size: int, batch_size: int = 1, logits_chunk: int = 1024,
                              scorer: Optional[Scorer] = None,
                              progress: Optional[Callable[[int], None]] = None) -> PerplexityResult:
    """Loss on the final ``block_size`` tokens of ``spans`` as the context grows (module docstring).

    Args:
      model: a :class:`~ttt_jax.models.lm.CausalLM` (or pass ``scorer=`` built from one).
      spans: ``[N, L_max + 1]`` int tokens, ``L_max = max(context_lengths)``.
      context_lengths: input lengths, each in ``[block_size, L_max]``.
      block_size: number of scored positions at the end of every window.
      batch_size: spans per forward pass (the last batch is padded with copies, not counted).
      logits_chunk: positions per chunk of the output projection (bounds logits memory).
      progress: called with the number of spans done after every forward pass.
    """
    spans = np.asarray(spans)
    lengths = sorted({int(n) for n in context_lengths})
    if spans.ndim != 2 or spans.shape[0] < 1:
        raise ValueError(f"spans must be [N, L_max + 1] with N >= 1, got shape {spans.shape}")
    l_max = spans.shape[1] - 1
    if not lengths or lengths[0] < block_size or lengths[-1] != l_max:
        raise ValueError(f"context lengths {lengths} must lie in [block_size={block_size}, "
                         f"{l_max}] and end at the span length - 1 = {l_max}")
    if block_size < 1 or batch_size < 1:
        raise ValueError(f"block_size ({block_size}) and batch_size ({batch_size}) must be >= 1")
    scorer = scorer or Scorer(model, logits_chunk=logits_chunk)
    n = spans.shape[0]
    per_len: list[list[float]] = []
    position_sum = np.zeros(l_max, np.float64)
    for length in lengths:
        window = spans[:, l_max - length:]                       # [N, length + 1]
        losses = []
        for start in range(0, n, batch_size):
            rows = window[start:start + batch_size]
            k = rows.shape[0]
            if k < batch_size:  # fixed batch shape: one compilation per length
                rows = np.concatenate([rows, np.repeat(rows[-1:], batch_size - k, axis=0)])
            nll, _ = scorer(rows[:, :-1], rows[:, 1:])
            nll = nll[:k].astype(np.float64)
            losses += nll[:, -block_size:].mean(axis=1).tolist()
            if length == l_max:
                position_sum += nll.sum(axis=0)
            if progress is not None:
                progress(k)
        per_len.append(losses)
    loss = [float(np.mean(x)) for x in per_len]
    return PerplexityResult(context_lengths=lengths, block_size=int(block_size), num_samples=n,
                            loss=loss, perplexity=[math.exp(x) for x in loss],
                            loss_per_span=per_len, position_loss=position_sum / n)
