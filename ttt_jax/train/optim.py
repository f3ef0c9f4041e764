"""Optimizer: AdamW with linear warmup, cosine decay and global-norm clipping.

Weight decay (decoupled, AdamW) applies to weight *matrices* only. A parameter is decayed when it
has at least 2 dimensions and its path names none of ``norm``, ``bias``, ``scale`` or ``conv``:

* norm scales and biases (1-D) are not decayed, as in GPT-2/Llama/Qwen recipes: pulling a norm
  scale to 0 silences its layer rather than regularising it;
* the In-Place TTT depthwise conv kernel (``[K, D]``, 2-D but one short filter per channel) is not
  decayed either: it is zero-initialised, tiny, and plays the role of a per-channel gain on the TTT
  target, so decaying it only pulls the fast-weight update towards "off";
* embeddings, attention/MLP kernels and the TTT target projection ``P`` (``[D, D]``) are decayed.
"""

from __future__ import annotations

from typing import Any

import jax
import optax

from ttt_jax.config import TrainConfig

# Path fragments of parameters that are never weight-decayed (see the module docstring).
NO_DECAY_KEYWORDS = ("norm", "bias", "scale", "conv")


# The TrainConfig fields that define the optimizer and its schedule.
OPTIMIZER_FIELDS = ("steps", "learning_rate", "min_lr_ratio", "warmup_steps", "weight_decay",
                    "b1", "b2", "eps", "grad_clip", "shard_optimizer")


def optimizer_fields(cfg: TrainConfig) -> tuple[tuple[str, Any], ...]:
    """A hashable summary of ``cfg``'s optimizer settings (``TrainConfig(**dict(...))`` rebuilds them)."""
    return tuple((k, getattr(cfg, k)) for k in OPTIMIZER_FIELDS)


def learning_rate_schedule(cfg: TrainConfig) -> optax.Schedule:
    """Linear warmup from 0 to ``learning_rate`` over ``warmup_steps``, then cosine decay to
    ``min_lr_ratio * learning_rate`` at ``steps``. ``schedule(i)`` is the rate of update ``i``
    (0-based)."""
    peak = cfg.learning_rate
    decay_steps = max(cfg.steps - cfg.warmup_steps, 1)
    cosine = optax.cosine_decay_schedule(peak, decay_steps, alpha=cfg.min_lr_ratio)
    if cfg.warmup_steps == 0:
        return cosine
    # Warmup reaches the peak at update `warmup_steps` (the first update uses peak/warmup_steps,
    # not 0, so no step is wasted).
    warmup = optax.linear_schedule(peak / cfg.warmup_steps, peak, cfg.warmup_steps - 1) \
        if cfg.warmup_steps > 1 else optax.constant_schedule(peak)
    return optax.join_schedules([warmup, cosine], boundaries=[cfg.warmup_steps])


def _path_str(path: tuple[Any, ...]) -> str:
    return ".".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)


def is_decayed(path: str, ndim: int) -> bool:
    """True when the parameter at dotted ``path`` with ``ndim`` dimensions is weight-decayed."""
    lowered = path.lower()
    return ndim >= 2 and not any(word in lowered for word in NO_DECAY_KEYWORDS)


def decay_mask(params: Any) -> Any:
    """A pytree of bools matching ``params`` (arrays or ``nnx.State``): True where decayed."""
    return jax.tree_util.tree_map_with_path(lambda p, x: is_decayed(_path_str(p), x.ndim), params)


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    """``clip_by_global_norm(grad_clip)`` (identity when 0) followed by AdamW with the schedule
    of :func:`learning_rate_schedule` and the decay mask of :func:`decay_mask`.

    The optimizer-state tree is the same for every setting, so a checkpoint can be resumed with
    other clipping, learning-rate or weight-decay values.
    """
    adamw = optax.adamw(
        learning_rate_schedule(cfg),
        b1=cfg.b1,
        b2=cfg.b2,
        eps=cfg.eps,
        weight_decay=cfg.weight_decay,
        mask=decay_mask,
    )
    # Both clip_by_global_norm and identity have an empty state: the tree does not depend on grad_clip.
    clip = optax.clip_by_global_norm(cfg.grad_clip) if cfg.grad_clip > 0 else optax.identity()
    return optax.chain(clip, adamw)
