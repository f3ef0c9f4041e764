"""The causal language model (Qwen3/Llama-compatible decoder, optional In-Place TTT MLPs).

Parameter tree of :class:`CausalLM` (``L = n_layers``, ``D = d_model``, ``F = d_ff``,
``H = n_heads``, ``KV = n_kv_heads``, ``Dh = head_dim``, ``V = vocab_size``, ``K = ttt.conv_kernel``)::

    embed                       [V, D]        (vocab, embed)
    layers/{i}/attn_norm/scale  [D]           (norm,)
    layers/{i}/attn/q           [D, H, Dh]    (embed, heads, head_dim)
    layers/{i}/attn/k           [D, KV, Dh]   (embed, kv_heads, head_dim)
    layers/{i}/attn/v           [D, KV, Dh]   (embed, kv_heads, head_dim)
    layers/{i}/attn/o           [H, Dh, D]    (heads, head_dim, embed)
    layers/{i}/attn/q_norm/scale [Dh]         (norm,)      -- qk_norm only
    layers/{i}/attn/k_norm/scale [Dh]         (norm,)      -- qk_norm only
    layers/{i}/mlp_norm/scale   [D]           (norm,)
    layers/{i}/mlp/gate         [D, F]        (embed, mlp)
    layers/{i}/mlp/up           [D, F]        (embed, mlp)
    layers/{i}/mlp/down         [F, D]        (mlp, embed)
    layers/{i}/mlp/ttt_conv     [K, D]        (conv, embed)   -- In-Place TTT layers only
    layers/{i}/mlp/ttt_proj     [D, D]        (embed, None)   -- In-Place TTT layers only
    final_norm/scale            [D]           (norm,)
    lm_head                     [D, V]        (embed, vocab)  -- only when tie_embeddings=false
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ttt_jax.config import ModelConfig
from ttt_jax.nn.block import DecoderBlock
from ttt_jax.nn.norm import RMSNorm
from ttt_jax.nn.params import make_param, normal_init


def check_tokens(tokens, vocab_size: int) -> None:
    """Raise ``ValueError`` if concrete ``tokens`` are not integers in ``[0, vocab_size)``.

    A no-op for traced arrays (inside ``jit``), where values are unknown; callers that feed data
    into a jitted step should call this on the host batch first.
    """
    if isinstance(tokens, jax.core.Tracer):
        return
    dtype = getattr(tokens, "dtype", None)
    if dtype is not None and not jnp.issubdtype(dtype, jnp.integer):
        raise ValueError(f"token ids must be integers, got dtype {dtype}")
    arr = np.asarray(tokens)
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"token ids must be integers, got dtype {arr.dtype}")
    if arr.size == 0:
        return
    lo, hi = int(arr.min()), int(arr.max())
    if lo < 0 or hi >= vocab_size:
        raise ValueError(
            f"token ids must lie in [0, {vocab_size}) (model.vocab_size={vocab_size}), got min {lo} "
            f"max {hi}; the tokenizer does not match the model -- set model.vocab_size to the "
            "tokenizer's vocabulary size")


def positions_from_segments(segment_ids: jax.Array) -> jax.Array:
    """``[B, T]`` position of every token within its document (a maximal run of equal ids)."""
    b, t = segment_ids.shape
    idx = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    change = jnp.concatenate([jnp.ones((b, 1), bool), segment_ids[:, 1:] != segment_ids[:, :-1]],
                             axis=1)
    start = jax.lax.cummax(jnp.where(change, idx, 0), axis=1)
    return idx - start


class CausalLM(nnx.Module):
    """Decoder-only LM. ``__call__(tokens [B, T] int32, *, segment_ids=None, positions=None)``
    returns ``[B, T, vocab_size]`` float32 logits.

    * ``segment_ids`` ``[B, T]`` int: packed documents (0 = padding); attention, the TTT conv and the
      fast weights never cross documents.
    * ``positions`` ``[B, T]`` int RoPE positions; default ``arange(T)``, or the position within each
      document when ``segment_ids`` are given.
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        cfg.validate()
        self.cfg = cfg
        self.dtype = jnp.dtype(cfg.compute_dtype)
        pd = jnp.dtype(cfg.param_dtype)
        self.embed = make_param(normal_init(cfg.initializer_range), rngs.params(),
                                (cfg.vocab_size, cfg.d_model), ("vocab", "embed"), pd)
        self.layers = nnx.List([DecoderBlock(cfg, i, rngs=rngs) for i in range(cfg.n_layers)])
        self.final_norm = RMSNorm(cfg.d_model, eps=cfg.rms_norm_eps, param_dtype=pd)
        if cfg.tie_embeddings:
            self.lm_head = None
        else:
            self.lm_head = make_param(normal_init(cfg.initializer_range), rngs.params(),
                                      (cfg.d_model, cfg.vocab_size), ("embed", "vocab"), pd)

    def embed_tokens(self, tokens: jax.Array) -> jax.Array:
        """``[B, T]`` int -> ``[B, T, D]`` token embeddings in the compute dtype."""
        return jnp.take(self.embed[...], tokens, axis=0).astype(self.dtype)

    def __call__(self, tokens: jax.Array, *, segment_ids: Optional[jax.Array] = None,
                 positions: Optional[jax.Array] = None) -> jax.Array:
        """``[B, T]`` int tokens -> ``[B, T, V]`` float32 logits."""
        return self.logits(self.hidden(tokens, segment_ids=segment_ids, positions=positions))

    def head(self) -> jax.Array:
        """The output projection as ``[D, V]`` in the compute dtype (the embedding when tied)."""
        if self.lm_head is None:
            return self.embed[...].astype(self.dtype).T
        return self.lm_head[...].astype(self.dtype)

    def logits(self, hidden: jax.Array) -> jax.Array:
        """``[B, T, D]`` final hidden states -> ``[B, T, V]`` float32 logits."""
        return jnp.einsum("btd,dv->btv", hidden.astype(self.dtype), self.head(),
                          preferred_element_type=jnp.float32)

    def hidden(self, tokens: jax.Array, *, segment_ids: Optional[jax.Array] = None,
               positions: Optional[jax.Array] = None) -> jax.Array:
        """``[B, T]`` int tokens -> ``[B, T, D]`` final-normed hidden states (compute dtype).

        Long-context training uses this with a chunked loss so that ``[B, T, V]`` logits are never
        materialised at once (``ttt_jax.train.steps.chunked_cross_entropy``).
        """
        cfg = self.cfg
        if tokens.ndim != 2:
            raise ValueError(f"tokens must be [B, T], got shape {tokens.shape}")
        check_tokens(tokens, cfg.vocab_size)
        b, t = tokens.shape
        if segment_ids is not None and tuple(segment_ids.shape) != (b, t):
            raise ValueError(f"segment_ids must be [B, T] = {(b, t)}, got {tuple(segment_ids.shape)}")
        if positions is None:
            if segment_ids is None:
                positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
            else:
                positions = positions_from_segments(segment_ids)
        elif tuple(positions.shape) != (b, t):
            raise ValueError(f"positions must be [B, T] = {(b, t)}, got {tuple(positions.shape)}")

        x0 = self.embed_tokens(tokens)

        def run_block(block, x, x0, positions, segment_ids):
            return block(x, x0=x0, positions=positions, segment_ids=segment_ids)

        if cfg.remat:
            run_block = nnx.remat(run_block)

        x = x0
        for block in self.layers:
            x = run_block(block, x, x0, positions, segment_ids)
        return self.final_norm(x)


def count_params(model: nnx.Module) -> int:
    """Total number of parameter elements (``nnx.Param`` leaves) in ``model``."""
    state = nnx.state(model, nnx.Param)
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(state)))
