"""Training: optimizer, checkpoints, metrics, the jitted steps and the loop (``train``).

``train`` is imported lazily so that light users of this package (e.g. ``optim``) do not import the
model and data layers.
"""

from __future__ import annotations

from typing import Any

__all__ = ["train", "TrainResult", "NonFiniteLossError", "TrainingInterrupted"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from ttt_jax.train import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module 'ttt_jax.train' has no attribute {name!r}")
