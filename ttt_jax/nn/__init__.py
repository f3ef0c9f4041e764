"""Flax NNX building blocks (see ``ttt_jax.nn.params`` for the logical axis names)."""

from ttt_jax.nn.attention import Attention
from ttt_jax.nn.block import DecoderBlock
from ttt_jax.nn.mlp import InPlaceTTTMLP, SwiGLUMLP
from ttt_jax.nn.norm import RMSNorm
from ttt_jax.nn.params import LOGICAL_AXES, logical_axes, make_param
from ttt_jax.nn.rope import apply_rope, rope_cos_sin, rope_inv_freq, rotate_half

__all__ = [
    "Attention", "DecoderBlock", "InPlaceTTTMLP", "LOGICAL_AXES", "RMSNorm", "SwiGLUMLP",
    "apply_rope", "logical_axes", "make_param", "rope_cos_sin", "rope_inv_freq", "rotate_half",
]
