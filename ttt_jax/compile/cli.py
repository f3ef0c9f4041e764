"""``ttt-jax compile CONFIG --topology NAME [key=value ...]``: will this run fit a TPU slice, and what
will its step cost? Answered on any host (a laptop, a CPU VM) by compiling the real program for the
slice with libtpu's compiler (``pip install 'ttt-jax[tpu]'``); see docs/tpu.md.

Exit status: 0 when the program fits (peak estimate <= 90% of HBM per chip), 2 when it does not (one
line names the largest live buffers and the ops that made them) or the config / topology is wrong.
``--topology`` takes TPU slices only; GPU targets are not supported by this command (compile on the
GPU host itself with ``ttt-jax bench model``).
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path

EXIT_USAGE = 2


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", metavar="CONFIG", help="YAML file or preset name (e.g. m1b_v5p32)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    p.add_argument("--topology", required=True,
                   help="TPU slice: v5p-128, v6e-256, v5e-16, v4-32, or a chip grid such as v5p:4x4x4")
    p.add_argument("--num-slices", type=int, default=1,
                   help="multi-slice: this many slices joined over DCN (mesh.data spans them)")
    p.add_argument("--what", choices=("train", "generate"), default="train",
                   help="train: the train step of `ttt-jax train`; generate: the inference engine's "
                        "prefill (one --prefill-block of prompt) and decode steps, KV cache for "
                        "data.seq_len tokens, data.batch_size sequences per host")
    p.add_argument("--prefill-block", type=int, default=1024, help="prompt tokens per prefill call")
    p.add_argument("--json", metavar="PATH", help="also write the report as JSON")
    p.add_argument("--top", type=int, default=3, help="largest live buffers named when it does not fit")
    # Internal: the second compile that names the largest buffers of a program the compiler refused
    # (libtpu's flags are fixed when it loads, hence a separate process).
    p.add_argument("--oom-diagnosis", metavar="PATH", help=argparse.SUPPRESS)


class _Progress:
    """An elapsed-time line on stderr while a compile runs (a single line that is rewritten on a
    terminal; one line at the start and one at the end otherwise)."""

    def __init__(self, what: str):
        self.what, self.stop = what, threading.Event()
        self.tty = sys.stderr.isatty()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        spin, t0, i = "|/-\\", time.perf_counter(), 0
        while not self.stop.wait(0.5):
            i += 1
            sys.stderr.write(f"\r{spin[i % 4]} compiling {self.what}: {time.perf_counter() - t0:5.0f} s")
            sys.stderr.flush()

    def __enter__(self):
        if self.tty:
            self.thread.start()
        else:
            print(f"compiling {self.what} (this can take minutes) ...", file=sys.stderr, flush=True)
        return self

    def __exit__(self, *exc):
        self.stop.set()
        if self.tty:
            self.thread.join()
            sys.stderr.write("\r" + " " * 60 + "\r")
            sys.stderr.flush()
        return False


def _diagnose_oom(args: argparse.Namespace) -> list[dict]:
    """Largest live buffers of the refused program: the same compile in a child process with
    libtpu's ``--xla_tpu_no_crash_on_oom`` (its memory figures are then not trusted, only the
    schedule is read: :func:`ttt_jax.compile.aot.largest_live`)."""
    import os
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "live.json"
        env = dict(os.environ)
        env["LIBTPU_INIT_ARGS"] = (env.get("LIBTPU_INIT_ARGS", "") + " --xla_tpu_no_crash_on_oom=true").strip()
        cmd = [sys.executable, "-m", "ttt_jax.cli", "compile", *_argv(args), "--top", str(args.top),
               "--oom-diagnosis", str(out)]
        subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
        return json.loads(out.read_text()) if out.is_file() else []


def run(args: argparse.Namespace) -> int:
    from ttt_jax.compile.chips import parse_topology
    from ttt_jax.config import load_config

    cfg = load_config(args.config, args.overrides)
    topo = parse_topology(args.topology, args.num_slices)
    from ttt_jax.compile import aot   # imports JAX

    devices = aot.topology_devices(topo)
    mesh = aot.build_mesh(cfg, devices, topo.num_slices)
    if args.what == "generate":
        return _generate(args, cfg, topo, mesh, devices, aot)
    try:
        with _Progress(f"the {args.what} step for {topo.slice_name}"):
            compiled = aot.compile_train(cfg, mesh, aot.processes_of(devices))
    except aot.DoesNotFit as e:
        if args.oom_diagnosis:
            raise
        return _refused(args, topo, mesh, e)
    if args.oom_diagnosis:
        live = aot.largest_live(compiled.compiled.as_text(), args.top)
        Path(args.oom_diagnosis).write_text(json.dumps([{"bytes": b, "shape": s, "op": o} for b, s, o in live]))
        return 0
    report = aot.analyse(cfg, compiled, topo, mesh)
    if not report.fits:
        report.largest_live = [{"bytes": b, "shape": s, "op": o}
                               for b, s, o in aot.largest_live(compiled.compiled.as_text(), args.top)]
    print(aot.format_report(report))
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        doc = {"command": "ttt-jax compile " + " ".join(_argv(args)), **report.to_json()}
        path.write_text(json.dumps(doc, indent=1) + "\n")
        print(f"report written to {path}")
    if not report.fits:
        live = _live_line(report.largest_live)
        print(f"error: does not fit: peak {report.peak_bytes / 2 ** 30:.2f} GiB > "
              f"{aot.FIT_FRACTION:.0%} of {report.hbm_bytes / 2 ** 30:.0f} GiB per chip; largest live "
              f"buffers: {live}", file=sys.stderr)
        return EXIT_USAGE
    return 0


def _generate(args, cfg, topo, mesh, devices, aot) -> int:
    with _Progress(f"the prefill and decode steps for {topo.slice_name}"):
        steps = aot.compile_generate(cfg, mesh, aot.processes_of(devices), prompt_len=cfg.data.seq_len,
                                     prefill_block=args.prefill_block)
    reports = [aot.analyse(cfg, c, topo, mesh) for c in steps]
    for r in reports:
        print(aot.format_report(r))
    if args.json:
        doc = {"command": "ttt-jax compile " + " ".join(_argv(args)), "steps": [r.to_json() for r in reports]}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(doc, indent=1) + "\n")
    bad = [r for r in reports if not r.fits]
    for r in bad:
        print(f"error: the {r.what} step does not fit: peak {r.peak_bytes / 2 ** 30:.2f} GiB > "
              f"{aot.FIT_FRACTION:.0%} of {r.hbm_bytes / 2 ** 30:.0f} GiB per chip", file=sys.stderr)
    return EXIT_USAGE if bad else 0


def _live_line(live: list[dict]) -> str:
    return "; ".join(f"{x['bytes'] / 2 ** 30:.2f} GiB {x['shape']} from {x['op']}" for x in live) or "(unknown)"


def _refused(args, topo, mesh, e) -> int:
    """The compiler's own out-of-memory refusal: one line with the largest live buffers, exit 2."""
    hbm = topo.chip.hbm_bytes
    print(f"compiling ... the TPU compiler refused the program: {e}", file=sys.stderr)
    with _Progress("again to find the largest buffers (libtpu --xla_tpu_no_crash_on_oom)"):
        live = _diagnose_oom(args)
    peak = e.temp_bytes + e.state_bytes
    if args.json:
        doc = {"command": "ttt-jax compile " + " ".join(_argv(args)), "what": args.what,
               "topology": topo.slice_name, "chips": topo.chips, "mesh": dict(mesh.shape),
               "fits": False, "temp_bytes": e.temp_bytes, "state_bytes": e.state_bytes,
               "peak_bytes": peak, "hbm_bytes": hbm, "compile_s": e.compile_s, "largest_live": live,
               "compiler_message": str(e)}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(doc, indent=1) + "\n")
    print(f"error: does not fit: temporaries {e.temp_bytes / 2 ** 30:.1f} GiB + parameters and optimizer "
          f"state {e.state_bytes / 2 ** 30:.1f} GiB per chip > {hbm / 2 ** 30:.0f} GiB HBM; largest live "
          f"buffers: {_live_line(live)}", file=sys.stderr)
    return EXIT_USAGE


def _argv(args: argparse.Namespace) -> list[str]:
    out = [args.config, *args.overrides, "--topology", args.topology]
    if args.num_slices != 1:
        out += ["--num-slices", str(args.num_slices)]
    if args.what != "train":
        out += ["--what", args.what]
    return out
