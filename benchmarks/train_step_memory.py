"""Device memory of the trainer's compiled train step, without running it.

Builds the real step of ``ttt-jax train`` -- :func:`ttt_jax.train.steps.make_train_step` with the
optimizer of :func:`ttt_jax.train.optim.make_optimizer` (clipping, AdamW, non-finite guard) --
on *abstract* states (``nnx.eval_shape``: no parameter is ever allocated), lowers and compiles it
for one device with the incoming states donated (as the trainer does), and prints XLA's
``memory_analysis()``: ``temp`` (the step's temporaries: activations, gradients, workspace) and
``args`` (parameters, Adam moments, batch). Their sum minus ``alias`` (donated buffers reused for
the outputs) approximates the step's peak; a real run adds the allocator's fragmentation.

Variants: ``segments`` (the batch carries ``[B, T]`` segment ids, as the trainer's packed batches
do) and ``no_segments`` (``segment_ids=None``). ``--attention-impl`` compiles each variant once per
listed ``runtime.attention_impl`` (e.g. ``xla flash`` for "before / after" of a new path); the line
also says what ``auto`` resolves to on this device for the variant's shapes.

    python benchmarks/train_step_memory.py --preset qwen3_4b_stage1 --seq-len 32768 \\
        --set model.param_dtype=bfloat16 train.init_from=null --attention-impl xla flash \\
        --out $OUT/train_step_memory_q4b_32k.json
    python benchmarks/train_step_memory.py --smoke          # CPU, tiny preset (seconds)

``--out`` (default ``$OUT/train_step_memory.json`` when ``$OUT`` is set) receives the rows as JSON.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ttt_jax.config import load_config  # noqa: E402
from ttt_jax.models.lm import CausalLM  # noqa: E402
from ttt_jax.ops import attention as attention_ops  # noqa: E402
from ttt_jax.train.optim import learning_rate_schedule, make_optimizer  # noqa: E402
from ttt_jax.train.steps import make_train_step  # noqa: E402

GIB = 2.0 ** 30
VARIANTS = ("segments", "no_segments")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="qwen3_4b_stage1", help="config preset or YAML path")
    p.add_argument("--seq-len", type=int, default=None, help="default: the preset's data.seq_len")
    p.add_argument("--batch-size", type=int, default=1, help="sequences per step on the device")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="config overrides, e.g. model.param_dtype=bfloat16 train.init_from=null")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--attention-impl", nargs="+", default=[None], metavar="IMPL",
                   help=f"runtime.attention_impl values to compile ({', '.join(attention_ops.IMPLS)}); "
                        "default: the preset's")
    p.add_argument("--smoke", action="store_true", help="tiny preset and length (CPU, seconds)")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    if args.smoke:
        args.preset, args.seq_len = "tiny", args.seq_len or 128
    bad = [i for i in args.attention_impl if i is not None and i not in attention_ops.IMPLS]
    if bad:
        p.error(f"--attention-impl {bad[0]!r} is not one of {attention_ops.IMPLS}")
    if args.out is None and os.environ.get("OUT"):
        args.out = Path(os.environ["OUT"]) / "train_step_memory.json"
    return args


def _resolved_impl(mcfg, b: int, t: int, segments: bool) -> str:
    """What the model's attention runs for these shapes here (``auto`` resolved)."""
    if cfg.runtime.attention_impl != "auto":
        return cfg.runtime.attention_impl
    dtype = jnp.bfloat16 if mcfg.compute_dtype == "bfloat16" else jnp.float32
    q = jax.ShapeDtypeStruct((b, t, mcfg.n_heads, mcfg.resolved_head_dim), dtype)
    seg = jax.ShapeDtypeStruct((b, t), jnp.int32) if segments else None
    return attention_ops._auto_impl(q, seg)


def measure(cfg, b: int, t: int, segments: bool) -> dict:
    """Compile the train step for ``[b, t]`` batches and return its memory analysis (bytes)."""
    mcfg, tcfg = cfg.model, cfg.train
    tx = make_optimizer(tcfg)

    def build():
        model = CausalLM(mcfg, runtime=cfg.runtime, rngs=nnx.Rngs(0))
        return model, nnx.Optimizer(model, tx, wrt=nnx.Param)

    abs_model, abs_opt = nnx.eval_shape(build)
    model_def, model_state = nnx.split(abs_model)
    opt_def, opt_state = nnx.split(abs_opt)
    tok = jax.ShapeDtypeStruct((b, t), jnp.int32)
    batch = {"inputs": tok, "targets": tok, "loss_mask": jax.ShapeDtypeStruct((b, t), jnp.float32),
             "segment_ids": tok if segments else None, "positions": tok}
    step = make_train_step(model_def, opt_def, learning_rate_schedule(tcfg),
                           loss_chunk=cfg.runtime.loss_chunk, loss_groups=1)
    t0 = time.perf_counter()
    compiled = jax.jit(step, donate_argnames=("model_state", "opt_state")).lower(
        model_state, opt_state, batch).compile()
    seconds = time.perf_counter() - t0
    ma = compiled.memory_analysis()
    row = {"compile_s": round(seconds, 1)}
    for key in ("temp", "argument", "output", "alias", "generated_code"):
        row[f"{key}_bytes"] = int(getattr(ma, f"{key}_size_in_bytes", 0) or 0) if ma is not None else None
    if ma is not None:
        row["peak_estimate_bytes"] = (row["temp_bytes"] + row["argument_bytes"] + row["output_bytes"]
                                      - row["alias_bytes"])
    return row


def main(argv=None) -> int:
    args = parse_args(argv)
    rows = []
    device = jax.devices()[0]
    print(f"device: {device.device_kind} ({jax.default_backend()}), jax {jax.__version__}; "
          f"preset {args.preset}, overrides {args.set}", flush=True)
    for impl in args.attention_impl:
        overrides = list(args.set) + ([f"runtime.attention_impl={impl}"] if impl else [])
        if args.seq_len:
            overrides.append(f"data.seq_len={args.seq_len}")
        cfg = load_config(args.preset, overrides)
        t = cfg.data.seq_len
        for variant in args.variants:
            segments = variant == "segments"
            resolved = _resolved_impl(cfg.model, args.batch_size, t, segments)
            row = {"preset": args.preset, "overrides": overrides, "batch_size": args.batch_size,
                   "seq_len": t, "variant": variant, "attention_impl": cfg.runtime.attention_impl,
                   "attention_resolved": resolved}
            try:
                row.update(measure(cfg, args.batch_size, t, segments))
            except Exception as e:  # an impl that cannot compile here: record why, go on
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
            rows.append(row)
            label = f"{variant:12s} attention {cfg.runtime.attention_impl}->{resolved}"
            if "error" in row:
                print(f"{label:40s} ERROR {row['error']}", flush=True)
            elif row.get("temp_bytes") is None:
                print(f"{label:40s} (no memory analysis on this backend)", flush=True)
            else:
                print(f"{label:40s} temp {row['temp_bytes'] / GIB:7.2f} GiB  args "
                      f"{row['argument_bytes'] / GIB:6.2f}  out {row['output_bytes'] / GIB:6.2f}  "
                      f"alias {row['alias_bytes'] / GIB:6.2f}  peak~ {row['peak_estimate_bytes'] / GIB:6.2f} GiB"
                      f"  (compile {row['compile_s']} s)", flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        meta = {"device": device.device_kind, "backend": jax.default_backend(),
                "jax": jax.__version__, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
                    timespec="seconds"), "command": " ".join(sys.argv)}
        args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
        print(f"wrote {args.out}")
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
