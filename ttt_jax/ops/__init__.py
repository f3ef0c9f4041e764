"""Pure-JAX operators (no Flax): In-Place TTT, its target conv, attention."""

from ttt_jax.ops.conv import chunked_depthwise_conv, inplace_ttt_target
from ttt_jax.ops.inplace_ttt import IMPLS as INPLACE_TTT_IMPLS
from ttt_jax.ops.inplace_ttt import affine_combine, inplace_ttt

__all__ = [
    "INPLACE_TTT_IMPLS",
    "affine_combine",
    "chunked_depthwise_conv",
    "inplace_ttt",
    "inplace_ttt_target",
]
