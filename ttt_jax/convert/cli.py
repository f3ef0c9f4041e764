"""``ttt-jax convert``: Hugging Face checkpoints <-> ttt-jax checkpoints.

::

    ttt-jax convert hf SRC_DIR OUT_DIR [--ttt-layers 0,6 | --ttt-every 6 [--ttt-start 0]]
                       [--ttt-lr 3] [--ttt-chunk 1024] [--ttt-target hidden] [--dtype bfloat16]
    ttt-jax convert export CKPT OUT_DIR [--step N] [--dtype bfloat16] [--max-shard-gb 5] [--overwrite]

``hf`` imports a local Hugging Face model directory (Qwen3ForCausalLM / LlamaForCausalLM:
``config.json``, safetensors, ``tokenizer.json``) into a model-only checkpoint that
``ttt-jax train`` (``train.init_from=OUT_DIR``) and ``load_model`` read; with ``--ttt-layers`` or
``--ttt-every`` In-Place TTT is added to those layers (new parameters at their init: the converted
model computes what the checkpoint computes). ``export`` writes a checkpoint (a converted directory
or a training run) back as safetensors + ``config.json``; it refuses an ``OUT_DIR`` that already
holds files unless ``--overwrite`` (which replaces the files an export writes and keeps others).
Without a ``tokenizer.json`` in ``SRC_DIR``, ``hf`` configures the byte tokenizer and says so.
"""

from __future__ import annotations

import argparse


def _layers(text: str) -> list[int]:
    try:
        return [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated layer indices (e.g. 0,6,12), got {text!r}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="convert_command", metavar="DIRECTION", required=True)
    hf = sub.add_parser("hf", help="Hugging Face directory -> ttt-jax checkpoint",
                        description="Import a Hugging Face Qwen3 / Llama 3.x model directory.")
    hf.add_argument("src", metavar="SRC_DIR", help="config.json + model.safetensors (or sharded + index)")
    hf.add_argument("out", metavar="OUT_DIR", help="new directory for the ttt-jax checkpoint")
    where = hf.add_mutually_exclusive_group()
    where.add_argument("--ttt-layers", type=_layers, metavar="I,J,...",
                       help="add In-Place TTT to these layers (e.g. 0,6,12)")
    where.add_argument("--ttt-every", type=int, metavar="N", help="add In-Place TTT to every N-th layer")
    hf.add_argument("--ttt-start", type=int, default=0, help="first TTT layer with --ttt-every (default 0)")
    hf.add_argument("--ttt-lr", type=float, default=3.0, help="fast-weight learning rate (default 3.0)")
    hf.add_argument("--ttt-chunk", type=int, default=1024, help="TTT chunk size (default 1024)")
    hf.add_argument("--ttt-target", choices=("hidden", "embeddings"), default="hidden",
                    help="target source: the layer's MLP input (hidden, the continual-training recipe) "
                         "or the token embeddings")
    hf.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                    help="parameter dtype of the converted model (default float32)")
    hf.add_argument("--compute-dtype", choices=("float32", "bfloat16"), default="bfloat16",
                    help="matmul dtype recorded in the config (default bfloat16)")
    hf.add_argument("--no-progress", action="store_true", help="no progress bar")

    ex = sub.add_parser("export", help="ttt-jax checkpoint -> Hugging Face directory",
                        description="Export a ttt-jax checkpoint as safetensors + config.json.")
    ex.add_argument("ckpt", metavar="CKPT", help="converted directory, run directory or step directory")
    ex.add_argument("out", metavar="OUT_DIR", help="directory for the Hugging Face files")
    ex.add_argument("--step", type=int, default=None, help="checkpoint step (default: newest)")
    ex.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                    help="tensor dtype (default: the model's parameter dtype)")
    ex.add_argument("--max-shard-gb", type=float, default=5.0, help="shard size limit (default 5 GB)")
    ex.add_argument("--overwrite", action="store_true",
                    help="write into an OUT_DIR that already holds files (replacing an earlier export)")
    ex.add_argument("--no-progress", action="store_true", help="no progress bar")


def _export_target(out: str, overwrite: bool) -> None:
    """Refuse an ``OUT_DIR`` holding files (one line) unless ``overwrite``; with it, remove the
    files an earlier export wrote (stale shards would otherwise stay listed beside the new ones)."""
    from pathlib import Path

    from ttt_jax.convert.hf_import import TOKENIZER_FILES
    from ttt_jax.fs import ensure_writable

    p = ensure_writable(out, "export directory (OUT_DIR)")
    if not p.is_dir() or not any(p.iterdir()):
        return
    if not overwrite:
        raise ValueError(f"OUT_DIR {str(p)!r} is not empty; choose a new directory or pass --overwrite")
    ours = [*p.glob("model*.safetensors"), p / "model.safetensors.index.json", p / "config.json",
            *(p / name for name in TOKENIZER_FILES)]
    for f in ours:
        if Path(f).is_file():
            Path(f).unlink()


def run(args: argparse.Namespace) -> int:
    import sys

    from ttt_jax.convert.hf_config import ttt_config

    if args.convert_command == "hf":
        from ttt_jax.convert.hf_import import convert_hf
        from ttt_jax.checkpoint import read_checkpoint_config

        from ttt_jax.fs import ensure_writable
        from ttt_jax.paths import existing_dir

        existing_dir(args.src, "SRC_DIR")
        ensure_writable(args.out, "checkpoint directory (OUT_DIR)")
        ttt = ttt_config(args.ttt_layers, args.ttt_every, start=args.ttt_start, lr=args.ttt_lr,
                         chunk_size=args.ttt_chunk, target_source=args.ttt_target)
        out = convert_hf(args.src, args.out, ttt=ttt, param_dtype=args.dtype,
                         compute_dtype=args.compute_dtype, progress=not args.no_progress)
        cfg = read_checkpoint_config(out)
        m = cfg.model
        ttt_layers = list(m.ttt.layer_ids(m.n_layers))
        print(f"converted {args.src} -> {out}: {m.n_layers} layers, d_model {m.d_model}, "
              f"{m.n_heads}/{m.n_kv_heads} heads, vocab {m.vocab_size}, params {m.param_dtype}, "
              + (f"In-Place TTT on layers {ttt_layers}" if ttt_layers else "no In-Place TTT"))
        print(f"tokenizer: {cfg.data.tokenizer}")
        if cfg.data.tokenizer == "byte":
            from ttt_jax.data.tokenizer import ByteTokenizer

            n = ByteTokenizer().vocab_size
            fit = ("which fits" if n <= m.vocab_size else "which does not fit") + \
                f" the model's vocabulary of {m.vocab_size}"
            print(f"note: {args.src} has no tokenizer.json, so the checkpoint is configured with the "
                  f"{n}-token byte tokenizer ({fit}); copy the model's tokenizer.json into {out} and "
                  f"set data.tokenizer, pass --tokenizer to eval/generate, or give generate token ids "
                  f"(--prompt-ids)", file=sys.stderr)
        print(f"continue training with: ttt-jax train CONFIG train.init_from={out}")
        return 0
    from ttt_jax.convert.hf_export import export_hf

    _export_target(args.out, args.overwrite)  # before the model is loaded
    out = export_hf(args.ckpt, args.out, step=args.step, dtype=args.dtype,
                    max_shard_bytes=int(args.max_shard_gb * 2**30), progress=not args.no_progress)
    print(f"exported {args.ckpt} -> {out} (safetensors + config.json)")
    return 0
