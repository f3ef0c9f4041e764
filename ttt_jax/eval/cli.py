"""``ttt-jax eval CHECKPOINT --suite ppl|ruler|all``: evaluate a trained or converted checkpoint.

Writes into a new directory, never beside the checkpoint (which may be read-only) and never over
earlier results: ``--out DIR`` (refused when it already holds files, unless ``--overwrite``), by
default ``./eval/<run name>-<step>-<suite>/`` (``-2``, ``-3``, ... appended when that exists):

* ``ppl.json``, ``ppl_context.png`` (loss on the final block vs context length),
  ``ppl_position.png`` (loss by position at the longest context);
* ``ruler.json`` (accuracy per task x length and every sample's record), ``ruler.md`` (the table),
  ``ruler.png`` (heat map).

The tokenizer and the default corpus are the checkpoint's (``data.tokenizer``, ``data.source``);
``--data PATH`` evaluates on local files instead (``--data-source text|jsonl|parquet``).
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any, Optional

EVAL_SUITES = ("ppl", "ruler", "all")


def _int_list(text: str) -> list[int]:
    try:
        out = [int(float(x)) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not out or min(out) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", metavar="CHECKPOINT",
                   help="run directory, checkpoints directory or one step's directory")
    p.add_argument("--suite", choices=EVAL_SUITES, default="all", help="what to run (default all)")
    p.add_argument("--out", default=None,
                   help="output directory (default ./eval/<run name>-<step>-<suite>/, a new one each run)")
    p.add_argument("--overwrite", action="store_true",
                   help="write into --out even when it already holds files")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest)")
    p.add_argument("--data", nargs="+", default=None, metavar="PATH",
                   help="local files/directories/globs to evaluate on (default: the checkpoint's "
                        "corpus); also the RULER haystack unless --haystack noise")
    p.add_argument("--data-source", choices=("text", "jsonl", "parquet", "stdlib"), default=None,
                   help="format of --data (default text; without --data the checkpoint's source)")
    p.add_argument("--field", default="text", help="JSONL field / Parquet column of --data")
    p.add_argument("--split", choices=("validation", "train", "all"), default="validation",
                   help="corpus split to draw spans and haystacks from (default validation)")
    p.add_argument("--tokenizer", default=None,
                   help="'byte' or a tokenizer.json (default: the checkpoint's data.tokenizer)")
    p.add_argument("--lengths", type=_int_list, default=None,
                   help="comma-separated token lengths; ppl: context lengths (default block, 2 "
                        "block, ... up to --max-length); ruler: sample lengths (default 4096)")
    p.add_argument("--max-length", type=int, default=None,
                   help="ppl: longest context (default the model's max_seq_len)")
    p.add_argument("--block-size", type=int, default=None,
                   help="ppl: scored tokens at the end of every window (default min(256, max/4))")
    p.add_argument("--num-samples", type=int, default=None,
                   help="ppl spans (default 16) / RULER samples per task and length (default 10)")
    p.add_argument("--concat", action="store_true",
                   help="ppl: concatenate documents into one stream (when few are long enough)")
    p.add_argument("--tasks", default=None,
                   help="RULER tasks, comma-separated (default all: niah_single, niah_multikey, "
                        "niah_multivalue, niah_multiquery, variable_tracking, common_words, "
                        "frequent_words)")
    p.add_argument("--haystack", choices=("corpus", "noise"), default="corpus",
                   help="RULER haystack: corpus lines or the repeated noise paragraph")
    p.add_argument("--seed", type=int, default=0, help="RULER generation seed")
    p.add_argument("--batch-size", type=int, default=1, help="sequences per forward pass")
    p.add_argument("--logits-chunk", type=int, default=1024,
                   help="positions per chunk of the output projection (bounds logits memory)")
    p.add_argument("--override", nargs="*", default=[], metavar="key=value",
                   help="runtime overrides (e.g. runtime.attention_impl=xla); the architecture cannot change")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="seq", disable=not enabled, leave=False)


def _corpus_args(args: argparse.Namespace, cfg: Any) -> dict[str, Any]:
    if args.data:
        source = args.data_source or "text"
        return {"source": source, "paths": tuple(args.data), "field": args.field,
                "column": args.field}
    if args.data_source not in (None, cfg.data.source):
        raise ValueError(f"--data-source {args.data_source} needs --data PATH")
    return {"source": cfg.data.source, "paths": tuple(cfg.data.paths), "field": cfg.data.field,
            "column": cfg.data.column}


def run_ppl(model: Any, tokenizer: Any, cfg: Any, args: argparse.Namespace, out: Path,
            corpus: dict[str, Any], say) -> dict[str, Any]:
    from ttt_jax.eval.perplexity import (default_context_lengths, evaluation_spans,
                                         sliding_window_perplexity)
    from ttt_jax.eval.plots import plot_context_loss, plot_position_loss

    if args.lengths:
        lengths = sorted(set(args.lengths))
        max_len = lengths[-1]
    else:
        max_len = args.max_length or cfg.model.max_seq_len
    block = args.block_size or max(1, min(256, max_len // 4))
    if not args.lengths:
        lengths = default_context_lengths(max_len, block)
    if lengths[0] < block:
        raise ValueError(f"--block-size {block} exceeds the shortest context length {lengths[0]}")
    if max_len > cfg.model.max_seq_len:
        say(f"note: contexts up to {max_len} tokens exceed the model's max_seq_len "
            f"{cfg.model.max_seq_len} (length extrapolation)")
    n = args.num_samples or 16
    spans = evaluation_spans(tokenizer, max_len, n, split=args.split, concat=args.concat, **corpus)
    say(f"ppl: {len(spans)} spans of {max_len + 1} tokens, context lengths {lengths}, "
        f"final block {block}")
    with _progress(len(spans) * len(lengths), "ppl", not args.no_progress) as bar:
        res = sliding_window_perplexity(model, spans, context_lengths=lengths, block_size=block,
                                        batch_size=args.batch_size, logits_chunk=args.logits_chunk,
                                        progress=bar.update)
    d = {"checkpoint": str(args.checkpoint), "corpus": {k: list(v) if isinstance(v, tuple) else v
                                                         for k, v in corpus.items()},
         "split": args.split, "concat": args.concat, **res.to_dict()}
    (out / "ppl.json").write_text(json.dumps(d, indent=1))
    window = cfg.model.attention_window or None
    plot_context_loss({"model": res}, out / "ppl_context.png", window=window)
    plot_position_loss({"model": res}, out / "ppl_position.png", window=window)
    say(res.markdown())
    return d


def run_ruler_suite(model: Any, tokenizer: Any, args: argparse.Namespace, out: Path,
                    corpus: dict[str, Any], say, cfg: Any = None) -> dict[str, Any]:
    from ttt_jax.eval.plots import plot_ruler_heatmap
    from ttt_jax.eval.ruler import TASKS, Haystack, run_ruler

    tasks = _ruler_tasks(args)
    lengths = sorted(set(args.lengths)) if args.lengths else [4096]
    if cfg is not None and lengths[-1] > cfg.model.max_seq_len:
        say(f"note: samples up to {lengths[-1]} tokens exceed the model's max_seq_len "
            f"{cfg.model.max_seq_len} (length extrapolation)")
    n = args.num_samples or 10
    haystack = Haystack(tokenizer, args.haystack, split=args.split, **corpus)
    say(f"ruler: {len(tasks)} tasks x lengths {lengths} x {n} samples (seed {args.seed}, "
        f"haystack {haystack.description})")
    with _progress(len(tasks) * len(lengths) * n, "ruler", not args.no_progress) as bar:
        res = run_ruler(model, tokenizer, tasks=tasks, lengths=lengths, num_samples=n,
                        seed=args.seed, haystack=haystack, batch_size=args.batch_size,
                        logits_chunk=args.logits_chunk, progress=bar.update)
    d = {"checkpoint": str(args.checkpoint), "haystack": haystack.description, **res.to_dict()}
    (out / "ruler.json").write_text(json.dumps(d, indent=1))
    (out / "ruler.md").write_text(res.markdown() + "\n")
    plot_ruler_heatmap(res.accuracy, res.lengths, out / "ruler.png")
    say(res.markdown())
    return d


def _ruler_tasks(args: argparse.Namespace) -> list[str]:
    from ttt_jax.eval.ruler import TASKS

    tasks = [t.strip() for t in args.tasks.split(",")] if args.tasks else list(TASKS)
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"unknown RULER task(s) {unknown}; tasks: {', '.join(TASKS)}")
    return tasks


def output_dir(args: argparse.Namespace, ckdir: Path, step: int) -> Path:
    """Where this evaluation writes: ``--out``, or a new ``./eval/<run>-<step>-<suite>[-k]``.
    ``ValueError`` when ``--out`` holds files (without ``--overwrite``) or cannot be written."""
    from ttt_jax.fs import ensure_writable

    if args.out:
        out = ensure_writable(args.out, "eval output directory (--out)")
        if out.is_dir() and any(out.iterdir()) and not args.overwrite:
            raise ValueError(f"--out {str(out)!r} already holds files (earlier results?); choose a "
                             "new directory or pass --overwrite")
        return out
    run_dir = ckdir.parent if ckdir.name == "checkpoints" else ckdir
    base = Path("eval") / f"{run_dir.name}-{step}-{args.suite}"
    out, k = base, 1
    while out.exists():
        k += 1
        out = base.with_name(f"{base.name}-{k}")
    return ensure_writable(out, "eval output directory")


def run(args: argparse.Namespace) -> int:
    from ttt_jax.data import load_tokenizer
    from ttt_jax.checkpoint import load_model, resolve_checkpoint

    for name in ("batch_size", "logits_chunk", "num_samples", "max_length", "block_size"):
        v = getattr(args, name)
        if v is not None and v < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {v}")
    if args.suite in ("ruler", "all"):
        _ruler_tasks(args)  # an unknown task is an error before anything is loaded
    ckdir, step = resolve_checkpoint(args.checkpoint, args.step)
    out = output_dir(args, ckdir, step)  # checked before the model is loaded
    # Orbax logs (through absl) a warning per checkpoint item it is not asked to restore.
    logging.getLogger("absl").setLevel(logging.ERROR)
    cfg, model = load_model(ckdir, step=step, overrides=tuple(args.override))
    tokenizer = load_tokenizer(args.tokenizer or cfg.data.tokenizer)
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise ValueError(f"tokenizer vocab_size {tokenizer.vocab_size} exceeds the model's "
                         f"{cfg.model.vocab_size}; pass the model's tokenizer with --tokenizer")
    out.mkdir(parents=True, exist_ok=True)
    corpus = _corpus_args(args, cfg)
    say = print
    say(f"checkpoint {ckdir / str(step)}: {cfg.model.n_layers} layers, d_model "
        f"{cfg.model.d_model}, window {cfg.model.attention_window or 'full'}, In-Place TTT "
        f"{'on layers ' + str(list(cfg.model.ttt.layer_ids(cfg.model.n_layers))) if cfg.model.ttt.enabled else 'off'}")
    if args.suite in ("ppl", "all"):
        run_ppl(model, tokenizer, cfg, args, out, corpus, say)
    if args.suite in ("ruler", "all"):
        run_ruler_suite(model, tokenizer, args, out, corpus, say, cfg)
    say(f"outputs: {out}/")
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    """Run ``ttt-jax eval`` alone (``python -m ttt_jax.eval.cli ...``)."""
    p = argparse.ArgumentParser(prog="ttt-jax eval")
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
