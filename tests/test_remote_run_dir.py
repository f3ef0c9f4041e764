"""Run directories and checkpoints at URLs (``train.run_dir=gs://...``), through the code a bucket
takes, without a network.

``mock://bkt/...`` (tests/mock_remote.py) is an etils.epath URL scheme kept in a local folder: its
``str()`` is the URL, so anything that treats it as a local file fails here as it would on gs://,
and :mod:`ttt_jax.fs` sends it down the URL branch (epath calls only, no ``statvfs``, Orbax's
commit-file steps, metrics and TensorBoard staged locally and copied up).
"""

import errno
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import yaml

import mock_remote
from ttt_jax import cli, fs
from ttt_jax.checkpoint import CORRUPT_SUFFIX, Checkpointer, load_model
from ttt_jax.checkpoint.storage import COMMIT_FILE
from ttt_jax.fs import UnwritablePathError, as_path, ensure_writable
from ttt_jax.train.metrics import MetricsWriter

from test_fault_checkpoint import CONFIG, _fresh, _garble, _kernel, _states
from test_fault_training import assert_same_params, run
from test_train import params_of, records, toy

pytestmark = pytest.mark.integration


@pytest.fixture
def bucket(tmp_path, monkeypatch):
    """The folder of the bucket ``mock://bkt`` (which exists, empty)."""
    root = tmp_path / "store"
    (root / "bkt").mkdir(parents=True)
    monkeypatch.setitem(mock_remote.ROOT, "dir", str(root))
    monkeypatch.chdir(tmp_path)   # a URL mistaken for a relative local path would land here
    return root / "bkt"


def _no_local_fallback(tmp_path):
    """Nothing was written to a local ``mock:`` folder (what ``Path('mock://bkt/run')`` names)."""
    assert not (tmp_path / "mock:").exists()


# --- paths --------------------------------------------------------------------------------------------


def test_as_path_tells_local_paths_from_urls(bucket, tmp_path):
    assert as_path("runs/a") == tmp_path / "runs" / "a" and not fs.is_remote(as_path("runs/a"))
    assert as_path("file:///tmp/x") == Path("/tmp/x")
    p = as_path("mock://bkt/run")
    assert isinstance(p, mock_remote.MockRemotePath) and fs.is_remote(p) and str(p) == "mock://bkt/run"
    assert str(p / "checkpoints" / "6") == "mock://bkt/run/checkpoints/6"
    assert fs.url_root(p / "a" / "b") == "mock://bkt"


def test_unknown_scheme_and_missing_client_are_one_line(monkeypatch):
    with pytest.raises(ValueError, match=r"train.run_dir 'nope://b/run': unknown URL scheme 'nope://'; "
                                         r"use a local path or a URL of a scheme etils.epath knows \(.*gs://"):
        as_path("nope://b/run", "train.run_dir")
    real = fs.importlib.util.find_spec
    monkeypatch.setattr(fs.importlib.util, "find_spec",
                        lambda name, *a: None if name in ("gcsfs", "tensorflow") else real(name, *a))
    with pytest.raises(ValueError, match=r"reaching gs:// needs the gcsfs package; pip install 'ttt-jax\[gcs\]'"):
        as_path("gs://b/run", "train.run_dir")


