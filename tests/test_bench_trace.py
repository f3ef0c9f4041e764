"""The profile summary of ``ttt-jax bench model --profile`` (ttt_jax.bench.trace): a synthetic
device trace with known intervals, and a real (CPU) jax.profiler trace."""

import gzip
import json

import jax
import jax.numpy as jnp
import pytest

from ttt_jax.bench import trace as T

pytestmark = pytest.mark.unit


def _write(path, events):
    with gzip.open(path, "wt") as f:
        json.dump({"displayTimeUnit": "ns", "traceEvents": events}, f)
    return path


def _device_trace(tmp_path):
    meta = [
        {"ph": "M", "pid": 1, "name": "process_name", "args": {"name": "/device:GPU:0"}},
        {"ph": "M", "pid": 1, "tid": 10, "name": "thread_name", "args": {"name": "Stream #10(Compute)"}},
        {"ph": "M", "pid": 1, "tid": 11, "name": "thread_name", "args": {"name": "Stream #11(Compute)"}},
        {"ph": "M", "pid": 1, "tid": 12, "name": "thread_name", "args": {"name": "XLA Modules"}},
        {"ph": "M", "pid": 2, "name": "process_name", "args": {"name": "/host:CPU"}},
    ]
    x = lambda tid, ts, dur, name, op="", hlo="": {"ph": "X", "pid": 1, "tid": tid, "ts": ts, "dur": dur,
                                                  "name": name, "args": {"tf_op": op, "hlo_op": hlo}}
    # Times in microseconds. Compute on stream 10: [0, 100) gemm, [100, 150) cuDNN, [300, 400)
    # fusion. NCCL on stream 11: [120, 220) overlaps compute for 30 us, then runs alone for 70.
    events = meta + [
        x(10, 0, 60, "sm90_xmma_gemm_bf16", "jit(step)/jvp(mlp)/ttt_scan/dot_general", "dot.7"),
        x(10, 60, 40, "sm90_xmma_gemm_bf16", "jit(step)/jvp(mlp)/ttt_scan/dot_general", "dot.7"),
        x(10, 100, 50, "cudnn_generated_fort_native_sdpa_sm90_flash_fprop", "jit(step)/attention/custom-call"),
        x(10, 300, 100, "loop_add_fusion", "jit(step)/transpose(jvp(loss))/add", "add_fusion.3"),
        x(11, 120, 100, "ncclDevKernel_AllReduce_Sum_bf16_RING_LL", "jit(step)/optimizer/all-reduce"),
        x(12, 0, 400, "jit_step", ""),                            # a whole-module line: ignored
        {"ph": "X", "pid": 2, "tid": 1, "ts": 0, "dur": 999, "name": "host work"},  # host: ignored
    ]
    return _write(tmp_path / "perfetto_trace.json.gz", events)


def test_summary_of_a_known_device_trace(tmp_path):
    s = T.summarize_trace(_device_trace(tmp_path))
    assert list(s["devices"]) == ["/device:GPU:0"]
    d = s["devices"]["/device:GPU:0"]
    assert d["span_ms"] == pytest.approx(0.4)
    assert d["busy_ms"] == pytest.approx(0.32)                 # [0, 220) and [300, 400)
    assert d["compute_ms"] == pytest.approx(0.25)
    assert d["exposed_collective_ms"] == pytest.approx(0.07)   # NCCL alone in [150, 220)
    assert d["categories"] == pytest.approx({"matmul": 0.1, "attention": 0.05, "other": 0.1,
                                             "collective": 0.1})
    # The innermost named scope wins: ttt_scan inside mlp.
    assert d["scopes"] == pytest.approx({"ttt_scan": 0.1, "attention": 0.05, "loss": 0.1,
                                         "optimizer": 0.1})
    assert d["scope_categories"]["ttt_scan"] == pytest.approx({"matmul": 0.1})
    assert d["scope_categories"]["optimizer"] == pytest.approx({"collective": 0.1})
    ops = {o["hlo_op"]: o for o in d["top_ops"]}
    assert set(ops) == {"dot.7", "add_fusion.3"}           # events without an hlo_op are not ops
    assert (ops["dot.7"]["count"], ops["dot.7"]["ms"], ops["dot.7"]["kind"], ops["dot.7"]["scope"]) == (
        2, pytest.approx(0.1), "matmul", "ttt_scan")
    assert ops["add_fusion.3"]["tf_op"].endswith("jvp(loss))/add")
    assert [o["hlo_op"] for o in d["top_ops_by_scope"]["ttt_scan"]] == ["dot.7"]
    assert [o["hlo_op"] for o in d["top_ops_by_scope"]["loss"]] == ["add_fusion.3"]
    # The all-reduce ran 100 us, 30 of them beside the cuDNN kernel: 70 exposed.
    (coll,) = d["top_exposed"]
    assert coll["op"].startswith("ncclDevKernel_AllReduce") and coll["count"] == 1
    assert (coll["ms"], coll["exposed_ms"]) == (pytest.approx(0.1), pytest.approx(0.07))
    # Nothing ran in [220, 300): one idle gap of 80 us, after the all-reduce, before the fusion.
    (gap,) = d["idle_gaps"]
    assert (gap["ms"], gap["at_ms"]) == (pytest.approx(0.08), pytest.approx(0.22))
    assert gap["after"].startswith("ncclDevKernel") and gap["before"] == "add_fusion.3"
    top = [(e["name"], e["count"], e["ms"]) for e in d["top"]]
    assert len(top) == 4 and top[-1] == ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop", 1, 0.05)
    assert "XLA Modules" not in d["threads"]
    text = T.format_summary(s)
    assert "collectives alone 0.1" in text and "ttt_scan 0.1" in text


