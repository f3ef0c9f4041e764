"""``ttt-jax bench op|model [options]``: the benchmark suite from the command line.

``op``: In-Place TTT against the plain down-projection, every implementation, forward + backward
(:mod:`ttt_jax.bench.op`). ``model``: train-step time, tokens/s, MFU and peak memory of a preset
with and without In-Place TTT, full or sliding-window attention, optionally on a mesh
(:mod:`ttt_jax.bench.model`). ``ttt-jax bench op --help`` lists each one's options.
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

    module = importlib.import_module(_TARGETS[args.target])
    module.main(list(args.options))
    return 0
