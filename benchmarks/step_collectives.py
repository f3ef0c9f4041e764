"""List the collectives in a compiled train step under a device mesh (CPU, compile only).

Builds the step of ``ttt_jax.bench.model.benchmark_step`` (model, AdamW, chunked loss with one group
per context shard) for a preset on emulated CPU devices, compiles it, and prints every all-gather, all-reduce,
reduce-scatter, all-to-all and collective-permute of the optimised HLO with its count and result
shape. Use it to check that a sharded step moves only what it should (for example, that the loss
does not gather the hidden states under context parallelism)::

    python benchmarks/step_collectives.py --preset m1b --context 4 --seq-len 16384 \\
        --set model.n_layers=4 model.attention_window=1024

``--loss-groups 1`` compiles the loss without per-shard groups, for comparison.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

_COLLECTIVE = re.compile(r"= (.+?) (all-gather|all-reduce|reduce-scatter|collective-permute|all-to-all)"
                         r"(?:-start)?\(")


def collectives(hlo_text: str) -> collections.Counter:
    """``Counter`` of ``(kind, result shape)`` over the collectives of an HLO module's text."""
    found = collections.Counter()
    for line in hlo_text.splitlines():
        m = _COLLECTIVE.search(line)
        if m:
            found[(m.group(2), m.group(1)[:120])] += 1
    return found


def main(argv=None) -> collections.Counter:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="m1b")
    p.add_argument("--context", type=int, default=4, help="mesh.context (emulated CPU devices)")
    p.add_argument("--seq-len", type=int, default=16384)
    p.add_argument("--loss-groups", type=int, default=None, help="default: the context size")
    p.add_argument("--set", nargs="*", default=[], help="config overrides")
    args = p.parse_args(argv)
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + f" --xla_force_host_platform_device_count={args.context}")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax
    import jax.numpy as jnp

    from ttt_jax.bench.model import benchmark_step
    from ttt_jax.config import load_config
    from ttt_jax import sharding

    cfg = load_config(args.preset, [*args.set, f"data.seq_len={args.seq_len}",
                                    f"mesh.context={args.context}", "mesh.data=1"])
    mesh = sharding.make_mesh(cfg.mesh)
    fn, _, abs_state, _, _ = benchmark_step(cfg.model, mesh, loss_groups=args.loss_groups,
                                             runtime=cfg.runtime)
    batch_sh = sharding.batch_sharding(mesh)
    tokens = jax.ShapeDtypeStruct((1, args.seq_len), jnp.int32, sharding=batch_sh)
    with jax.set_mesh(mesh):
        text = fn.lower(abs_state, tokens, tokens, tokens).compile().as_text()
    found = collectives(text)
    for (kind, shape), count in sorted(found.items(), key=lambda kv: (kv[0][0], -kv[1])):
        print(f"{count:4d} x {kind:18s} {shape}")
    return found


if __name__ == "__main__":
    main()
