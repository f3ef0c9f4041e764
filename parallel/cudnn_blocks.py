"""cuDNN flash-attention block kernels for ring attention.

Ring attention (:mod:`parallel.fused_attention`) needs, for each (query block, key block) pair:

* a forward pass that returns the block's output *and* its float32 log-sum-exp, so that blocks are
  merged by online softmax;
* a backward pass that takes the *merged* output and log-sum-exp of all blocks, so that the block's
  gradients are those of the global softmax (``P = exp(S * scale - lse)``,
  ``dS = P * (dO V^T - rowsum(dO * O))``).

cuDNN's fused attention computes exactly these: its forward kernel writes the softmax statistics
(the log-sum-exp) as a residual and its backward kernel reads them back together with the forward
output. JAX's public ``jax.nn.dot_product_attention`` does not let a caller use that: it returns
the statistics cast to the output dtype (bfloat16 loses the precision the merge needs) and its VJP
only ever uses its own residuals. This module calls the forward and backward *rules* of JAX's cuDNN
custom VJP (``jax._src.cudnn.fused_attention_stablehlo``) directly, and hands the backward rule a
residual tuple whose statistics and output are the ring's merged ones.

Those rules are private to JAX and may change between releases. :func:`private_api_problem` checks
the signatures this module was written against (JAX 0.10 and 0.11) and says what differs; callers
(``parallel.fused_attention``) then use the Pallas kernels of :mod:`parallel.flash` instead. The
GPU tests compare both kernels with a dense float32 reference, values and gradients.

Shapes::

    q: [B, Tq, H, Dh]    k, v: [B, Tk, KV, Dh]    (bfloat16 / float16; H % KV == 0, GQA native)
    lse: [B, H, Tq] float32 (natural log of each row's sum of exp(scale * q.k))

Masks: ``causal=False`` (every query sees every key) or ``causal=True`` (``Tq == Tk``, top-left
aligned: query ``i`` sees keys ``j <= i``).
"""

from __future__ import annotations

import functools
import inspect
from typing import Optional

import jax
import jax.numpy as jnp

# Parameter names of the private rules, as in JAX 0.10 / 0.11. The backward rule's 8th parameter
# receives the custom VJP's ``cudnn_version`` argument; its name has varied, so it is not checked.
_FWD_RULE = "_dot_product_attention_fwd_rule"
_BWD_RULE = "_dot_product_attention_bwd_rule"
_FWD_PARAMS = ("query", "key", "value", "bias", "q_seqlen", "kv_seqlen", "q_offsets", "kv_offsets",
               "page_table_k", "page_table_v", "scale", "seed", "dropout_rate", "variadic_args",
               "mask_type", "layout", "sliding_window_length", "cudnn_version", "return_residual")
_BWD_PARAMS = ("scale", "seed", "dropout_rate", "variadic_args", "mask_type", "layout",
               "sliding_window_length", None, "return_residual", "res", "grad_output")
# The backward rule's residual tuple: operands, the ten optional inputs' placeholders, then
# (softmax statistics, forward output) -- which we replace by the merged ones.
_N_RES = 12


def _module():
    from jax._src.cudnn import fused_attention_stablehlo
    return fused_attention_stablehlo


def _params_problem(fn, want) -> Optional[str]:
    got = tuple(inspect.signature(fn).parameters)
    if len(got) != len(want) or any(w is not None and g != w for g, w in zip(got, want)):
        return f"{fn.__name__}{got} (expected {tuple(w or '*' for w in want)})"
    return None


@functools.lru_cache(maxsize=None)
def private_api_problem() -> Optional[str]:
    """What keeps this JAX's private cuDNN attention rules from being used here (``None``: usable)."""
    try:
        fa = _module()
    except ImportError as e:  # a JAX without the cuDNN fused-attention module
        return f"jax._src.cudnn.fused_attention_stablehlo is not importable ({e})"
    for name, want in ((_FWD_RULE, _FWD_PARAMS), (_BWD_RULE, _BWD_PARAMS)):
        fn = getattr(fa, name, None)
        if fn is None:
            return f"JAX {jax.__version__} has no {name}"
        problem = _params_problem(fn, want)
        if problem is not None:
            return f"JAX {jax.__version__} changed a private cuDNN attention rule: {problem}"
    for name in ("MaskType", "AttentionLayout", "check_cudnn_version"):
        if not hasattr(fa, name):
            return f"JAX {jax.__version__} has no jax._src.cudnn.fused_attention_stablehlo.{name}"
    return None


