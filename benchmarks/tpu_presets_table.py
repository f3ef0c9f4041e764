"""The pod-preset table of docs/tpu.md from the `ttt-jax compile --json` reports.

    python benchmarks/tpu_presets_table.py benchmarks/results/tpu_*.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

GIB = 2 ** 30


def row(path: Path) -> str:
    r = json.loads(path.read_text())
    mesh = " x ".join(f"{a}={n}" for a, n in r["mesh"].items() if n > 1) or "1 device"
    peak = f"{r['peak_bytes'] / GIB:.1f} / {r['hbm_bytes'] / GIB:.0f} GiB ({100 * r['peak_bytes'] / r['hbm_bytes']:.0f}%)"
    if "est_step_s" in r:
        if "est_step_serial_s" in r:   # bounds: all overlapped .. none overlapped
            est = (f"{r['est_step_s']:.2f}-{r['est_step_serial_s']:.2f} s, "
                   f"{100 * r['est_mfu_serial']:.0f}-{100 * r['est_mfu']:.0f}%")
        else:
            est = f"{r['est_step_s']:.2f} s, {100 * r['est_mfu']:.0f}% (compute floor only)"
        tokens = f"{r['global_batch']} x {r['seq_len'] // 1024}k"
        fb = "XLA (no Pallas TPU CP kernel)" if r["attention_fallback"] else f"Mosaic ({r['mosaic_calls']} calls)"
    else:   # refused by the compiler: only its memory figure
        est, tokens, fb = "-", "-", "-"
    return (f"| {r['command'].split()[2]} | {r['topology']} | {mesh} | {tokens} | {peak} | "
            f"{'yes' if r['fits'] else 'no'} | {est} | {fb} | {r['compile_s'] / 60:.1f} min | "
            f"`{r['command']}` |")


def main(paths: list[str]) -> None:
    print("| preset | slice | mesh | batch x seq | peak per chip / HBM | fits | est. step, MFU | "
          "attention | compile | command |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for p in paths:
        print(row(Path(p)))


if __name__ == "__main__":
    main(sys.argv[1:])
