"""Config loading: presets, overrides, and error messages that name the key and the fix."""

import pytest

from ttt_jax.config import CONFIG_DIR, Config, ConfigError, load_config, parse_overrides, replace

pytestmark = pytest.mark.unit

PRESETS = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def test_presets_exist():
    assert {"tiny", "small", "qwen3_4b_shape"} <= set(PRESETS)


@pytest.mark.parametrize("name", PRESETS)
def test_presets_validate(name):
    cfg = load_config(name)
    assert isinstance(cfg, Config)
    # A round trip through a plain dict gives the same config.
    assert replace(cfg) == cfg


def test_qwen3_4b_shape_matches_the_architecture():
    m = load_config("qwen3_4b_shape").model
    assert (m.n_layers, m.d_model, m.n_heads, m.n_kv_heads, m.resolved_head_dim, m.d_ff, m.vocab_size) == \
        (36, 2560, 32, 8, 128, 9728, 151936)
    assert m.rope_theta == 1e6 and m.qk_norm and m.tie_embeddings
    assert m.ttt.layer_ids(m.n_layers) == (0, 6, 12, 18, 24, 30)
    assert m.ttt.chunk_size == 1024 and m.ttt.lr == 3.0 and m.ttt.target_source == "hidden"


def test_unknown_key_suggests_closest():
    with pytest.raises(ConfigError, match=r"unknown config key 'train\.learnig_rate'.*did you mean 'learning_rate'"):
        load_config("tiny", ["train.learnig_rate=1e-3"])
    with pytest.raises(ConfigError, match=r"did you mean 'model'"):
        load_config("tiny", ["modle.d_model=64"])


@pytest.mark.parametrize("override, field", [
    ("model.n_kv_heads=3", "model.n_kv_heads"),
    ("model.ttt.conv_kernel=4", "model.ttt.conv_kernel"),
    ("data.batch_size=0", "data.batch_size"),
    ("train.steps=abc", "train.steps"),
    ("train.progress=maybe", "train.progress"),
    ("model.compute_dtype=float16", "model.compute_dtype"),
    ("model.ttt.layers=[0,9]", "model.ttt.layers"),
    ("train.warmup_steps=100000", "train.warmup_steps"),
])
def test_bad_values_name_the_field(override, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_config("tiny", [override])


def test_chunk_align_needs_multiple_of_chunk():
    with pytest.raises(ConfigError, match="chunk_size"):
        load_config("tiny", ["data.chunk_align=true", "data.seq_len=200"])


def test_overrides_nested_list_bool_null():
    cfg = load_config("tiny", [
        "model.ttt.layers=[1, 3]", "train.tensorboard=false", "train.peak_tflops=null",
        "model.ttt.clip_tau=0.5", "data.paths=a.txt,b.txt", "data.source=text", "train.learning_rate=1e-4",
    ])
    assert cfg.model.ttt.layers == (1, 3)
    assert cfg.train.tensorboard is False
    assert cfg.train.peak_tflops is None
    assert cfg.model.ttt.clip_tau == 0.5
    assert cfg.data.paths == ("a.txt", "b.txt")
    assert cfg.train.learning_rate == 1e-4
    assert load_config("tiny", ["model.ttt.layers=null"]).model.ttt.layers is None


def test_override_must_be_key_value():
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["train.steps"])


def test_unknown_preset_lists_presets():
    with pytest.raises(ConfigError, match="tiny"):
        load_config("no_such_preset")


def test_huge_integer_overrides_are_errors_not_hangs():
    """A float too large to name an exact integer, or an absurd layer count, is a ConfigError
    (validation builds per-layer lists; 4.8e118 layers used to hang it)."""
    with pytest.raises(ConfigError, match="n_layers"):
        load_config("tiny", ["model.n_layers=4.84567330035119e+118"])
    with pytest.raises(ConfigError, match="n_layers"):
        load_config("tiny", ["model.n_layers=100000000"])
    assert load_config("tiny", ["model.n_layers=3.0"]).model.n_layers == 3


