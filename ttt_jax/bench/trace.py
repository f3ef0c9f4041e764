"""Where a profiled step spends device time: a summary of a ``jax.profiler`` Perfetto trace.

``jax.profiler.trace(dir, create_perfetto_trace=True)`` writes
``dir/plugins/profile/<run>/perfetto_trace.json.gz``: Chrome trace events, one process per device
(``/device:GPU:0`` ...) and one for the host. :func:`summarize_trace` reduces it to what a scaling
question needs, per device:

* ``busy_ms``: the union of the device's event intervals (time anything ran on it);
* ``compute_ms``: the union of its non-collective kernels' intervals, and
  ``exposed_collective_ms = busy_ms - compute_ms``: time in which only collectives ran (the part
  of the communication that no computation hid);
* ``span_ms``: first event start to last event end (the step as the device saw it), so
  ``span_ms - busy_ms`` is time the device sat idle (waiting on the host or on a peer);
* ``categories``: summed event time by kind (``collective``, ``attention``, ``matmul``, ``other``);
* ``scopes``: summed event time by model region, read from the op's name stack (``tf_op`` /
  ``long_name`` arguments) for the named scopes the model sets (``attention``, ``mlp``,
  ``ttt_target``, ``ttt_scan``, ``loss``, ``optimizer``) -- the innermost one wins;
* ``scope_categories``: the same time split by scope *and* kind (which region's matmuls, ...);
* ``top``: the events of largest summed time, with their counts;
* ``top_ops``: the HLO ops (``hlo_op`` argument) of largest summed time, each with its kind, scope
  and one ``tf_op`` name stack -- present when the trace names ops (on GPU, with command buffers
  off: ``XLA_FLAGS=--xla_gpu_enable_command_buffer=``);
* ``top_ops_by_scope``: the same, the largest few of each scope;
* ``top_exposed``: the collectives whose time overlapped no computation on their device, ranked by
  that exposed time (what communication actually cost the step), with their op names;
* ``idle_gaps``: the longest stretches inside the span in which nothing ran on the device, with
  the events just before and after (a device waiting for a peer or for the host).

Events on several streams of one device can overlap, so category sums may exceed ``busy_ms``.
"""

from __future__ import annotations

import gzip
import json
import re
from collections import defaultdict
from pathlib import Path
from typing import Optional, Union

# Innermost first: an op inside the TTT scan of an MLP is counted as ``ttt_scan``.
SCOPES = ("ttt_cp_exchange", "ttt_cp_correction", "attention_halo", "ttt_scan", "ttt_target",
          "attention", "mlp", "loss", "optimizer")

_CATEGORIES = (
    ("collective", re.compile(r"nccl|all-?reduce|all-?gather|reduce-?scatter|collective-?permute|"
                              r"all-?to-?all|send|recv|ppermute", re.I)),
    ("attention", re.compile(r"cudnn|fmha|sdpa|flash|attention", re.I)),
    ("matmul", re.compile(r"gemm|cublas|cutlass|nvjet|xmma|dot|matmul|wgmma", re.I)),
)


