"""Continual training from a converted Hugging Face checkpoint (``train.init_from``), the TTT
baseline switch from the same checkpoint, and the ``ttt-jax convert`` command line."""

import json

import numpy as np
import pytest

from flax import nnx

pytestmark = pytest.mark.integration

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from ttt_jax.cli import main  # noqa: E402
from ttt_jax.config import apply_overrides  # noqa: E402
from ttt_jax.convert import SafetensorsCheckpoint  # noqa: E402
from ttt_jax.checkpoint import read_checkpoint_config  # noqa: E402
from ttt_jax.train.trainer import train  # noqa: E402


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """A tiny random Qwen3 (byte-level vocabulary) converted by the CLI with TTT on layer 1."""
    tmp = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    cfg = transformers.Qwen3Config(vocab_size=260, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                   max_position_embeddings=256, tie_word_embeddings=True,
                                   initializer_range=0.2)   # far from a uniform predictor
    transformers.Qwen3ForCausalLM(cfg).save_pretrained(tmp / "src")
    assert main(["convert", "hf", str(tmp / "src"), str(tmp / "ckpt"), "--ttt-layers", "1",
                 "--ttt-chunk", "16", "--no-progress"]) == 0
    return tmp


def _run(converted, tmp_path, name, *extra):
    cfg = apply_overrides(read_checkpoint_config(converted / "ckpt"), [
        "model.compute_dtype=float32", "data.seq_len=64", "data.batch_size=8", "data.max_documents=40",
        "train.steps=3", "train.warmup_steps=1", "train.learning_rate=1e-3", "train.eval_batches=2",
        "train.progress=false", "train.tensorboard=false", f"train.run_dir={tmp_path / name}", *extra])
    return train(cfg, log=lambda msg: None)


@pytest.mark.slow
def test_converted_model_continues_training(converted, tmp_path):
    init = f"train.init_from={converted / 'ckpt'}"
    ttt = _run(converted, tmp_path, "ttt", init)
    base = _run(converted, tmp_path, "base", init, "model.ttt.enabled=false")   # the baseline switch
    scratch = _run(converted, tmp_path, "scratch", "model.ttt.enabled=false")   # random init
    assert ttt.step == 3 and np.isfinite(ttt.train_loss)
    # Step-0 validation: TTT added at conversion leaves the converted model's function unchanged,
    # and both warm starts differ from a random initialisation.
    assert ttt.val_losses[0][1] == pytest.approx(base.val_losses[0][1], rel=1e-6)
    assert abs(ttt.val_losses[0][1] - scratch.val_losses[0][1]) > 1e-3
    assert ttt.val_losses[-1][1] < ttt.val_losses[0][1]     # it learns
    layers = ttt.model.layers
    assert hasattr(layers[1].mlp, "ttt_conv") and not hasattr(base.model.layers[1].mlp, "ttt_conv")
    assert np.abs(np.asarray(layers[1].mlp.ttt_conv[...])).max() > 0   # TTT parameters are trained


def test_init_from_errors_name_the_parameter(converted):
    from ttt_jax.models.lm import CausalLM
    from ttt_jax.train.warm_start import restore_model_params

    cfg = apply_overrides(read_checkpoint_config(converted / "ckpt"), ["model.d_ff=128"])
    state = nnx.state(nnx.eval_shape(lambda: CausalLM(cfg.model, rngs=nnx.Rngs(0))))
    with pytest.raises(ValueError, match=r"layers\.0\.mlp\.gate: checkpoint \(64, 96\) != model \(64, 128\)"):
        restore_model_params(converted / "ckpt", state, cfg)
    cfg = apply_overrides(read_checkpoint_config(converted / "ckpt"), ["model.qk_norm=false"])
    state = nnx.state(nnx.eval_shape(lambda: CausalLM(cfg.model, rngs=nnx.Rngs(0))))
    with pytest.raises(ValueError, match=r"layers\.0\.attn\.k_norm\.scale: in the checkpoint but not in the model"):
        restore_model_params(converted / "ckpt", state, cfg)


def test_cli_export_round_trip(converted, tmp_path, capsys):
    out = tmp_path / "hf_out"
    assert main(["convert", "export", str(converted / "ckpt"), str(out), "--dtype", "bfloat16",
                 "--no-progress"]) == 0
    hf = json.loads((out / "config.json").read_text())
    assert hf["architectures"] == ["Qwen3ForCausalLM"] and hf["ttt_layers"] == [1]
    st = SafetensorsCheckpoint(out)
    assert st.dtype("model.layers.1.mlp.ttt_conv.weight") == "BF16"
    # bfloat16 tensors back in as bfloat16 parameters: the fp32 originals rounded once.
    import jax
    import jax.numpy as jnp
    from ttt_jax.convert import load_hf
    from ttt_jax.checkpoint import load_model
    _, bf = load_hf(out, param_dtype="bfloat16")
    _, f32 = load_model(converted / "ckpt")
    a, b = nnx.to_pure_dict(nnx.state(f32, nnx.Param)), nnx.to_pure_dict(nnx.state(bf, nnx.Param))
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(jnp.asarray(x).astype(jnp.bfloat16)),
                                                            np.asarray(y)), a, b)
    # The reader's own bfloat16 path (older safetensors releases) gives the same arrays.
    name = "model.layers.1.mlp.ttt_proj.weight"
    np.testing.assert_array_equal(st._read_raw(name), st.get(name))
    assert main(["convert", "hf", str(converted / "src"), str(tmp_path / "x"), "--ttt-layers", "7"]) == 2
    assert "model.ttt.layers" in capsys.readouterr().err
    # An earlier export is not overwritten silently; --overwrite replaces its files, keeps others.
    (out / "notes.txt").write_text("mine")
    argv = ["convert", "export", str(converted / "ckpt"), str(out), "--no-progress"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: OUT_DIR") and "not empty" in err and err.count("\n") == 1
    assert main(argv + ["--overwrite"]) == 0
    assert SafetensorsCheckpoint(out).dtype("model.layers.1.mlp.ttt_conv.weight") == "F32"
    assert (out / "notes.txt").read_text() == "mine"
    assert main(["convert", "export", str(converted / "ckpt"), str(out / "notes.txt")]) == 2
    assert "is a file" in capsys.readouterr().err


def test_cli_convert_without_tokenizer_says_so(converted, tmp_path, capsys):
    assert main(["convert", "hf", str(converted / "src"), str(tmp_path / "y"), "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "has no tokenizer.json" in err and "259-token byte tokenizer (which fits the model's " \
        "vocabulary of 260)" in err and "--prompt-ids" in err
    assert main(["convert", "hf", str(tmp_path / "nowhere"), str(tmp_path / "z")]) == 2
    assert "SRC_DIR" in capsys.readouterr().err and not (tmp_path / "z").exists()
