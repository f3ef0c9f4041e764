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