def test_directory_lookup_and_missing_trace(tmp_path):
    _device_trace(tmp_path)
    assert T.summarize_trace(tmp_path)["devices"]
    with pytest.raises(FileNotFoundError, match="create_perfetto_trace"):
        T.find_trace(tmp_path / "nothing_here")


def test_a_real_cpu_profile(tmp_path):
    """jax.profiler's own output parses; on CPU the host process is summarised (never empty)."""
    f = jax.jit(lambda x: jnp.tanh(x @ x).sum())
    x = jnp.ones((128, 128))
    f(x).block_until_ready()
    with jax.profiler.trace(str(tmp_path), create_perfetto_trace=True):
        f(x).block_until_ready()
    s = T.summarize_trace(tmp_path)
    assert s["trace"].endswith("perfetto_trace.json.gz")
    (dev,) = s["devices"].values()
    assert dev["busy_ms"] > 0 and dev["span_ms"] >= dev["busy_ms"] - 1e-6
    assert dev["top"]


@pytest.mark.slow
def test_bench_model_profile_end_to_end(tmp_path, capsys, monkeypatch):
    """``ttt-jax bench model --profile``: the variant's subprocess traces a step, the JSON row
    carries the summary and the table is preceded by its digest."""
    from ttt_jax.cli import main

    # The variant's subprocess sees one CPU device (the test session emulates 8).
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=1")

    out = tmp_path / "model.json"
    assert main(["bench", "model", "--preset", "tiny", "--seq-len", "128", "--iters", "1", "--warmup", "1",
                 "--variants", "ttt", "--mesh", "data=1", "--set", "model.ttt.chunk_size=64",
                 "--profile", str(tmp_path / "prof"), "--out", str(out)]) in (0, None)
    (row,) = json.loads(out.read_text())
    assert row["step_s"] > 0 and row["step_pipelined_s"] > 0 and row["profile"]["traced_step_s"] > 0
    (dev,) = row["profile"]["devices"].values()
    assert dev["busy_ms"] > 0 and dev["top"]
    assert list((tmp_path / "prof").rglob("perfetto_trace.json.gz"))
    assert list((tmp_path / "prof").rglob("step.hlo.txt"))
    printed = capsys.readouterr().out
    assert "busy" in printed and "by kind" in printed and "'profile'" not in printed


def test_op_names_from_compiled_text_give_scopes(tmp_path):
    """The compiled module's metadata names each instruction's scope; a trace event is matched by
    its ``hlo_op`` argument or, failing that, by its kernel name (``fusion_3`` -> ``fusion.3``)."""
    def f(x, w):
        with jax.named_scope("ttt_scan"):
            y = jnp.tanh(x @ w)
        with jax.named_scope("loss"):
            return (y * 2).sum()

    text = jax.jit(jax.grad(f)).lower(jnp.ones((64, 64)), jnp.ones((64, 64))).compile().as_text()
    names = T.op_names_from_hlo(text)
    assert any("ttt_scan" in v for v in names.values()) and any("loss" in v for v in names.values())
    assert all(not k.startswith("%") for k in names)
    hlo = ('ENTRY %main {\n'
           '  %fusion.3 = f32[8]{0} fusion(%p), kind=kLoop, calls=%c, metadata={op_name="jit(step)/jvp(mlp)/ttt_cp_exchange/add" source_line=3}\n'
           '  ROOT %dot.7 = f32[8]{0} dot(%a, %b), metadata={op_name="jit(step)/attention_halo/dot_general"}\n'
           '}\n')
    meta = [{"ph": "M", "pid": 1, "name": "process_name", "args": {"name": "/device:GPU:0"}},
            {"ph": "M", "pid": 1, "tid": 10, "name": "thread_name", "args": {"name": "Stream #10(Compute)"}}]
    ev = lambda ts, name, hlo_op: {"ph": "X", "pid": 1, "tid": 10, "ts": ts, "dur": 10, "name": name,
                                   "args": {"tf_op": "XlaModule:", "hlo_op": hlo_op}}
    path = _write(tmp_path / "perfetto_trace.json.gz", meta + [
        ev(0, "fusion_3", "command_buffer_9"),     # inside a command buffer: matched by kernel name
        ev(20, "sm90_gemm", "dot.7"),              # matched by hlo_op
        ev(40, "loop_mul_fusion", "mul.1")])       # not in the module text: unscoped
    d = T.summarize_trace(path, hlo_text=hlo)["devices"]["/device:GPU:0"]
    assert d["scopes"] == pytest.approx({"ttt_cp_exchange": 0.01, "attention_halo": 0.01, "unscoped": 0.01})
    assert {o["hlo_op"]: o["tf_op"] for o in d["top_ops"]}["dot.7"] == "jit(step)/attention_halo/dot_general"
    # Without the module text the same trace has no scopes.
    assert T.summarize_trace(path)["devices"]["/device:GPU:0"]["scopes"] == pytest.approx({"unscoped": 0.03})
