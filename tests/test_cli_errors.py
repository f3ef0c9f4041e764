"""User mistakes on the command line: one ``error: ...`` line on stderr and a non-zero exit, no
traceback, nothing computed. Run in-process through ``main(argv)``."""

from __future__ import annotations

import pytest

from ttt_jax.cli import main

from test_train import TOY


def one_line_error(capsys, *needles):
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.startswith("error: ")]
    assert len(lines) == 1, err
    assert "Traceback" not in err, err
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def test_train_bad_data_fails_before_compute(tmp_path, capsys, monkeypatch):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(6):
        (corpus / f"f{i}.txt").write_text("hello world\n" * 50)
    (corpus / "f3.txt").write_bytes(b"fine\nnot \xff fine\n")
    import ttt_jax.train.trainer as trainer

    def no_compute(*a, **k):
        raise AssertionError("compiled before the data check")

    monkeypatch.setattr(trainer, "make_batches", no_compute)
    run = tmp_path / "run"
    argv = ["train", "tiny", *TOY, "data.source=text", f"data.paths=[{corpus}]", f"train.run_dir={run}"]
    assert main(argv) == 2
    one_line_error(capsys, "f3.txt:line 2: invalid UTF-8")
    assert not run.exists()
