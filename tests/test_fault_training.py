"""The trainer under faults: interrupted at random steps, corrupt checkpoints, non-finite steps.

Every run uses the toy setup of ``test_train.py`` (same model, seed, optimizer and mesh), so the
compiled step is shared by all of them; faults are injected through the training batch iterator:
a hook sees the n-th batch drawn by a ``train`` call and may send a signal, raise (a crash), or
poison the batch's loss mask with NaN (which makes that step's loss and gradients non-finite).
"""

import os
import signal

import jax
import numpy as np
import pytest

from ttt_jax.train import NonFiniteLossError, TrainingInterrupted, trainer
from ttt_jax.checkpoint import CORRUPT_SUFFIX, CheckpointCorruptError, Checkpointer, CheckpointWriteError

from test_fault_checkpoint import _garble, _swap_arrays
from test_train import params_of, records, toy

pytestmark = [pytest.mark.integration, pytest.mark.skipif(jax.default_backend() != "cpu",
                                reason="bitwise reproducibility is a CPU guarantee (see README)")]


class _Hooked:
    """The training batch iterator, with ``hook(n, batch) -> batch`` on the n-th batch (1-based)."""

    def __init__(self, it, hook):
        self.it, self.hook, self.n = it, hook, 0

    def __iter__(self):
        return self

    def __next__(self):
        batch = next(self.it)
        self.n += 1
        return self.hook(self.n, batch)

    def get_state(self):
        return self.it.get_state()

    def set_state(self, state):
        self.it.set_state(state)


def run(monkeypatch, cfg, hook=None, log=None):
    """``train(cfg)`` with ``hook`` on its training batches."""
    real = trainer.make_batches

    def make_batches(data_cfg, split, **kw):
        it = real(data_cfg, split, **kw)
        return _Hooked(it, hook) if hook is not None and split == "train" else it

    with monkeypatch.context() as m:
        m.setattr(trainer, "make_batches", make_batches)
        return trainer.train(cfg, log=log if log is not None else (lambda msg: None))


def poison(steps):
    """A hook making the loss (and gradients) of the given draws NaN."""
    def hook(n, batch):
        if n in steps:
            batch = dict(batch, loss_mask=batch["loss_mask"].copy())
            batch["loss_mask"][0, 0] = np.nan
        return batch
    return hook


_STRAIGHT: dict[int, list[np.ndarray]] = {}


def straight_params(tmp_path_factory, data_seed):
    """Final parameters of an uninterrupted toy run (computed once per data seed)."""
    if data_seed not in _STRAIGHT:
        d = tmp_path_factory.mktemp("straight")
        _STRAIGHT[data_seed] = params_of(trainer.train(toy(d, f"data.seed={data_seed}"), log=lambda m: None).model)
    return _STRAIGHT[data_seed]


def assert_same_params(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)


# --- Kill and resume at random steps -----------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_signal_and_crash_at_random_steps_resume_exactly(tmp_path, tmp_path_factory, monkeypatch, seed):
    """SIGTERM at a random step (the step finishes, is checkpointed, TrainingInterrupted), then a
    crash at a later random step (no checkpoint of it; the work since the last periodic checkpoint
    is redone): the final parameters equal those of an uninterrupted run, bitwise."""
    rng = np.random.default_rng(seed)
    data_seed = seed % 2
    every = int(rng.choice([2, 3, 5]))
    k_signal = int(rng.integers(1, 11))          # the step in flight when SIGTERM arrives
    k_crash = int(rng.integers(k_signal + 1, 12))  # a later step that never completes
    cfg = toy(tmp_path, f"data.seed={data_seed}", f"train.checkpoint_every={every}", "train.log_every=1")

    def send_sigterm(n, batch):
        if n == k_signal:
            os.kill(os.getpid(), signal.SIGTERM)
        return batch

    with pytest.raises(TrainingInterrupted) as info:
        run(monkeypatch, cfg, send_sigterm)
    assert info.value.step == k_signal and info.value.checkpoint.is_dir()

    def crash(n, batch):
        if k_signal + n == k_crash:
            raise RuntimeError("simulated crash")
        return batch

    with pytest.raises(RuntimeError, match="simulated crash"):
        run(monkeypatch, cfg, crash)
    ck = Checkpointer(tmp_path / "run" / "checkpoints", keep=3)
    latest = ck.latest_step()
    ck.close()
    # The newest checkpoint: the signal's, or a periodic one written before the crash.
    assert latest == max([k_signal] + [s for s in range(k_signal + 1, k_crash) if s % every == 0])
    res = run(monkeypatch, cfg)
    assert res.step == 12
    assert_same_params(params_of(res.model), straight_params(tmp_path_factory, data_seed))


