"""RULER-style long-context evaluation: scoring and the suite runner (:func:`run_ruler`).

The tasks, their haystacks and lengths: :mod:`ttt_jax.eval.ruler_tasks`.

Scoring (exact match). Greedy decoding reproduces the gold answer ``a_1 .. a_m`` (token ids) as
its first ``m`` tokens **iff** at every answer position the arg-max of the model's next-token
distribution given ``prompt + a_<i`` is ``a_i``. (By induction on ``i``: if greedy has produced
``a_<i``, its next input is exactly ``prompt + a_<i``; conversely the first ``i`` where the arg-max
differs is where greedy leaves the gold answer.) Because the model is causal, the logits at
position ``p`` of one forward pass over ``prompt + a_1 .. a_{m-1}`` are exactly those greedy
decoding computes at step ``p`` (with In-Place TTT too: a chunk's update only reaches later
chunks, tests/test_eval_causality.py). So one teacher-forced forward pass scores a sample, and
``exact = all(argmax == gold)`` over the answer positions; :func:`greedy_answer` (repeated full
forwards) is the oracle the equivalence is tested against (tests/test_ruler.py). Exact match is
on the gold *tokenization* (a model emitting the same text in other tokens counts as wrong) and
ignores what is generated after the answer. RULER itself scores substring recall with partial
credit; :attr:`RulerResult.token_accuracy` (teacher-forced fraction of correct answer tokens) is
reported beside the exact-match accuracy as a finer, non-generation signal.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional, Sequence

import numpy as np

from ttt_jax.eval.ruler_tasks import TASKS, Haystack, Sample, generate_sample, generate_suite
from ttt_jax.eval.scoring import Scorer, pad_rows

__all__ = ["TASKS", "Haystack", "Sample", "RulerResult", "generate_sample", "generate_suite",
           "score_samples", "greedy_answer", "run_ruler"]


def teacher_forced_rows(samples: Sequence[Sample], length: int, pad_id: int
                        ) -> tuple[np.ndarray, np.ndarray, list[tuple[int, int]]]:
    """``(inputs, targets, spans)``: ``[N, length]`` rows ``prompt + answer[:-1]`` right-padded,
    their next-token targets, and per row the ``[start, end)`` positions that predict the answer."""
    inputs, targets, spans = [], [], []
    for s in samples:
        seq = np.concatenate([s.prompt, s.answer])
        inputs.append(seq[:-1])
        targets.append(seq[1:])
        spans.append((len(s.prompt) - 1, len(seq) - 1))
    return pad_rows(inputs, length, pad_id), pad_rows(targets, length, pad_id), spans


def score_samples(scorer: Scorer, samples: Sequence[Sample], *, pad_id: int, batch_size: int = 1,
                  progress: Optional[Callable[[int], None]] = None) -> list[dict[str, Any]]:
    """Teacher-forced exact match of every sample (module docstring): per sample
    ``{"exact": bool, "token_accuracy": float, "prefix": int}`` (``prefix``: leading answer tokens
    greedy decoding gets right). Batches group samples of one ``length``; rows are right-padded to
    ``length`` (one compilation per length)."""
    out: list[Optional[dict[str, Any]]] = [None] * len(samples)
    by_length: dict[int, list[int]] = {}
    for i, s in enumerate(samples):
        by_length.setdefault(s.length, []).append(i)
    for length, idx in sorted(by_length.items()):
        for a in range(0, len(idx), batch_size):
            part = idx[a:a + batch_size]
            inputs, targets, spans = teacher_forced_rows([samples[i] for i in part], length, pad_id)
            if len(part) < batch_size:
                inputs = np.concatenate([inputs, np.repeat(inputs[-1:], batch_size - len(part), 0)])
                targets = np.concatenate([targets, np.repeat(targets[-1:], batch_size - len(part), 0)])
            _, pred = scorer(inputs, targets)
            for r, i in enumerate(part):
                lo, hi = spans[r]
                ok = pred[r, lo:hi] == targets[r, lo:hi]
                prefix = int(np.argmin(ok)) if not ok.all() else len(ok)
                out[i] = {"exact": bool(ok.all()), "token_accuracy": float(ok.mean()),
                          "prefix": prefix}
            if progress is not None:
                progress(len(part))
    return out  # type: ignore[return-value]


def greedy_answer(model: Any, prompt: np.ndarray, num_tokens: int, *,
                  forward: Optional[Callable[[Any], Any]] = None) -> np.ndarray:
    """Greedy decoding by repeated full forward passes (no cache, no padding): the oracle of the
    teacher-forced scoring. ``prompt`` ``[n]`` int -> ``[num_tokens]`` int32. Slow (one forward
    per token). ``forward(tokens [1, T]) -> logits [1, T, V]`` defaults to ``model(tokens)``."""
    import jax.numpy as jnp

    forward = forward or model
    seq = [int(x) for x in prompt]
    out = []
    for _ in range(num_tokens):
        logits = forward(jnp.asarray([seq], jnp.int32))
        nxt = int(jnp.argmax(logits[0, -1]))
        out.append(nxt)
        seq.append(nxt)
    return np.asarray(out, np.int32)


@dataclasses.dataclass
class RulerResult:
    """Exact-match accuracy per task and length (``accuracy[task][length]``), the teacher-forced
    answer-token accuracy likewise, the mean over tasks per length, and every sample's record."""

    tasks: list[str]
    lengths: list[int]
    num_samples: int
    seed: int
    accuracy: dict[str, dict[int, float]]
    token_accuracy: dict[str, dict[int, float]]
    samples: list[dict[str, Any]]

    @property
    def mean(self) -> dict[int, float]:
        return {n: float(np.mean([self.accuracy[t][n] for t in self.tasks])) for n in self.lengths}

    def to_dict(self) -> dict[str, Any]:
        return {"tasks": self.tasks, "lengths": self.lengths, "num_samples": self.num_samples,
                "seed": self.seed, "scoring": "exact match (teacher-forced greedy equivalence)",
                "accuracy": {t: {str(n): v for n, v in d.items()} for t, d in self.accuracy.items()},
                "token_accuracy": {t: {str(n): v for n, v in d.items()}
                                   for t, d in self.token_accuracy.items()},
                "mean": {str(n): v for n, v in self.mean.items()}, "samples": self.samples}

    def markdown(self) -> str:
        head = "| task | " + " | ".join(str(n) for n in self.lengths) + " |"
        rows = [head, "|---|" + "---:|" * len(self.lengths)]
        for t in self.tasks:
            rows.append(f"| {t} | " + " | ".join(f"{self.accuracy[t][n]:.2f}"
                                                for n in self.lengths) + " |")
        rows.append("| **mean** | " + " | ".join(f"{self.mean[n]:.2f}" for n in self.lengths) + " |")
        return "\n".join(rows)


