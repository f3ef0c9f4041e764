"""Context-parallel weak and strong scaling in one call: baseline and context-parallel rows of
``ttt_jax.bench.model``, run alternately, with the ratios computed in the same call.

Weak scaling: ``L`` tokens on one device against ``n x L`` tokens on ``n`` devices
(``mesh.context=n``); the ratio is the n-device step time over the one-device step time (goal:
close to 1). Strong scaling: ``L`` tokens on one device against the same ``L`` on ``n`` devices;
the ratio is the speed-up (one-device time over n-device time).

Each variant (``--variant NAME=KEY=VALUE,KEY=VALUE``; the first is the plain run) is run
``--repeat`` times, interleaved with the baseline (base, v1, v2, ..., base, v1, v2, ...), so that a
drift of the machine between runs shows up in the baseline rows instead of in one variant's
ratio. Each row is its own process (``ttt_jax.bench.model`` runs every variant in a child).

Example (the weak-scaling rows of benchmarks/README.md, 4 x H100)::

    PYTHONPATH=. python benchmarks/cp_scaling.py --mode weak --devices 4 --length 32768 \\
        --variant full=runtime.remat_policy=full \\
        --repeat 2 --out benchmarks/results/cp_weak.json

A variant's entry ``env:NAME=VALUE`` sets an environment variable for its rows instead of a config
override, e.g. ``--variant olap=runtime.remat_policy=full,env:XLA_FLAGS=--xla_gpu_foo=2``.
``--compile-cache DIR`` shares JAX's persistent compilation cache between the rows, so a repeat
of a row (same program, same flags) skips most of its compile time.

``--dry-run`` prints the commands instead of running them.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Optional, Sequence

DEFAULT_SET = ["model.param_dtype=bfloat16", "runtime.remat=true"]


def parse_variant(spec: str) -> tuple[str, list[str], dict[str, str]]:
    """``"NAME=KEY=VALUE,env:VAR=VALUE,..."`` -> ``(NAME, ["KEY=VALUE", ...], {"VAR": "VALUE"})``;
    ``"NAME="`` has no overrides."""
    name, sep, rest = spec.partition("=")
    if not sep or not name:
        raise ValueError(f"--variant {spec!r}: expected NAME=KEY=VALUE[,KEY=VALUE...] (or NAME=)")
    overrides, env = [], {}
    for o in (o for o in rest.split(",") if o):
        key, eq, value = o.removeprefix("env:").partition("=")
        if not eq or not key:
            raise ValueError(f"--variant {spec!r}: entry {o!r} is not KEY=VALUE or env:NAME=VALUE")
        if o.startswith("env:"):
            env[key] = value
        else:
            overrides.append(o)
    return name, overrides, env


def row_command(args, devices: int, length: int, overrides: Sequence[str], out: Path) -> list[str]:
    """The ``ttt_jax.bench.model`` command of one row."""
    mesh = f"context={devices}" if devices > 1 else "data=1"
    sets = DEFAULT_SET + list(args.set) + list(overrides)
    if args.mode == "strong" and devices > 1:
        sets.append("runtime.context.layout=zigzag")
    model_variant = "swa_ttt" if args.mode == "weak" else "ttt"
    return [sys.executable, "-m", "ttt_jax.bench.model", "--preset", args.preset, "--warmup", "1",
            "--iters", str(args.iters), "--variants", model_variant, "--window", str(args.window),
            "--seq-len", str(length), "--mesh", mesh, "--out", str(out), "--set", *sets]


def ratios(rows: Sequence[dict], mode: str) -> dict[str, dict]:
    """Per variant: each repeat's ratio against the baseline row run just before it, their mean,
    and the spread. Rows: ``{"name", "repeat", "time_s"}``, the baseline named ``"1 device"``."""
    base = {r["repeat"]: r["time_s"] for r in rows if r["name"] == "1 device"}
    out: dict[str, dict] = {}
    for r in rows:
        if r["name"] == "1 device" or r["repeat"] not in base:
            continue
        b = base[r["repeat"]]
        ratio = r["time_s"] / b if mode == "weak" else b / r["time_s"]
        out.setdefault(r["name"], {"ratios": []})["ratios"].append(ratio)
    for v in out.values():
        v["mean"] = statistics.fmean(v["ratios"])
        v["min"], v["max"] = min(v["ratios"]), max(v["ratios"])
    return out


def main(argv: Optional[Sequence[str]] = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mode", choices=("weak", "strong"), default="weak")
    p.add_argument("--devices", type=int, default=4, help="context-parallel devices")
    p.add_argument("--length", type=int, default=32768,
                   help="tokens per device (weak) or in total (strong)")
    p.add_argument("--preset", default="m1b")
    p.add_argument("--window", type=int, default=4096, help="sliding window (weak mode's swa_ttt)")
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--set", nargs="*", default=[], help="overrides for every row")
    p.add_argument("--variant", action="append", default=[],
                   help="NAME=KEY=VALUE,... (repeatable); default: one plain variant")
    p.add_argument("--timing", choices=("step_pipelined_s", "step_s"), default="step_pipelined_s")
    p.add_argument("--out", type=Path)
    p.add_argument("--compile-cache", type=Path,
                   help="JAX persistent compilation cache shared by the rows (repeats compile faster)")
    p.add_argument("--dry-run", action="store_true")
    args = p.parse_args(argv)
    variants = [parse_variant(v) for v in args.variant] or [("plain", [], {})]
    total = args.length * args.devices if args.mode == "weak" else args.length
    rows, tmp = [], Path(tempfile.mkdtemp(prefix="cp_scaling_"))
    base_env = dict(os.environ)
    if args.compile_cache:
        base_env["JAX_COMPILATION_CACHE_DIR"] = str(args.compile_cache)
    one_device = dict(base_env, CUDA_VISIBLE_DEVICES=os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0])
    for rep in range(args.repeat):
        plan = [("1 device", 1, args.length, [], one_device, {})]
        plan += [(name, args.devices, total, ov, dict(base_env, **extra), extra)
                 for name, ov, extra in variants]
        for name, devices, length, overrides, env, extra in plan:
            out = tmp / f"{len(rows)}.json"
            cmd = row_command(args, devices, length, overrides, out)
            print(("$ " if args.dry_run else f"[{name}, repeat {rep}] ")
                  + (f"CUDA_VISIBLE_DEVICES={env['CUDA_VISIBLE_DEVICES']} " if devices == 1 else "")
                  + "".join(f"{k}={shlex.quote(v)} " for k, v in extra.items())
                  + shlex.join(cmd), flush=True)
            if args.dry_run:
                continue
            done = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL)
            result = json.loads(out.read_text())[0] if out.exists() else {"error": f"exit {done.returncode}"}
            if "error" in result:
                print(f"  failed: {result['error']}", flush=True)
                continue
            row = {"name": name, "repeat": rep, "devices": devices, "seq_len": length,
                   "overrides": list(overrides), "env": extra, "time_s": result[args.timing],
                   "peak_gib": result["peak_gib"], "result": result}
            rows.append(row)
            print(f"  {args.timing} {row['time_s']:.4f}, peak {row['peak_gib']:.2f} GiB", flush=True)
            if args.out:   # partial results survive a time limit
                args.out.parent.mkdir(parents=True, exist_ok=True)
                args.out.write_text(json.dumps({"mode": args.mode, "rows": rows}, indent=1))
    summary = ratios(rows, args.mode)
    what = "n-device / 1-device time" if args.mode == "weak" else "speed-up"
    for name, v in summary.items():
        print(f"{name}: {what} mean {v['mean']:.3f} (min {v['min']:.3f}, max {v['max']:.3f}, "
              f"{len(v['ratios'])} repeats)")
    if args.out and rows:
        args.out.write_text(json.dumps({"mode": args.mode, "rows": rows, "ratios": summary}, indent=1))
    return summary


if __name__ == "__main__":
    main()