# --- Corrupt checkpoints ------------------------------------------------------------------------------


def test_resume_skips_a_corrupt_newest_checkpoint(tmp_path, tmp_path_factory, monkeypatch):
    cfg = toy(tmp_path, "train.checkpoint_every=2")
    run(monkeypatch, toy(tmp_path, "train.checkpoint_every=2", "train.stop_after=8"))
    ckdir = tmp_path / "run" / "checkpoints"
    _swap_arrays(ckdir / "8", ckdir / "4")      # well-formed, other values: the checksums tell
    log = []
    res = run(monkeypatch, cfg, log=log.append)
    assert any(f"warning: checkpoint {ckdir / '8'} is corrupt" in m and "checksums" in m for m in log), log
    assert any(f"resumed from {ckdir / '6'} (step 6)" in m for m in log), log
    assert (ckdir / f"8{CORRUPT_SUFFIX}").is_dir()
    assert res.step == 12
    assert_same_params(params_of(res.model), straight_params(tmp_path_factory, 0))


def test_no_intact_checkpoint_is_an_error_naming_them(tmp_path, monkeypatch):
    cfg = toy(tmp_path, "train.stop_after=2")
    run(monkeypatch, cfg)
    ckdir = tmp_path / "run" / "checkpoints"
    _garble(ckdir / "2")
    with pytest.raises(CheckpointCorruptError, match=rf"no intact checkpoint is left: {ckdir / '2'}"
                                                     rf"{CORRUPT_SUFFIX} were moved aside"):
        run(monkeypatch, cfg)
    res = run(monkeypatch, cfg)   # as the message says: the same command starts over
    assert res.step == 2


def test_full_disk_stops_before_training_with_a_clear_error(tmp_path, monkeypatch):
    import shutil

    monkeypatch.setattr(shutil, "disk_usage",
                        lambda p: shutil._ntuple_diskusage(total=1 << 30, used=(1 << 30) - (256 << 10), free=256 << 10))
    with pytest.raises(CheckpointWriteError, match=rf"not enough free disk space for a checkpoint in "
                                                   rf"{tmp_path / 'run' / 'checkpoints'}: 256.0 KiB free"):
        trainer.train(toy(tmp_path), log=lambda m: None)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()   # nothing was computed


# --- Non-finite steps -----------------------------------------------------------------------------------


def test_nonfinite_step_is_skipped_and_counted(tmp_path, monkeypatch):
    """``skip`` (the default): the poisoned step changes nothing -- the checkpoint after it equals
    the one before, bitwise, optimizer step counter included -- and is counted and logged; the run
    goes on and the count survives a resume."""
    log = []
    cfg = toy(tmp_path, "train.checkpoint_every=2", "train.log_every=1")
    res = run(monkeypatch, toy(tmp_path, "train.checkpoint_every=2", "train.log_every=1", "train.stop_after=3"),
              poison({3}), log=log.append)
    assert res.step == 3 and res.nonfinite_skipped == 1
    assert any("step 3: non-finite loss (nan)" in m and "update skipped (1 of at most "
               "train.max_nonfinite_steps=10)" in m for m in log), log
    recs = records(res.metrics_path, "train")
    assert [r["step"] for r in recs if r.get("skipped")] == [3]
    assert recs[-1]["nonfinite_skipped"] == 1
    ck = Checkpointer(res.checkpoint_dir, keep=3)
    metas = {s: ck.read_meta(s) for s in (2, 3)}
    ck.close()
    assert metas[2]["checksums"] == metas[3]["checksums"], "the skipped update was applied"
    assert metas[3]["nonfinite_skipped"] == 1
    res = run(monkeypatch, cfg)
    assert res.step == 12 and res.nonfinite_skipped == 1 and np.isfinite(res.train_loss)


def test_too_many_nonfinite_steps_stop_and_keep_the_last_good_checkpoint(tmp_path, monkeypatch):
    log = []
    cfg = toy(tmp_path, "train.checkpoint_every=2", "train.log_every=1", "train.max_nonfinite_steps=1")
    with pytest.raises(NonFiniteLossError, match=r"non-finite training loss at step 5 .*2 updates skipped, more "
                                                 r"than train.max_nonfinite_steps=1; stopped. Last good "
                                                 r"checkpoint: .*2 \(step 2\)"):
        run(monkeypatch, cfg, poison(set(range(4, 13))), log=log.append)
    # Step 4's periodic checkpoint waited (its update was skipped): only step 2 exists.
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["2"]
    assert any("step 4: checkpoint deferred" in m for m in log), log


