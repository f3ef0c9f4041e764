"""Cross-device exclusive scans of the affine monoid (DESIGN.md, "The associative operator").

A fast-weight state evolves by affine maps ``W -> a * W + B``. An element of the monoid is a pair

    a: [...]          scalar decay per batch element (1 = carry on, 0 = reset, 0 < a < 1 = decay)
    B: [..., F, D]    additive term (``a`` broadcasts over the trailing two dims of ``B``)

and applying ``(a1, B1)`` then ``(a2, B2)`` is ``combine((a1, B1), (a2, B2)) = (a2 * a1,
a2 * B1 + B2)``, associative with identity ``(1, 0)``.

Context parallelism: each device folds its own chunks into one summary ``(a, B)`` (the map from
the state entering its segment to the state leaving it), then calls :func:`exclusive_device_scan`
*inside* ``jax.shard_map`` to receive the composition of the summaries of every segment before its
own, i.e. the state entering its segment when the sequence starts from ``W = 0`` -- and replays its
chunks from there. Communication is one ``[..., F, D]`` summary per device, independent of sequence
length. Two modes:

* ``"allgather"`` -- one ``all_gather`` of all summaries, then each device forms only its own
  prefix as one weighted sum ``b_in = sum_j w_j B_j`` with scalar weights ``w_j = [j < p] *
  prod_{j<k<p} a_k`` (``p``: its position). That reads the gathered terms once, and its
  transpose is one broadcast multiply (a sequential combine of all prefixes, stacked and indexed,
  cost several ``[F, D]`` passes each way). One collective; receive volume ``n * |B|``. What the
  model uses (``ttt_jax.ops.inplace_ttt_cp``).
* ``"ppermute"`` -- Hillis-Steele: ``ceil(log2 n) + 1`` rounds of ``lax.ppermute`` (one shift for
  exclusivity, then shifts by 1, 2, 4, ...), each moving one summary. Receive volume
  ``(log2 n + 1) * |B|``. Kept as the log-depth primitive for large ``n``; at the measured sizes it
  was no faster and held more memory (benchmarks/history/2026-11-notes.md), so the model does not use it.

Both are differentiable by ordinary autodiff (the transposes of ``all_gather`` and ``ppermute`` are
collectives too), so gradients flow back to every device's summary.

Sequence order: with a contiguous layout position order is device order. ``order`` gives the
position rank of each device's segment for any other layout; :func:`exclusive_device_scan_zigzag`
handles the load-balanced layout where device ``i`` holds segments ``i`` and ``2n - 1 - i``.

Scans run in float32 (at least): inputs of lower precision are upcast and the results are float32.
"""

from __future__ import annotations

from typing import Literal, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

ScanMode = Literal["allgather", "ppermute"]
MODES = ("allgather", "ppermute")

Pair = tuple[jax.Array, jax.Array]


def combine(first: Pair, second: Pair) -> Pair:
    """Compose two affine maps: apply ``first`` then ``second``.

    Args:
      first: ``(a1 [...], B1 [..., F, D])``.
      second: ``(a2 [...], B2 [..., F, D])`` (leading dims broadcast against ``first``).

    Returns:
      ``(a2 * a1, a2 * B1 + B2)``.
    """
    a1, b1 = first
    a2, b2 = second
    return a2 * a1, a2[..., None, None] * b1 + b2


def identity_like(a: jax.Array, b: jax.Array) -> Pair:
    """The identity ``(1, 0)`` with the shapes (and, inside ``shard_map``, varying axes) of ``a, b``."""
    return jnp.ones_like(a), jnp.zeros_like(b)


def apply(pair: Pair, w: jax.Array) -> jax.Array:
    """Apply the map ``(a [...], B [..., F, D])`` to a state ``w [..., F, D]``: ``a * w + B``."""
    a, b = pair
    return a[..., None, None] * w + b


def _check_pair(a: jax.Array, b: jax.Array, what: str) -> tuple[jax.Array, jax.Array]:
    if b.ndim < 2 or tuple(b.shape[:-2]) != tuple(a.shape):
        raise ValueError(f"{what}: expected a [...] and b [..., F, D] with the same leading dims, got "
                         f"a {tuple(a.shape)} and b {tuple(b.shape)}")
    dtype = jnp.promote_types(jnp.promote_types(a.dtype, b.dtype), jnp.float32)
    return a.astype(dtype), b.astype(dtype)


