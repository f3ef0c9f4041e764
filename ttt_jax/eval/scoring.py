"""Per-token scores of a causal LM in one jitted, batched forward pass with bounded memory.

Evaluation needs, for every position ``p`` of a ``[B, T]`` input, the negative log-likelihood of a
target token and whether the model's arg-max prediction equals it. :func:`token_scores` computes
both from the final hidden states ``[B, T, D]`` a chunk of positions at a time, so at most
``[B, chunk, V]`` logits exist at once (a 152k vocabulary at 128k tokens would otherwise need
80 GB of fp32 logits per sequence). :func:`token_scores_reference` is the full-logits oracle.

:class:`Scorer` wraps a :class:`~ttt_jax.models.lm.CausalLM`: the model's own forward
(``CausalLM.hidden``) followed by :func:`token_scores`, jitted once per input shape. The model is
causal, so the scores at position ``p`` depend only on ``inputs[:, :p + 1]`` (tested with In-Place
TTT layers whose chunks are shorter than the sequence: tests/test_eval_causality.py). Right padding
therefore never changes the scores of the positions before it.
"""

from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

__all__ = ["Scorer", "token_scores", "token_scores_reference"]


def token_scores_reference(hidden: jax.Array, head: jax.Array,
                           targets: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Full-logits oracle of :func:`token_scores`: ``(nll [B, T] fp32, argmax [B, T] int32)``."""
    logits = jnp.einsum("btd,dv->btv", hidden, head.astype(hidden.dtype),
                        preferred_element_type=jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    tgt = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return lse - tgt, jnp.argmax(logits, axis=-1).astype(jnp.int32)


def token_scores(hidden: jax.Array, head: jax.Array, targets: jax.Array, *,
                 chunk_size: int = 1024) -> tuple[jax.Array, jax.Array]:
    """Per-position next-token NLL and arg-max prediction, ``chunk_size`` positions at a time.

    Args:
      hidden: ``[B, T, D]`` final hidden states (compute dtype).
      head: ``[D, V]`` output projection.
      targets: ``[B, T]`` int target ids (any value where the score is not used).
      chunk_size: positions per chunk; ``T`` is padded to a multiple internally.

    Returns:
      ``(nll, argmax)``: ``[B, T]`` fp32 (log-sum-exp in fp32) and ``[B, T]`` int32 (first index
      among ties, as ``jnp.argmax``).
    """
    b, t, d = hidden.shape
    c = max(1, min(int(chunk_size), t))
    n = -(-t // c)
    pad = n * c - t
    if pad:
        hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
        targets = jnp.pad(targets, ((0, 0), (0, pad)))
    hs = hidden.reshape(b, n, c, d).swapaxes(0, 1)
    ts = targets.reshape(b, n, c).swapaxes(0, 1)
    head = head.astype(hidden.dtype)

    def body(_, xs):
        h, tg = xs
        logits = jnp.einsum("bcd,dv->bcv", h, head, preferred_element_type=jnp.float32)
        lse = jax.nn.logsumexp(logits, axis=-1)
        tgt = jnp.take_along_axis(logits, tg[..., None], axis=-1)[..., 0]
        return None, (lse - tgt, jnp.argmax(logits, axis=-1).astype(jnp.int32))

    _, (nll, pred) = jax.lax.scan(body, None, (hs, ts))
    nll = nll.swapaxes(0, 1).reshape(b, n * c)[:, :t]
    pred = pred.swapaxes(0, 1).reshape(b, n * c)[:, :t]
    return nll, pred


class Scorer:
    """Jitted scoring of a :class:`~ttt_jax.models.lm.CausalLM`.

    ``scorer(inputs [B, T] int, targets [B, T] int) -> (nll [B, T] float32, argmax [B, T] int32)``
    as numpy arrays: position ``p`` scores ``targets[:, p]`` given ``inputs[:, :p + 1]``. Every
    row is one document starting at position 0 (no segment ids). One compilation per input shape:
    callers pad batches to a few fixed shapes. ``logits_chunk`` bounds the logits held at once.
    """

    def __init__(self, model: Any, *, logits_chunk: int = 1024):
        self.cfg = model.cfg
        self.graphdef, self.state = nnx.split(model)
        self.logits_chunk = int(logits_chunk)
        graphdef, chunk = self.graphdef, self.logits_chunk

        def score(state, inputs, targets):
            m = nnx.merge(graphdef, state)
            return token_scores(m.hidden(inputs), m.head(), targets, chunk_size=chunk)

        self._score = jax.jit(score)

    def __call__(self, inputs: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        inputs = np.asarray(inputs)
        targets = np.asarray(targets)
        if inputs.ndim != 2 or inputs.shape != targets.shape:
            raise ValueError(f"inputs and targets must both be [B, T], got {inputs.shape} and "
                             f"{targets.shape}")
        from ttt_jax.models.lm import check_tokens

        check_tokens(inputs, self.cfg.vocab_size)
        check_tokens(targets, self.cfg.vocab_size)
        nll, pred = self._score(self.state, jnp.asarray(inputs, jnp.int32),
                                jnp.asarray(targets, jnp.int32))
        return np.asarray(nll), np.asarray(pred)


def pad_rows(rows: list[np.ndarray], length: int, pad_id: int,
             n_rows: Optional[int] = None) -> np.ndarray:
    """Right-pad 1-D int arrays into ``[n_rows or len(rows), length]`` int32 (extra rows all pad)."""
    n = len(rows) if n_rows is None else n_rows
    out = np.full((n, length), pad_id, np.int32)
    for i, r in enumerate(rows):
        if len(r) > length:
            raise ValueError(f"row {i} has {len(r)} tokens, more than the padded length {length}")
        out[i, :len(r)] = r
    return out
