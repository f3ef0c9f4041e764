"""Hostile storage: unwritable output locations, failing background saves, noisy fallbacks.

Read-only mounts, permissions, full disks and quotas are simulated by patching the writer to raise
the OS error (the tests run as any user, root included, where ``chmod`` would not stop a write).
Each test asserts the exit code, the one-line message, and that no intact checkpoint was lost.
"""

import errno
import json
import os

import pytest
import yaml

from ttt_jax import cli, fs
from ttt_jax.fs import UnwritablePathError, ensure_writable

from test_train import toy

pytestmark = pytest.mark.integration


def _unwritable(monkeypatch, bad_dir, err=errno.EROFS):
    """Make writes into ``bad_dir`` (and below) fail with ``err``, as on a read-only mount."""
    real = fs._probe

    def probe(directory):
        if str(directory).startswith(str(bad_dir)):
            raise OSError(err, os.strerror(err))
        return real(directory)

    monkeypatch.setattr(fs, "_probe", probe)


# --- ensure_writable -------------------------------------------------------------------------------


def test_ensure_writable_accepts_new_and_existing_dirs_without_creating(tmp_path):
    assert ensure_writable(tmp_path, "output directory") == tmp_path
    assert ensure_writable(tmp_path / "a" / "b", "output directory") == tmp_path / "a" / "b"
    assert not (tmp_path / "a").exists()
    assert list(tmp_path.iterdir()) == []      # the probe file is gone


@pytest.mark.parametrize("err,words", [(errno.EROFS, "the filesystem is read-only (EROFS)"),
                                       (errno.EACCES, "permission denied (EACCES)"),
                                       (errno.ENOSPC, "no space left on the device (bytes or inodes) (ENOSPC)"),
                                       (errno.EDQUOT, "the disk quota is exceeded (EDQUOT)")])
def test_ensure_writable_names_path_and_os_error(tmp_path, monkeypatch, err, words):
    _unwritable(monkeypatch, tmp_path, err)
    with pytest.raises(UnwritablePathError) as info:
        ensure_writable(tmp_path / "new", "eval output directory")
    assert info.value.errno == err and isinstance(info.value, ValueError)
    assert str(info.value) == (f"cannot write the eval output directory {tmp_path / 'new'} (its nearest existing "
                               f"parent {tmp_path} cannot be written): {words}; choose a writable location")


def test_ensure_writable_rejects_a_file(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(UnwritablePathError, match=rf"the run directory {tmp_path / 'f'} is a file"):
        ensure_writable(tmp_path / "f", "run directory")
    with pytest.raises(UnwritablePathError, match=rf"{tmp_path / 'f'} is a file, not a directory"):
        ensure_writable(tmp_path / "f" / "sub", "run directory")


# --- train: every output location is checked before any compute -----------------------------------


def _train_cli(tmp_path, *extra):
    (tmp_path / "toy.yaml").write_text(yaml.safe_dump(toy(tmp_path, *extra).to_dict()))
    return cli.main(["train", str(tmp_path / "toy.yaml")])


@pytest.mark.parametrize("bad", ["run", "run/checkpoints", ""])
def test_train_refuses_an_unwritable_output_location_before_compute(tmp_path, monkeypatch, capsys, bad):
    """A read-only run directory, a read-only checkpoints/ under a writable run directory, or a new
    run under a read-only parent: one line naming the path, exit 2, nothing computed."""
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    if bad == "":
        (tmp_path / "run" / "checkpoints").rmdir()
        (tmp_path / "run").rmdir()
    _unwritable(monkeypatch, tmp_path / bad if bad else tmp_path)
    assert _train_cli(tmp_path) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    what = "checkpoint directory" if bad == "run/checkpoints" else "run directory (train.run_dir)"
    path = tmp_path / "run" / "checkpoints" if bad == "run/checkpoints" else tmp_path / "run"
    assert err[0].startswith(f"error: cannot write the {what} {path}"), err
    assert "the filesystem is read-only (EROFS)" in err[0]
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_train_run_dir_that_is_a_file_is_one_line(tmp_path, capsys):
    (tmp_path / "run").write_text("not a directory")
    assert _train_cli(tmp_path) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: the run directory (train.run_dir) {tmp_path / 'run'} is a file, not a directory; "
                   "choose a directory path"], err


# --- A background save that fails ------------------------------------------------------------------


def _failing_writer(monkeypatch, step, err):
    """Make Orbax's background writer fail with ``err`` while it writes the checkpoint of ``step``
    (as a full disk, exhausted inodes, a quota, a read-only remount or a failing device would).
    Returns a list that receives the time of the first failure."""
    import time

    from orbax.checkpoint._src.path import async_path

    real = async_path.write_text
    failed_at = []

    async def write_text(path, text):
        if f"/{step}.orbax-checkpoint-tmp" in str(path):
            failed_at.append(time.perf_counter())
            raise OSError(err, os.strerror(err), str(path))
        return await real(path, text)

    monkeypatch.setattr(async_path, "write_text", write_text)
    return failed_at