def exclusive_scan_reference(a: jax.Array, b: jax.Array) -> Pair:
    """Sequential exclusive scan over the leading axis (the oracle of the device scans).

    Args:
      a: ``[N, ...]`` summaries in position order.
      b: ``[N, ..., F, D]``.

    Returns:
      ``(a_in [N, ...], b_in [N, ..., F, D])``: element ``i`` is the composition of elements
      ``0 .. i-1`` (the identity for ``i = 0``), float32.
    """
    a, b = _check_pair(a, b, "exclusive_scan_reference")

    def step(carry, x):
        return combine(carry, x), carry

    _, out = lax.scan(step, identity_like(a[0], b[0]), (a, b))
    return out


def _check_order(order: Optional[Sequence[int]], n: int) -> np.ndarray:
    if order is None:
        return np.arange(n)
    order_np = np.asarray(order)
    if order_np.shape != (n,) or sorted(order_np.tolist()) != list(range(n)):
        raise ValueError(f"order must be a permutation of range({n}) (the position rank of each "
                         f"device's segment along the axis), got {list(order)}")
    return order_np


def _where(cond: jax.Array, x: Pair, y: Pair) -> Pair:
    return tuple(jnp.where(cond, u, v) for u, v in zip(x, y))


def _shift(pair: Pair, axis_name: str, inv: np.ndarray, k: int) -> Pair:
    """Every position ``p >= k`` receives the value of position ``p - k`` (others receive 0).

    ``inv[p]`` is the device at position ``p``."""
    n = len(inv)
    perm = [(int(inv[p - k]), int(inv[p])) for p in range(k, n)]
    return lax.ppermute(pair, axis_name, perm)


def _ppermute_exclusive(a: jax.Array, b: jax.Array, axis_name: str, order: np.ndarray) -> Pair:
    n = len(order)
    if n == 1:
        return identity_like(a, b)
    inv = np.argsort(order)
    pos = jnp.asarray(order, jnp.int32)[lax.axis_index(axis_name)]
    x = (a, b)
    # Exclusive: shift by one first (position 0 gets the identity), then an inclusive scan.
    x = _where(pos == 0, identity_like(a, b), _shift(x, axis_name, inv, 1))
    k = 1
    while k < n:
        x = _where(pos >= k, combine(_shift(x, axis_name, inv, k), x), x)
        k *= 2
    return x


def prefix_weights(a_seq: jax.Array, pos: jax.Array) -> Pair:
    """The exclusive prefix at position ``pos`` as weights on the summaries.

    Args:
      a_seq: ``[N, ...]`` summary decays in position order.
      pos: int scalar (may be traced), the position whose carried-in state is wanted.

    Returns:
      ``(a_in [...], w [N, ...])``: ``a_in = prod_{j<pos} a_j`` and ``w_j = [j < pos] *
      prod_{j<k<pos} a_k``, so that the carried-in additive term is ``sum_j w_j B_j`` -- the same
      as ``combine``-ing elements ``0 .. pos-1`` in order. ``N^2`` scalar products: nothing next to
      one ``[F, D]`` pass.
    """
    n = a_seq.shape[0]
    j = np.arange(n)
    ex = (1,) * (a_seq.ndim - 1)
    before = (j < pos).reshape((n,) + ex)                                   # [N, 1...]
    between = ((j[None, :] > j[:, None]) & (j[None, :] < pos)).reshape((n, n) + ex)  # [j, k, 1...]
    w = jnp.prod(jnp.where(between, a_seq[None], 1.0), axis=1) * before.astype(a_seq.dtype)
    a_in = jnp.prod(jnp.where(before, a_seq, 1.0), axis=0)
    return a_in, w


def _weighted(w: jax.Array, gb: jax.Array) -> jax.Array:
    """``sum_i w_i B_i``: ``w [M, ...]``, ``gb [M, ..., F, D]`` -> ``[..., F, D]`` (one fused
    reduction; its transpose is one broadcast multiply)."""
    return jnp.sum(w[..., None, None] * gb, axis=0)


def _allgather_exclusive(a: jax.Array, b: jax.Array, axis_name: str, order: np.ndarray) -> Pair:
    inv = np.argsort(order)
    ga, gb = lax.all_gather((a, b), axis_name)     # [n, ...], [n, ..., F, D] in device order
    pos = jnp.asarray(order, jnp.int32)[lax.axis_index(axis_name)]
    a_in, w_pos = prefix_weights(ga[inv], pos)      # position order (scalars only)
    # Device i's summary sits at position order[i]: weight the gathered terms where they lie.
    return a_in, _weighted(w_pos[order], gb)


