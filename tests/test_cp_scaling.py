"""benchmarks/cp_scaling.py: variant parsing, the ratio arithmetic and the commands it would run
(the runs themselves need GPUs; benchmarks/README.md has their results)."""

import importlib.util
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "cp_scaling.py"
spec = importlib.util.spec_from_file_location("cp_scaling", _PATH)
cp_scaling = importlib.util.module_from_spec(spec)
spec.loader.exec_module(cp_scaling)


def test_parse_variant():
    assert cp_scaling.parse_variant("full=runtime.remat_policy=full,runtime.remat=false") == (
        "full", ["runtime.remat_policy=full", "runtime.remat=false"], {})
    assert cp_scaling.parse_variant("plain=") == ("plain", [], {})
    assert cp_scaling.parse_variant("o=runtime.remat_policy=full,env:XLA_FLAGS=--xla_a=2 --xla_b=true") == (
        "o", ["runtime.remat_policy=full"], {"XLA_FLAGS": "--xla_a=2 --xla_b=true"})
    for bad in ("nothing", "=a=b", "x=runtime.remat", "x=env:FOO", "x=env:=1"):
        with pytest.raises(ValueError, match="--variant"):
            cp_scaling.parse_variant(bad)


def test_ratios_pair_each_row_with_its_repeats_baseline():
    rows = [{"name": "1 device", "repeat": 0, "time_s": 0.75}, {"name": "a", "repeat": 0, "time_s": 0.825},
            {"name": "1 device", "repeat": 1, "time_s": 0.74}, {"name": "a", "repeat": 1, "time_s": 0.814},
            {"name": "b", "repeat": 1, "time_s": 0.74}]
    weak = cp_scaling.ratios(rows, "weak")
    assert weak["a"]["ratios"] == pytest.approx([1.1, 1.1])
    assert weak["a"]["mean"] == pytest.approx(1.1)
    assert weak["b"] == {"ratios": [1.0], "mean": 1.0, "min": 1.0, "max": 1.0}
    strong = cp_scaling.ratios([{"name": "1 device", "repeat": 0, "time_s": 12.0},
                                {"name": "x", "repeat": 0, "time_s": 3.0}], "strong")
    assert strong["x"]["mean"] == pytest.approx(4.0)


def test_dry_run_prints_interleaved_commands(capsys):
    assert cp_scaling.main(["--dry-run", "--repeat", "2", "--variant", "full=runtime.remat_policy=full",
                            "--variant", "split="]) == {}
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("$ ")]
    assert len(lines) == 6                                   # (base, full, split) x 2
    assert lines[0].startswith("$ CUDA_VISIBLE_DEVICES=0 ") and "--mesh data=1" in lines[0]
    assert "--seq-len 32768" in lines[0] and "--seq-len 131072" in lines[1]
    assert "--mesh context=4" in lines[1] and lines[1].endswith("runtime.remat_policy=full")
    assert lines[3].startswith("$ CUDA_VISIBLE_DEVICES=0 ")
    cp_scaling.main(["--dry-run", "--variant", "o=env:XLA_FLAGS=--xla_a=2 --xla_b=1"])
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("$ ")]
    assert "XLA_FLAGS" not in lines[0] and lines[1].startswith("$ XLA_FLAGS='--xla_a=2 --xla_b=1' ")
    strong = cp_scaling.main(["--dry-run", "--mode", "strong", "--length", "131072"])
    out = capsys.readouterr().out
    assert strong == {} and out.count("--seq-len 131072") == 2 and "runtime.context.layout=zigzag" in out
