"""Pre-norm decoder block: ``x + attn(norm(x))`` then ``x + mlp(norm(x))``.

Sub-modules: ``attn_norm`` (RMSNorm), ``attn`` (:class:`Attention`), ``mlp_norm`` (RMSNorm), ``mlp``
(:class:`InPlaceTTTMLP` on the layers of ``cfg.ttt.layer_ids``, :class:`SwiGLUMLP` elsewhere).
On the layers of ``cfg.ttt_seq.layer_ids`` a ``ttt_seq`` (:class:`TTTSeqLayer`) sequence mixer reads
the same normed input as attention: with ``mode="replace"`` there is no ``attn`` and
``x + ttt_seq(norm(x))``; with ``mode="beside"`` ``x + attn(norm(x)) + ttt_seq(norm(x))``.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

from ttt_jax.config import ModelConfig, RuntimeConfig
from ttt_jax.nn.attention import Attention
from ttt_jax.nn.mlp import InPlaceTTTMLP, SwiGLUMLP
from ttt_jax.nn.norm import RMSNorm
from ttt_jax.nn.ttt_seq import TTTSeqLayer


class DecoderBlock(nnx.Module):
    """Layer ``layer`` of the decoder.

    ``__call__(x [B, T, D], *, x0 [B, T, D], positions [B, T], segment_ids [B, T] | None)
    -> [B, T, D]`` in the compute dtype. ``x0`` (token embeddings) feeds the In-Place TTT target.
    ``runtime`` picks the kernels (default :class:`~ttt_jax.config.RuntimeConfig`).
    """

    def __init__(self, cfg: ModelConfig, layer: int, *, runtime: Optional[RuntimeConfig] = None,
                 rngs: nnx.Rngs):
        pd = jnp.dtype(cfg.param_dtype)
        self.layer = layer
        self.is_ttt = layer in cfg.ttt.layer_ids(cfg.n_layers)
        self.attn_norm = RMSNorm(cfg.d_model, eps=cfg.rms_norm_eps, param_dtype=pd)
        has_seq = layer in cfg.ttt_seq.layer_ids(cfg.n_layers)
        if has_seq and cfg.ttt_seq.mode == "replace":
            self.attn = None
        else:
            self.attn = Attention(cfg, window=cfg.layer_window(layer), runtime=runtime, rngs=rngs)
        self.ttt_seq = TTTSeqLayer(cfg, runtime=runtime, rngs=rngs) if has_seq else None
        self.mlp_norm = RMSNorm(cfg.d_model, eps=cfg.rms_norm_eps, param_dtype=pd)
        self.mlp = InPlaceTTTMLP(cfg, runtime=runtime, rngs=rngs) if self.is_ttt else SwiGLUMLP(cfg, rngs=rngs)

    def __call__(self, x: jax.Array, *, x0: Optional[jax.Array], positions: jax.Array,
                 segment_ids: Optional[jax.Array] = None) -> jax.Array:
        # Named scopes label the ops for profiles (ttt_jax.bench.trace); they change no values.
        h = self.attn_norm(x)
        if self.ttt_seq is None:
            with jax.named_scope("attention"):
                x = x + self.attn(h, positions=positions, segment_ids=segment_ids)
        else:
            mix = self.ttt_seq(h, positions=positions, segment_ids=segment_ids)
            if self.attn is not None:
                with jax.named_scope("attention"):
                    mix = mix + self.attn(h, positions=positions, segment_ids=segment_ids)
            x = x + mix
        with jax.named_scope("mlp"):
            x = x + self.mlp(self.mlp_norm(x), x0=x0, segment_ids=segment_ids)
        return x
