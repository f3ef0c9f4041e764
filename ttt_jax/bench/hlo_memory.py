"""Which values are live at the memory peak of a compiled step: a liveness walk over the scheduled
HLO text of an XLA module.

XLA reports one number for a program's temporary memory (``compiled.memory_analysis()``); when it
changes between two configurations, the question is *which* buffers are live at the peak and where
they come from. The scheduled module (``compiled.as_text()``, or the
``*after_optimizations.txt`` file of ``XLA_FLAGS=--xla_dump_to=DIR --xla_dump_hlo_as_text``) lists
the entry computation's instructions in execution order, each with its shape and the JAX name stack
of the operation it came from (``metadata={op_name=...}``). This module walks that order:

* a value is born at its instruction and dies after its last user (``get-tuple-element``,
  ``bitcast`` and ``tuple`` are views of their operand, not new buffers);
* the live total after each instruction gives the peak and the instruction at it;
* the values live there are listed by size, and summed per JAX op name (digits folded), which says
  e.g. "five layers' recomputed MLP activations are live at once";
* and summed by the op name of their *last user*: what keeps them live. A value live long after it
  was made is either made early or used late; its last user says which consumer is late.

It is an approximation of XLA's buffer assignment: parameters are not counted, in-place updates
and buffer sharing are not modelled, and nested computations (fusions, loops) count as their
outputs only; outputs that alias donated arguments are counted as new values. It can therefore
overestimate the device's peak (the comparison is in benchmarks/history/). It is meant for *where*
the memory goes, not for the exact figure.

Usage::

    XLA_FLAGS="--xla_dump_to=/tmp/dump --xla_dump_hlo_as_text" python -m ttt_jax.bench.model ...
    python -m ttt_jax.bench.hlo_memory /tmp/dump/module_*jit_step*after_optimizations.txt --top 30
"""

from __future__ import annotations

import argparse
import collections
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "bf16": 2, "f16": 2, "s32": 4, "u32": 4,
          "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}
_ARRAY = re.compile(r"\b(" + "|".join(_BYTES) + r")\[([0-9,]*)\]")
_INSTR = re.compile(r"\s*(?:ROOT )?%(\S+) = (.*?) ([a-z][\w\-]*)\((.*)$")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_VIEWS = ("get-tuple-element", "bitcast", "tuple")


def shape_bytes(shape: str) -> int:
    """Bytes of an HLO shape string; a tuple shape is the sum of its arrays (layouts ignored)."""
    total = 0
    for dtype, dims in _ARRAY.findall(shape):
        n = 1
        for d in dims.split(","):
            if d:
                n *= int(d)
        total += n * _BYTES[dtype]
    return total


@dataclass(frozen=True)
class Value:
    """One top-level value of the entry computation."""

    name: str
    shape: str
    opcode: str
    op_name: str        # the JAX name stack (metadata op_name), "" when absent
    bytes: int
    born: int           # index of its instruction in the schedule
    dies: int           # index of its last user (== born when unused)
    last_user: str = ""  # op name (else opcode) of that last user; "" when unused


@dataclass(frozen=True)
class LiveReport:
    peak_bytes: int
    peak_index: int
    peak_instruction: str
    n_instructions: int
    live: tuple[Value, ...]          # live at the peak, largest first
    by_op_name: tuple[tuple[str, int], ...]   # bytes per op name pattern, largest first
    by_last_user: tuple[tuple[str, int], ...] = ()   # bytes per last user's op name pattern


def logical_lines(hlo_text: str) -> list[str]:
    """The text's lines with each instruction on one line. An attribute may hold raw newlines (a
    Mosaic call's ``backend_config`` does); its continuation lines start at column 0 but are neither
    a computation header, a closing ``}`` nor blank, and are joined back to their instruction."""
    out: list[str] = []
    for line in hlo_text.split("\n"):
        cont = (out and line[:1] not in ("", " ", "\t", "%") and line.rstrip() != "}"
                and not line.startswith(("ENTRY", "HloModule")))
        if cont:
            out[-1] += line
        else:
            out.append(line)
    return out


def _entry_lines(hlo_text: str) -> list[str]:
    start = hlo_text.find("\nENTRY ")
    if start < 0:
        raise ValueError("no ENTRY computation in this HLO text (is it an HLO module dump?)")
    lines = logical_lines(hlo_text[start + 1:])
    body = []
    for line in lines[1:]:
        if line.rstrip() == "}":
            break
        body.append(line)
    return body