def run_ruler(model: Any, tokenizer: Any, *, tasks: Sequence[str] = TASKS,
              lengths: Sequence[int] = (4096,), num_samples: int = 10, seed: int = 0,
              haystack: Optional[Haystack] = None, batch_size: int = 1, logits_chunk: int = 1024,
              scorer: Optional[Scorer] = None,
              progress: Optional[Callable[[int], None]] = None) -> RulerResult:
    """Generate the suite and score ``model`` on it (exact match, teacher-forced)."""
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    if tokenizer.vocab_size > model.cfg.vocab_size:
        raise ValueError(f"the tokenizer has vocab_size={tokenizer.vocab_size} but the model "
                         f"{model.cfg.vocab_size}; evaluate with the model's own tokenizer")
    samples = generate_suite(tasks, lengths, num_samples, tokenizer, haystack, seed=seed)
    scorer = scorer or Scorer(model, logits_chunk=logits_chunk)
    scores = score_samples(scorer, samples, pad_id=tokenizer.pad_id, batch_size=batch_size,
                           progress=progress)
    lengths = sorted(set(int(n) for n in lengths))
    acc = {t: {n: 0.0 for n in lengths} for t in tasks}
    tok = {t: {n: 0.0 for n in lengths} for t in tasks}
    records = []
    for s, sc in zip(samples, scores):
        acc[s.task][s.length] += sc["exact"] / num_samples
        tok[s.task][s.length] += sc["token_accuracy"] / num_samples
        records.append({"task": s.task, "length": s.length, "index": s.index,
                        "tokens": s.num_tokens, "answer": s.answer_text,
                        **sc, **{k: v for k, v in s.meta.items() if k != "haystack"}})
    return RulerResult(tasks=list(tasks), lengths=lengths, num_samples=num_samples, seed=seed,
                       accuracy=acc, token_accuracy=tok, samples=records)

