"""PNG plots of benchmark results: written from the JSON shapes the scripts produce."""

import json

from ttt_jax.bench import plots
import pytest

pytestmark = pytest.mark.unit


def _is_png(path):
    return path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_op_plot(tmp_path):
    rows = [dict(T=t, chunk=c, impl=i, ms=1.0 + t / 1e4, ratio=r, temp_gib=t / 1e5)
            for t in (4096, 32768) for c in (512, 1024) for i, r in (("plain", 1.0), ("scan", 2.3))]
    rows.append(dict(T=4096, chunk=512, impl="associative", error="OOM"))  # errors are left out
    assert _is_png(plots.plot_op({"device": "test", "rows": rows}, tmp_path / "op.png"))


def test_model_sweep_plot(tmp_path):
    rows = [dict(variant=v, seq_len=t, tokens_per_s=1e4 / t, peak_gib=t / 1e4, device="test")
            for v in ("base", "ttt") for t in (8192, 32768)]
    rows.append(dict(variant="swa", seq_len=8192, returncode=-9, error=""))
    assert _is_png(plots.plot_model_sweep(rows, tmp_path / "model.png"))


def test_decode_plot_and_cli(tmp_path):
    def entry(ms):
        return {"contexts": {str(c): {"prefill": {"engine_tokens_per_s": 1e5 / c * 1e3},
                                      "decode": {"1": {"ms_per_step": ms}, "32": {"skipped": "memory"}}}
                             for c in (4096, 32768)}}
    a = {"device": "test", "variants": {"swa_ttt": entry(5.0)}}
    b = {"device": "test", "variants": {"full": entry(6.0)}}
    for name, d in (("a.json", a), ("b.json", b)):
        (tmp_path / name).write_text(json.dumps(d))
    out = tmp_path / "decode.png"
    assert plots.main(["decode", str(tmp_path / "a.json"), str(tmp_path / "b.json"), "--out", str(out)]) == 0
    assert _is_png(out)
    assert plots.main(["nonsense"]) == 2
