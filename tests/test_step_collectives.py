"""benchmarks/step_collectives.py: the context-parallel train step's loss gathers no hidden states."""

import importlib.util
from pathlib import Path

import jax
import pytest

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "step_collectives.py"
spec = importlib.util.spec_from_file_location("step_collectives", _PATH)
step_collectives = importlib.util.module_from_spec(spec)
spec.loader.exec_module(step_collectives)


def _hidden_gathers(found, d_model):
    """All-gathers of rank-4 float arrays ending in ``d_model``: chunks of hidden states (the model
    has no TTT layers, whose fast-weight summaries would look alike)."""
    shapes = [shape.split("{")[0] for (kind, shape), _ in found.items() if kind == "all-gather"]
    return [s for s in shapes if s.startswith("f32[") and s.endswith(f",{d_model}]") and s.count(",") == 3]


@pytest.mark.skipif(len(jax.devices()) < 8, reason="needs the 8 emulated CPU devices of conftest")
def test_loss_groups_keep_the_loss_local_under_context_parallelism():
    args = ["--preset", "tiny", "--context", "8", "--seq-len", "8192",
            "--set", "model.n_layers=3", "model.ttt.enabled=false", "model.max_seq_len=8192"]
    local = step_collectives.main(args)
    gathered = step_collectives.main(args + ["--loss-groups", "1"])
    # Without per-shard groups the loss scan gathers [chunks, B, chunk, D] hidden states.
    assert _hidden_gathers(gathered, 128), sorted(gathered)
    assert not _hidden_gathers(local, 128), sorted(local)
