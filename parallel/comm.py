"""Analytic communication volume of context parallelism (bytes each device receives per train step).

Counts the collectives over the ``context`` axis that the context-parallel attention
(``ttt_jax.ops.attention_cp``) and :mod:`parallel.scan` issue for one forward + backward pass,
for one device (a ``ppermute`` sends as much as it receives; all-gathers and their reduce-scatter
transposes are counted as the ``n - 1`` blocks a device receives in a ring algorithm). Device 0's
empty halo is not subtracted: the numbers are the per-device maximum. Data / FSDP / tensor
collectives are not included.

Per full-attention layer (``kv = batch * T_local * KV * Dh * act_bytes`` for K or V of one block):

* ring:      forward ``(n - 1) * 2kv``; backward ``(n - 1) * 2kv`` (K/V again) plus ``n`` hops of
  dK/dV, which travel as float32 accumulators (``n * 2kv * 4 / act_bytes``).
* allgather: forward ``(n - 1) * 2kv``; backward a reduce-scatter of dK/dV in the K/V dtype,
  ``(n - 1) * 2kv``.

Per sliding-window layer: the halo (``window - 1`` keys and values) forward, its cotangent backward.

Per In-Place TTT layer: summaries ``(a [B], B [B, F, D])`` in float32, one per segment (two per
device in the zigzag layout). ``allgather``: ``n - 1`` summaries per segment forward, as many in the
reduce-scatter backward; ``ppermute``: ``ceil(log2 n) + 1`` shifts per segment forward and backward.

With ``remat`` the forward collectives run twice (the backward pass recomputes the forward).
"""

from __future__ import annotations

import math
from typing import Sequence


def context_comm_bytes(*, n: int, batch: int, seq_len: int, layer_windows: Sequence[int],
                       kv_heads: int, head_dim: int, ttt_layers: int = 0,
                       ttt_shape: tuple[int, int] = (0, 0), act_bytes: int = 2,
                       attention: str = "ring", scan: str = "allgather",
                       layout: str = "contiguous", remat: bool = False) -> dict[str, int]:
    """Bytes one device receives over the ``context`` axis in one train step.

    Args:
      n: context devices.
      batch: rows each context group processes (global batch / data-parallel ways).
      seq_len: global sequence length ``T`` (``T_local = T / n``).
      layer_windows: attention window of every layer (0 = full causal).
      kv_heads, head_dim: K/V heads held by a device (after any tensor parallelism) and head size.
      ttt_layers: number of In-Place TTT layers; ttt_shape: their fast weight ``(F, D)`` per device.
      act_bytes: bytes per K/V element (2 for bf16).
      attention: ``"ring"`` or ``"allgather"`` (full causal layers).
      scan: ``"allgather"`` or ``"ppermute"`` (the TTT cross-device scan).
      layout: ``"contiguous"`` or ``"zigzag"``.
      remat: the backward pass recomputes the forward (forward collectives counted twice).

    Returns:
      ``{"attention_fwd", "attention_bwd", "ttt_scan_fwd", "ttt_scan_bwd", "total"}`` in bytes
      (``*_fwd`` already doubled under ``remat``).
    """
    if n <= 1:
        return dict(attention_fwd=0, attention_bwd=0, ttt_scan_fwd=0, ttt_scan_bwd=0, total=0)
    t_local = seq_len // n
    kv = 2 * batch * t_local * kv_heads * head_dim * act_bytes          # K and V of one block
    att_f = att_b = 0
    for w in layer_windows:
        if w:
            halo = 2 * batch * (w - 1) * kv_heads * head_dim * act_bytes
            att_f += halo
            att_b += halo
        elif attention == "ring":
            att_f += (n - 1) * kv
            att_b += (n - 1) * kv + n * kv * 4 // act_bytes
        else:
            att_f += (n - 1) * kv
            att_b += (n - 1) * kv
    f, d = ttt_shape
    summary = 4 * batch * (1 + f * d)                                     # fp32 (a, B)
    segments = 2 if layout == "zigzag" else 1
    if scan == "allgather":
        per_layer = segments * (n - 1) * summary
    else:
        per_layer = segments * (math.ceil(math.log2(n)) + 1) * summary
    ttt_f = ttt_b = ttt_layers * per_layer
    if remat:
        att_f *= 2
        ttt_f *= 2
    return dict(attention_fwd=att_f, attention_bwd=att_b, ttt_scan_fwd=ttt_f, ttt_scan_bwd=ttt_b,
                total=att_f + att_b + ttt_f + ttt_b)
