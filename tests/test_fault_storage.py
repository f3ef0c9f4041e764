"""Hostile storage: unwritable output locations, failing background saves, noisy fallbacks.

Read-only mounts, permissions, full disks and quotas are simulated by patching the writer to raise
the OS error (the tests run as any user, root included, where ``chmod`` would not stop a write).
Each test asserts the exit code, the one-line message, and that no intact checkpoint was lost.
"""

import errno
import os

import pytest
import yaml

from ttt_jax import cli, fs
from ttt_jax.fs import UnwritablePathError, ensure_writable

from test_train import toy


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
