"""The trainer: loss falls, exact resume, checkpoint/config checks, errors, divergence, metrics."""

import json
import math
import os

import jax
import numpy as np
import pytest
from flax import nnx

from ttt_jax.config import load_config
from ttt_jax.train import NonFiniteLossError, train
from ttt_jax.checkpoint import Checkpointer
from ttt_jax.train.metrics import peak_tflops_per_device, throughput
from ttt_jax.train.optim import decay_mask, is_decayed, learning_rate_schedule

pytestmark = pytest.mark.integration

# A 2-layer In-Place TTT model (TTT on layer 0) on a slice of the byte-level stdlib corpus; batch 8
# so that it splits over the 8 emulated CPU devices of the test session.
TOY = [
    "model.vocab_size=259", "model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.n_kv_heads=1",
    "model.d_ff=64", "model.max_seq_len=64", "model.compute_dtype=float32",
    "model.ttt.layers=[0]", "model.ttt.chunk_size=16",
    "data.seq_len=32", "data.batch_size=8", "data.max_documents=200",
    "train.steps=12", "train.warmup_steps=2", "train.learning_rate=1e-2", "train.log_every=2",
    "train.eval_every=6", "train.eval_batches=2", "train.checkpoint_every=6", "train.progress=false",
]


def toy(tmp_path, *extra, name="run"):
    return load_config(None, TOY + [f"train.run_dir={tmp_path / name}", *extra])


def params_of(model):
    return jax.tree.leaves(jax.device_get(nnx.state(model, nnx.Param)))


def records(path, kind):
    return [r for r in map(json.loads, open(path)) if r["kind"] == kind]


@pytest.fixture(scope="module")
def straight_30(tmp_path_factory):
    """Final parameters of an uninterrupted 30-step toy run (validation every 15 steps): the
    reference of the resume tests. Logging and checkpoint cadence do not change the numbers, so one
    run serves them all."""
    tmp = tmp_path_factory.mktemp("straight")
    res = train(toy(tmp, "train.steps=30", "train.checkpoint_every=1000", "train.eval_every=15",
                    "train.log_every=10", name="straight"))
    assert res.step == 30
    return params_of(res.model)


# Most tests share this exact setup (model, seed, optimizer, mesh), so the trainer's compiled
# functions are reused across them instead of recompiled.


