"""Flax NNX building blocks (see ``ttt_jax.nn.params`` for the logical axis names), and beside each
layer kind its inference cache and update (``kv_cache``, ``ttt_cache``, ``ttt_seq_cache``; a block's
:class:`LayerCache`; one call's :class:`CacheStep`)."""

from ttt_jax.nn.attention import Attention
from ttt_jax.nn.block import DecoderBlock, LayerCache, init_layer_cache
from ttt_jax.nn.cache import CacheStep
from ttt_jax.nn.mlp import InPlaceTTTMLP, SwiGLUMLP
from ttt_jax.nn.norm import RMSNorm
from ttt_jax.nn.params import LOGICAL_AXES, logical_axes, make_param
from ttt_jax.nn.rope import apply_rope, rope_cos_sin, rope_inv_freq, rotate_half

__all__ = [
    "Attention", "CacheStep", "DecoderBlock", "InPlaceTTTMLP", "LOGICAL_AXES", "LayerCache", "RMSNorm",
    "SwiGLUMLP", "apply_rope", "init_layer_cache", "logical_axes", "make_param", "rope_cos_sin",
    "rope_inv_freq", "rotate_half",
]
