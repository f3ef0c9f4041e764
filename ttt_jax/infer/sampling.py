"""Next-token sampling from logits: greedy, temperature, top-k, top-p (nucleus).

All options are traced values, so one compiled decode step serves every setting.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_NEG = -1e30


def filter_logits(logits: jax.Array, top_k, top_p) -> jax.Array:
    """Mask (to ``-1e30``) the logits outside the top-k and outside the nucleus of mass ``top_p``.

    ``logits [B, V]`` fp32; ``top_k`` int (0 = off); ``top_p`` float in ``(0, 1]`` (1 = off). The
    nucleus is the smallest set of most likely tokens whose probability reaches ``top_p`` (the most
    likely token always stays). Ties at the cut-off are kept.
    """
    v = logits.shape[-1]
    srt = jnp.sort(logits, axis=-1)[:, ::-1]                              # descending
    k = jnp.clip(jnp.where(top_k > 0, top_k, v), 1, v)
    kth = jnp.take_along_axis(srt, jnp.broadcast_to(k - 1, (logits.shape[0], 1)), axis=-1)
    logits = jnp.where(logits >= kth, logits, _NEG)
    srt = jnp.where(jnp.arange(v)[None, :] < k, srt, _NEG)
    probs = jax.nn.softmax(srt, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs                          # mass of strictly better tokens
    keep = before < top_p
    n_keep = jnp.maximum(jnp.sum(keep, axis=-1, keepdims=True), 1)
    cut = jnp.take_along_axis(srt, n_keep - 1, axis=-1)
    return jnp.where(logits >= cut, logits, _NEG)


def sample_logits(logits: jax.Array, key: jax.Array, temperature, top_k=0, top_p=1.0) -> jax.Array:
    """``logits [B, V]`` -> ``[B]`` int32 next tokens.

    ``temperature == 0`` is greedy (argmax); otherwise a draw from
    ``softmax(filter_logits(logits / temperature))`` with ``key``.
    """
    logits = logits.astype(jnp.float32)
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    t = jnp.where(temperature > 0, temperature, 1.0)
    filtered = filter_logits(logits / t, top_k, top_p)
    drawn = jax.random.categorical(key, filtered, axis=-1).astype(jnp.int32)
    return jnp.where(temperature > 0, drawn, greedy)