def exclusive_device_scan(a: jax.Array, b: jax.Array, axis_name: str, mode: ScanMode = "allgather",
                          order: Optional[Sequence[int]] = None) -> Pair:
    """State carried into this device's segment: the composition of all earlier segments' summaries.

    Call inside ``jax.shard_map`` with ``axis_name`` manual (e.g. ``"context"``).

    Args:
      a: ``[...]`` this device's summary decay (batch dims allowed, e.g. ``[B]``).
      b: ``[..., F, D]`` this device's summary additive term.
      axis_name: the mesh axis the sequence is split over.
      mode: ``"allgather"`` (default; few devices) or ``"ppermute"`` (log depth; many devices).
      order: optional permutation of ``range(n)``, ``n = axis_size(axis_name)``: ``order[i]`` is the
        position rank of device ``i``'s segment in the sequence (default: device order).

    Returns:
      ``(a_in [...], b_in [..., F, D])`` float32: ``combine`` of the summaries of every device whose
      segment comes before this one, in position order; the identity ``(1, 0)`` for the first.
      The state entering this segment, starting the sequence from ``W``, is
      ``a_in * W + b_in``.
    """
    if mode not in MODES:
        raise ValueError(f"exclusive_device_scan: mode={mode!r} is not one of {MODES}")
    a, b = _check_pair(a, b, "exclusive_device_scan")
    n = lax.axis_size(axis_name)
    order_np = _check_order(order, n)
    if n == 1:
        return identity_like(a, b)
    if mode == "allgather":
        return _allgather_exclusive(a, b, axis_name, order_np)
    return _ppermute_exclusive(a, b, axis_name, order_np)


def exclusive_device_scan_zigzag(a2: jax.Array, b2: jax.Array, axis_name: str,
                                 mode: ScanMode = "allgather") -> Pair:
    """Exclusive scan for the load-balanced ("zigzag") layout: two segments per device.

    With ``n = axis_size(axis_name)`` devices the sequence is cut into ``2n`` segments and device
    ``i`` holds segments ``i`` (early) and ``2n - 1 - i`` (late) -- see
    :func:`parallel.layout.to_zigzag`. Summaries are combined in *position* order
    ``0, 1, ..., 2n - 1``.

    Call inside ``jax.shard_map`` with ``axis_name`` manual.

    Args:
      a2: ``[2, ...]`` this device's two summary decays, ``[0]`` early segment, ``[1]`` late.
      b2: ``[2, ..., F, D]`` the matching additive terms.
      axis_name: the mesh axis the sequence is split over.
      mode: ``"allgather"`` (one all-gather of ``2n`` summaries) or ``"ppermute"`` (two chained
        log-depth scans: the early segments in device order, then the late segments in reverse
        device order, seeded on device ``n - 1`` with the total of all early segments).

    Returns:
      ``(a_in [2, ...], b_in [2, ..., F, D])`` float32: the state carried into each of this
      device's two segments (identity for segment 0).
    """
    if mode not in MODES:
        raise ValueError(f"exclusive_device_scan_zigzag: mode={mode!r} is not one of {MODES}")
    a2, b2 = _check_pair(a2, b2, "exclusive_device_scan_zigzag")
    if a2.ndim < 1 or a2.shape[0] != 2:
        raise ValueError(f"exclusive_device_scan_zigzag: expected a2 [2, ...] (early, late), got "
                         f"{tuple(a2.shape)}")
    n = lax.axis_size(axis_name)
    idx = lax.axis_index(axis_name)
    early, late = (a2[0], b2[0]), (a2[1], b2[1])
    if mode == "allgather":
        ga, gb = lax.all_gather((a2, b2), axis_name)  # [n, 2, ...]
        seq_a = jnp.concatenate([ga[:, 0], ga[::-1, 1]], axis=0)  # [2n, ...] position order
        # Position p < n is device p's early segment, p >= n device 2n-1-p's late one: the
        # weights go back to the gathered [n, 2] layout, so the [F, D] terms are never reordered.
        to_gathered = lambda w: jnp.stack([w[:n], w[n:][::-1]], axis=1)   # [2n, ...] -> [n, 2, ...]
        pairs = []
        for p in (idx, 2 * n - 1 - idx):
            a_in, w = prefix_weights(seq_a, p)
            pairs.append((a_in, _weighted(to_gathered(w).reshape((2 * n,) + w.shape[1:]),
                                          gb.reshape((2 * n,) + gb.shape[2:]))))
        e_in, l_in = pairs
    else:
        e_in = _ppermute_exclusive(*early, axis_name, np.arange(n))
        last = idx == n - 1
        total_early = combine(e_in, early)  # correct on device n - 1 only
        seed = _where(last, combine(total_early, late), late)
        l_in = _ppermute_exclusive(*seed, axis_name, np.arange(n)[::-1].copy())
        l_in = _where(last, total_early, l_in)
    return tuple(jnp.stack([e, l], axis=0) for e, l in zip(e_in, l_in))