@pytest.mark.parametrize("err,words", [(errno.ENOSPC, "no space left on the device (bytes or inodes) (ENOSPC)"),
                                       (errno.EROFS, "the filesystem is read-only (EROFS)"),
                                       (errno.EIO, "input/output error (EIO)")])
def test_failed_background_save_stops_at_once_naming_step_path_and_error(tmp_path, monkeypatch, capfd, err, words):
    """The save of step 4 fails in the background: the run stops at the next step boundary (not
    at the next save), with one line naming step 4, its path and the OS error, exit 2; the
    checkpoint of step 2 is intact and the run resumes from it."""
    import time

    from ttt_jax.checkpoint import Checkpointer

    failed_at = _failing_writer(monkeypatch, 4, err)
    assert _train_cli(tmp_path, "train.checkpoint_every=2", "train.log_every=1") == 2
    elapsed = time.perf_counter() - failed_at[0]
    out, err_text = capfd.readouterr()
    lines = [ln for ln in err_text.splitlines() if ln.strip()]
    ckdir = tmp_path / "run" / "checkpoints"
    assert len(lines) == 1, err_text[-3000:]
    assert lines[0].startswith(f"error: saving the checkpoint of step 4 to {ckdir / '4'} failed: {words}"), lines
    assert "the checkpoint of step 2 in it is intact" in lines[0], lines
    assert "Traceback" not in err_text
    # Stopped at the step boundary after the failure (steps 5 or 6), not later.
    steps = [json.loads(ln)["step"] for ln in open(tmp_path / "run" / "metrics.jsonl")
             if json.loads(ln)["kind"] == "train"]
    assert max(steps) <= 6, steps
    assert elapsed < 20, elapsed   # seconds, not minutes of Orbax's timeouts
    monkeypatch.undo()
    # Step 2 is intact; at most the failed save's temporary directory is left (Orbax's threads may
    # recreate it after it was removed), which the next run removes with a warning.
    assert sorted(p.name for p in ckdir.iterdir() if ".orbax-checkpoint-tmp" not in p.name) == ["2"]
    ck = Checkpointer(ckdir, keep=3, warn=lambda m: None)
    assert ck.all_steps() == [2]
    ck.close()
    assert _train_cli(tmp_path, "train.checkpoint_every=2", "train.log_every=1", "train.stop_after=6") == 0
    assert "resumed from" in capfd.readouterr().out


