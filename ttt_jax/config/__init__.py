"""Typed, validated configuration: YAML presets plus ``key=value`` overrides.

A run is described by one :class:`Config` made of five sections::

    model:    the architecture: everything that changes the parameters or the function computed
              (Qwen3/Llama-compatible; In-Place TTT under model.ttt)      -- config/model.py
    runtime:  how it runs: kernels, remat, layer scanning, loss chunking,
              context parallelism (runtime.context)                      -- config/runtime.py
    data:     corpus, tokenizer, sequence packing                         -- config/run.py
    train:    optimizer, schedule, checkpoints, logging                   -- config/run.py
    mesh:     device mesh shape (data, fsdp, tensor, context)             -- config/run.py

Presets live in ``configs/*.yaml``; a YAML file may extend a preset or another file with
``base: NAME`` (config/loading.py). Any field can be overridden on the command line with dotted keys
(``train.steps=200 model.ttt.lr=1.0 runtime.remat=true``). Every value is checked when the config is
built, so a user's mistake surfaces as a one-line :class:`ConfigError` (a ``ValueError``) naming the
field, before any compute. A checkpoint is tied to the ``model`` and ``data`` sections only
(:func:`checkpoint_differences`): a run resumes under any runtime, train or mesh change.
"""

from ttt_jax.config.base import MAX_LAYERS, RESUMABLE, ConfigError
from ttt_jax.config.loading import (CONFIG_DIR, MOVED, REMOVED, apply_overrides, config_from_dict,
                                    config_from_saved, load_config, parse_overrides, read_yaml_config,
                                    replace, resolve_config_path, upgrade_dict)
from ttt_jax.config.model import E2EConfig, ModelConfig, RopeScalingConfig, TTTConfig, TTTSeqConfig
from ttt_jax.config.root import Config, checkpoint_differences, checkpoint_view
from ttt_jax.config.run import DataConfig, MeshConfig, TrainConfig
from ttt_jax.config.runtime import ContextConfig, RuntimeConfig

__all__ = [
    "CONFIG_DIR", "MAX_LAYERS", "MOVED", "REMOVED", "RESUMABLE", "Config", "ConfigError",
    "ContextConfig", "DataConfig", "E2EConfig", "MeshConfig", "ModelConfig", "RopeScalingConfig",
    "RuntimeConfig", "TTTConfig", "TTTSeqConfig", "TrainConfig", "apply_overrides",
    "checkpoint_differences", "checkpoint_view", "config_from_dict", "config_from_saved",
    "load_config", "parse_overrides", "read_yaml_config", "replace", "resolve_config_path",
    "upgrade_dict",
]
