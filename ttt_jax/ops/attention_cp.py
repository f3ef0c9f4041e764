"""Causal attention over a sequence split across the ``context`` mesh axis: the dispatcher.

One public function, :func:`context_attention`, called *inside* ``jax.shard_map`` with
``axis_name`` (usually ``"context"``) manual, on per-device blocks::

    q: [B, T_local, H, Dh]    k, v: [B, T_local, KV, Dh]    segment_ids: [B, T_local] (optional)

with ``H % KV == 0`` (GQA: query head ``h`` uses kv head ``h // (H // KV)``). ``n =
axis_size(axis_name)`` devices hold a global sequence of ``T = n * T_local`` tokens, in the
``"contiguous"`` or load-balanced ``"zigzag"`` layout of :mod:`parallel.layout`.

Semantics (the same as ``ttt_jax.ops.attention``; one mask,
:func:`ttt_jax.ops.attention_reference.attention_mask`): query ``t`` sees key ``s`` iff ``s <= t``
in *global* positions, ``s > t - window`` when ``window > 0`` (the window counts the query itself),
and, with segment ids, ``seg[s] == seg[t] != 0`` (same id, not same run; 0 = padding). A query that
sees no key (padding) outputs exactly 0, with zero gradient. Scores, softmax statistics and
accumulators are float32; matmuls take the input dtype with float32 accumulation; outputs are
``q.dtype``. The oracle of every path is :func:`ttt_jax.ops.attention_reference.attention_reference`
on the gathered sequence.

The paths, by role:

* :mod:`ttt_jax.ops.attention_cp_ring` -- full causal attention in plain XLA: the ring
  (``impl="ring"``, the default: K/V blocks travel by ``ppermute``, ``O(T_local)`` memory,
  communication overlapped with compute) and the all-gather (``impl="allgather"``: one collective,
  ``O(T)`` memory);
* :mod:`ttt_jax.ops.attention_cp_window` -- sliding window after one halo exchange: plain XLA, and
  the fused single-call form;
* :mod:`ttt_jax.ops.attention_cp_fused` -- the ring with one fused kernel per (query block, key
  block) pair, which returns the block's log-sum-exp and whose backward takes the merged one:
  cuDNN's kernels (:mod:`ttt_jax.ops.kernels.cudnn_blocks`) where this JAX has its private cuDNN
  functions as expected, else the Pallas (Triton) kernels of :mod:`ttt_jax.ops.kernels.flash`;
* :mod:`ttt_jax.ops.attention_cp_halo` -- the split sliding window: a local call plus a halo block
  merged by log-sum-exp;
* :mod:`ttt_jax.ops.attention_cp_tpu` -- ``kernel="tpu"``: the ring, the all-gather and the halo
  window with TPU splash (Pallas Mosaic) blocks of :mod:`ttt_jax.ops.kernels.tpu_splash`.

``kernel="auto"`` (the default) takes the fused path where it can run (NVIDIA GPU, bf16/fp16, no
segment ids with a window, block lengths multiples of 16) and the XLA path otherwise -- so CPU and
TPU results are unchanged; :func:`fused_unsupported_reason` says why the fused path was not taken.
"""

from __future__ import annotations

import functools
import math
from typing import Literal, Optional

import jax

from ttt_jax.parallel.layout import Layout, check_layout
from ttt_jax.ops import (attention_cp_fused, attention_cp_halo, attention_cp_ring, attention_cp_tpu,
                         attention_cp_window)
from ttt_jax.ops.attention_kernels import per_device
from ttt_jax.ops.attention_cp_window import check_window
from ttt_jax.ops.attention_reference import check_qkv
from ttt_jax.ops.kernels import cudnn_blocks, flash
from ttt_jax.platform import target_platform

ContextImpl = Literal["ring", "allgather"]
CONTEXT_IMPLS = ("ring", "allgather")
ContextKernel = Literal["auto", "xla", "fused", "pallas", "tpu"]
CONTEXT_KERNELS = ("auto", "xla", "fused", "pallas", "tpu")
CONTEXT_HALOS = ("single", "split")
# Packed documents (segment ids) in full causal layers: the fused ring runs the Pallas blocks with
# the ids, ``kernel="auto"`` included (its GPU-marked tests pass against the unsharded reference,
# contiguous and zigzag, and the Qwen3-4B-shape 128k stage-2 run trained with it: benchmarks/README.md,
# "Trainer at the Qwen3-4B shape").



