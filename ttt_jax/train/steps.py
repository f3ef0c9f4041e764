"""The jitted train and eval steps (pure functions of split NNX state).

The model and the optimizer are carried between steps as ``nnx.State`` pytrees (``nnx.split``) so
that ``jax.jit`` sees plain arrays: shardings are given at the boundary and the input state buffers
are donated (updated in place, no second copy of parameters and Adam moments).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from ttt_jax.ops.loss import chunked_cross_entropy

Batch = dict[str, jax.Array]


def cross_entropy(logits: jax.Array, targets: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Summed next-token negative log-likelihood and token count.

    Args:
      logits: ``[B, T, V]`` (any float dtype; reduced in fp32).
      targets: ``[B, T]`` int32, the token that follows each position.
      mask: ``[B, T]`` float32, 1 where the position counts (0 on padding / unlabelled tokens).
    Returns:
      ``(nll_sum, n_tokens)``: fp32 scalars; the mean loss is ``nll_sum / max(n_tokens, 1)``.
    """
    logits = logits.astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)                                   # [B, T]
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    mask = mask.astype(jnp.float32)
    return jnp.sum((lse - target_logit) * mask), jnp.sum(mask)


def _forward_nll(model: nnx.Module, batch: Batch, loss_chunk: int = 0,
                 loss_groups: int = 1) -> tuple[jax.Array, jax.Array]:
    """``(nll_sum, n_tokens)`` of ``batch``. ``loss_chunk > 0`` computes the loss from the final
    hidden states ``loss_chunk`` positions at a time (:func:`ttt_jax.ops.loss.chunked_cross_entropy`,
    ``loss_groups`` = the context-parallel degree) so ``[B, T, V]`` logits never exist at once;
    ``0`` takes the model's full logits. Both give the same value (tested)."""
    if loss_chunk and loss_chunk < batch["inputs"].shape[1]:
        hidden = model.hidden(batch["inputs"], segment_ids=batch["segment_ids"],
                              positions=batch["positions"])
        return chunked_cross_entropy(hidden, model.head(), batch["targets"], batch["loss_mask"],
                                     chunk_size=loss_chunk, groups=loss_groups)
    logits = model(batch["inputs"], segment_ids=batch["segment_ids"], positions=batch["positions"])
    return cross_entropy(logits, batch["targets"], batch["loss_mask"])


def make_train_step(model_def: nnx.GraphDef, opt_def: nnx.GraphDef,
                    schedule: optax.Schedule, *, loss_chunk: int = 0,
                    loss_groups: int = 1) -> Callable[..., Any]:
    """``step(model_state, opt_state, batch) -> (model_state, opt_state, metrics)``.

    ``loss_chunk`` / ``loss_groups``: see :func:`_forward_nll` (``runtime.loss_chunk``).

    ``batch`` holds ``[B, T]`` arrays ``inputs, targets, loss_mask, segment_ids, positions``.
    ``metrics``: fp32 scalars ``loss`` (mean NLL over ``loss_mask``), ``grad_norm`` (global L2
    norm of the gradient before clipping), ``lr`` (``schedule`` at this update, the rate the
    optimizer applies) and ``skipped`` (1.0 when the update was not applied, else 0.0).

    Non-finite guard: when the loss or the gradient norm is NaN/inf the update is not applied --
    the returned states are the incoming ones, bitwise, optimizer step counter included (so the
    schedule does not advance either) -- and ``skipped`` is 1. The choice is a per-element select
    inside the program, so it adds no host synchronisation; whether a skipped step stops the run
    is the trainer's policy (``train.on_nonfinite``). Finite steps compute exactly what they would
    without the guard. Not jitted here: see :func:`jit_train_step`.
    """

    def step(model_state: nnx.State, opt_state: nnx.State, batch: Batch):
        # The incoming values (immutable arrays/tracers), kept for the non-finite case: merging and
        # updating below rebinds the variables, never these.
        old_model, old_opt = jax.tree.leaves(model_state), jax.tree.leaves(opt_state)
        model = nnx.merge(model_def, model_state)
        optimizer = nnx.merge(opt_def, opt_state)

        def loss_fn(m: nnx.Module) -> jax.Array:
            nll, n = _forward_nll(m, batch, loss_chunk, loss_groups)
            return nll / jnp.maximum(n, 1.0)

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        grad_norm = optax.tree.norm(grads)
        lr = jnp.asarray(schedule(optimizer.step[...]), jnp.float32)  # step = updates done so far
        optimizer.update(model, grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

        def keep_if_finite(new_state: nnx.State, old_leaves: list) -> nnx.State:
            leaves, treedef = jax.tree.flatten(new_state)
            return jax.tree.unflatten(treedef, [jnp.where(finite, n, o) for n, o in zip(leaves, old_leaves)])

        metrics = {"loss": loss, "grad_norm": grad_norm, "lr": lr,
                   "skipped": jnp.where(finite, 0.0, 1.0).astype(jnp.float32)}
        return (keep_if_finite(nnx.state(model), old_model), keep_if_finite(nnx.state(optimizer), old_opt),
                metrics)

    return step


def make_eval_step(model_def: nnx.GraphDef, *, loss_chunk: int = 0,
                   loss_groups: int = 1) -> Callable[..., Any]:
    """``eval_step(model_state, batch) -> (nll_sum, n_tokens)`` (fp32 scalars), no state change."""

    def eval_step(model_state: nnx.State, batch: Batch):
        return _forward_nll(nnx.merge(model_def, model_state), batch, loss_chunk, loss_groups)

    return eval_step


def jit_train_step(step: Callable[..., Any], model_sh: Any, opt_sh: Any, batch_sh: Any,
                   scalar_sh: Any) -> Callable[..., Any]:
    """``jax.jit`` the train step with explicit shardings; the incoming states are donated."""
    return jax.jit(step, in_shardings=(model_sh, opt_sh, batch_sh),
                   out_shardings=(model_sh, opt_sh, scalar_sh),
                   donate_argnames=("model_state", "opt_state"))


def jit_eval_step(eval_step: Callable[..., Any], model_sh: Any, batch_sh: Any,
                  scalar_sh: Any) -> Callable[..., Any]:
    return jax.jit(eval_step, in_shardings=(model_sh, batch_sh), out_shardings=(scalar_sh, scalar_sh))
