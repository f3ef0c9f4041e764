"""The ``ttt-jax`` command, run in-process through ``main(argv)``."""

import json

import pytest
import yaml

from ttt_jax.cli import main
from ttt_jax.config import load_config

from test_train import TOY  # the shared toy setup (compiled functions are reused)

pytestmark = pytest.mark.integration


def test_config_prints_resolved_yaml(capsys):
    assert main(["config", "tiny", "train.steps=70", "model.ttt.layers=[1]"]) == 0
    out = yaml.safe_load(capsys.readouterr().out)
    assert out["train"]["steps"] == 70
    assert out["model"]["ttt"]["layers"] == [1]
    # The printed YAML is itself a valid config that resolves to the same thing.
    assert load_config("tiny", ["train.steps=70", "model.ttt.layers=[1]"]).to_dict() == out


@pytest.mark.parametrize("preset", ["tiny", "small", "qwen3_4b_shape"])
def test_config_presets(preset, capsys):
    assert main(["config", preset]) == 0
    assert "model:" in capsys.readouterr().out


def test_bad_key_is_one_line_error(capsys):
    assert main(["config", "tiny", "train.stpes=3"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "did you mean 'steps'" in err
    assert "Traceback" not in err and err.count("\n") == 1


def test_bad_value_and_missing_config(capsys):
    assert main(["train", "tiny", "model.n_kv_heads=3"]) == 2
    assert "model.n_kv_heads" in capsys.readouterr().err
    assert main(["config", "no_such_preset"]) == 2
    assert "presets:" in capsys.readouterr().err


def test_every_subcommand_is_implemented_and_documents_itself(capsys):
    # Each subcommand module exists and defines its arguments: `--help` prints usage and exits 0.
    from ttt_jax.cli import _SUBCOMMANDS, _subcommand_module

    for name in _SUBCOMMANDS:
        module = _subcommand_module(name)
        assert module is not None and callable(module.run), name
        with pytest.raises(SystemExit) as exit_info:
            main([name, "--help"])
        assert exit_info.value.code == 0
        assert f"usage: ttt-jax {name}" in capsys.readouterr().out


def test_train_toy(tmp_path, capsys):
    run_dir = tmp_path / "cli_run"
    argv = ["train", "tiny", *TOY, "train.stop_after=3", f"train.run_dir={run_dir}"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "parameters: " in out and "final validation loss:" in out and str(run_dir) in out
    lines = [json.loads(x) for x in open(run_dir / "metrics.jsonl")]
    assert [r["step"] for r in lines if r["kind"] == "eval"] == [0, 3]
    assert (run_dir / "checkpoints" / "3").is_dir()
    # Running again finds the finished run and says so instead of retraining.
    assert main(argv) == 0
    assert "already trained to step 3" in capsys.readouterr().out


def test_train_divergence_exit_code(tmp_path, capsys):
    argv = ["train", "tiny", *TOY, "train.learning_rate=1e30", "train.grad_clip=0", "train.on_nonfinite=stop",
            f"train.run_dir={tmp_path / 'bad'}"]
    assert main(argv) == 3
    assert "non-finite training loss" in capsys.readouterr().err


def test_bench_op_tiny(capsys, tmp_path):
    out = tmp_path / "op.json"
    assert main(["bench", "op", "--lengths", "256", "--chunks", "64", "--d-model", "16", "--d-ff", "32",
                 "--iters", "1", "--impls", "plain", "scan", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["impl"] for r in rows] == ["plain", "scan"] and all("ms" in r for r in rows)
    assert "ratio" in capsys.readouterr().out


def test_error_after_backend_start_is_one_line_with_libtpu_installed(tmp_path):
    """A mistake found after JAX's backends start (here a missing ``train.init_from``) is still one
    line: with the ``tpu`` extra installed on a host without TPU chips, libtpu's start-up warnings
    (TPU_ACCELERATOR_TYPE, TPU_WORKER_HOSTNAMES; five lines) are dropped. Run without
    ``JAX_PLATFORMS=cpu`` (which the suite sets, and which skips loading libtpu)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")])
    out = subprocess.run([sys.executable, "-m", "ttt_jax.cli", "train", "tiny", f"train.run_dir={tmp_path / 'run'}",
                          f"train.init_from={tmp_path / 'missing'}"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stderr
    assert out.stderr.splitlines() == [f"error: train.init_from '{tmp_path / 'missing'}' does not exist"], out.stderr
