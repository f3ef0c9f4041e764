"""cuDNN flash-attention kernels: ring blocks with log-sum-exp, and one sliding-window call.

Ring attention (:mod:`ttt_jax.ops.attention_cp_fused`) needs, for each (query block, key block) pair:

* a forward pass that returns the block's output *and* its float32 log-sum-exp, so that blocks are
  merged by online softmax;
* a backward pass that takes the *merged* output and log-sum-exp of all blocks, so that the block's
  gradients are those of the global softmax (``P = exp(S * scale - lse)``,
  ``dS = P * (dO V^T - rowsum(dO * O))``).

cuDNN's fused attention computes exactly these: its forward kernel writes the softmax statistics
(the log-sum-exp) as a residual and its backward kernel reads them back together with the forward
output. JAX's public ``jax.nn.dot_product_attention`` does not let a caller use that: it returns
the statistics cast to the output dtype (bfloat16 loses the precision the merge needs) and its VJP
only ever uses its own residuals. This module calls the private functions behind JAX's cuDNN primitives
(``jax._src.cudnn.fused_attention_stablehlo``) directly and hands the backward the ring's merged
statistics and output. They also bypass JAX's ``custom_partitioning`` of those primitives, which
fails inside a ``shard_map`` that leaves some mesh axes automatic (:func:`cudnn_attention` is the
differentiable single-call form used for the sliding window under context parallelism).

Those functions are private to JAX and may change between releases. :func:`private_api_problem` checks
the signatures this module was written against (JAX 0.10 and 0.11) and says what differs; callers
(``ttt_jax.ops.attention_cp_fused``) then use the Pallas kernels of :mod:`ttt_jax.ops.kernels.flash`
instead. The GPU tests compare both kernels with a dense float32 reference, values and gradients.

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

from ttt_jax.platform import target_platform

# Parameter names of the private functions used, as in JAX 0.10 / 0.11. They are the bodies of
# JAX's custom-partitioned cuDNN primitives: they bind the plain cuDNN primitives, which lower to
# one local cuDNN call. (The public path goes through ``custom_partitioning``, whose partitioner
# fails inside a ``shard_map`` that leaves some mesh axes automatic -- the model's context-parallel
# layers.)
_FWD = "_dot_product_attention_fwd_impl"
_BWD = "_dot_product_attention_bwd_impl"
_OPTIONAL = ("bias", "q_seqlen", "kv_seqlen", "q_offsets", "kv_offsets", "page_table_k",
             "page_table_v")
_STATIC = ("scale", "seed", "dropout_rate", "variadic_args", "mask_type", "layout",
           "sliding_window_length")
_FWD_PARAMS = ("query", "key", "value", *_OPTIONAL, *_STATIC, "is_training")
_BWD_PARAMS = ("query", "key", "value", *_OPTIONAL, "activation", "fwd_output", "grad_output",
               *_STATIC)


def _module():
    from jax._src.cudnn import fused_attention_stablehlo
    return fused_attention_stablehlo


def _params_problem(fn, want) -> Optional[str]:
    got = tuple(inspect.signature(fn).parameters)
    if got != want:
        return f"{fn.__name__}{got} (expected {want})"
    return None


@functools.lru_cache(maxsize=None)
def private_api_problem() -> Optional[str]:
    """What keeps this JAX's private cuDNN attention functions from being used here (``None``:
    usable)."""
    try:
        fa = _module()
    except ImportError as e:  # a JAX without the cuDNN fused-attention module
        return f"jax._src.cudnn.fused_attention_stablehlo is not importable ({e})"
    for name, want in ((_FWD, _FWD_PARAMS), (_BWD, _BWD_PARAMS)):
        fn = getattr(fa, name, None)
        if fn is None:
            return f"JAX {jax.__version__} has no {name}"
        problem = _params_problem(fn, want)
        if problem is not None:
            return f"JAX {jax.__version__} changed a private cuDNN attention function: {problem}"
    for name in ("MaskType", "AttentionLayout"):
        if not hasattr(fa, name):
            return f"JAX {jax.__version__} has no jax._src.cudnn.fused_attention_stablehlo.{name}"
    return None


def _static(causal: bool, window: int, scale: float) -> dict:
    fa = _module()
    return dict(scale=float(scale), seed=42, dropout_rate=0.0, variadic_args=(False, False),
                mask_type=fa.MaskType.CAUSAL if causal else fa.MaskType.NO_MASK,
                layout=fa.AttentionLayout.BTNH.value,
                sliding_window_length=int(window) if window else None)


def _unused(q: jax.Array) -> tuple:
    """The placeholders JAX passes for absent optional inputs (bias, sequence lengths, offsets,
    page tables)."""
    return (jnp.zeros((0,), q.dtype),) * len(_OPTIONAL)


def cudnn_block_fwd(q: jax.Array, k: jax.Array, v: jax.Array, *, causal: bool, scale: float,
                    window: int = 0) -> tuple[jax.Array, jax.Array]:
    """Attention of one (query block, key block) pair with its log-sum-exp, by one cuDNN call.

    Args:
      q: ``[B, Tq, H, Dh]``; k, v: ``[B, Tk, KV, Dh]`` (bfloat16 or float16, same dtype).
      causal: top-left aligned causal mask (``Tq == Tk``) or none.
      scale: logit scale.
      window: 0, or (causal only) keys per query, the query included (cuDNN's sliding window).

    Returns:
      ``out [B, Tq, H, Dh]`` in ``q.dtype`` (normalised within the block) and
      ``lse [B, H, Tq]`` float32.
    """
    _check(q, k, v, causal, window)
    outputs = getattr(_module(), _FWD)(q, k, v, *_unused(q), **_static(causal, window, scale),
                                       is_training=True)
    return outputs[0], outputs[1].astype(jnp.float32)


def cudnn_block_bwd(q: jax.Array, k: jax.Array, v: jax.Array, do: jax.Array, out: jax.Array,
                    lse: jax.Array, *, causal: bool, scale: float,
                    window: int = 0) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Gradients of one (query block, key block) pair given the *global* output and log-sum-exp.

    Args:
      q, k, v, causal, scale, window: as in :func:`cudnn_block_fwd`.
      do: ``[B, Tq, H, Dh]`` cotangent of the global output (cast to ``q.dtype``).
      out: ``[B, Tq, H, Dh]`` the global (merged) output of these queries (cast to ``q.dtype``);
        cuDNN forms ``rowsum(dO * out)`` from it.
      lse: ``[B, H, Tq]`` float32 global log-sum-exp of these queries.

    Returns:
      ``(dq, dk, dv)`` in the operands' dtype, shaped like ``q``, ``k``, ``v``.
    """
    _check(q, k, v, causal, window)
    grads = getattr(_module(), _BWD)(q, k, v, *_unused(q), lse.astype(jnp.float32),
                                     out.astype(q.dtype), do.astype(q.dtype),
                                     **_static(causal, window, scale))
    return grads[0], grads[1], grads[2]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def cudnn_attention(q: jax.Array, k: jax.Array, v: jax.Array, causal: bool, window: int,
                    scale: float) -> jax.Array:
    """Differentiable attention by one cuDNN call per direction, without ``custom_partitioning``
    (usable inside any ``shard_map``). Shapes as in :func:`cudnn_block_fwd`."""
    return cudnn_block_fwd(q, k, v, causal=causal, scale=scale, window=window)[0]


def _attention_fwd(q, k, v, causal, window, scale):
    out, lse = cudnn_block_fwd(q, k, v, causal=causal, scale=scale, window=window)
    return out, (q, k, v, out, lse)


def _attention_bwd(causal, window, scale, res, do):
    q, k, v, out, lse = res
    return cudnn_block_bwd(q, k, v, do, out, lse, causal=causal, scale=scale, window=window)


cudnn_attention.defvjp(_attention_fwd, _attention_bwd)


def _check(q, k, v, causal, window):
    if window and not causal:
        raise ValueError("cuDNN block kernels: a sliding window needs the causal mask")
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


def cudnn_window_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, window: int,
                           scale: float) -> jax.Array:
    """Causal sliding-window attention of equal-length ``q``/``k``/``v`` by one cuDNN call.

    ``[B, T, H, Dh]`` x ``[B, T, KV, Dh]`` -> ``[B, T, H, Dh]`` (GPU; bfloat16/float16). An odd
    length is padded by one token at the end (cuDNN's backward pass needs even lengths; the pad is
    invisible to real queries under the causal mask and its row is dropped).
    """
    t = q.shape[1]
    pad = t % 2
    if pad:
        q, k, v = (jnp.pad(x, [(0, 0), (0, pad), (0, 0), (0, 0)]) for x in (q, k, v))
    k, v = k.astype(q.dtype), v.astype(q.dtype)
    if private_api_problem() is None:
        # Straight to the cuDNN primitives: the public API's custom partitioning fails inside the
        # model's shard_map, which leaves the non-context mesh axes automatic.
        out = cudnn_attention(q, k, v, True, window, float(scale))
    else:
        out = jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=True,
                                           local_window_size=(window - 1, 0), implementation="cudnn")
    return out[:, :t]


def cudnn_unsupported_reason(q: jax.Array, backend: Optional[str] = None) -> Optional[str]:
    """Why cuDNN flash attention (:func:`cudnn_window_attention`, and the single-device
    ``impl="cudnn"`` of ``ttt_jax.ops.attention``) cannot run on ``q`` here (``None`` when it can).
    ``backend`` defaults to the target platform (:func:`ttt_jax.platform.target_platform`)."""
    backend = target_platform() if backend is None else backend
    if backend != "gpu":
        return f"cuDNN attention needs an NVIDIA GPU (the target platform is {backend!r})"
    if q.dtype not in (jnp.bfloat16, jnp.float16):
        return f"cuDNN flash attention needs bfloat16/float16 inputs, got {q.dtype}"
    d = q.shape[-1]
    if d % 8 or d > 256:
        return f"cuDNN flash attention needs head_dim a multiple of 8 and <= 256 (<= 128 before " \
               f"Hopper), got {d}"
    if d > 128:
        try:
            cc = float(getattr(jax.devices()[0], "compute_capability", "0"))
        except (TypeError, ValueError):
            cc = 0.0
        if cc < 9.0:
            return f"cuDNN flash attention supports head_dim {d} > 128 only on Hopper or newer"
    return None