def _truncate_all(step_dir):
    """Cut every array data file of a step in half (OCDBT may keep more than one data file, and
    the largest is not always one the arrays are read from)."""
    for f in (p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"):
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


# --- Quiet fallbacks ------------------------------------------------------------------------------------


def test_fallback_from_truncated_step_is_one_warning(tmp_path, capfd):
    assert _train_cli(tmp_path, "train.checkpoint_every=2", "train.stop_after=4") == 0
    ckdir = tmp_path / "run" / "checkpoints"
    _truncate_all(ckdir / "4")
    (ckdir / "6.orbax-checkpoint-tmp-123").mkdir()          # a leftover of a killed save
    capfd.readouterr()
    assert _train_cli(tmp_path, "train.checkpoint_every=2", "train.stop_after=6") == 0
    out, err = capfd.readouterr()
    text = out + err
    warnings_ = [ln for ln in text.splitlines() if "warning" in ln.lower()]
    assert len(warnings_) == 2, text[-3000:]
    assert any(f"checkpoint {ckdir / '6.orbax-checkpoint-tmp-123'} was interrupted" in w for w in warnings_)
    assert any(f"checkpoint {ckdir / '4'} is corrupt" in w and "skipped and moved to" in w for w in warnings_)
    assert "bound method" not in text and "Traceback" not in text and "Event loop is closed" not in text
    assert f"resumed from {ckdir / '2'} (step 2)" in text


# --- Free-space estimate ----------------------------------------------------------------------------------


def test_free_space_estimate_is_within_20_percent_of_bytes_written(tmp_path):
    """A trained state's arrays do not compress much: the estimate must match what is written."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from ttt_jax.checkpoint import Checkpointer
    from ttt_jax.checkpoint.integrity import checkpoint_bytes, state_nbytes
    from ttt_jax.checkpoint.tree import to_saveable
    from ttt_jax.config import load_config
    from ttt_jax import sharding as mesh_lib
    from ttt_jax.train.trainer import train_program

    cfg = load_config("tiny", [])
    prog = train_program(cfg, mesh_lib.make_mesh(cfg.mesh))
    rng = np.random.default_rng(0)

    def trained_like(x):   # values like those of a trained state (Adam moments no longer zero)
        if not jnp.issubdtype(x.dtype, jnp.floating):
            return x
        return jax.device_put(jnp.asarray(rng.normal(size=x.shape).astype(x.dtype)), x.sharding)

    ms, os_ = (jax.tree.map(trained_like, t) for t in prog.init())
    state = {"model": to_saveable(nnx.to_pure_dict(ms)), "optimizer": to_saveable(nnx.to_pure_dict(os_))}
    estimate = checkpoint_bytes(state_nbytes(state), len(jax.tree.leaves(state)))
    ck = Checkpointer(tmp_path, keep=1)
    ck.save(1, ms, os_, {}, cfg.to_dict())
    ck.close()
    written = sum(f.stat().st_size for f in (tmp_path / "1").rglob("*") if f.is_file())
    assert abs(estimate - written) <= 0.2 * written, (estimate, written)


# --- metrics.jsonl after a resume ---------------------------------------------------------------------------


def test_metrics_truncated_to_the_resumed_step(tmp_path):
    from ttt_jax.train.metrics import truncate_metrics

    p = tmp_path / "metrics.jsonl"
    recs = [{"kind": "eval", "step": 0}] + [{"kind": "train", "step": s} for s in range(1, 9)]
    p.write_text("".join(json.dumps(r) + "\n" for r in recs) + '{"kind": "train", "st')   # cut by a kill
    assert truncate_metrics(p, 6) == 3
    assert [json.loads(ln)["step"] for ln in p.read_text().splitlines()] == [0, 1, 2, 3, 4, 5, 6]
    assert truncate_metrics(p, 0) == 7 and p.read_text() == ""


def test_exported_safetensors_get_the_umask_mode(tmp_path):
    import numpy as np

    from ttt_jax.convert.safetensors_io import write_safetensors

    old = os.umask(0o022)
    try:
        names = write_safetensors(tmp_path, [("a", np.zeros(3, np.float32))])
        names2 = write_safetensors(tmp_path / "sharded", [("a", np.zeros(64, np.float32)),
                                                          ("b", np.zeros(64, np.float32))], max_shard_bytes=256)
    finally:
        os.umask(old)
    assert names == ["model.safetensors"] and len(names2) == 2
    for p in [tmp_path / names[0]] + [tmp_path / "sharded" / n for n in names2]:
        assert oct(p.stat().st_mode & 0o777) == oct(0o644), p


def test_generate_falls_back_to_the_newest_intact_step(tmp_path, capfd):
    assert _train_cli(tmp_path, "train.checkpoint_every=2", "train.stop_after=4") == 0
    ckdir = tmp_path / "run" / "checkpoints"
    _truncate_all(ckdir / "4")
    capfd.readouterr()
    import warnings

    from ttt_jax.checkpoint import CheckpointWarning

    with pytest.warns(CheckpointWarning) as caught:
        assert cli.main(["generate", str(tmp_path / "run"), "--prompt", "def ", "--max-new-tokens", "4"]) == 0
    out, err = capfd.readouterr()
    msgs = [str(w.message) for w in caught if issubclass(w.category, CheckpointWarning)]
    assert len(msgs) == 1 and f"checkpoint {ckdir / '4'} is corrupt" in msgs[0] and \
        "loading step 2 instead" in msgs[0], msgs
    # The command prints it as one line.
    line = warnings.formatwarning(msgs[0], CheckpointWarning, "x.py", 1)
    assert line == f"warning: {msgs[0]}\n"
    assert "Traceback" not in err and "bound method" not in err + msgs[0]
    assert (ckdir / "4").is_dir()     # reading never moves or deletes anything


def test_model_readers_keep_orbax_restore_warnings_off_the_console(tmp_path):
    """Reading only some items of a checkpoint (`convert export`, `eval`, `generate` load the model
    and the meta record) made Orbax log "Item ... was found in the checkpoint, but could not be
    restored" through absl, four lines per export. A fresh process, so that no earlier checkpoint
    use in this one installed the filter."""
    import subprocess
    import sys

    from flax import nnx

    from ttt_jax.checkpoint import save_model
    from ttt_jax.models.lm import CausalLM

    cfg = toy(tmp_path)
    save_model(tmp_path / "m", CausalLM(cfg.model, runtime=cfg.runtime, rngs=nnx.Rngs(0)), cfg)
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, "-m", "ttt_jax.cli", "convert", "export", str(tmp_path / "m"),
                        str(tmp_path / "hf"), "--no-progress"], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "JAX_PLATFORMS": "cpu",
                            "PYTHONPATH": os.pathsep.join([repo, os.environ.get("PYTHONPATH", "")])})
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "hf" / "model.safetensors").is_file()
    assert "could not be restored" not in r.stderr and "absl" not in r.stderr, r.stderr[-2000:]
