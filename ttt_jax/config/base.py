"""Shared pieces of the config sections: the error type, the value check, per-layer placement and
the marker of fields a checkpoint need not agree with."""

from __future__ import annotations

import dataclasses
from typing import Any

# Upper bound on model.n_layers: validation and the layer-placement rules build per-layer lists.
MAX_LAYERS = 65536

# ``metadata`` of a field in the ``model`` or ``data`` section that a resumed run may change
# (:func:`ttt_jax.config.checkpoint_view`): it changes neither the parameters nor the data order.
RESUMABLE = {"resumable": True}


class ConfigError(ValueError):
    """A configuration a user supplied is invalid; the message (one line) names the key and the
    fix. The command line prints it as one ``error:`` line and exits with status 2."""


def check(ok: bool, key: str, value: Any, expected: str) -> None:
    """Raise :class:`ConfigError` ``invalid key=value: expected ...`` unless ``ok``."""
    if not ok:
        raise ConfigError(f"invalid {key}={value!r}: expected {expected}")


def resumable_field(default: Any) -> Any:
    """A dataclass field with ``default`` that a resumed run may change (:data:`RESUMABLE`)."""
    return dataclasses.field(default=default, metadata=RESUMABLE)


def layer_ids(cfg: Any, n_layers: int) -> tuple[int, ...]:
    """Layer indices of a per-layer feature with ``enabled``, explicit ``layers`` (or None) and
    ``start`` / ``every``: the explicit list when given, else every ``every``-th from ``start``."""
    if not cfg.enabled:
        return ()
    if cfg.layers is not None:
        return tuple(sorted(set(cfg.layers)))
    return tuple(range(cfg.start, n_layers, cfg.every))
