"""The compatibility policy: which differences between the config a checkpoint was written with and
the current config forbid restoring it (a resumed run, a model loaded with overrides).

A checkpoint is tied to the architecture (``model``) and to the data fields that define the saved
iterator position (``data``), except for the fields marked resumable: the policy is
:func:`ttt_jax.config.checkpoint_differences`, declared on the config fields themselves. Every
``runtime``, ``train`` and ``mesh`` setting may change on resume; a change of
``runtime.scan_layers`` converts the saved layer layout (:mod:`ttt_jax.checkpoint.layout`).
"""

from __future__ import annotations

from typing import Any

from ttt_jax.config import checkpoint_differences


def config_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Dotted keys (``model.d_model: checkpoint 128 != config 192``) where two config dicts
    disagree on what a checkpoint is tied to. A key absent from the saved config (written before
    that field existed) counts as its default; configs saved before the ``runtime`` section
    existed are read with their keys moved (:func:`ttt_jax.config.upgrade_dict`)."""
    return checkpoint_differences(saved, current)
