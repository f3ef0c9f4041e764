"""Sequence layouts over the ``context`` mesh axis: which global positions each device holds.

* ``"contiguous"``: device ``i`` of ``n`` holds global positions ``[i * T_local, (i + 1) * T_local)``.
* ``"zigzag"`` (load-balanced causal attention and scans): the sequence is cut into ``2n`` segments
  of ``S = T_local / 2``; device ``i`` holds segment ``i`` then segment ``2n - 1 - i``, so every
  device has the same amount of causal work. :func:`to_zigzag` permutes a global ``[B, T, ...]``
  array into this order (shard the result contiguously), :func:`from_zigzag` undoes it.

:func:`global_positions` gives the global position of every token of a device (host or traced
device index); :func:`local_positions` is the same inside ``jax.shard_map`` (use it for RoPE).
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

Layout = Literal["contiguous", "zigzag"]
LAYOUTS = ("contiguous", "zigzag")


def _zigzag_perm(n: int) -> np.ndarray:
    """Segment order of the zigzag layout: ``[0, 2n-1, 1, 2n-2, ..., n-1, n]``."""
    return np.array([s for i in range(n) for s in (i, 2 * n - 1 - i)])


def _permute_segments(x: jax.Array, n: int, axis: int, perm: np.ndarray, what: str) -> jax.Array:
    axis = axis % x.ndim
    t = x.shape[axis]
    if t % (2 * n):
        raise ValueError(f"{what}: sequence length {t} (axis {axis} of {tuple(x.shape)}) must be "
                         f"divisible by 2 * n = {2 * n} (two segments per device); pad the sequence")
    seg = t // (2 * n)
    xs = x.reshape(*x.shape[:axis], 2 * n, seg, *x.shape[axis + 1:])
    # Host (numpy) arrays stay on the host: the input pipeline permutes batches before placing them.
    xs = np.take(xs, perm, axis=axis) if isinstance(x, np.ndarray) else jnp.take(xs, jnp.asarray(perm), axis=axis)
    return xs.reshape(x.shape)


def to_zigzag(x: jax.Array, n: int, axis: int = 1) -> jax.Array:
    """Reorder a global sequence so that ``n`` contiguous shards hold segments ``i`` and ``2n-1-i``.

    Args:
      x: ``[..., T, ...]`` with the sequence on ``axis`` (default 1: ``[B, T, ...]``),
        ``T % (2n) == 0``.
      n: number of devices along the context axis.
      axis: the sequence axis.

    Returns:
      ``x`` with its ``2n`` segments in the order ``0, 2n-1, 1, 2n-2, ..., n-1, n``.

    Apply it to host or unsharded arrays (the input pipeline is the natural place), or under
    ``AxisType.Auto`` mesh axes. On an array already sharded along the sequence over
    ``AxisType.Explicit`` axes the permutation moves data between devices and JAX raises a
    ``ShardingTypeError``.
    """
    return _permute_segments(x, n, axis, _zigzag_perm(n), "to_zigzag")


def from_zigzag(x: jax.Array, n: int, axis: int = 1) -> jax.Array:
    """Inverse of :func:`to_zigzag` (zigzag order back to sequence order), same arguments."""
    return _permute_segments(x, n, axis, np.argsort(_zigzag_perm(n)), "from_zigzag")


def global_positions(dev, t_local: int, n: int, layout: str):
    """Global positions ``[t_local]`` int32 of device ``dev``'s tokens out of ``n`` devices.

    ``dev`` is an int (numpy result) or a traced scalar such as ``lax.axis_index`` (jnp result).
    """
    xp = np if isinstance(dev, (int, np.integer)) else jnp
    local = xp.arange(t_local, dtype=np.int32)
    if layout == "contiguous":
        return dev * t_local + local
    half = t_local // 2
    late = 2 * n - 1 - dev
    return xp.where(local < half, dev * half + local, late * half + (local - half)).astype(np.int32)


def local_positions(axis_name: str, t_local: int, layout: Layout = "contiguous") -> jax.Array:
    """Global positions ``[t_local]`` int32 of this device's tokens (inside ``shard_map``).

    Args:
      axis_name: the context mesh axis.
      t_local: tokens per device (for ``"zigzag"``, even).
      layout: ``"contiguous"`` or ``"zigzag"``.
    """
    check_layout(layout, t_local)
    return global_positions(lax.axis_index(axis_name), t_local, lax.axis_size(axis_name), layout)


def check_layout(layout: str, t_local: int) -> None:
    """``ValueError`` unless ``layout`` is one of :data:`LAYOUTS` and fits ``t_local`` tokens per
    device (zigzag: an even number, two segments)."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r} is not one of {LAYOUTS}")
    if layout == "zigzag" and t_local % 2:
        raise ValueError(f"the zigzag layout needs an even number of tokens per device (two "
                         f"segments), got T_local={t_local}")
