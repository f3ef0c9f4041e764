"""User mistakes on the command line: one ``error: ...`` line on stderr and a non-zero exit, no
traceback, nothing computed. Run in-process through ``main(argv)``."""

from __future__ import annotations

import pytest

from ttt_jax.cli import main

from test_train import TOY

pytestmark = pytest.mark.integration


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


@pytest.mark.parametrize("argv,needle", [
    (["bench", "op", "--chunks", "0"], "--chunks 0"),
    (["bench", "op", "--impls", "foo"], "--impls 'foo'"),
    (["bench", "op", "--lengths", "64", "--chunks", "48"], "nothing to run"),
    (["bench", "op", "--dtype", "nope"], "--dtype 'nope'"),
    (["bench", "op", "--out", "."], "is a directory"),
    (["bench", "model", "--variants", "nope"], "--variants 'nope'"),
    (["bench", "model", "--preset", "tiny", "--set", "model.nope=1"], "unknown config key 'model.nope'"),
    (["bench", "model", "--preset", "tiny", "--mesh", "context=x"], "--mesh 'context=x'"),
    (["bench", "model", "--preset", "no_such_preset"], "neither a YAML file nor a preset"),
    (["bench", "model", "--preset", "tiny", "--iters", "0"], "--iters 0"),
])
def test_bench_argument_mistakes(argv, needle, capsys, monkeypatch):
    import ttt_jax.bench.isolate as isolate

    monkeypatch.setattr(isolate, "run_variant_process", lambda *a, **k: pytest.fail("a child started"))
    assert main(argv) == 2
    one_line_error(capsys, needle)


def test_bench_failed_row_exits_non_zero(capsys, monkeypatch):
    import ttt_jax.bench.op as op

    real = op.fwd_bwd

    def broken(name, lr, chunk_size):
        if name == "scan":
            raise RuntimeError("RESOURCE_EXHAUSTED: out of memory")
        return real(name, lr, chunk_size)

    monkeypatch.setattr(op, "fwd_bwd", broken)
    argv = ["bench", "op", "--lengths", "64", "--chunks", "16", "--d-model", "8", "--d-ff", "16",
            "--iters", "1", "--impls", "plain", "scan"]
    assert main(argv) == 1
    out = capsys.readouterr()
    assert "ERROR RuntimeError" in out.out and "nan" not in out.out.replace("nan%", "")
    assert out.err.count("error: ") == 1 and "1 of 2 benchmark rows failed (first: scan" in out.err
    # CPU figures: no "0 TFLOP/s" peak, percentages of the measured peak with digits.
    peak_line = next(x for x in out.out.splitlines() if "matmul peak" in x)
    assert " 0 TFLOP/s" not in peak_line and "TFLOP/s" in peak_line


def test_bench_formatting():
    from ttt_jax.bench.fmt import num, pct

    assert num(0.0512, " TFLOP/s") == "0.0512 TFLOP/s" and num(1234.5) == "1234"
    assert num(None) == num(float("nan")) == pct(None) == pct(float("nan")) == "n/a"
    assert pct(0.511) == "51.1%" and num(3e-9) == "3.00e-09"


def test_train_run_dir_mistakes(tmp_path, capsys):
    f = tmp_path / "afile"
    f.write_text("x")
    for run_dir, needle in ((f, "is a file, not a directory"), (f / "sub", "cannot create")):
        assert main(["train", "tiny", *TOY, f"train.run_dir={run_dir}"]) == 2
        one_line_error(capsys, "train.run_dir", needle)
    assert main(["train", "tiny", *TOY, f"train.run_dir={tmp_path / 'r'}",
                 f"train.init_from={tmp_path / 'missing'}"]) == 2
    one_line_error(capsys, "train.init_from", "does not exist")


def test_short_run_clamps_the_preset_warmup(capsys):
    import yaml

    assert main(["config", "tiny", "train.steps=10"]) == 0
    out = capsys.readouterr()
    assert yaml.safe_load(out.out)["train"]["warmup_steps"] == 10
    assert out.err.count("\n") == 1 and "warmup_steps 30 clamped to train.steps=10" in out.err
    # An explicit warmup above the steps stays an error.
    assert main(["config", "tiny", "train.steps=10", "train.warmup_steps=20"]) == 2
    one_line_error(capsys, "train.warmup_steps=20")


@pytest.mark.parametrize("argv,needle", [
    (["eval", "{tmp}/missing"], "does not exist"),
    (["eval", "{tmp}/afile"], "no checkpoint under"),
    (["generate", "{tmp}/missing", "--prompt", "hi"], "does not exist"),
    (["convert", "export", "{tmp}/missing", "{tmp}/out"], "does not exist"),
    (["convert", "export", "{tmp}/missing", "{tmp}/afile"], "is a file"),
    (["convert", "hf", "{tmp}/afile", "{tmp}/out"], "SRC_DIR"),
])
def test_path_mistakes_are_one_line(argv, needle, tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    assert main([a.format(tmp=tmp_path) for a in argv]) == 2
    one_line_error(capsys, needle)
