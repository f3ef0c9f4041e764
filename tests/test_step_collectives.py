"""benchmarks/step_collectives.py: the context-parallel train step's loss gathers no hidden states."""

import importlib.util
from pathlib import Path

import jax
import pytest

pytestmark = pytest.mark.structure

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
@pytest.mark.slow
def test_loss_groups_keep_the_loss_local_under_context_parallelism():
    # One layer: the loss reads the last hidden states only.
    args = ["--preset", "tiny", "--context", "8", "--seq-len", "8192",
            "--set", "model.n_layers=1", "model.ttt.layers=[0]", "model.ttt.enabled=false",
            "model.max_seq_len=8192"]
    local = step_collectives.main(args)
    gathered = step_collectives.main(args + ["--loss-groups", "1"])
    # Without per-shard groups the loss scan gathers [chunks, B, chunk, D] hidden states.
    assert _hidden_gathers(gathered, 128), sorted(gathered)
    assert not _hidden_gathers(local, 128), sorted(local)


@pytest.mark.skipif(len(jax.devices()) < 8, reason="needs the 8 emulated CPU devices of conftest")
@pytest.mark.slow
def test_remat_policy_save_exchanges_repeats_no_collective():
    """``runtime.remat_policy=save_exchanges``: the backward pass's recomputation of a block repeats
    neither the halo exchange (collective-permute) nor the TTT summaries' all-gather."""
    args = ["--preset", "tiny", "--context", "8", "--seq-len", "2048",
            "--set", "model.n_layers=2", "model.attention_window=64", "model.ttt.layers=[0]",
            "model.ttt.chunk_size=64", "model.max_seq_len=2048", "runtime.remat=true"]
    count = lambda found, kind, pred=lambda s: True: sum(
        n for (k, shape), n in found.items() if k == kind and pred(shape))
    summary = lambda shape: shape.startswith("f32[8,1,")     # [n, B, F, D] fast-weight summaries
    full = step_collectives.main(args + ["runtime.remat_policy=full"])
    saved = step_collectives.main(args + ["runtime.remat_policy=save_exchanges"])
    # Per layer: K/V halo forward + recomputed forward + gradients back = 3 exchanges, 2 when saved.
    assert count(full, "collective-permute") == 3 * 2 * 2, sorted(full.items())
    assert count(saved, "collective-permute") == 2 * 2 * 2, sorted(saved.items())
    assert count(full, "all-gather", summary) == 2 and count(saved, "all-gather", summary) == 1
