"""Model-only loading/saving: ``load_model`` reads training and model-only checkpoints exactly."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ttt_jax.config import load_config
from ttt_jax.models.lm import CausalLM
from ttt_jax.checkpoint import load_model, read_checkpoint_config, resolve_checkpoint, save_model
from ttt_jax.train.trainer import train

from test_train import TOY

pytestmark = pytest.mark.integration


def _params(model):
    return jax.tree.leaves(nnx.to_pure_dict(nnx.state(model, nnx.Param)))


def test_save_then_load_model_only(tmp_path):
    cfg = load_config(None, TOY + ["model.ttt.layers=[1]"])
    model = CausalLM(cfg.model, rngs=nnx.Rngs(3))
    step_dir = save_model(tmp_path / "m", model, cfg, step=7)
    assert step_dir.name == "7" and (tmp_path / "m" / "config.yaml").exists()
    assert resolve_checkpoint(tmp_path / "m") == (tmp_path / "m" / "checkpoints", 7)
    assert resolve_checkpoint(step_dir) == (tmp_path / "m" / "checkpoints", 7)
    assert read_checkpoint_config(tmp_path / "m") == cfg
    cfg2, loaded = load_model(tmp_path / "m")
    assert cfg2 == cfg
    for a, b in zip(_params(model), _params(loaded)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    tokens = jnp.arange(2 * cfg.data.seq_len).reshape(2, -1) % cfg.model.vocab_size
    np.testing.assert_array_equal(np.asarray(model(tokens)), np.asarray(loaded(tokens)))
    # A runtime override may change the layer layout: the saved (unrolled) layers come back stacked.
    cfg3, scanned = load_model(tmp_path / "m", overrides=["runtime.scan_layers=true"])
    assert cfg3.runtime.scan_layers and scanned.period == 2 and len(scanned.layers) == 2
    assert scanned.layers[1].mlp.down.shape == (1, cfg.model.d_ff, cfg.model.d_model)
    np.testing.assert_allclose(np.asarray(scanned(tokens)), np.asarray(model(tokens)), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_load_model_from_training_run(tmp_path):
    cfg = load_config(None, TOY + [f"train.run_dir={tmp_path / 'run'}", "train.stop_after=2"])
    train(cfg)
    cfg2, model = load_model(tmp_path / "run", overrides=["runtime.attention_impl=xla"])
    assert cfg2.runtime.attention_impl == "xla" and cfg2.model.d_model == cfg.model.d_model
    assert count_nonzero_changed(model, cfg)


def count_nonzero_changed(model, cfg):
    # Trained parameters differ from a fresh init with the same seed.
    fresh = CausalLM(cfg.model, rngs=nnx.Rngs(cfg.train.seed))
    return any(not np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(_params(model), _params(fresh)))


def test_load_model_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_model(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no checkpoint"):
        load_model(tmp_path / "empty")
    cfg = load_config(None, TOY)
    save_model(tmp_path / "m", CausalLM(cfg.model, rngs=nnx.Rngs(0)), cfg)
    with pytest.raises(ValueError, match="model.d_model"):
        load_model(tmp_path / "m", overrides=["model.d_model=64"])
    with pytest.raises(ValueError, match="step 5 not among"):
        load_model(tmp_path / "m", step=5)
