"""Loading a config: YAML presets and files (with ``base:`` inheritance), ``key=value`` overrides,
type coercion, and one-line :class:`~ttt_jax.config.base.ConfigError` messages for every mistake."""

from __future__ import annotations

import dataclasses
import difflib
import importlib.resources
import math
import typing
from pathlib import Path
from typing import Any, Literal, Optional, Sequence

import yaml

from ttt_jax.config.base import ConfigError
from ttt_jax.config.keys import MOVED, REMOVED, merge, set_dotted, upgrade_dict
from ttt_jax.config.root import Config

def _preset_dir() -> Path:
    """The presets: the package ``ttt_jax.configs`` when installed (the wheel maps the top-level
    ``configs/`` folder there), else ``configs/`` beside the package (a source checkout)."""
    try:
        return Path(str(importlib.resources.files("ttt_jax.configs")))
    except ModuleNotFoundError:
        return Path(__file__).resolve().parents[2] / "configs"


CONFIG_DIR = _preset_dir()

def _suggest(prefix: str, key: str, options: Sequence[str]) -> str:
    full = f"{prefix}{key}"
    if full in MOVED:
        return f"; it moved to {MOVED[full]}"
    if full in REMOVED:
        return f"; it was removed: {REMOVED[full]}"
    close = difflib.get_close_matches(key, list(options), n=1, cutoff=0.5)
    return f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(sorted(options))}"