def _operands(args: str) -> list[str]:
    # Operands come before the first "), " that closes the operand list; attributes follow it.
    depth, end = 1, len(args)
    for i, ch in enumerate(args):
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
            if depth == 0:
                end = i
                break
    return re.findall(r"%([\w.\-]+)", args[:end])


def analyse(hlo_text: str) -> LiveReport:
    """Liveness walk over the entry computation of a scheduled HLO module (see the module doc)."""
    instrs = []
    for line in _entry_lines(hlo_text):
        m = _INSTR.match(line)
        if m is None:
            continue
        name, shape, opcode, args = m.groups()
        meta = _OP_NAME.search(line)
        instrs.append((name, shape, opcode, _operands(args), meta.group(1) if meta else ""))
    if not instrs:
        raise ValueError("the ENTRY computation has no instructions")
    index = {name: i for i, (name, *_rest) in enumerate(instrs)}
    alias: dict[str, str] = {}
    last_use: dict[str, int] = {}
    for i, (name, _shape, opcode, operands, _meta) in enumerate(instrs):
        for op in operands:
            last_use[alias.get(op, op)] = i
        if opcode in _VIEWS and operands:
            alias[name] = alias.get(operands[0], operands[0])
    values = []
    for i, (name, shape, opcode, _ops, meta) in enumerate(instrs):
        if name in alias or opcode == "parameter":
            continue
        user = last_use.get(name)
        user_name = "" if user is None else (instrs[user][4] or f"<{instrs[user][2]}>")
        values.append(Value(name, shape.split("{")[0] if not shape.startswith("(") else shape, opcode,
                            meta, shape_bytes(shape), i, max(i, i if user is None else user), user_name))
    dying = collections.defaultdict(list)
    born = collections.defaultdict(list)
    for v in values:
        born[v.born].append(v)
        dying[v.dies].append(v)
    live, peak, peak_at = 0, -1, 0
    for i in range(len(instrs)):
        live += sum(v.bytes for v in born[i])
        if live > peak:
            peak, peak_at = live, i
        live -= sum(v.bytes for v in dying[i])
    at_peak = sorted((v for v in values if v.born <= peak_at <= v.dies and v.bytes),
                     key=lambda v: -v.bytes)
    groups: collections.Counter = collections.Counter()
    users: collections.Counter = collections.Counter()
    for v in at_peak:
        groups[re.sub(r"\d+", "#", v.op_name) or f"<{v.opcode}>"] += v.bytes
        users[re.sub(r"\d+", "#", v.last_user) or "<unused>"] += v.bytes
    return LiveReport(peak, peak_at, instrs[peak_at][0], len(instrs), tuple(at_peak),
                      tuple(groups.most_common()), tuple(users.most_common()))


def format_report(report: LiveReport, top: int = 30, groups: int = 20) -> str:
    gib = 2 ** 30
    out = [f"{report.n_instructions} instructions; peak of live values {report.peak_bytes / gib:.2f} GiB "
           f"at #{report.peak_index} ({report.peak_instruction}); {len(report.live)} values live there",
           f"{'MiB':>9}  {'born':>6} {'dies':>6}  {'opcode':22s} {'shape':40s} op_name"]
    for v in report.live[:top]:
        out.append(f"{v.bytes / 2 ** 20:9.1f}  {v.born:6d} {v.dies:6d}  {v.opcode:22s} {v.shape[:40]:40s} "
                   f"{v.op_name[-140:]}")
    out.append("-- live at the peak, per op name (digits folded):")
    for name, b in report.by_op_name[:groups]:
        out.append(f"{b / gib:7.2f} GiB  {name[-160:]}")
    out.append("-- live at the peak, per op name of the last user (what keeps them live):")
    for name, b in report.by_last_user[:groups]:
        out.append(f"{b / gib:7.2f} GiB  {name[-160:]}")
    return "\n".join(out)


def main(argv: Optional[Sequence[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("hlo", type=Path, help="scheduled HLO text (an *after_optimizations.txt dump)")
    p.add_argument("--top", type=int, default=30, help="values to list (largest first)")
    p.add_argument("--groups", type=int, default=20, help="op-name groups to list")
    args = p.parse_args(argv)
    if not args.hlo.is_file():
        p.error(f"no such file: {args.hlo}")
    try:
        report = analyse(args.hlo.read_text())
    except ValueError as e:
        p.error(f"{args.hlo}: {e}")
    print(format_report(report, args.top, args.groups))


if __name__ == "__main__":
    main()
