"""The whole run's :class:`Config`, and what of it a checkpoint must agree with."""

from __future__ import annotations

import dataclasses
import typing
from typing import Any

from ttt_jax.config.base import ConfigError
from ttt_jax.config.keys import upgrade_dict
from ttt_jax.config.model import ModelConfig
from ttt_jax.config.run import DataConfig, MeshConfig, TrainConfig
from ttt_jax.config.runtime import RuntimeConfig


@dataclasses.dataclass(frozen=True)
class Config:
    """A run: the architecture (``model``), how it runs (``runtime``), the data, the training
    schedule and the device mesh."""

    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    """The architecture (:class:`~ttt_jax.config.model.ModelConfig`)."""
    runtime: RuntimeConfig = dataclasses.field(default_factory=RuntimeConfig)
    """How it runs (:class:`~ttt_jax.config.runtime.RuntimeConfig`)."""
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    """Corpus, tokenizer, packing (:class:`~ttt_jax.config.run.DataConfig`)."""
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    """Optimizer, schedule, checkpoints (:class:`~ttt_jax.config.run.TrainConfig`)."""
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    """Device mesh (:class:`~ttt_jax.config.run.MeshConfig`)."""

    def validate(self) -> "Config":
        self.model.validate()
        self.runtime.validate(self.model)
        self.data.validate()
        self.train.validate()
        self.mesh.validate()
        if self.data.seq_len > self.model.max_seq_len:
            raise ConfigError(
                f"data.seq_len={self.data.seq_len} exceeds model.max_seq_len={self.model.max_seq_len}; "
                "raise model.max_seq_len or lower data.seq_len")
        for key, on in (("model.ttt_seq.enabled", bool(self.model.ttt_seq.layer_ids(self.model.n_layers))),
                        ("model.e2e.enabled", self.model.e2e.enabled)):
            if on and self.mesh.context > 1:
                raise ConfigError(
                    f"{key}=true is not supported with mesh.context={self.mesh.context} (context "
                    "parallelism): the layer is not affine in its state; set mesh.context=1")
        if self.data.chunk_align and self.model.ttt.enabled and self.data.seq_len % self.model.ttt.chunk_size:
            raise ConfigError(
                f"data.chunk_align=true needs data.seq_len ({self.data.seq_len}) to be a multiple of "
                f"model.ttt.chunk_size ({self.model.ttt.chunk_size}) so every document can start on a "
                "chunk boundary; change one of them or set data.chunk_align=false")
        return self

    def to_dict(self) -> dict[str, Any]:
        return to_plain(dataclasses.asdict(self))


def to_plain(x: Any) -> Any:
    """Tuples -> lists, recursively (what YAML and JSON write)."""
    if isinstance(x, dict):
        return {k: to_plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [to_plain(v) for v in x]
    return x


# Sections a checkpoint is tied to: the parameters (model) and the data iterator's position (data).
# ``runtime``, ``train`` and ``mesh`` may change on resume.
CHECKPOINT_SECTIONS = ("model", "data")


def _view(cls: type, values: Any, prefix: str, out: dict[str, Any]) -> None:
    hints = typing.get_type_hints(cls)
    values = values if isinstance(values, dict) else {}
    defaults = to_plain(dataclasses.asdict(cls()))
    for f in dataclasses.fields(cls):
        if f.metadata.get("resumable"):
            continue
        value = values.get(f.name, defaults[f.name])
        if dataclasses.is_dataclass(hints[f.name]):
            _view(hints[f.name], value, f"{prefix}{f.name}.", out)
        else:
            out[f"{prefix}{f.name}"] = to_plain(value)


def checkpoint_view(values: dict[str, Any]) -> dict[str, Any]:
    """``{"model.d_model": 128, ...}``: the fields of a config dict (:meth:`Config.to_dict`, or a
    checkpoint's saved one) that a checkpoint written under it is tied to -- the ``model`` and
    ``data`` sections without their resumable fields. A field absent from ``values`` (written before
    it existed) counts as its default."""
    out: dict[str, Any] = {}
    for section in CHECKPOINT_SECTIONS:
        _view(typing.get_type_hints(Config)[section], values.get(section, {}), f"{section}.", out)
    return out


def checkpoint_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """``["model.d_model: checkpoint 128 != config 192", ...]``: where :func:`checkpoint_view` of
    two config dicts differs. Empty when a checkpoint written under ``saved`` may be resumed (or
    loaded) under ``current``, whatever their runtime, train and mesh sections."""
    s, c = checkpoint_view(upgrade_dict(saved)), checkpoint_view(upgrade_dict(current))
    return [f"{k}: checkpoint {s[k]!r} != config {c[k]!r}" for k in sorted(s) if s[k] != c[k]]