def _yaml(text: str, where: str) -> Any:
    """``yaml.safe_load(text)``; a syntax error becomes one line naming ``where`` and the spot."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{where}: invalid YAML{at}: {problem}") from None


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert a YAML/CLI value to the annotated type ``tp``, or raise ConfigError naming ``key``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Union:  # Optional[X]
        if value is None or (isinstance(value, str) and value.lower() in ("null", "none", "~")):
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"invalid {key}={value!r}: expected one of {list(args)}")
        return value
    if origin is tuple:
        if isinstance(value, str):
            value = _yaml(value, f"invalid {key}={value!r}") if value.strip().startswith("[") else \
                [v for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            value = [value]
        return tuple(_coerce(v, args[0], f"{key}[]") for v in value)
    if dataclasses.is_dataclass(tp):
        if isinstance(tp, type) and isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"invalid {key}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return _build(tp, value, prefix=f"{key}.")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no", "on", "off"):
            return value.lower() in ("true", "1", "yes", "on")
        raise ConfigError(f"invalid {key}={value!r}: expected true or false")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"invalid {key}={value!r}: expected an integer")
        if isinstance(value, int):
            return value
        try:
            f = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"invalid {key}={value!r}: expected an integer") from None
        # Floats name an integer only while every integer is representable (|f| <= 2^53); beyond
        # that, e.g. 4.8e118, the value is not one the user could have meant exactly.
        if not math.isfinite(f) or f != int(f) or abs(f) > 2 ** 53:
            raise ConfigError(f"invalid {key}={value!r}: expected an integer")
        return int(f)
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"invalid {key}={value!r}: expected a number")
        try:
            f = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"invalid {key}={value!r}: expected a number") from None
        if math.isnan(f):
            raise ConfigError(f"invalid {key}={value!r}: expected a number, not NaN")
        return f
    if tp is str:
        if not isinstance(value, (str, int, float)):
            raise ConfigError(f"invalid {key}={value!r}: expected a string")
        return str(value)
    return value


def _build(cls: type, values: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for k, v in values.items():
        if k not in names:
            raise ConfigError(f"unknown config key '{prefix}{k}'" + _suggest(prefix, k, names))
        kwargs[k] = _coerce(v, hints[k], f"{prefix}{k}")
    return cls(**kwargs)


def parse_overrides(overrides: Sequence[str]) -> dict[str, Any]:
    """Turn ``["a.b=1", "c=[1, 2]"]`` into a nested dict; values are parsed as YAML scalars/lists
    (a value that is not valid YAML is taken as a string, unless it opens a list or mapping)."""
    tree: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. train.steps=100)")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key:
            raise ConfigError(f"override {item!r} has an empty key")
        if raw.strip()[:1] in ("[", "{"):
            value = _yaml(raw, f"override {item!r}")
        else:
            try:
                value = yaml.safe_load(raw) if raw.strip() else ""
            except yaml.YAMLError:
                value = raw
        set_dotted(tree, key, value)
    return tree


def _presets() -> list[str]:
    return sorted(x.stem for x in CONFIG_DIR.glob("*.yaml")) if CONFIG_DIR.is_dir() else []


def resolve_config_path(name_or_path: str | Path, relative_to: Optional[Path] = None) -> Path:
    """A path to a YAML file, or the name of a preset in ``configs/`` (``tiny`` -> configs/tiny.yaml).
    ``relative_to``: the directory a relative path is read from (a ``base:`` key's file)."""
    p = Path(name_or_path).expanduser()
    if relative_to is not None and not p.is_absolute():
        p = relative_to / p
    if p.is_file():
        return p
    for cand in (CONFIG_DIR / f"{name_or_path}.yaml", CONFIG_DIR / str(name_or_path)):
        if cand.is_file():
            return cand
    raise ConfigError(f"config {str(name_or_path)!r} is neither a YAML file nor a preset; "
                      f"presets: {', '.join(_presets()) or '(none found)'}")


def read_yaml_config(name_or_path: str | Path, _chain: tuple[Path, ...] = (),
                     _relative_to: Optional[Path] = None) -> dict[str, Any]:
    """The nested dict of a preset or YAML file, with its ``base:`` chain applied: ``base: NAME``
    (a preset, or a YAML file relative to this file's directory) is read first and this file's
    values are merged over it, section by section. Cycles, empty files and syntax errors raise
    :class:`ConfigError`."""
    path = resolve_config_path(name_or_path, _relative_to).resolve()
    if path in _chain:
        cycle = " -> ".join(str(p) for p in (*_chain, path))
        raise ConfigError(f"config {path}: 'base:' chain is a cycle: {cycle}")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read config {path}: {e}") from None
    values = _yaml(text, str(path))
    if values is None:
        raise ConfigError(f"config {path} is empty; give at least one section (model, runtime, "
                          "data, train, mesh) or 'base: <preset>'")
    if not isinstance(values, dict):
        raise ConfigError(f"config {path}: the top level must be a mapping of sections, got "
                          f"{type(values).__name__}")
    base = values.pop("base", None)
    if base is None:
        return values
    if not isinstance(base, str) or not base.strip():
        raise ConfigError(f"config {path}: 'base:' must name a preset or a YAML file, got {base!r}")
    parent = read_yaml_config(base, (*_chain, path), path.parent)
    return merge(parent, values)


def config_from_dict(values: dict[str, Any]) -> Config:
    """Build and validate a :class:`Config` from a nested dict (unknown keys are errors)."""
    if values is not None and not isinstance(values, dict):
        raise ConfigError(f"a config must be a mapping of sections, got {type(values).__name__}")
    return _build(Config, values or {}).validate()


def config_from_saved(values: dict[str, Any]) -> Config:
    """:func:`config_from_dict` of a config saved by an older version (a checkpoint's record):
    moved keys are read at their new place, removed ones ignored (:func:`upgrade_dict`)."""
    return config_from_dict(upgrade_dict(values or {}))


def load_config(name_or_path: str | Path | None = None, overrides: Sequence[str] = ()) -> Config:
    """Load a preset or YAML file, apply ``key=value`` overrides, validate.

    Example::

        cfg = load_config("tiny", ["train.steps=50", "model.ttt.chunk_size=64", "runtime.remat=true"])
    """
    base = read_yaml_config(name_or_path) if name_or_path is not None else {}
    return config_from_dict(merge(base, parse_overrides(overrides)))


def replace(cfg: Config, **sections: dict[str, Any]) -> Config:
    """Return ``cfg`` with fields changed, e.g. ``replace(cfg, model={"n_layers": 2})``; validated."""
    return config_from_dict(merge(cfg.to_dict(), sections))


def apply_overrides(cfg: Config, overrides: Sequence[str]) -> Config:
    """``cfg`` with ``key=value`` overrides applied (as on the command line); validated."""
    return config_from_dict(merge(cfg.to_dict(), parse_overrides(overrides)))