@pytest.mark.slow
def test_toy_trains_and_writes_metrics(tmp_path):
    res = train(toy(tmp_path))
    assert res.step == 12
    assert [s for s, _ in res.val_losses] == [0, 6, 12]
    assert res.val_losses[-1][1] < res.val_losses[0][1] - 0.5, res.val_losses
    train_recs = records(res.metrics_path, "train")
    assert train_recs[-1]["loss"] < train_recs[0]["loss"]
    for key in ("loss", "grad_norm", "lr", "tokens_per_s", "tflops_per_s", "mfu", "tokens_seen"):
        assert key in train_recs[-1], key
    # No MFU without a known peak (CPUs, with train.peak_tflops unset); a fraction otherwise.
    known = peak_tflops_per_device(jax.devices()[0].device_kind) is not None
    assert (train_recs[-1]["mfu"] is not None) == known
    assert len(records(res.metrics_path, "eval")) == 3
    assert list((res.run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert (res.run_dir / "config.yaml").is_file()
    ck = Checkpointer(res.checkpoint_dir, keep=3)
    assert ck.all_steps() == [6, 12]
    assert ck.read_meta(12)["config"] == toy(tmp_path).to_dict()
    ck.close()


def test_resume_is_bitwise_exact(tmp_path):
    if jax.default_backend() == "gpu" and "--xla_gpu_deterministic_ops=true" not in os.environ.get("XLA_FLAGS", ""):
        pytest.skip("GPU reductions (e.g. the embedding-gradient scatter) are non-deterministic unless "
                    "XLA_FLAGS=--xla_gpu_deterministic_ops=true")
    straight = train(toy(tmp_path, name="straight"))
    # Stop after 5 steps (checkpointed at 5; same schedule), then resume the same run dir to 12.
    first = train(toy(tmp_path, "train.stop_after=5", name="resumed"))
    assert first.step == 5
    resumed = train(toy(tmp_path, name="resumed"))
    assert resumed.step == 12
    for a, b in zip(params_of(straight.model), params_of(resumed.model)):
        np.testing.assert_array_equal(a, b)
    assert resumed.val_losses[-1] == straight.val_losses[-1]
    assert resumed.train_loss == straight.train_loss


def test_restore_with_other_model_config_names_keys(tmp_path):
    train(toy(tmp_path, "train.stop_after=1"))
    with pytest.raises(ValueError, match=r"model\.d_ff: checkpoint 64 != config 96.*model\.n_layers"):
        train(toy(tmp_path, "model.d_ff=96", "model.n_layers=3"))


@pytest.mark.slow   # three short runs, two compilations
def test_resume_after_runtime_change(tmp_path):
    """Runtime settings may change on resume: 2 steps, then the same run dir with remat on and the
    layers scanned (their parameters and Adam moments are converted from the unrolled layout), to
    step 4. The parameters match an uninterrupted unrolled run without remat."""
    straight = train(toy(tmp_path, "train.stop_after=4", name="straight"))
    train(toy(tmp_path, "train.stop_after=2", name="changed"))
    resumed = train(toy(tmp_path, "train.stop_after=4", "runtime.remat=true", "runtime.scan_layers=true",
                        name="changed"))
    assert resumed.step == 4
    from ttt_jax.models.layers import unstack_layer_params
    got = jax.tree.leaves(jax.device_get(unstack_layer_params(nnx.state(resumed.model, nnx.Param),
                                                              resumed.model.cfg)))
    for a, b in zip(params_of(straight.model), got, strict=True):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-6)


def test_restore_shape_mismatch_names_params(tmp_path):
    from ttt_jax.models.lm import CausalLM
    from ttt_jax.train.optim import make_optimizer

    saved = toy(tmp_path, "train.stop_after=1")
    res = train(saved)
    # Arrays that do not fit the checkpoint even though the recorded config matches (e.g. the
    # checkpoint came from other code): the shape check names the parameters.
    other = toy(tmp_path, "model.d_ff=96")

    def build():  # abstract (shape-only) model and optimizer: nothing is computed
        model = CausalLM(other.model, runtime=other.runtime, rngs=nnx.Rngs(0))
        return model, nnx.Optimizer(model, make_optimizer(other.train), wrt=nnx.Param)

    model, opt = nnx.eval_shape(build)
    ck = Checkpointer(res.checkpoint_dir, keep=3)
    try:
        with pytest.raises(ValueError, match=r"does not match the model's parameters: .*"
                                             r"mlp\.down: checkpoint shape \(64, 32\) != model shape \(96, 32\)"):
            ck.restore(1, nnx.state(model), nnx.state(opt), saved.to_dict())
    finally:
        ck.close()


def test_resume_false_refuses_existing_run(tmp_path):
    train(toy(tmp_path, "train.stop_after=1"))
    with pytest.raises(ValueError, match="train.resume=false"):
        train(toy(tmp_path, "train.resume=false"))


def test_tokenizer_vocab_larger_than_model(tmp_path):
    with pytest.raises(ValueError, match=r"vocab_size=259.*model\.vocab_size=200"):
        train(toy(tmp_path, "model.vocab_size=200"))


def test_ttt_chunk_layout_errors(tmp_path):
    with pytest.raises(ValueError, match=r"data.seq_len=32 is not longer than model.ttt.chunk_size=32"):
        train(toy(tmp_path, "model.ttt.chunk_size=32"))
    with pytest.raises(ValueError, match=r"chunk_align=true needs data.seq_len \(32\) to be a multiple"):
        train(toy(tmp_path, "model.ttt.chunk_size=12", "data.chunk_align=true"))


def test_token_ids_out_of_range_rejected():
    from ttt_jax.models.lm import check_tokens

    with pytest.raises(ValueError):
        check_tokens(np.array([[1, 2, 300]], np.int32), 259)


def test_batch_and_mesh_must_fit(tmp_path):
    n = jax.device_count()
    if n > 1:
        with pytest.raises(ValueError, match=rf"data.batch_size={n + 1} \(global\) is not divisible by "
                                             rf"the data-parallel size {n}"):
            train(toy(tmp_path, f"data.batch_size={n + 1}"))
    with pytest.raises(ValueError, match="devices"):
        train(toy(tmp_path, f"mesh.data={n + 1}"))


@pytest.mark.slow
def test_non_finite_loss_keeps_last_good_checkpoint(tmp_path):
    train(toy(tmp_path, "train.stop_after=6"))  # a good checkpoint at step 6
    ckpt_dir = tmp_path / "run" / "checkpoints"
    before = sorted(p.name for p in ckpt_dir.iterdir())
    # Resumed with an absurd learning rate (optimizer settings may change on resume), the
    # parameters blow up at step 7 and the loss of step 8 is non-finite: the checkpoint due at
    # step 9 must never be written.
    bad = toy(tmp_path, "train.learning_rate=1e30", "train.grad_clip=0", "train.checkpoint_every=3",
              "train.on_nonfinite=stop")
    with pytest.raises(NonFiniteLossError, match=r"non-finite training loss at step \d+.*"
                                                 r"Last good checkpoint: .*6 \(step 6\)"):
        train(bad)
    assert sorted(p.name for p in ckpt_dir.iterdir()) == before
    bad_recs = [r for r in records(tmp_path / "run" / "metrics.jsonl", "train") if r["loss"] in ("nan", "inf")]
    assert bad_recs, "the non-finite step is recorded in metrics.jsonl"
    # The last good checkpoint still restores and trains on.
    res = train(toy(tmp_path))
    assert res.step == 12 and math.isfinite(res.train_loss)


def test_optimizer_schedule_and_decay_mask():
    cfg = load_config(None, ["train.steps=10", "train.warmup_steps=4", "train.learning_rate=1.0",
                             "train.min_lr_ratio=0.1"]).train
    lr = learning_rate_schedule(cfg)
    np.testing.assert_allclose([float(lr(i)) for i in (0, 3, 10)], [0.25, 1.0, 0.1], rtol=1e-6)
    assert all(float(lr(i)) >= float(lr(i + 1)) for i in range(3, 10))
    assert is_decayed("layers.0.mlp.down.kernel", 2)
    assert is_decayed("embed.embedding", 2)
    assert not is_decayed("layers.0.post_norm.scale", 1)
    assert not is_decayed("layers.0.mlp.ttt_conv.kernel", 2)
    assert not is_decayed("layers.0.attn.q.bias", 1)
    mask = decay_mask({"w": np.zeros((2, 2)), "b": np.zeros(2)})
    assert mask == {"w": True, "b": False}


def test_throughput_and_mfu():
    t = throughput(steps=10, seconds=2.0, tokens_per_step=1000, flops_per_token=1e9, n_devices=2,
                   peak_per_device=100.0)
    assert t["tokens_per_s"] == 5000.0
    assert math.isclose(t["tflops_per_s"], 5.0)
    assert math.isclose(t["mfu"], 5.0 / 200.0)
    assert peak_tflops_per_device("NVIDIA H100 80GB HBM3") == 989.0
    assert peak_tflops_per_device("TPU v5 lite") == 197.0
    assert peak_tflops_per_device("cpu") is None
    assert peak_tflops_per_device("cpu", override=1.5) == 1.5


@pytest.mark.slow   # three CLI processes, each importing JAX and compiling the step
def test_signal_then_kill_then_resume_gives_the_parameters_of_one_run(tmp_path, straight_30):
    """The same `ttt-jax train` command three times (CPU, bitwise):

    1. SIGINT mid-run (before the first periodic checkpoint): the step in flight is checkpointed
       (the only checkpoint, named on stderr) and the process exits with status 4;
    2. run again: it resumes from that checkpoint; SIGKILL once the periodic checkpoint of step 10
       exists (nothing of the steps after it is kept);
    3. run again: it resumes from the newest intact checkpoint and finishes. The final parameters equal those of an
       uninterrupted run.

    (SIGTERM, and SIGINT/SIGTERM at random steps, are covered in process by
    test_fault_training.py; its CLI test covers SIGTERM followed by a second signal.)"""
    import signal
    import subprocess
    import sys
    import time

    import yaml

    if jax.default_backend() != "cpu":
        pytest.skip("bitwise reproducibility is a CPU guarantee (see README)")
    extra = ["train.steps=30", "train.checkpoint_every=10", "train.eval_every=15", "train.log_every=1"]
    run_dir = tmp_path / "interrupted"
    (tmp_path / "toy.yaml").write_text(yaml.safe_dump(toy(tmp_path, *extra, name="interrupted").to_dict()))
    cmd = [sys.executable, "-m", "ttt_jax.cli", "train", str(tmp_path / "toy.yaml")]
    metrics, checkpoints = run_dir / "metrics.jsonl", run_dir / "checkpoints"

    def start_and_wait(ready, what):
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.time() + 240
        while not ready():
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.time() < deadline, f"{what} within 240 s"
            time.sleep(0.05)
        return proc

    proc = start_and_wait(lambda: metrics.is_file() and len(records(metrics, "train")) >= 3,
                          "no third training step")
    proc.send_signal(signal.SIGINT)
    err = proc.stderr.read().decode()
    assert proc.wait() == 4, err[-2000:]
    ck = Checkpointer(checkpoints, keep=3)
    steps = ck.all_steps()
    ck.close()
    assert len(steps) == 1 and 3 <= steps[0] < 10, steps
    assert f"saved {checkpoints / str(steps[0])}" in err

    proc = start_and_wait(lambda: (checkpoints / "10").is_dir(), "no checkpoint at step 10")
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the run finished before it could be killed"

    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "resumed from" in done.stdout, done.stdout[-2000:]
    resumed = train(toy(tmp_path, *extra, name="interrupted"))   # restores the final checkpoint
    assert resumed.step == 30
    for a, b in zip(straight_30, params_of(resumed.model), strict=True):
        np.testing.assert_array_equal(a, b)
