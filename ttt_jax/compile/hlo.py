"""What a compiled (scheduled, SPMD-partitioned) HLO module contains: collective bytes and kernels.

* :func:`collective_bytes` -- bytes per device per step for each collective kind (all-gather,
  all-reduce, reduce-scatter, collective-permute, all-to-all), split into ICI (within a slice) and
  DCN (a replica group or source/target pair that spans slices). The size of one collective is its
  larger buffer (the gathered result of an all-gather, the input of a reduce-scatter, the buffer of
  an all-reduce). Collectives inside ``while`` loops (``lax.scan`` over layers, chunk scans) count
  once per iteration when XLA knows the trip count (``known_trip_count``), else once.
* :func:`kernel_calls` -- the Mosaic (Pallas TPU) custom calls and the op names they came from.
"""

from __future__ import annotations

import collections
import re
from typing import Optional, Sequence

import numpy as np

from ttt_jax.bench.hlo_memory import logical_lines, shape_bytes

KINDS = ("all-gather", "all-reduce", "reduce-scatter", "collective-permute", "all-to-all")
_COMP = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) .*\{\s*$")
_INSTR = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (.*?) ([a-z][\w\-]*)\(")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"')
_CALLS = re.compile(r"\b(?:body|condition|to_apply|calls|branch_computations|called_computations)="
                    r"(\{[^}]*\}|%?[\w.\-]+)")


def _computations(text: str) -> dict[str, list[str]]:
    comps: dict[str, list[str]] = {}
    name: Optional[str] = None
    for line in logical_lines(text):
        if name is None:
            m = _COMP.match(line)
            if m and not line[:1].isspace():   # headers start at column 0, instructions are indented
                name = m.group(1)
                comps[name] = []
                if line.startswith("ENTRY"):
                    comps["__entry__"] = [name]
        elif line.rstrip() == "}":
            name = None
        else:
            comps[name].append(line)
    return comps


def _multiplicity(comps: dict[str, list[str]]) -> dict[str, int]:
    """How many times each computation runs per execution of the entry (trip counts multiplied)."""
    entry = comps.get("__entry__", [None])[0]
    mult: dict[str, int] = collections.defaultdict(int)
    if entry is None:
        return mult

    def visit(comp: str, times: int, depth: int = 0) -> None:
        if depth > 64:
            return
        mult[comp] += times
        for line in comps.get(comp, ()):
            trip = _TRIP.search(line)
            for callee_s in _CALLS.findall(line):
                for callee in re.findall(r"%?([\w.\-]+)", callee_s.strip("{}")):
                    if callee in comps:
                        n = int(trip.group(1)) if (trip and " while(" in line) else 1
                        visit(callee, times * n, depth + 1)

    visit(entry, 1)
    return mult


def _groups(line: str) -> list[list[int]]:
    """Replica groups (explicit ``{{0,1},{2,3}}`` or iota ``[2,2]<=[4]`` / ``[2,2]<=[2,2]T(1,0)``) or
    source/target pairs of one collective."""
    m = re.search(r"source_target_pairs=\{((?:\{\d+,\d+\},?)*)\}", line)
    if m:
        return [[int(a), int(b)] for a, b in re.findall(r"\{(\d+),(\d+)\}", m.group(1))]
    m = re.search(r"replica_groups=\[([\d,]+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?", line)
    if m:
        shape = [int(x) for x in m.group(1).split(",")]
        dims = [int(x) for x in m.group(2).split(",")]
        ids = np.arange(int(np.prod(dims))).reshape(dims)
        if m.group(3):
            ids = ids.transpose([int(x) for x in m.group(3).split(",")])
        return ids.reshape(shape[0], -1).tolist()
    m = re.search(r"replica_groups=\{((?:\{[\d,]*\},?)*)\}", line)
    if m:
        return [[int(x) for x in g.split(",") if x] for g in re.findall(r"\{([\d,]*)\}", m.group(1))]
    return []


def collective_bytes(text: str, slice_of: Optional[Sequence[int]] = None) -> dict[str, dict[str, int]]:
    """``{kind: {"ici": bytes, "dcn": bytes, "count": n}}`` per device per step; see module doc.

    ``slice_of[i]``: the slice of the device with logical id ``i`` (the mesh's devices in order);
    ``None`` = one slice, everything is ICI."""
    comps = _computations(text)
    mult = _multiplicity(comps)
    out = {k: {"ici": 0, "dcn": 0, "count": 0} for k in KINDS}
    for comp, lines in comps.items():
        if comp == "__entry__" or not mult.get(comp):
            continue
        for line in lines:
            m = _INSTR.match(line)
            if m is None:
                continue
            opcode = m.group(3)
            kind = opcode[:-6] if opcode.endswith("-start") else opcode
            if kind not in KINDS:
                continue
            args = line[m.end():]
            nbytes = max(shape_bytes(m.group(2)), shape_bytes(args.split("),")[0]))
            if opcode.endswith("-start") and m.group(2).startswith("("):
                # async start: the tuple holds operand and result (and scratch); take the largest
                nbytes = max(shape_bytes(s) for s in re.findall(r"\w+\[[\d,]*\]", m.group(2)))
            link = "ici"
            if slice_of is not None:
                for g in _groups(line):
                    if len({slice_of[i] for i in g if i < len(slice_of)}) > 1:
                        link = "dcn"
                        break
            out[kind][link] += nbytes * mult[comp]
            out[kind]["count"] += mult[comp]
    return out


def kernel_calls(text: str) -> list[str]:
    """Op names of the Mosaic (``tpu_custom_call``) custom calls, one per call site in the module."""
    names = []
    for line in logical_lines(text):
        if "custom-call(" in line and 'custom_call_target="tpu_custom_call"' in line:
            m = _OP_NAME.search(line)
            names.append(m.group(1) if m else "")
    return names


def is_attention_op(op_name: str) -> bool:
    """An op under an attention module's name scope (``attention`` / ``attn``), not the TTT op's."""
    low = op_name.lower()
    return ("attention" in low or "attn" in low) and "ttt" not in low


def attention_kernel_calls(text: str) -> tuple[int, int]:
    """``(forward, backward)`` Mosaic call sites under attention scopes (backward: under
    ``transpose(...)``, the gradient pass)."""
    names = [n for n in kernel_calls(text) if is_attention_op(n)]
    bwd = sum("transpose(" in n for n in names)
    return len(names) - bwd, bwd