# --------------------------------------------------------------------------------------------------
# Architecture vs runtime: what a checkpoint is tied to
# --------------------------------------------------------------------------------------------------

import dataclasses  # noqa: E402
import typing  # noqa: E402

from ttt_jax.config import (ContextConfig, RuntimeConfig, checkpoint_differences,  # noqa: E402
                            config_from_saved, upgrade_dict)


def _other_value(tp, value):
    """A valid value of annotated type ``tp`` different from ``value``."""
    if typing.get_origin(tp) is typing.Literal:
        return next(a for a in typing.get_args(tp) if a != value)
    if tp is bool:
        return not value
    if tp is int:
        return value + 1
    raise AssertionError(f"no alternative for {tp}")


def _runtime_keys(cls=RuntimeConfig, prefix="runtime."):
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            yield from _runtime_keys(hints[f.name], f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", hints[f.name], f.default


RUNTIME_KEYS = list(_runtime_keys())


def test_runtime_keys_cover_the_section():
    names = {k for k, _, _ in RUNTIME_KEYS}
    assert {"runtime.remat", "runtime.scan_layers", "runtime.attention_impl", "runtime.ttt_impl",
            "runtime.context.layout", "runtime.context.kernel", "runtime.loss_chunk"} <= names
    assert set(RuntimeConfig.__dataclass_fields__) >= {"context"}
    assert set(ContextConfig.__dataclass_fields__) == {"layout", "attention", "kernel"}


@pytest.mark.parametrize("key,tp,default", RUNTIME_KEYS, ids=[k for k, _, _ in RUNTIME_KEYS])
def test_every_runtime_key_may_change_on_resume(key, tp, default):
    base = load_config("tiny", ["model.attention_window=0"])
    changed = load_config("tiny", [f"{key}={str(_other_value(tp, default)).lower()}"])
    assert changed != base
    assert checkpoint_differences(base.to_dict(), changed.to_dict()) == []


@pytest.mark.parametrize("override,differs", [
    ("model.d_model=64", True), ("model.ttt.chunk_size=32", True), ("model.ttt.enabled=false", True),
    ("model.param_dtype=bfloat16", True), ("data.seq_len=128", True), ("data.seed=3", True),
    # Resumable model/data fields: no parameter or data-order change.
    ("model.compute_dtype=bfloat16", False), ("model.max_seq_len=512", False),
    ("data.on_error=skip", False), ("data.worker_count=2", False),
    # Other sections never tie a checkpoint.
    ("train.learning_rate=1e-4", False), ("train.steps=400", False), ("mesh.data=2", False)])
def test_checkpoint_ties_architecture_and_data_only(override, differs):
    base, other = load_config("tiny"), load_config("tiny", [override])
    diffs = checkpoint_differences(base.to_dict(), other.to_dict())
    assert bool(diffs) == differs, diffs
    if differs:
        assert diffs[0].startswith(override.split("=")[0] + ": checkpoint ")


def test_config_saved_before_the_runtime_section_is_read():
    """A checkpoint's config written with the old keys (runtime settings under model.*,
    train.loss_chunk, removed experiment knobs) is upgraded; it matches today's config."""
    now = load_config("tiny", ["runtime.remat=true", "runtime.context.kernel=xla", "runtime.loss_chunk=64"])
    old = now.to_dict()
    runtime = old.pop("runtime")
    old["model"].update(remat=True, remat_policy="full", remat_pinned=True, scan_layers=False,
                        attention_impl="xla", context_layout="contiguous", context_scan="ppermute",
                        context_exchange_dtype="bfloat16", context_kernel="xla", context_halo="single")
    old["model"]["ttt"]["impl"] = "scan"
    old["train"]["loss_chunk"] = runtime["loss_chunk"]
    cfg = config_from_saved(old)
    assert cfg.runtime.remat and cfg.runtime.remat_policy == "full" and cfg.runtime.ttt_impl == "scan"
    assert cfg.runtime.context.kernel == "xla"
    assert cfg.runtime.loss_chunk == 64 and cfg.runtime.attention_impl == "xla"
    assert checkpoint_differences(old, now.to_dict()) == []
    assert "remat" not in upgrade_dict(old)["model"]
    # A user's YAML or override with an old key is told where it went.
    with pytest.raises(ConfigError, match=r"^unknown config key 'model\.remat'; it moved to runtime\.remat$"):
        load_config("tiny", ["model.remat=true"])
    with pytest.raises(ConfigError, match=r"model\.context_exchange_dtype'; it was removed"):
        load_config("tiny", ["model.context_exchange_dtype=bfloat16"])


# --------------------------------------------------------------------------------------------------
# base: inheritance; user errors are one line
# --------------------------------------------------------------------------------------------------


def _write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_base_extends_a_preset_and_files_in_a_chain(tmp_path):
    _write(tmp_path / "presets" / "mid.yaml", "base: tiny\nmodel:\n  d_model: 64\ntrain:\n  steps: 50\n")
    child = _write(tmp_path / "runs" / "child.yaml",
                   "base: ../presets/mid.yaml\ntrain:\n  steps: 20\n  warmup_steps: 5\n")
    cfg, tiny = load_config(child), load_config("tiny")
    assert cfg.model.d_model == 64 and cfg.train.steps == 20 and cfg.train.warmup_steps == 5
    # Everything else comes from the preset at the root of the chain (merged section by section).
    assert cfg.model.ttt == tiny.model.ttt and cfg.data == tiny.data and cfg.model.n_layers == tiny.model.n_layers
    # Command-line overrides apply last.
    assert load_config(child, ["model.d_model=96"]).model.d_model == 96


def test_base_cycle_and_missing_base_are_one_line_errors(tmp_path):
    a = _write(tmp_path / "a.yaml", "base: b.yaml\ntrain:\n  steps: 5\n")
    _write(tmp_path / "b.yaml", "base: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle") as e:
        load_config(a)
    assert "\n" not in str(e.value)
    bad = _write(tmp_path / "c.yaml", "base: no_such_preset\n")
    with pytest.raises(ConfigError, match="no_such_preset.*neither a YAML file nor a preset"):
        load_config(bad)
    odd = _write(tmp_path / "d.yaml", "base: [tiny]\n")
    with pytest.raises(ConfigError, match="'base:' must name a preset or a YAML file"):
        load_config(odd)


@pytest.mark.parametrize("text,overrides,match", [
    ("model:\n  d_model: [64\n", [], r"invalid YAML at line \d+, column \d+"),
    ("model: {d_model: 64\n", [], "invalid YAML"),
    ("", [], "is empty"),
    ("# only a comment\n", [], "is empty"),
    ("- a\n- b\n", [], "top level must be a mapping"),
    ("base: tiny\n", ["model.ttt.layers=[0,"], r"override 'model\.ttt\.layers=\[0,': invalid YAML"),
    ("base: tiny\n", ["model.ttt.layers={0"], "invalid YAML"),
    ("base: tiny\nmodel:\n  d_modle: 3\n", [], r"unknown config key 'model\.d_modle'; did you mean 'd_model'"),
])
def test_config_mistakes_are_one_line_config_errors(tmp_path, text, overrides, match):
    path = _write(tmp_path / "c.yaml", text)
    with pytest.raises(ConfigError, match=match) as e:
        load_config(path, overrides)
    assert "\n" not in str(e.value)


def test_cli_prints_one_line_and_exits_2(tmp_path, capsys):
    from ttt_jax.cli import main

    cases = [[str(_write(tmp_path / "bad.yaml", "train: {steps: 3\n"))],
             [str(_write(tmp_path / "empty.yaml", ""))],
             ["tiny", "model.ttt.layers=[0,"],
             ["tiny", "model.no_such_key=1"]]
    for args in cases:
        assert main(["config", *args]) == 2, args
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
