"""Single-device attention through the fused kernels of :mod:`ttt_jax.ops.kernels`: the adapters
behind ``impl="cudnn"``, ``"flash"`` and ``"pallas"`` of :func:`ttt_jax.ops.attention.attention`
(argument checks, padding to the kernels' lengths, dropping padded rows), and :func:`per_device`,
which runs a kernel XLA cannot partition once per device under a mesh.

Shapes and semantics are those of :func:`ttt_jax.ops.attention.attention`: ``q [B, T, H, Dh]``,
``k, v [B, T, KV, Dh]``, optional ``segment_ids [B, T]`` (0 = padding, whose rows output 0),
``window`` (0 = full causal); each adapter returns ``[B, T, H, Dh]`` in ``q.dtype``. Callers pass
validated arguments and a float ``scale``; :func:`ttt_jax.ops.attention.attention` is the entry
point and the tests compare every path with :func:`ttt_jax.ops.attention_reference.attention_reference`.
"""

from __future__ import annotations

import math
from typing import Optional

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from ttt_jax.ops.attention_reference import attention_mask
from ttt_jax.ops.kernels import cudnn_blocks, flash
from ttt_jax.platform import target_platform


def zero_padding_rows(out: jax.Array, segment_ids: Optional[jax.Array]) -> jax.Array:
    """Padding queries (segment id 0) output exactly 0; also blocks their gradient."""
    if segment_ids is None:
        return out
    return jnp.where((segment_ids != 0)[:, :, None, None], out, jnp.zeros((), out.dtype))


# --------------------------------------------------------------------------------------------------
# cuDNN (jax.nn.dot_product_attention)
# --------------------------------------------------------------------------------------------------


def attention_cudnn(q, k, v, segment_ids, *, window: int, scale: float) -> jax.Array:
    """``impl="cudnn"``: one ``jax.nn.dot_product_attention`` call (segment ids as a dense
    ``[B, 1, T, T]`` mask); ``ValueError`` naming the reason where cuDNN cannot run."""
    reason = cudnn_blocks.cudnn_unsupported_reason(q, backend=target_platform())
    if reason is not None:
        raise ValueError(f"attention impl='cudnn' cannot run here: {reason}; use impl='auto' or "
                         "impl='xla'")
    b, t, h, d = q.shape
    mask = None
    # cuDNN's backward pass rejects odd sequence lengths: pad at the end (invisible to real
    # queries under the causal mask; the padded rows are dropped).
    pad = t % 2
    if pad:
        q, k, v = (jnp.pad(x, [(0, 0), (0, pad), (0, 0), (0, 0)]) for x in (q, k, v))
    if segment_ids is not None:
        seg = jnp.pad(segment_ids.astype(jnp.int32), [(0, 0), (0, pad)])
        idx = jnp.arange(t + pad)
        # Padding query rows are fully masked here; cuDNN gives them finite values we zero below.
        mask = attention_mask(idx, idx, window=window, q_segment_ids=seg,
                              k_segment_ids=seg)[:, None]                     # [B,1,T,T]
    out = jax.nn.dot_product_attention(
        q, k.astype(q.dtype), v.astype(q.dtype), mask=mask, scale=scale, is_causal=True,
        local_window_size=(window - 1, 0) if window > 0 else None, implementation="cudnn")
    out = out[:, :t]
    return zero_padding_rows(out, segment_ids)


# --------------------------------------------------------------------------------------------------
# Pallas (Triton) flash kernels with native segment ids
# --------------------------------------------------------------------------------------------------


