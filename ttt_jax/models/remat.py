"""Rematerialisation of the decoder blocks (``runtime.remat``): the pinned remat.

:func:`remat_block` wraps the model's ``run_block(block, x, x0, positions, segment_ids)`` for the
backward pass: every block keeps only its input (and, with ``policy="save_exchanges"``, the
context-parallel exchange results of :data:`ttt_jax.ops.checkpoint_names.SAVE_EXCHANGES_NAMES`) and
recomputes the rest, with :func:`pinned_remat`: ``nnx.remat``'s recomputation as a custom VJP
whose backward pass runs block by block (without it, XLA's GPU schedule kept several blocks'
recomputed activations live at once: benchmarks/history/2026-11-notes.md).
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from ttt_jax.ops.checkpoint_names import SAVE_EXCHANGES_NAMES


def remat_block(run_block: Callable, *, policy: str) -> Callable:
    """``run_block`` under remat.

    Args:
      run_block: ``(block, x, x0, positions, segment_ids) -> y``.
      policy: ``"save_exchanges"`` (keep the context-parallel exchange results, so the
        recomputation repeats no collective) or ``"full"`` (recompute everything).
    """
    checkpoint_policy = (jax.checkpoint_policies.save_only_these_names(*SAVE_EXCHANGES_NAMES)
                         if policy == "save_exchanges" else None)
    return pinned_remat(run_block, checkpoint_policy)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _pinned_call(f, *args):
    return f(*args)


def _pinned_fwd(f, *args):
    return jax.vjp(f, *args)   # the VJP closure is a pytree of f's saved residuals


def _pinned_bwd(f, vjp_fn, dy):
    # The first barrier makes the residuals -- and so the recomputation that starts from them --
    # depend on the output cotangent: the recomputation cannot be scheduled before the block above
    # has finished its backward pass.
    leaves, tree = jax.tree.flatten(vjp_fn)
    leaves, dy = jax.lax.optimization_barrier((leaves, dy))
    grads = jax.tree.unflatten(tree, leaves)(dy)
    # The second ties the block's gradients together: the input cotangent (which the block below
    # waits for) is released only with the parameter gradients. Without it XLA may postpone the
    # weight-gradient matmuls, keeping the recomputed activations they read live across several
    # blocks (benchmarks/history/2026-11-notes.md: "the strong row's memory, located"). Integer inputs' float0
    # cotangents stay outside the barrier.
    flat, gtree = jax.tree.flatten(grads)
    floats = [i for i, g in enumerate(flat) if jnp.issubdtype(g.dtype, jnp.inexact)]
    pinned = jax.lax.optimization_barrier([flat[i] for i in floats])
    for i, g in zip(floats, pinned):
        flat[i] = g
    return jax.tree.unflatten(gtree, flat)


_pinned_call.defvjp(_pinned_fwd, _pinned_bwd)


def pinned_remat(run_block, policy):
    """``nnx.remat(run_block, policy=policy)`` whose backward pass runs block by block
    (``runtime.remat``): a block is recomputed only once the gradient of its output is there,
    and the gradient of its input is released only together with its parameter gradients.

    Plain remat lets the compiler recompute a block as soon as its saved input exists, and finish
    its weight gradients whenever it likes; XLA's GPU scheduler then keeps several blocks'
    recomputed activations live together (benchmarks/history/2026-11-notes.md: the split halo's and the
    4-GPU strong row's extra memory). Same values and gradients as plain remat (tested).

    ``run_block(block, x, x0, positions, segment_ids) -> y``; the block's parameters and the float
    inputs get gradients, ``positions`` / ``segment_ids`` (integers) none.
    """
    def run(block, x, x0, positions, segment_ids):
        graphdef, state = nnx.split(block)

        def f(state, x, x0, positions, segment_ids):
            return run_block(nnx.merge(graphdef, state), x, x0, positions, segment_ids)

        return _pinned_call(jax.checkpoint(f, policy=policy), state, x, x0, positions, segment_ids)

    return run
