"""Parameter creation with logical axis names, and dtype helpers shared by the NNX modules.

Every parameter is an ``nnx.Param`` whose ``out_sharding`` metadata holds one *logical* axis name
per array dimension (``None`` = never sharded). ``parallel/`` maps logical names to mesh axes
(``data``, ``fsdp``, ``tensor``, ``context``); ``nnx.get_partition_spec(state)`` under
``nnx.logical_axis_rules(rules)`` turns them into ``PartitionSpec``s.

Logical axis names
==================
===========  ================================================================================
name         dimension
===========  ================================================================================
``vocab``    vocabulary (token embedding rows, LM-head columns)
``embed``    model width ``d_model`` (the residual stream)
``mlp``      MLP hidden width ``d_ff`` (gate/up columns, down rows -- the fast-weight rows)
``heads``    query heads
``kv_heads`` key/value heads (GQA)
``head_dim`` per-head feature dimension
``norm``     the scale vector of an RMSNorm (model width or, for QK-norm, head_dim)
``conv``     kernel taps of the In-Place TTT depthwise conv (``ttt_conv`` ``[K, D]``)
===========  ================================================================================

``ttt_proj`` is ``[D, D]``: its rows are ``embed`` and its columns ``None`` (a mesh axis may appear
only once in a ``PartitionSpec``, so the second ``embed``-sized axis stays unsharded).

Parameters are created unsharded unless Flax eager sharding is on *and* logical-axis rules and a
mesh are active (``with jax.set_mesh(mesh), nnx.logical_axis_rules(rules): model = CausalLM(...)``),
in which case Flax shards them at creation.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
from flax import nnx
import flax.linen as nn_linen

LOGICAL_AXES = ("vocab", "embed", "mlp", "heads", "kv_heads", "head_dim", "norm", "conv")

Initializer = Callable[[jax.Array, Sequence[int], jnp.dtype], jax.Array]


def _eager_sharding() -> bool:
    if not nnx.using_eager_sharding():
        return False
    if not nn_linen.get_logical_axis_rules():
        return False
    return not jax.sharding.get_abstract_mesh().empty


def make_param(init: Initializer, key: Optional[jax.Array], shape: Sequence[int],
               axes: Sequence[Optional[str]], dtype) -> nnx.Param:
    """An ``nnx.Param`` of ``shape`` from ``init(key, shape, dtype)`` with logical ``axes``."""
    axes = tuple(axes)
    if len(axes) != len(shape):
        raise AssertionError(f"{len(axes)} axis names {axes} for a {len(shape)}-d parameter {shape}")
    bad = [a for a in axes if a is not None and a not in LOGICAL_AXES]
    if bad:
        raise AssertionError(f"unknown logical axis names {bad}; known: {LOGICAL_AXES}")
    value = init(key, tuple(shape), jnp.dtype(dtype))
    return nnx.Param(value, out_sharding=axes, eager_sharding=_eager_sharding())


def normal_init(stddev: float) -> Initializer:
    return lambda key, shape, dtype: (stddev * jax.random.normal(key, shape, jnp.float32)).astype(dtype)


def zeros_init(key, shape, dtype):
    del key
    return jnp.zeros(shape, dtype)


def ones_init(key, shape, dtype):
    del key
    return jnp.ones(shape, dtype)


def logical_axes(param: nnx.Variable) -> Optional[tuple[Optional[str], ...]]:
    """The logical axis names of a parameter (``None`` when it has none)."""
    names = param.get_metadata().get("out_sharding")
    return None if names is None else tuple(names)


def dense(x: jax.Array, kernel: jax.Array, eq: str, dtype) -> jax.Array:
    """``einsum(eq, x, kernel)`` in ``dtype`` with fp32 accumulation, result in ``dtype``.

    The dot is asked for its result in ``dtype`` directly (GPU and TPU matmul units accumulate
    low-precision products in fp32 regardless), not in fp32 followed by a cast: the cast's
    transpose would hand the backward pass an fp32 cotangent, and both gradient matmuls would then
    run in fp32 (TF32 on an H100, half the bf16 rate; see "the mixed-precision fix" in
    benchmarks/history/2026-11-notes.md) and all-reduce fp32 weight gradients under context or data
    parallelism. This way the backward matmuls run in ``dtype`` too, as in mixed-precision
    PyTorch.
    """
    return jnp.einsum(eq, x.astype(dtype), kernel.astype(dtype), preferred_element_type=dtype)
