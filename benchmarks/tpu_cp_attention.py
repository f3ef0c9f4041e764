"""Ring vs all-gather context-parallel attention on TPU, compared by compiled memory and collective
bytes (ahead-of-time compile for a TPU topology on any host; needs libtpu).

For each kernel (``ring``, ``allgather``) and layout it compiles forward + backward of the splash
context-parallel attention (:mod:`ttt_jax.ops.attention_cp_tpu`) inside ``shard_map`` over the
``context`` axis of the topology's chips, and records per chip: argument / output / temporary bytes
from ``memory_analysis()``, the Mosaic (``tpu_custom_call``) count, and for each collective kind
the bytes it produces per step (result bytes of every collective in the optimised HLO, times the
trip count of the ``while`` loop it sits in, from XLA's ``known_trip_count``)::

    python benchmarks/tpu_cp_attention.py --topology v5p:2x2x2 --seq-len 65536 \\
        --out benchmarks/results/tpu_cp_attention_v5p8.json
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4,
                "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8}
_COLLECTIVE = re.compile(r"= (.+?) (all-gather|all-reduce|reduce-scatter|collective-permute|all-to-all)"
                         r"(-start)?\(")
_ARRAY = re.compile(r"(\w+)\[([\d,]*)\]")
_WHILE = re.compile(r" while\(.*condition=%?([\w.\-]+), body=%?([\w.\-]+)")
_CONST = re.compile(r"s32\[\]\S* constant\((\d+)\)")
_CALLEE = re.compile(r"(?:to_apply|calls|branch_computations|called_computations)=\{?([%\w.\-, ]+)\}?")


def _arrays(text: str):
    out = []
    for dt, dims in _ARRAY.findall(text):
        if dt in _DTYPE_BYTES and dims:
            n = 1
            for d in dims.split(","):
                n *= int(d)
            out.append(n * _DTYPE_BYTES[dt])
    return out


def _computations(hlo: str) -> dict:
    """``{name: [instruction lines]}``: headers are the unindented lines ending in ``{``."""
    comps, cur = {}, None
    for line in hlo.splitlines():
        if line and not line[0].isspace() and line.rstrip().endswith("{"):
            cur = line.split(" ")[1 if line.startswith("ENTRY") else 0].lstrip("%")
            comps[cur] = []
        elif cur is not None and line.startswith("  "):
            comps[cur].append(line)
    return comps


def collective_bytes(hlo: str) -> dict:
    """``{kind: {"ops": count, "bytes": result bytes per step}}`` of an optimised HLO module.

    A collective inside a ``while`` body counts once per iteration: the trip count is read from
    the loop condition (XLA normalises these loops to ``i < constant`` from 0); computations
    called from a body (fusions, conditionals) inherit its multiplier.
    """
    comps = _computations(hlo)
    mult = collections.defaultdict(lambda: 1)
    for _ in range(4):  # a few passes settle nesting
        for name, lines in comps.items():
            for line in lines:
                w = _WHILE.search(line)
                if w and w.group(1) in comps:
                    consts = [int(c) for l in comps[w.group(1)] for c in _CONST.findall(l)]
                    trips = max(consts) if consts else 1
                    mult[w.group(2)] = max(mult[w.group(2)], mult[name] * trips)
                for c in _CALLEE.findall(line):
                    for callee in re.split(r"[ ,%]+", c):
                        if callee in comps:
                            mult[callee] = max(mult[callee], mult[name])
    found = collections.defaultdict(lambda: {"ops": 0, "bytes": 0})
    for name, lines in comps.items():
        for line in lines:
            m = _COLLECTIVE.search(line)
            if not m:
                continue
            sizes = _arrays(m.group(1))
            if m.group(3):  # async start: (operands..., results..., scalars) -> the results
                sizes = sizes[len(sizes) // 2:]
            found[m.group(2)]["ops"] += mult[name]
            found[m.group(2)]["bytes"] += mult[name] * sum(sizes)
    return dict(found)


# Bytes a chip sends per result byte, for ring implementations of each collective over n chips.
def wire_bytes(collectives: dict, n: int) -> int:
    """Estimated bytes each chip sends per step: all-gather ``(n-1)/n``, reduce-scatter ``n-1``,
    all-reduce ``2(n-1)/n`` times the result bytes; a collective-permute sends its result."""
    factor = {"all-gather": (n - 1) / n, "reduce-scatter": n - 1, "all-reduce": 2 * (n - 1) / n,
              "collective-permute": 1.0, "all-to-all": (n - 1) / n}
    return int(sum(v["bytes"] * factor[k] for k, v in collectives.items()))


def measure(kernel: str, layout: str, mesh, seq_len: int, heads: int, kv_heads: int,
            head_dim: int) -> dict:
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from ttt_jax.ops.attention_cp_tpu import tpu_context_attention

    spec = P(None, "context")
    fn = jax.shard_map(lambda q, k, v: tpu_context_attention(q, k, v, "context", kernel=kernel,
                                                             layout=layout),
                       mesh=mesh, in_specs=(spec,) * 3, out_specs=spec)
    loss = lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32))
    sh = NamedSharding(mesh, spec)
    args = [jax.ShapeDtypeStruct((1, seq_len, h, head_dim), jnp.bfloat16, sharding=sh)
            for h in (heads, kv_heads, kv_heads)]
    t0 = time.time()
    compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2))).lower(*args).compile()
    secs = time.time() - t0
    mem = compiled.memory_analysis()
    hlo = compiled.as_text()
    if os.environ.get("TPU_CP_DUMP"):
        Path(os.environ["TPU_CP_DUMP"], f"{kernel}_{layout}.hlo").write_text(hlo)
    row = {
        "kernel": kernel, "layout": layout, "compile_s": round(secs, 1),
        "argument_bytes": mem.argument_size_in_bytes, "output_bytes": mem.output_size_in_bytes,
        "temp_bytes": mem.temp_size_in_bytes,
        "peak_estimate_bytes": (mem.argument_size_in_bytes + mem.output_size_in_bytes
                                + mem.temp_size_in_bytes - mem.alias_size_in_bytes),
        "mosaic_calls": hlo.count('custom_call_target="tpu_custom_call"'),
        "collectives": collective_bytes(hlo),
    }
    row["wire_bytes_estimate"] = wire_bytes(row["collectives"], mesh.devices.size)
    return row


def main(argv=None) -> list:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--topology", default="v5p:2x2x2")
    p.add_argument("--seq-len", type=int, default=65536, help="global tokens (batch 1)")
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--kernels", nargs="*", default=["ring", "allgather"])
    p.add_argument("--layouts", nargs="*", default=["contiguous", "zigzag"])
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    from jax.experimental import topologies

    from ttt_jax.parallel.mesh import make_mesh

    devices = topologies.get_topology_desc(topology_name=args.topology, platform="tpu").devices
    mesh = make_mesh(data=1, context=len(devices), devices=devices)
    rows = []
    for layout in args.layouts:
        for kernel in args.kernels:
            print(f"compiling {kernel} / {layout} for {args.topology} ...", file=sys.stderr, flush=True)
            row = measure(kernel, layout, mesh, args.seq_len, args.heads, args.kv_heads,
                          args.head_dim)
            print(json.dumps(row), flush=True)
            rows.append(row)
    result = {"topology": args.topology, "chips": len(devices), "seq_len": args.seq_len,
              "heads": args.heads, "kv_heads": args.kv_heads, "head_dim": args.head_dim,
              "dtype": "bfloat16", "what": "forward + backward of one attention layer, per chip",
              "results": rows}
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return rows


if __name__ == "__main__":
    main()
