"""Next-token cross-entropy without materialising all ``[B, T, V]`` logits.

At 32k tokens and a 152k vocabulary the fp32 logits alone are 20 GB. :func:`chunked_cross_entropy`
computes the loss over sequence chunks inside a ``lax.scan`` whose body is rematerialised, so at
most one chunk's logits exist at a time in the forward *and* the backward pass.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ttt_jax.ops.precision import matmul_f32_out


def cross_entropy_reference(hidden: jax.Array, head: jax.Array, targets: jax.Array,
                            mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Full-logits oracle: returns ``(nll_sum, n_tokens)`` as fp32 scalars."""
    logits = jnp.einsum("btd,dv->btv", hidden, head.astype(hidden.dtype), preferred_element_type=jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    tgt = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    mask = mask.astype(jnp.float32)
    return jnp.sum((lse - tgt) * mask), jnp.sum(mask)


def chunked_cross_entropy(hidden: jax.Array, head: jax.Array, targets: jax.Array, mask: jax.Array, *,
                          chunk_size: int = 2048, groups: int = 1) -> tuple[jax.Array, jax.Array]:
    """Summed next-token NLL and token count, computed ``chunk_size`` positions at a time.

    Args:
      hidden: ``[B, T, D]`` final hidden states (compute dtype).
      head: ``[D, V]`` output projection.
      targets: ``[B, T]`` int target ids.
      mask: ``[B, T]`` float, 1 where the position counts.
      chunk_size: positions per chunk; ``T`` is padded to a multiple (padding is masked out).
      groups: the sequence is first cut into ``groups`` contiguous blocks, and every scan step
        takes one chunk of ``chunk_size`` positions from *each* block. With ``groups`` equal to
        the number of devices the sequence is sharded over (context parallelism), every step's
        slice is spread over all devices, the loss needs no gathering of ``hidden``, and each
        device works on ``chunk_size`` positions per step, as one device does without
        sharding (the same logits memory and matmul shapes, and ``groups`` times fewer steps
        than cutting the chunk into ``groups`` pieces). ``T`` must be divisible by ``groups``.

    Returns:
      ``(nll_sum, n_tokens)`` fp32 scalars (logits in fp32, log-sum-exp in fp32).
    """
    b, t, d = hidden.shape
    if groups < 1 or t % groups:
        raise ValueError(f"chunked_cross_entropy: groups={groups} must be >= 1 and divide T={t}")
    if groups > 1:  # [B, T] -> [B * groups, T / groups]: blocks become rows; the sum is unchanged
        hidden = hidden.reshape(b * groups, t // groups, d)
        targets = targets.reshape(b * groups, t // groups)
        mask = mask.reshape(b * groups, t // groups)
        b, t = b * groups, t // groups
    c = min(chunk_size, t)
    n = -(-t // c)
    pad = n * c - t
    if pad:
        hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
        targets = jnp.pad(targets, ((0, 0), (0, pad)))
        mask = jnp.pad(mask, ((0, 0), (0, pad)))
    hs = hidden.reshape(b, n, c, d).swapaxes(0, 1)
    ts = targets.reshape(b, n, c).swapaxes(0, 1)
    ms = mask.astype(jnp.float32).reshape(b, n, c).swapaxes(0, 1)
    head = head.astype(hidden.dtype)

    @jax.checkpoint
    def chunk_nll(h, tg, m):
        # fp32 logits; the backward matmuls run in the hidden states' dtype (matmul_f32_out).
        logits = matmul_f32_out("bcd,dv->bcv", h, head)
        lse = jax.nn.logsumexp(logits, axis=-1)
        tgt = jnp.take_along_axis(logits, tg[..., None], axis=-1)[..., 0]
        return jnp.sum((lse - tgt) * m)

    def body(total, xs):
        return total + chunk_nll(*xs), None

    with jax.named_scope("loss"):
        total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32), (hs, ts, ms))
    return total, jnp.sum(ms)