def flash_length(t: int) -> int:
    """Padded length for the flash kernels: a multiple of their 128-row tiles (16 when short)."""
    m = 128 if t >= 128 else 16
    return -(-t // m) * m


def attention_flash(q, k, v, segment_ids, *, window: int, scale: float) -> jax.Array:
    """``impl="flash"``: the Pallas (Triton) kernels with native segment ids and window, lengths
    padded by :func:`flash_length`; Pallas interpret mode off GPU."""
    interpret = target_platform() != "gpu"
    b, t, h, d = q.shape
    tp = flash_length(t)
    pad = tp - t
    # Padding at the end: invisible to real queries (causal; segment id 0 with packed ids), and
    # the padded rows are dropped.
    q, k, v = (jnp.pad(x, [(0, 0), (0, pad), (0, 0), (0, 0)]) for x in (q, k.astype(q.dtype),
                                                                       v.astype(q.dtype)))
    reason = flash.flash_unsupported_reason(q, k, causal=True, interpret=interpret)
    if reason is not None:
        raise ValueError(f"attention impl='flash' cannot run here: {reason}; use impl='auto' or "
                         "impl='xla'")
    seg = None
    if segment_ids is not None:
        seg = jnp.pad(segment_ids.astype(jnp.int32), [(0, 0), (0, pad)])
    out = flash.flash_attention(q, k, v, True, scale, interpret, segment_ids=seg, window=window)
    return out[:, :t]


# --------------------------------------------------------------------------------------------------
# Pallas (TPU splash attention)
# --------------------------------------------------------------------------------------------------


# Mesh axes that split the batch and the heads of attention's operands (the trainer's layout,
# ttt_jax.sharding).
_BATCH_AXES, _HEAD_AXIS = ("data", "fsdp"), "tensor"


def per_device(fn, q, k, v, *rows, check_vma: bool = False) -> jax.Array:
    """``fn(q, k, v, *rows)`` once per device when the trace runs under a mesh of more than one
    device: inside a ``shard_map`` of its own over every mesh axis still automatic. XLA cannot
    partition a Mosaic kernel ("wrap the call in a shard_map"), and attention is independent per
    (row, head): rows are split over ``data`` x ``fsdp`` and heads over ``tensor`` where they
    divide, any other axis sees whole operands (XLA reshards at the boundary if the operands are
    laid out otherwise).

    ``q [B, Tq, H, Dh]``, ``k, v [B, Tk, KV, Dh]`` and the result (shaped like ``q``) are split by
    rows and heads; ``rows`` (segment ids, positions: ``[B, ...]``, ``None`` allowed and passed on
    as ``None``) by rows only."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return fn(q, k, v, *rows)
    manual = set(getattr(mesh, "manual_axes", ()))
    # Every automatic axis, size 1 included: a Mosaic call lowers only where the whole mesh is
    # manual (JAX refuses it inside a shard_map that leaves any axis automatic).
    auto = [a for a in mesh.axis_names if a not in manual]
    if not auto or (not manual and all(mesh.shape[a] == 1 for a in auto)):
        return fn(q, k, v, *rows)
    batch = tuple(a for a in _BATCH_AXES if a in auto and mesh.shape[a] > 1)
    if q.shape[0] % math.prod(mesh.shape[a] for a in batch):
        batch = ()
    heads = _HEAD_AXIS if _HEAD_AXIS in auto and mesh.shape[_HEAD_AXIS] > 1 else None
    if heads and (q.shape[2] % mesh.shape[heads] or k.shape[2] % mesh.shape[heads]):
        heads = None
    spec = P(batch or None, None, heads, None)
    given = [i for i, r in enumerate(rows) if r is not None]
    row_specs = tuple(P(batch or None, *([None] * (rows[i].ndim - 1))) for i in given)

    def local(q_, k_, v_, *given_rows):
        full = [None] * len(rows)
        for i, r in zip(given, given_rows):
            full[i] = r
        return fn(q_, k_, v_, *full)

    # check_vma=False (default): splash's pallas_call declares plain output shapes (no varying-axes
    # info); kernels that type their results varying (ttt_jax.ops.attention_cp_tpu) ask for True.
    mapped = jax.shard_map(local, in_specs=(spec,) * 3 + row_specs, out_specs=spec,
                           axis_names=frozenset(auto), check_vma=check_vma)
    return mapped(q, k, v, *(rows[i] for i in given))


def attention_splash(q, k, v, segment_ids, *, window: int, scale: float,
                      block_size: Optional[int]) -> jax.Array:
    # One splash call through ttt_jax.ops.kernels.tpu_splash: 128-token padding (not a multiple of
    # the 512 tile), GQA without repeating K/V, a custom VJP that works inside a variance-checking
    # shard_map. Its tiles follow the length (512 / 256 / 128); ``block_size`` is for "xla".
    from ttt_jax.ops.kernels.tpu_splash import tpu_attention

    del block_size
    on_tpu = target_platform() == "tpu"   # the target's platform: Mosaic when compiling for TPU
    return tpu_attention(q, k, v, segment_ids=segment_ids, window=window, scale=scale,
                         interpret=not on_tpu)
