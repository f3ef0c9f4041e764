"""PNG plots of benchmark results (matplotlib, Agg backend), from the JSON the scripts write.

* :func:`plot_op` -- op benchmark (``ttt-jax bench op`` / ``benchmarks/op_bench.py``): time ratio to
  the plain down-projection and XLA temporary memory vs sequence length, one line per impl (and
  chunk size when several were run).
* :func:`plot_model_sweep` -- model benchmark over several sequence lengths: tokens/s and peak
  memory vs context, one line per variant.
* :func:`plot_decode` -- ``benchmarks/decode_bench.py``: decode time per token (each batch size) and
  prefill throughput vs context, one line per variant.

Each function takes the decoded JSON and a path, and returns the path. ``python -m
ttt_jax.bench.plots KIND RESULT.json [OUT.png]`` re-plots a saved result.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

from ttt_jax.eval.plots import agg_pyplot


def _length_axis(ax, lengths: Sequence[int]) -> None:
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted(set(lengths)))
    ax.set_xticklabels([f"{n // 1024}k" if n >= 1024 else str(n) for n in sorted(set(lengths))])
    ax.grid(True, alpha=0.3)


def _save(plt, fig, path: str | Path, title: str) -> Path:
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def plot_op(result: Mapping[str, Any], path: str | Path) -> Path:
    """``result``: ``{"device", "rows": [{"T", "chunk", "impl", "ratio", "temp_gib", ...}]}``."""
    plt = agg_pyplot()
    rows = [r for r in result["rows"] if "ms" in r]
    chunks = sorted({r["chunk"] for r in rows})
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for impl in dict.fromkeys(r["impl"] for r in rows):
        for c in chunks:
            sel = sorted((r for r in rows if r["impl"] == impl and r["chunk"] == c), key=lambda r: r["T"])
            if not sel:
                continue
            label = impl if len(chunks) == 1 else f"{impl}, chunk {c}"
            ts = [r["T"] for r in sel]
            a1.plot(ts, [r["ratio"] for r in sel], marker="o", label=label)
            a2.plot(ts, [r["temp_gib"] for r in sel], marker="o", label=label)
    lengths = [r["T"] for r in rows]
    for ax in (a1, a2):
        _length_axis(ax, lengths)
        ax.set_xlabel("sequence length")
    a1.set_ylabel("time / plain z @ w0 (forward + backward)")
    a2.set_ylabel("XLA temporary memory (GiB)")
    a2.set_yscale("log")
    a1.legend(fontsize=8)
    return _save(plt, fig, path, f"In-Place TTT op vs the plain down-projection ({result.get('device', '')})")


def plot_model_sweep(rows: Sequence[Mapping[str, Any]], path: str | Path) -> Path:
    """``rows``: records of ``ttt_jax.bench.model`` (``variant``, ``seq_len``, ``tokens_per_s``,
    ``peak_gib``); rows with an ``error`` are left out."""
    plt = agg_pyplot()
    ok = [r for r in rows if "error" not in r]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for v in dict.fromkeys(r["variant"] for r in ok):
        sel = sorted((r for r in ok if r["variant"] == v), key=lambda r: r["seq_len"])
        ts = [r["seq_len"] for r in sel]
        a1.plot(ts, [r["tokens_per_s"] for r in sel], marker="o", label=v)
        a2.plot(ts, [r["peak_gib"] for r in sel], marker="o", label=v)
    for ax in (a1, a2):
        _length_axis(ax, [r["seq_len"] for r in ok] or [1])
        ax.set_xlabel("sequence length")
    a1.set_ylabel("train tokens/s")
    a2.set_ylabel("peak device memory (GiB)")
    a1.legend(fontsize=8)
    device = ok[0].get("device", "") if ok else ""
    return _save(plt, fig, path, f"Train step vs context length ({device})")


def plot_decode(result: Mapping[str, Any], path: str | Path) -> Path:
    """``result``: the JSON of ``benchmarks/decode_bench.py`` (one or several variants)."""
    plt = agg_pyplot()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.2))
    lengths = []
    for name, entry in result["variants"].items():
        ctxs = sorted(entry["contexts"], key=int)
        lengths += [int(c) for c in ctxs]
        batches = sorted({b for c in ctxs for b in entry["contexts"][c]["decode"]}, key=int)
        for b in batches:
            pts = []
            for c in ctxs:
                d = entry["contexts"][c]["decode"].get(b, {})
                ms = d.get("ms_per_step_amortized", d.get("ms_per_step"))
                if ms is not None:
                    pts.append((int(c), ms))
            if pts:
                a1.plot(*zip(*pts), marker="o", label=f"{name}, batch {b}")
        for key, what in (("engine_tokens_per_s", "blockwise"), ("forward_tokens_per_s", "one pass")):
            pts = [(int(c), entry["contexts"][c]["prefill"][key]) for c in ctxs
                   if key in entry["contexts"][c]["prefill"]]
            if pts:
                a2.plot(*zip(*pts), marker="o", label=f"{name}, {what}")
    for ax in (a1, a2):
        _length_axis(ax, lengths or [1])
        ax.set_xlabel("context length")
    a1.set_ylabel("decode ms per step (one token per sequence)")
    a2.set_ylabel("prefill tokens/s")
    a2.set_yscale("log")
    a1.legend(fontsize=8)
    a2.legend(fontsize=8)
    return _save(plt, fig, path, f"Decode and prefill vs context ({result.get('device', '')})")


def merge_decode_results(results: Sequence[Mapping[str, Any]]) -> dict:
    """Several decode-bench JSONs (e.g. one per variant) as one, for one plot."""
    out = {"device": results[0].get("device", ""), "variants": {}}
    for r in results:
        out["variants"].update(r["variants"])
    return out


_KINDS = {"op": plot_op, "model": plot_model_sweep, "decode": plot_decode}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) < 2 or argv[0] not in _KINDS:
        print("usage: python -m ttt_jax.bench.plots {op|model|decode} RESULT.json [RESULT2.json ...] "
              "[--out OUT.png]", file=sys.stderr)
        return 2
    kind, rest = argv[0], argv[1:]
    out = None
    if "--out" in rest:
        i = rest.index("--out")
        out, rest = rest[i + 1], rest[:i] + rest[i + 2:]
    data = [json.loads(Path(p).read_text()) for p in rest]
    if kind == "decode":
        payload = merge_decode_results(data)
    elif kind == "model":
        payload = [row for d in data for row in d]
    else:
        payload = data[0]
    out = out or str(Path(rest[0]).with_suffix(".png"))
    print(_KINDS[kind](payload, out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