def fused_unsupported_reason(q: jax.Array, k: jax.Array, *, segment_ids: Optional[jax.Array] = None,
                             window: int = 0, impl: ContextImpl = "ring",
                             layout: Layout = "contiguous") -> Optional[str]:
    """Why ``kernel="fused"`` cannot run these (per-device) operands here; ``None`` when it can.

    Fused means: one cuDNN call per device for a sliding window (after the halo exchange), cuDNN or
    Pallas flash kernels per ring block for full causal attention (:mod:`ttt_jax.ops.attention_cp_fused`;
    with segment ids the Pallas kernels). For the ring this checks the Pallas kernels'
    requirements: where the cuDNN blocks cannot run, the ring uses the Pallas ones.
    """
    if segment_ids is not None and window:
        return "segment ids (packed documents) with a sliding window have no fused context-parallel kernel"
    if window:
        return cudnn_blocks.cudnn_unsupported_reason(q)
    if impl != "ring":
        return f"context attention impl={impl!r} has no fused kernel (the fused kernels serve the ring)"
    t = q.shape[1]
    if layout == "zigzag":  # half blocks: all queries x the early key half
        return flash.flash_unsupported_reason(q, k[:, : t // 2])
    return flash.flash_unsupported_reason(q, k, causal=True)


def runs_mosaic(kernel: ContextKernel) -> bool:
    """Whether :func:`context_attention` with this ``kernel`` calls Pallas Mosaic (TPU) kernels in
    the program being traced; a Mosaic call lowers only inside a ``shard_map`` that leaves no mesh
    axis automatic, so the caller's ``shard_map`` should make them all manual."""
    return kernel == "tpu" or (kernel == "auto" and target_platform() == "tpu")


def context_attention(q: jax.Array, k: jax.Array, v: jax.Array, axis_name: str, *,
                      segment_ids: Optional[jax.Array] = None, window: int = 0,
                      impl: ContextImpl = "ring", layout: Layout = "contiguous",
                      kernel: ContextKernel = "auto", scale: Optional[float] = None,
                      block_size: Optional[int] = None, halo: str = "split") -> jax.Array:
    """Causal attention of a context-sharded sequence (inside ``shard_map``).

    ``window > 0`` runs the sliding window (halo exchange; contiguous layout only); ``window == 0``
    runs ring attention (``impl="ring"``, the default: ``O(T_local)`` memory, communication
    overlapped with compute -- the choice for long contexts) or the all-gather
    (``impl="allgather"``: one collective, ``O(T)`` memory); both in
    :mod:`ttt_jax.ops.attention_cp_ring`, where the shapes are described.

    ``kernel`` picks the per-device compute: ``"xla"`` (plain XLA, any backend, segment ids:
    :mod:`ttt_jax.ops.attention_cp_ring`, :mod:`ttt_jax.ops.attention_cp_window`), ``"fused"``
    (:mod:`ttt_jax.ops.attention_cp_fused`: cuDNN -- or, where JAX's private cuDNN functions are
    not as expected, Pallas -- flash kernels per ring block, one cuDNN call for the sliding window;
    NVIDIA GPU, bf16/fp16; segment ids only in the ring, by the Pallas blocks -- an explicit choice
    that cannot run raises ``ValueError`` naming why), ``"pallas"`` (fused, with the Pallas kernels
    per ring block), ``"tpu"`` (:mod:`ttt_jax.ops.attention_cp_tpu`: splash (Pallas Mosaic)
    blocks in the ring or the all-gather, one splash call with the halo for the sliding window;
    segment ids everywhere; Pallas interpret mode when the program is not built for TPU) or
    ``"auto"`` (``"tpu"`` when the program is built for TPU, :func:`ttt_jax.platform.target_platform`;
    elsewhere fused where it can run, XLA otherwise).
    ``block_size`` is passed on to the XLA paths (``None``: their default). ``halo`` picks the
    fused sliding-window computation: ``"split"`` (the default: faster, benchmarks/history/2026-11-notes.md) or ``"single"`` (:func:`ttt_jax.ops.attention_cp_window.
    halo_window_attention`, one call with zero query rows; the test reference) -- ``"split"``
    (:func:`ttt_jax.ops.attention_cp_halo.halo_split_attention`) is a local call plus a halo block; with
    cuDNN blocks it needs an even ``T_local``, with the Pallas ones a multiple of 16, else the
    single call runs).
    """
    if halo not in CONTEXT_HALOS:
        raise ValueError(f"context_attention: halo={halo!r} is not one of {CONTEXT_HALOS}")
    if impl not in CONTEXT_IMPLS:
        raise ValueError(f"context_attention: impl={impl!r} is not one of {CONTEXT_IMPLS}")
    if kernel not in CONTEXT_KERNELS:
        raise ValueError(f"context_attention: kernel={kernel!r} is not one of {CONTEXT_KERNELS}")
    if window and layout != "contiguous":
        raise ValueError("context_attention: sliding-window attention needs the contiguous layout "
                         "(its work is already balanced); got layout='zigzag'")
    check_qkv(q, k, v, segment_ids, "context_attention")
    check_layout(layout, q.shape[1])
    if window:
        check_window(window, q.shape[1])
    if kernel == "auto" and target_platform() == "tpu":
        kernel = "tpu"   # splash (Pallas Mosaic) ring / halo whenever the program is built for TPU
    if kernel == "tpu":
        interpret = target_platform() != "tpu"
        if window:
            fn = functools.partial(_tpu_window, axis_name=axis_name, window=window, scale=scale,
                                   interpret=interpret)
        else:
            fn = functools.partial(_tpu_ring, axis_name=axis_name, impl=impl, layout=layout,
                                   scale=scale, interpret=interpret)
        # Mosaic calls cannot be partitioned by XLA: mesh axes a caller's shard_map leaves automatic
        # (data, fsdp, tensor) are made manual around them too (rows and heads are independent).
        # The halo's and the ring's collectives over ``axis_name`` cannot sit in such a nested
        # shard_map, so the model's is manual over every axis already (runs_mosaic;
        # ttt_jax.nn.context.run_over_context) and this one is then a no-op.
        return per_device(fn, q, k, v, segment_ids, check_vma=True)
    if kernel != "xla":
        reason = fused_unsupported_reason(q, k, segment_ids=segment_ids, window=window, impl=impl,
                                          layout=layout)
        if reason is not None and kernel != "auto":
            raise ValueError(f"context kernel {kernel!r} cannot run here: {reason}; use 'auto' or 'xla'")
        if reason is None:
            scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
            if window and halo == "split" and window > 1 and q.shape[1] % 2 == 0:
                blocks = "cudnn" if cudnn_blocks.private_api_problem() is None else "pallas"
                if blocks == "cudnn" or q.shape[1] % 16 == 0:
                    return attention_cp_halo.halo_split_attention(q, k, v, axis_name, window=window,
                                                                  scale=scale, blocks=blocks)
            if window:
                local = functools.partial(cudnn_blocks.cudnn_window_attention, window=window,
                                          scale=scale)
                return attention_cp_window.halo_window_attention(q, k, v, axis_name, window=window,
                                                                 local_attention=local)
            return attention_cp_fused.ring_flash_attention(
                q, k, v, axis_name, layout=layout, scale=scale,
                blocks="pallas" if kernel == "pallas" else None, segment_ids=segment_ids)
    if window:
        return attention_cp_window.sliding_window_attention(
            q, k, v, axis_name, window=window, segment_ids=segment_ids, scale=scale,
            block_size=block_size)
    if impl == "allgather":
        return attention_cp_ring.allgather_attention(q, k, v, axis_name, segment_ids=segment_ids,
                                                     layout=layout, scale=scale)
    kwargs = {} if block_size is None else {"block_size": block_size}
    return attention_cp_ring.ring_attention(q, k, v, axis_name, segment_ids=segment_ids,
                                            layout=layout, scale=scale, **kwargs)


def _tpu_window(q, k, v, segment_ids, *, axis_name, window, scale, interpret):
    return attention_cp_tpu.tpu_window_attention(q, k, v, axis_name, window=window,
                                                 segment_ids=segment_ids, scale=scale,
                                                 interpret=interpret)


def _tpu_ring(q, k, v, segment_ids, *, axis_name, impl, layout, scale, interpret):
    return attention_cp_tpu.tpu_context_attention(q, k, v, axis_name, kernel=impl, layout=layout,
                                                  segment_ids=segment_ids, scale=scale,
                                                  interpret=interpret)