def test_stop_policy_stops_at_the_first_nonfinite_step(tmp_path, monkeypatch):
    cfg = toy(tmp_path, "train.checkpoint_every=2", "train.on_nonfinite=stop")
    with pytest.raises(NonFiniteLossError, match=r"non-finite training loss at step 3 .*train.on_nonfinite=stop"
                                                 r".*Last good checkpoint: .*2 \(step 2\)"):
        run(monkeypatch, cfg, poison({3}))
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["2"]


def test_disk_filling_up_mid_run_is_a_clear_error_and_keeps_checkpoints(tmp_path, monkeypatch, capsys):
    """The disk fills up after the checkpoint of step 2: the command stops at the next save with one
    `error:` line naming the directory and its free space (exit 2); step 2 still restores."""
    import shutil

    import yaml

    from ttt_jax import cli

    real = shutil.disk_usage
    saves = []

    def usage(path):
        if (tmp_path / "run" / "checkpoints" / "2").is_dir():
            saves.append(path)
            return shutil._ntuple_diskusage(total=1 << 30, used=(1 << 30) - (256 << 10), free=256 << 10)
        return real(path)

    monkeypatch.setattr(shutil, "disk_usage", usage)
    (tmp_path / "toy.yaml").write_text(yaml.safe_dump(toy(tmp_path, "train.checkpoint_every=2").to_dict()))
    assert cli.main(["train", str(tmp_path / "toy.yaml")]) == 2
    err = capsys.readouterr().err
    monkeypatch.undo()
    ck = Checkpointer(tmp_path / "run" / "checkpoints", keep=3)
    steps = ck.all_steps()
    ck.close()
    # Step 2's directory appears once its (asynchronous) write completes: during step 4's save at the
    # latest, so the save of step 4 or 6 is the one refused.
    assert steps in ([2], [2, 4]), steps
    assert f"error: not enough free disk space for a checkpoint in {tmp_path / 'run' / 'checkpoints'}: " \
           f"256.0 KiB free, a checkpoint needs about" in err, err
    assert f"the checkpoint of step {steps[-1]} in it is intact" in err, err
    assert run(monkeypatch, toy(tmp_path, "train.checkpoint_every=2")).step == 12


@pytest.mark.slow
def test_nonfinite_parameters_stop_at_once_instead_of_skipping(tmp_path, monkeypatch):
    """An update that overflows the parameters themselves (an infinite learning rate from step 7
    on): the next step's loss is non-finite, and since skipping cannot bring the parameters back,
    the run stops there -- it does not burn train.max_nonfinite_steps steps -- naming the last
    good checkpoint. The interval's summary counts the skipped step and excludes its loss."""
    run(monkeypatch, toy(tmp_path, "train.stop_after=6"))
    bad = toy(tmp_path, "train.learning_rate=1e39", "train.grad_clip=0", "train.checkpoint_every=3",
              "train.log_every=2")
    with pytest.raises(NonFiniteLossError, match=r"non-finite training loss at step 8 .*the parameters themselves "
                                                 r"hold NaN/inf.*Last good checkpoint: .*6 \(step 6\)"):
        run(monkeypatch, bad)
    recs = records(tmp_path / "run" / "metrics.jsonl", "train")
    assert [r["step"] for r in recs if r.get("skipped")] == [8]
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["6"]


def _slow_steps(monkeypatch, seconds, announce=False):
    """Make every training step take ``seconds`` on the device side (a host callback in the
    program that produces the step's loss), so that a signal's timing can be told apart. With
    ``announce``, each step prints ``IN STEP`` to stdout as its sleep starts."""
    import dataclasses
    import time

    real = trainer._program

    def sleepy(x):
        if announce:
            print("IN STEP", flush=True)
        time.sleep(seconds)
        return x

    delay = jax.jit(lambda x: jax.pure_callback(sleepy, jax.ShapeDtypeStruct(x.shape, x.dtype), x))

    def program(*a, **k):
        prog = real(*a, **k)

        def step(model_state, opt_state, batch):
            model_state, opt_state, metrics = prog.step(model_state, opt_state, batch)
            return model_state, opt_state, dict(metrics, loss=delay(metrics["loss"]))

        return dataclasses.replace(prog, step=step)

    monkeypatch.setattr(trainer, "_program", program)


