"""Batched text generation: prefill the prompts, optionally adapt queries (qTTT), then decode.

::

    from ttt_jax.infer import GenerationConfig, generate
    result = generate(model, [prompt_ids_1, prompt_ids_2],
                      GenerationConfig(max_new_tokens=64, temperature=0.8, top_p=0.95, seed=0,
                                       stop_tokens=(tok.eos_id,)))
    result.tokens      # per prompt, the generated ids (a stop token ends it and is not included)

Greedy decoding when ``temperature == 0``. Every sequence decodes at its own position; one that has
stopped is left untouched while the others go on. Decoding runs in blocks of ``decode_block`` tokens,
each one jitted call that loops on the device (:meth:`~ttt_jax.infer.engine.Engine.decode_loop`:
decode step, sampling and stop tokens without a host round trip per token); ``decode_block=0`` is
the per-token loop (one jitted step per token, stop checks on the host), which gives the same tokens
and logits (tested). ``on_token(step, tokens, active)`` is called for every step with the ``[B]``
new tokens (host ints) and which of them are real -- the hook the command line uses to stream text;
with blocks, the calls of a block's steps come together when the block is done.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ttt_jax.infer.engine import Engine
from ttt_jax.infer.sampling import sample_logits


@dataclasses.dataclass(frozen=True)
class GenerationConfig:
    """Sampling options.

    Attributes:
      max_new_tokens: most tokens generated per prompt.
      temperature: 0 = greedy; otherwise logits are divided by it before sampling.
      top_k: keep the ``k`` most likely tokens (0 = all).
      top_p: keep the smallest set of most likely tokens of total probability >= ``top_p`` (1 = all).
      seed: random seed of the sampling.
      stop_tokens: ids that end a sequence (not included in its output).
    """

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    stop_tokens: tuple[int, ...] = ()

    def validate(self, vocab_size: int) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        bad = [t for t in self.stop_tokens if not 0 <= t < vocab_size]
        if bad:
            raise ValueError(f"stop tokens {bad} are outside the vocabulary [0, {vocab_size})")


@dataclasses.dataclass
class GenerationResult:
    """What :func:`generate` returns.

    Attributes:
      tokens: per prompt, the generated token ids.
      stop_reasons: per prompt, ``"stop"`` (a stop token) or ``"length"`` (``max_new_tokens``).
      logits: per prompt, ``[n_i, V]`` fp32 logits each generated token was drawn from, and for a
        sequence that stopped, one more row: the logits that produced the stop token (only with
        ``return_logits``).
      qttt_losses: ``[steps, B]`` span losses of query-only TTT (empty without it).
    """

    tokens: list
    stop_reasons: list
    logits: Optional[list] = None
    qttt_losses: Optional[np.ndarray] = None


_sample = jax.jit(sample_logits)


def generate(model, prompts: Sequence[Sequence[int]], config: GenerationConfig = GenerationConfig(), *,
             return_logits: bool = False, on_token: Optional[Callable] = None, qttt=None,
             prefill_block: int = 1024, decode_block: int = 32) -> GenerationResult:
    """Generate continuations of ``prompts`` (lists of token ids, lengths may differ).

    Args:
      model: a :class:`~ttt_jax.models.lm.CausalLM` or an :class:`~ttt_jax.infer.engine.Engine`
        (reuse an engine across calls to reuse its compiled functions).
      prompts: ``B`` non-empty token lists.
      config: :class:`GenerationConfig`.
      return_logits: also return the logits of every generated token.
      on_token: ``on_token(step, tokens [B] np.int64, active [B] np.bool_)`` for every step.
      qttt: optional :class:`ttt_jax.infer.qttt.QTTTConfig`; with ``steps > 0`` the queries are
        adapted on the prompts after prefill.
      prefill_block: prompt tokens per prefill call (when ``model`` is a model).
      decode_block: decode steps per jitted call (a loop on the device); 0 = one call per token with
        sampling and stop checks on the host (the reference the blocks are tested against).
    """
    if decode_block < 0:
        raise ValueError(f"decode_block must be >= 0 (0 = one call per token), got {decode_block}")
    engine = model if isinstance(model, Engine) else Engine(model, prefill_block=prefill_block)
    config.validate(engine.cfg.vocab_size)
    prompts = [list(map(int, p)) for p in prompts]
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token (e.g. the tokenizer's bos_id)")
    b = len(prompts)
    use_qttt = qttt is not None and qttt.steps > 0
    max_len = max(len(p) for p in prompts) + config.max_new_tokens
    cache = engine.init_cache(b, max_len, ring=not use_qttt)
    logits, cache = engine.prefill(cache, prompts)
    q_deltas, losses = {}, None
    if use_qttt:
        from ttt_jax.infer.qttt import adapt_queries

        q_deltas, losses = adapt_queries(engine, cache, prompts, qttt)
    key = jax.random.key(config.seed)
    tok = _sample(logits, jax.random.fold_in(key, 0), jnp.float32(config.temperature),
                  jnp.int32(config.top_k), jnp.float32(config.top_p))
    rec = _Record(b, config.stop_tokens, return_logits, on_token)
    rec.step(0, np.asarray(tok), np.asarray(logits) if return_logits else None)
    # The cache was sized for every prompt plus max_new_tokens and sampled ids are in range, so the
    # decode calls skip their host-side checks. Step s samples with fold_in(key, s) either way.
    opts = dict(temperature=config.temperature, top_k=config.top_k, top_p=config.top_p,
                q_deltas=q_deltas, check=False)
    if decode_block == 0:
        for step in range(1, config.max_new_tokens):
            if not rec.active.any():
                break
            tok, logits, cache = engine.decode(cache, rec.last, active=rec.active,
                                               key=jax.random.fold_in(key, step), **opts)
            rec.step(step, np.asarray(tok), np.asarray(logits) if return_logits else None)
    else:
        def launch(step, last, active, cache):
            n = min(decode_block, config.max_new_tokens - step)
            return step, n, engine.decode_loop(cache, last, n, active=active, key=key, step0=step,
                                               stop_tokens=config.stop_tokens, size=decode_block,
                                               return_logits=return_logits, **opts)

        pending = launch(1, tok, rec.active, cache) if config.max_new_tokens > 1 and rec.active.any() \
            else None
        while pending is not None:
            step, n, res = pending
            # Queue the next block before reading this one, so the device is not idle while the host
            # streams (if every sequence stops in this block, the next one runs no step).
            pending = launch(step + n, res.last, res.active, res.cache) \
                if step + n < config.max_new_tokens else None
            toks = np.asarray(res.tokens)
            rows = np.asarray(res.logits) if return_logits else None
            for i in range(n):
                if not rec.active.any():
                    break
                rec.step(step + i, toks[i], None if rows is None else rows[i])
            if not rec.active.any():
                break
    logits_out = [np.stack(r) if r else np.zeros((0, engine.cfg.vocab_size), np.float32)
                  for r in rec.rows] if return_logits else None
    return GenerationResult(tokens=rec.out, stop_reasons=rec.reasons, logits=logits_out,
                            qttt_losses=losses)


class _Record:
    """The host's view of a generation: per sequence the emitted tokens (and logits rows), why it
    ended, whether it is still going; ``step`` takes one step's sampled tokens ``[B]``."""

    def __init__(self, b: int, stop_tokens, return_logits: bool, on_token: Optional[Callable]):
        self.stop = np.asarray(sorted(set(stop_tokens)), np.int64)
        self.out = [[] for _ in range(b)]
        self.reasons = ["length"] * b
        self.rows = [[] for _ in range(b)] if return_logits else None
        self.active = np.ones(b, bool)
        self.last = np.zeros(b, np.int64)
        self.on_token = on_token

    def step(self, step: int, tokens: np.ndarray, logits: Optional[np.ndarray]) -> None:
        host = np.asarray(tokens).astype(np.int64)
        stopped = self.active & np.isin(host, self.stop)
        emitted = self.active & ~stopped
        for i in np.flatnonzero(self.active):
            if self.rows is not None:
                self.rows[i].append(logits[i])
            if emitted[i]:
                self.out[i].append(int(host[i]))
            else:
                self.reasons[i] = "stop"
        self.active = emitted
        self.last = host
        if self.on_token is not None:
            self.on_token(step, host, emitted.copy())
