"""The README's promises: CI runs its test command, and its Python examples run."""

import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _bash_block_lines():
    blocks = re.findall(r"```bash\n(.*?)```", README, flags=re.S)
    return [ln.strip() for b in blocks for ln in b.splitlines() if ln.strip() and not ln.startswith("#")]


def test_ci_runs_the_readme_test_command():
    test_cmd = [ln for ln in _bash_block_lines() if "pytest" in ln and "venv" in ln]
    assert len(test_cmd) == 1, test_cmd
    ci = (ROOT / ".ci" / "run").read_text()
    assert test_cmd[0] in ci


def test_readme_main_command_trains_the_default_preset():
    main_cmd = [ln for ln in _bash_block_lines() if "ttt-jax train tiny" in ln and "venv" in ln]
    assert len(main_cmd) == 1 and (ROOT / "configs" / "tiny.yaml").is_file()


def test_op_example_runs():
    block = re.search(r"### The op\n\n```python\n(.*?)```", README, flags=re.S).group(1)
    scope: dict = {}
    exec(compile(block, "README.md", "exec"), scope)
    assert scope["out"].shape == (2, 300, 64)


@pytest.mark.slow
def test_model_example_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    block = re.search(r"### Model, data, training\n\n```python\n(.*?)```", README, flags=re.S).group(1)
    scope: dict = {}
    exec(compile(block, "README.md", "exec"), scope)
    assert scope["logits"].shape[-1] == 259
    assert scope["result"].step == 2