@pytest.mark.parametrize("signame", ["SIGTERM", "SIGINT"])
@pytest.mark.slow
def test_signal_stops_within_one_step_and_checkpoints_the_step_in_flight(tmp_path, monkeypatch, signame):
    """A signal arriving while step 3 runs (steps of 0.5 s, no log or checkpoint due at step 3):
    no further step is dispatched; step 3 finishes, is checkpointed, and the run stops within
    about one step's time of the signal."""
    import threading
    import time

    step_s = 0.5
    _slow_steps(monkeypatch, step_s)
    sent = {}

    def hook(n, batch):
        if n == 3:
            def fire():
                sent["t"] = time.perf_counter()
                os.kill(os.getpid(), getattr(signal, signame))
            threading.Timer(step_s / 2, fire).start()
        return batch

    # A checkpoint at step 2 first: the first save of a process compiles the checksum program
    # (seconds, many on a loaded CI machine), which is not what this test times.
    cfg = toy(tmp_path, "train.steps=30", "train.log_every=1000", "train.eval_every=1000",
              "train.checkpoint_every=2")
    with pytest.raises(TrainingInterrupted) as info:
        run(monkeypatch, cfg, hook)
    took = time.perf_counter() - sent["t"]
    assert info.value.step == 3, info.value.step
    assert took < step_s + 5.0, took     # the rest of step 3 plus its checkpoint
    assert info.value.checkpoint == tmp_path / "run" / "checkpoints" / "3"
    assert info.value.checkpoint.is_dir()


@pytest.mark.slow
def test_second_signal_exits_at_once_with_one_line(tmp_path):
    """In a CLI process: the first SIGTERM asks for a checkpoint of the step in flight; a second
    one while that step still runs (10 s steps) ends the process at once with one line and status
    128 + 15; the earlier checkpoint is intact."""
    import subprocess
    import sys
    import time

    import yaml

    (tmp_path / "toy.yaml").write_text(yaml.safe_dump(toy(tmp_path, "train.steps=30", "train.log_every=1",
                                                          "train.checkpoint_every=2").to_dict()))
    script = f"""
import sys; sys.path.insert(0, {str(os.path.dirname(__file__))!r})
import pytest
from test_fault_training import _slow_steps
from ttt_jax import cli
mp = pytest.MonkeyPatch()
_slow_steps(mp, 10.0, announce=True)
sys.exit(cli.main(["train", {str(tmp_path / "toy.yaml")!r}]))
"""
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    for line in proc.stdout:
        if line.startswith("IN STEP"):
            break
    # Inside step 1 (10 s): after the first evaluation and the step's compilation, which on a
    # loaded machine can take longer than any fixed wait.
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    t0 = time.perf_counter()
    proc.send_signal(signal.SIGTERM)
    rc = proc.wait(timeout=60)
    took = time.perf_counter() - t0
    err = proc.stderr.read()
    assert rc == 128 + signal.SIGTERM, (rc, err[-2000:])
    assert took < 3.0, took
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert lines[-1].startswith("SIGTERM received again: exiting at once without a checkpoint"), err[-2000:]
    assert "Traceback" not in err


@pytest.mark.parametrize("second", ["SIGTERM", "SIGINT"])
def test_second_signal_is_exactly_one_line_off_a_terminal(second):
    """The signal handler on its own (no training): SIGTERM, then SIGTERM or SIGINT. Off a terminal
    (a log file, a scheduler's capture) stderr is exactly one line, no blank line before it and no
    KeyboardInterrupt traceback; the status is 128 + the second signal."""
    import subprocess
    import sys

    script = """
import os, signal, time
from ttt_jax.train.stop import StopSignals
with StopSignals(lambda: "kept") as stop:
    os.kill(os.getpid(), signal.SIGTERM)
    while stop.received is None:
        time.sleep(0.01)
    os.kill(os.getpid(), signal.%s)
    time.sleep(30)
""" % second
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": os.pathsep.join(
                              [os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                               os.environ.get("PYTHONPATH", "")])})
    assert proc.returncode == 128 + getattr(signal, second), proc.stderr[-2000:]
    assert proc.stderr.splitlines() == [f"{second} received again: exiting at once without a checkpoint of "
                                        "the step in flight; kept"], proc.stderr[-2000:]
