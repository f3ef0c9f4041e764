"""``ttt-jax bench op|model [options]``: the benchmark suite from the command line.

``op``: In-Place TTT against the plain down-projection, every implementation, forward + backward
(:mod:`ttt_jax.bench.op`). ``model``: train-step time, tokens/s, MFU and peak memory of a preset
with and without In-Place TTT, full or sliding-window attention, optionally on a mesh
(:mod:`ttt_jax.bench.model`). ``ttt-jax bench op --help`` lists each one's options.

Bad arguments (an unknown impl or variant, a size < 1, an override the config rejects) are one
``error:`` line and exit status 2 before anything runs; when a row fails while running (out of
memory, a compiler crash) the table records it and the command ends with one ``error:`` line and
exit status 1.
"""

from __future__ import annotations

import argparse

_TARGETS = {"op": "ttt_jax.bench.op", "model": "ttt_jax.bench.model"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("target", choices=sorted(_TARGETS), help="op: the In-Place TTT op; "
                        "model: a train step of a whole model")
    parser.add_argument("options", nargs=argparse.REMAINDER,
                        help="options of the benchmark (see `ttt-jax bench op --help`)")


def run(args: argparse.Namespace) -> int:
    import importlib
    import sys

    module = importlib.import_module(_TARGETS[args.target])
    rows = module.main(list(args.options)) or []
    failed = [r for r in rows if "error" in r]
    if failed:
        first = failed[0]
        name = first.get("impl") or first.get("variant")
        print(f"error: {len(failed)} of {len(rows)} benchmark rows failed (first: {name}: "
              f"{str(first['error'])[:200]})", file=sys.stderr)
        return 1
    return 0