def find_trace(log_dir: Union[str, Path]) -> Path:
    """The newest ``perfetto_trace.json.gz`` under ``log_dir`` (as ``jax.profiler.trace`` writes it)."""
    found = sorted(Path(log_dir).rglob("perfetto_trace.json*"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise FileNotFoundError(f"no perfetto_trace.json(.gz) under {log_dir}; profile with "
                                "jax.profiler.trace(dir, create_perfetto_trace=True)")
    return found[-1]


def load_events(path: Union[str, Path]) -> list:
    """The ``traceEvents`` list of a (gzipped) Chrome/Perfetto JSON trace."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        data = json.load(f)
    return data["traceEvents"] if isinstance(data, dict) else data


def category(name: str) -> str:
    """``collective`` / ``attention`` / ``matmul`` / ``other`` for a kernel or HLO op name."""
    for cat, pattern in _CATEGORIES:
        if pattern.search(name):
            return cat
    return "other"


_HLO_INSTR = re.compile(r'^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=.*?metadata=\{[^}]*?op_name="([^"]*)"', re.M)


def op_names_from_hlo(hlo_text: str) -> dict:
    """``{instruction name: op_name}`` from a compiled module's text (``compiled.as_text()``).

    The op name is the JAX name stack of the operation an instruction came from, so it carries
    the model's named scopes even where the trace's own arguments do not (GPU command buffers).
    """
    return {m.group(1): m.group(2) for m in _HLO_INSTR.finditer(hlo_text)}


def _op_name(event: dict, op_names: dict) -> str:
    """The event's op name stack: from ``op_names`` by its ``hlo_op`` argument, else by its kernel
    name (XLA names a fusion's kernel ``loop_add_fusion_3`` for instruction ``loop_add_fusion.3``)."""
    if not op_names:
        return ""
    args = event.get("args") or {}
    name = event.get("name", "")
    for key in (str(args.get("hlo_op", "")), name, re.sub(r"_(\d+)$", r".\1", name)):
        if key in op_names:
            return op_names[key]
    return ""


def scope(event: dict, op_name: str = "") -> str:
    """The innermost model scope named in the event's op-name arguments or in ``op_name``
    (``"unscoped"`` if none)."""
    args = event.get("args") or {}
    text = " ".join(str(args.get(k, "")) for k in ("tf_op", "long_name", "hlo_op", "name_stack"))
    text += " " + event.get("name", "") + " " + op_name
    for s in SCOPES:
        if re.search(rf"(^|[/\s(]){s}([/\s)]|$)", text):
            return s
    return "unscoped"


def _union_ms(intervals: list) -> float:
    total, end = 0.0, float("-inf")
    for start, stop in sorted(intervals):
        if stop <= end:
            continue
        total += stop - max(start, end)
        end = stop
    return total / 1e3


def _is_device(process_name: str) -> bool:
    return bool(re.search(r"/device:(GPU|TPU)|GPU:\d|TPU:\d", process_name))


def summarize_trace(path: Union[str, Path], *, top: int = 25,
                    thread_filter: Optional[str] = None, hlo_text: Optional[str] = None) -> dict:
    """Per-device time summary of a trace (see the module docstring).

    Args:
      path: a ``perfetto_trace.json(.gz)`` or a directory holding one.
      top: how many of the largest events (by summed time) to list per device.
      thread_filter: a regex over thread (stream / line) names; only matching threads count.
        Default: every thread of the device except the ``XLA Modules`` / ``Steps`` lines, which
        span whole executions rather than individual ops.
      hlo_text: the traced executable's compiled module text; when given, each event's scope and
        ``tf_op`` come from its instruction's ``op_name`` metadata (:func:`op_names_from_hlo`).

    Returns:
      ``{"trace": str, "devices": {name: {...}}}``; with no device processes in the trace (a CPU
      run) the host process is summarised instead under its own name, so the summary is never
      silently empty.
    """
    path = Path(path)
    if path.is_dir():
        path = find_trace(path)
    events = load_events(path)
    op_names = op_names_from_hlo(hlo_text) if hlo_text else {}
    procs, threads = {}, {}
    for e in events:
        if e.get("ph") == "M" and e.get("name") == "process_name":
            procs[e["pid"]] = e["args"]["name"]
        elif e.get("ph") == "M" and e.get("name") == "thread_name":
            threads[(e["pid"], e.get("tid"))] = e["args"]["name"]
    device_pids = {pid for pid, name in procs.items() if _is_device(name)}
    if not device_pids:
        device_pids = set(procs)
    skip = re.compile(r"XLA Modules|Steps|TraceMe|python", re.I)
    keep = re.compile(thread_filter) if thread_filter else None
    acc: dict = defaultdict(lambda: {"intervals": [], "categories": defaultdict(float),
                                     "scopes": defaultdict(float), "threads": defaultdict(float),
                                     "scope_categories": defaultdict(lambda: defaultdict(float)),
                                     "ops": {}, "events": defaultdict(lambda: [0, 0.0]), "sample_args": [],
                                     "compute": [], "collectives": [], "labelled": []})
    for e in events:
        if e.get("ph") != "X" or e.get("pid") not in device_pids or "dur" not in e:
            continue
        tname = threads.get((e["pid"], e.get("tid")), str(e.get("tid")))
        if (keep and not keep.search(tname)) or (not keep and skip.search(tname)):
            continue
        d = acc[procs.get(e["pid"], str(e["pid"]))]
        ts, dur = float(e["ts"]), float(e["dur"])
        name = e.get("name", "?")
        d["intervals"].append((ts, ts + dur))
        cat = category(name + " " + str((e.get("args") or {}).get("hlo_op", "")))
        op_name = _op_name(e, op_names)
        hlo = str((e.get("args") or {}).get("hlo_op", ""))
        label = hlo or name
        if cat != "collective":
            d["compute"].append((ts, ts + dur))
        else:
            d["collectives"].append((ts, ts + dur, label, op_name))
        d["labelled"].append((ts, ts + dur, label))
        d["categories"][cat] += dur / 1e3
        sc = scope(e, op_name)
        d["scopes"][sc] += dur / 1e3
        d["scope_categories"][sc][cat] += dur / 1e3
        if hlo:
            op = d["ops"].setdefault(hlo, {"count": 0, "ms": 0.0, "kind": cat, "scope": sc,
                                           "tf_op": (op_name or str(e["args"].get("tf_op", "")))[:200]})
            op["count"] += 1
            op["ms"] += dur / 1e3
        d["threads"][tname] += dur / 1e3
        if e.get("args") and len(d["sample_args"]) < 3:  # what this trace's events carry
            d["sample_args"].append({k: str(v)[:200] for k, v in e["args"].items()} | {"name": name[:80]})
        ev = d["events"][name]
        ev[0] += 1
        ev[1] += dur / 1e3
    out = {}
    for dev, d in sorted(acc.items()):
        iv = d["intervals"]
        ranked = sorted(d["events"].items(), key=lambda kv: -kv[1][1])[:top]
        busy, compute = _union_ms(iv), _union_ms(d["compute"])
        out[dev] = {
            "busy_ms": round(busy, 3),
            "compute_ms": round(compute, 3),
            "exposed_collective_ms": round(busy - compute, 3),
            "span_ms": round((max(b for _, b in iv) - min(a for a, _ in iv)) / 1e3, 3),
            "categories": {k: round(v, 3) for k, v in sorted(d["categories"].items(), key=lambda kv: -kv[1])},
            "scopes": {k: round(v, 3) for k, v in sorted(d["scopes"].items(), key=lambda kv: -kv[1])},
            "scope_categories": {s: {k: round(v, 3) for k, v in sorted(c.items(), key=lambda kv: -kv[1])}
                                 for s, c in d["scope_categories"].items()},
            "threads": {k: round(v, 3) for k, v in sorted(d["threads"].items(), key=lambda kv: -kv[1])},
            "top": [{"name": n[:160], "count": c, "ms": round(ms, 3)} for n, (c, ms) in ranked],
            "top_ops": [{"hlo_op": n[:120], **{k: (round(v, 3) if k == "ms" else v) for k, v in o.items()}}
                        for n, o in sorted(d["ops"].items(), key=lambda kv: -kv[1]["ms"])[:top]],
            "top_ops_by_scope": _top_by_scope(d["ops"], per_scope=8),
            "top_exposed": _exposed(d["collectives"], d["compute"], top),
            "idle_gaps": _idle_gaps(d["labelled"], top),
            "sample_args": d["sample_args"],
        }
    return {"trace": str(path), "devices": out}


def _top_by_scope(ops: dict, per_scope: int) -> dict:
    """``{scope: [op, ...]}``: each scope's HLO ops of largest summed time (kind, count, ms, name)."""
    by: dict = defaultdict(list)
    for name, o in ops.items():
        by[o["scope"]].append((o["ms"], name, o))
    return {sc: [{"hlo_op": n[:120], "kind": o["kind"], "count": o["count"], "ms": round(ms, 3),
                  "tf_op": o["tf_op"]} for ms, n, o in sorted(rows, key=lambda r: -r[0])[:per_scope]]
            for sc, rows in by.items()}


def _merged(intervals: list) -> list:
    """Sorted, disjoint union of ``(start, end)`` intervals."""
    out: list = []
    for a, b in sorted(intervals):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return out


def _exposed(collectives: list, compute: list, top: int) -> list:
    """Per collective op: summed time and the part of it that overlapped no compute interval."""
    import bisect

    merged = _merged(compute)
    starts = [a for a, _ in merged]
    acc: dict = {}
    for a, b, label, op_name in collectives:
        covered = 0.0
        i = max(bisect.bisect_right(starts, a) - 1, 0)
        while i < len(merged) and merged[i][0] < b:
            covered += max(0.0, min(b, merged[i][1]) - max(a, merged[i][0]))
            i += 1
        r = acc.setdefault(label, {"count": 0, "ms": 0.0, "exposed_ms": 0.0, "op_name": op_name[:200]})
        r["count"] += 1
        r["ms"] += (b - a) / 1e3
        r["exposed_ms"] += (b - a - covered) / 1e3
    ranked = sorted(acc.items(), key=lambda kv: -kv[1]["exposed_ms"])[:top]
    return [{"op": k[:120], "count": r["count"], "ms": round(r["ms"], 3),
             "exposed_ms": round(r["exposed_ms"], 3), "op_name": r["op_name"]} for k, r in ranked]


def _idle_gaps(labelled: list, top: int) -> list:
    """The longest stretches with no event on the device: ``at_ms`` from the first event's start."""
    if not labelled:
        return []
    events = sorted(labelled)
    t0 = events[0][0]
    gaps, end, last = [], events[0][1], events[0][2]
    for a, b, label in events[1:]:
        if a > end:
            gaps.append(((a - end) / 1e3, (end - t0) / 1e3, last, label))
        if b >= end:
            end, last = b, label
    gaps.sort(reverse=True)
    return [{"ms": round(g, 3), "at_ms": round(at, 3), "after": before[:120], "before": after[:120]}
            for g, at, before, after in gaps[:top]]


def format_summary(summary: dict, *, device: Optional[str] = None) -> str:
    """A few readable lines for one device (default: the first) of :func:`summarize_trace`."""
    devices = summary["devices"]
    if not devices:
        return "trace: no device events"
    name = device or next(iter(devices))
    d = devices[name]
    lines = [f"{name}: busy {d['busy_ms']:.1f} ms of a {d['span_ms']:.1f} ms span "
             f"(compute {d['compute_ms']:.1f}, collectives alone {d['exposed_collective_ms']:.1f})",
             "  by kind:  " + ", ".join(f"{k} {v:.1f}" for k, v in d["categories"].items()),
             "  by scope: " + ", ".join(f"{k} {v:.1f}" for k, v in d["scopes"].items())]
    return "\n".join(lines)