def _common(q: jax.Array, causal: bool, scale: float):
    """Positional arguments shared by both rules, after the operands."""
    fa = _module()
    mask = fa.MaskType.CAUSAL if causal else fa.MaskType.NO_MASK
    # (scale, seed, dropout_rate, variadic_args=(has_bias, has_dbias), mask_type, layout, window)
    return fa, (float(scale), 42, 0.0, (False, False), mask, fa.AttentionLayout.BTNH.value, None)


def _unused(q: jax.Array) -> jax.Array:
    """The placeholder JAX passes for absent optional inputs (bias, sequence lengths, offsets, pages)."""
    return jnp.zeros((0,), q.dtype)


def cudnn_block_fwd(q: jax.Array, k: jax.Array, v: jax.Array, *, causal: bool,
                    scale: float) -> tuple[jax.Array, jax.Array]:
    """Attention of one (query block, key block) pair with its log-sum-exp, by one cuDNN call.

    Args:
      q: ``[B, Tq, H, Dh]``; k, v: ``[B, Tk, KV, Dh]`` (bfloat16 or float16, same dtype).
      causal: top-left aligned causal mask (``Tq == Tk``) or none.
      scale: logit scale.

    Returns:
      ``out [B, Tq, H, Dh]`` in ``q.dtype`` (normalised within the block) and
      ``lse [B, H, Tq]`` float32.
    """
    _check(q, k, v, causal)
    fa, common = _common(q, causal, scale)
    nu = _unused(q)
    outputs, _ = getattr(fa, _FWD_RULE)(q, k, v, nu, nu, nu, nu, nu, nu, nu, *common,
                                        fa.check_cudnn_version(), True)
    out, lse = outputs[0], outputs[1]
    return out, lse.astype(jnp.float32)


def cudnn_block_bwd(q: jax.Array, k: jax.Array, v: jax.Array, do: jax.Array, out: jax.Array,
                    lse: jax.Array, *, causal: bool,
                    scale: float) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Gradients of one (query block, key block) pair given the *global* output and log-sum-exp.

    Args:
      q, k, v, causal, scale: as in :func:`cudnn_block_fwd`.
      do: ``[B, Tq, H, Dh]`` cotangent of the global output (cast to ``q.dtype``).
      out: ``[B, Tq, H, Dh]`` the global (merged) output of these queries (cast to ``q.dtype``);
        cuDNN forms ``rowsum(dO * out)`` from it.
      lse: ``[B, H, Tq]`` float32 global log-sum-exp of these queries.

    Returns:
      ``(dq, dk, dv)`` in the operands' dtype, shaped like ``q``, ``k``, ``v``.
    """
    _check(q, k, v, causal)
    fa, common = _common(q, causal, scale)
    nu = _unused(q)
    res = (q, k, v, nu, nu, nu, nu, nu, nu, nu, lse.astype(jnp.float32), out.astype(q.dtype))
    assert len(res) == _N_RES
    grads = getattr(fa, _BWD_RULE)(*common, fa.check_cudnn_version(), False, res, do.astype(q.dtype))
    return grads[0], grads[1], grads[2]


def _check(q, k, v, causal):
    if q.ndim != 4 or k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(f"cuDNN block kernels: need q [B, Tq, H, Dh], k/v [B, Tk, KV, Dh]; got "
                         f"{q.shape}, {k.shape}, {v.shape}")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"cuDNN block kernels: {q.shape[2]} query heads are not a multiple of "
                         f"{k.shape[2]} key/value heads")
    if causal and q.shape[1] != k.shape[1]:
        raise ValueError(f"cuDNN block kernels: a causal block needs as many queries as keys, got "
                         f"{q.shape[1]} and {k.shape[1]}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"cuDNN block kernels: q, k, v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype})")