def test_cli_refuses_an_unknown_scheme_before_compute(tmp_path, capsys):
    (tmp_path / "toy.yaml").write_text(yaml.safe_dump(toy(tmp_path).to_dict()))
    assert cli.main(["train", str(tmp_path / "toy.yaml"), "train.run_dir=nope://b/run"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: run directory (train.run_dir) 'nope://b/run': "
                                               "unknown URL scheme 'nope://'")
    assert cli.main(["generate", "nope://b/run", "--prompt-ids", "1"]) == 2
    assert capsys.readouterr().err.startswith("error: CHECKPOINT 'nope://b/run': unknown URL scheme")


# --- writability and space ------------------------------------------------------------------------------


def test_ensure_writable_probes_a_url_and_leaves_nothing(bucket, tmp_path):
    assert str(ensure_writable("mock://bkt/run/checkpoints", "checkpoint directory", urls=True)) == \
        "mock://bkt/run/checkpoints"
    assert list(bucket.iterdir()) == []      # probed at the bucket, the probe object deleted
    with pytest.raises(ValueError, match=r"the eval output directory must be a local path, got the URL "
                                         r"mock://bkt/out"):
        ensure_writable("mock://bkt/out", "eval output directory")
    with pytest.raises(UnwritablePathError, match=r"the bucket mock://nobkt does not exist"):
        ensure_writable("mock://nobkt/run", "run directory", urls=True)
    (bucket / "obj").write_text("x")
    with pytest.raises(UnwritablePathError, match=r"the run directory mock://bkt/obj is a file \(an object\)"):
        ensure_writable("mock://bkt/obj", "run directory", urls=True)
    _no_local_fallback(tmp_path)


def test_ensure_writable_names_a_url_that_refuses_writes(bucket, monkeypatch):
    def refuse(self, data):
        raise PermissionError(errno.EACCES, "Forbidden: caller does not have storage.objects.create access")

    monkeypatch.setattr(mock_remote.MockRemotePath, "write_bytes", refuse)
    with pytest.raises(UnwritablePathError) as info:
        ensure_writable("mock://bkt/run", "run directory (train.run_dir)", urls=True)
    assert info.value.errno == errno.EACCES and isinstance(info.value, ValueError)
    assert str(info.value) == ("cannot write the run directory (train.run_dir) mock://bkt/run (probed at "
                               "mock://bkt): permission denied (EACCES): [Errno 13] Forbidden: caller does "
                               "not have storage.objects.create access; check the URL, the bucket and the "
                               "credentials")


def test_a_url_has_no_free_space_check(bucket, monkeypatch):
    def no_statvfs(*a):
        raise AssertionError("statvfs of a URL")

    monkeypatch.setattr(shutil, "disk_usage", no_statvfs)
    monkeypatch.setattr(os, "statvfs", no_statvfs)
    assert fs.free_bytes(as_path("mock://bkt/run")) is None
    assert fs.free_inodes(as_path("mock://bkt/run")) is None
    ck = Checkpointer("mock://bkt/run/checkpoints", keep=2)
    ck.check_free_space(1 << 50, 10)   # a petabyte: no figure to compare with, no error
    ck.close()


# --- checkpoints ----------------------------------------------------------------------------------------


def test_checkpoints_at_a_url_skip_unfinished_and_corrupt_steps(bucket, tmp_path):
    url = "mock://bkt/run/checkpoints"
    ck = Checkpointer(url, keep=5)
    for s in (1, 2):
        ck.save(s, *_states(s), data_state={"pos": s}, config=CONFIG)
    ck.close()
    local = bucket / "run" / "checkpoints"
    # Written in place and marked complete by the commit file (no rename on an object store).
    assert sorted(p.name for p in local.iterdir()) == ["1", "2"]
    assert all((local / s / COMMIT_FILE).is_file() for s in ("1", "2"))
    # A save killed while writing: step 3 without its commit file, and a temporary directory.
    shutil.copytree(local / "2", local / "3")
    (local / "3" / COMMIT_FILE).unlink()
    (local / "4.orbax-checkpoint-tmp-1").mkdir()
    _garble(local / "2")

    warned = []
    ck = Checkpointer(url, keep=5, warn=warned.append)
    assert len(warned) == 2 and "mock://bkt/run/checkpoints/3 was interrupted" in warned[0] \
        and "mock://bkt/run/checkpoints/4.orbax-checkpoint-tmp-1 was interrupted" in warned[1]
    assert ck.all_steps() == [1, 2]
    restored = ck.restore_latest(*_fresh(), CONFIG)
    assert restored.step == 1 and restored.data_state == {"pos": 1}
    np.testing.assert_array_equal(_kernel(restored.model_state), _kernel(_states(1)[0]))
    assert [str(p) for p in ck.set_aside] == [f"{url}/2{CORRUPT_SUFFIX}"]
    assert "checkpoint mock://bkt/run/checkpoints/2 is corrupt" in warned[2]
    ck.close()
    assert sorted(p.name for p in local.iterdir()) == ["1", f"2{CORRUPT_SUFFIX}"]
    _no_local_fallback(tmp_path)


# --- metrics and TensorBoard ---------------------------------------------------------------------------


def _record_staging(monkeypatch):
    made, real = [], tempfile.mkdtemp

    def mkdtemp(*a, **k):
        made.append(real(*a, **k))
        return made[-1]

    monkeypatch.setattr(tempfile, "mkdtemp", mkdtemp)
    return made


def test_metrics_at_a_url_are_staged_and_copied_up(bucket, monkeypatch):
    made = _record_staging(monkeypatch)
    (bucket / "run").mkdir()
    (bucket / "run" / "metrics.jsonl").write_text(
        "".join(json.dumps({"kind": "train", "step": s, "loss": 1.0}) + "\n" for s in (2, 4, 6)))
    w = MetricsWriter("mock://bkt/run", total_steps=10, initial_step=4, tensorboard=True, progress=False)
    # Cut back to the resumed step at once, in the bucket too.
    assert [r["step"] for r in records(bucket / "run" / "metrics.jsonl", "train")] == [2, 4]
    w.write({"kind": "train", "step": 6, "loss": 0.5})
    assert [r["step"] for r in records(bucket / "run" / "metrics.jsonl", "train")] == [2, 4]   # not yet
    assert w.sync()
    assert [r["step"] for r in records(bucket / "run" / "metrics.jsonl", "train")] == [2, 4, 6]
    assert b"train/loss" in next((bucket / "run" / "tensorboard").iterdir()).read_bytes()
    w.close()
    assert len(made) == 1 and not os.path.exists(made[0])


def test_a_failed_copy_is_a_warning_and_keeps_the_staged_files(bucket, monkeypatch, capsys):
    made = _record_staging(monkeypatch)
    w = MetricsWriter("mock://bkt/run", total_steps=10, tensorboard=False, progress=False)
    w.write({"kind": "train", "step": 1, "loss": 0.5})

    def offline(*a):
        raise ConnectionError("network is unreachable")

    monkeypatch.setattr(fs, "upload_changed", offline)
    w.close()
    out = capsys.readouterr().out.splitlines()
    assert out == ["warning: copying the metrics and TensorBoard files to mock://bkt/run failed "
                   "(ConnectionError: network is unreachable); retried at the next checkpoint",
                   f"warning: the metrics and TensorBoard files of this run are kept in {made[0]}; "
                   "copy them to mock://bkt/run"]
    assert [r["step"] for r in records(Path(made[0]) / "metrics.jsonl", "train")] == [1]
    shutil.rmtree(made[0])


# --- training -------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_training_at_a_url_crashes_resumes_exactly_and_keeps_its_files(bucket, tmp_path, monkeypatch):
    """A run at ``mock://bkt/run`` crashes at step 9 (checkpoint at 6, metrics to 8 copied up as it
    ends), then resumes to 12: the parameters are bitwise those of an uninterrupted local run,
    ``metrics.jsonl`` holds every step once, TensorBoard's events of both runs arrived, and the
    model loads back from the URL (``load_model``, a warm start, an export)."""
    url = "mock://bkt/run"
    extra = ("train.tensorboard=true", "train.keep_checkpoints=3")
    made = _record_staging(monkeypatch)

    def crash(n, batch):
        if n == 9:
            raise RuntimeError("killed")
        return batch

    with pytest.raises(RuntimeError, match="killed"):
        run(monkeypatch, toy(tmp_path, *extra, f"train.run_dir={url}"), hook=crash)
    run_dir = bucket / "run"
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["6"]
    assert [r["step"] for r in records(run_dir / "metrics.jsonl", "train")] == [2, 4, 6, 8]

    res = run(monkeypatch, toy(tmp_path, *extra, f"train.run_dir={url}"))
    assert res.step == 12 and str(res.run_dir) == url and str(res.checkpoint_dir) == f"{url}/checkpoints"
    straight = run(monkeypatch, toy(tmp_path, *extra, name="local"))
    assert_same_params(params_of(res.model), params_of(straight.model))

    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["12", "6"]
    assert [r["step"] for r in records(run_dir / "metrics.jsonl", "train")] == [2, 4, 6, 8, 10, 12]
    assert [r["step"] for r in records(run_dir / "metrics.jsonl", "eval")] == [0, 6, 12]
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["train"]["run_dir"] == url
    events = sorted((run_dir / "tensorboard").iterdir())
    assert len(events) == 2 and all(e.name.startswith("events.out.tfevents") for e in events)
    assert all(b"train/loss" in e.read_bytes() and b"eval/val_loss" in e.read_bytes() for e in events)
    assert len(made) == 2 and not any(os.path.exists(d) for d in made)   # staged, then removed

    _, model = load_model(url)                      # what eval / generate read
    assert_same_params(params_of(model), params_of(res.model))
    said = []
    run(monkeypatch, toy(tmp_path, *extra, f"train.init_from={url}", "train.stop_after=1", name="warm"),
        log=said.append)
    assert any(m.startswith(f"initialised ") and m.endswith(f"from {url}/checkpoints/12") for m in said)
    from ttt_jax.convert.hf_export import export_hf

    export_hf(url, tmp_path / "hf")
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["num_hidden_layers"] == 2
    _no_local_fallback(tmp_path)
