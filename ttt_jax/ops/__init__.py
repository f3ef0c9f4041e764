"""Pure-JAX operators (no Flax), each with a reference beside it.

* In-Place TTT: ``inplace_ttt`` (+ ``_reference``, ``_layout``, ``_scan``, ``_cp`` context parallel).
* Attention: ``attention`` (single device, ``impl=`` switch), ``attention_reference`` (the mask and
  the oracles), ``attention_cp`` (context parallel: ``_ring``, ``_window``, ``_fused``, ``_halo``),
  ``attention_cache`` (new queries against a KV cache, for cached inference); their per-device
  kernels in :mod:`ttt_jax.ops.kernels`.
* The target conv (``conv``), losses, the TTT-Linear/MLP inner loop (``ttt_layer``), precision.
"""

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
