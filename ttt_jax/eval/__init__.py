"""Evaluation: sliding-window perplexity and RULER-style synthetic long-context tasks.

Python API::

    from ttt_jax.checkpoint import load_model
    from ttt_jax.data import load_tokenizer
    from ttt_jax.eval import evaluation_spans, sliding_window_perplexity, run_ruler

    cfg, model = load_model("runs/tiny")
    tok = load_tokenizer(cfg.data.tokenizer)
    spans = evaluation_spans(tok, length=256, num_samples=4)
    ppl = sliding_window_perplexity(model, spans, context_lengths=[64, 128, 256], block_size=64)
    ruler = run_ruler(model, tok, lengths=[1024], num_samples=2)

The command line is ``ttt-jax eval CHECKPOINT --suite ppl|ruler|all`` (:mod:`ttt_jax.eval.cli`).
"""

from ttt_jax.eval.perplexity import (PerplexityResult, default_context_lengths, evaluation_spans,
                                     sliding_window_perplexity)
from ttt_jax.eval.ruler import (TASKS, Haystack, RulerResult, Sample, generate_sample,
                                generate_suite, greedy_answer, run_ruler, score_samples)
from ttt_jax.eval.scoring import Scorer, token_scores, token_scores_reference

__all__ = [
    "PerplexityResult", "default_context_lengths", "evaluation_spans", "sliding_window_perplexity",
    "TASKS", "Haystack", "RulerResult", "Sample", "generate_sample", "generate_suite",
    "greedy_answer", "run_ruler", "score_samples",
    "Scorer", "token_scores", "token_scores_reference",
]
