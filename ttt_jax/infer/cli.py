"""``ttt-jax generate``: sample text from a trained or converted checkpoint, streaming it as it comes.

::

    ttt-jax generate CHECKPOINT --prompt TEXT | --prompt-file FILE | --prompt-ids 1,2,3 [--max-new-tokens N]
        [--temperature T] [--top-p P] [--top-k K] [--seed S] [--tokenizer byte|tokenizer.json]
        [--decode-block N]
        [--mesh fsdp=4,tensor=2] [--qttt-steps N --qttt-span K --qttt-lr LR --qttt-layers all|0,3,5
        --qttt-rank R]

CHECKPOINT is a run directory, its ``checkpoints/`` directory or one step's directory (training or
model-only checkpoints). The tokenizer defaults to the checkpoint's ``data.tokenizer``. The
continuation goes to stdout as it is decoded; a summary (tokens, time, tokens/s, qTTT losses) goes to
stderr. ``--prompt-ids`` gives the prompt as token ids (used as they are: no bos is added) and
prints the generated ids, comma-separated, instead of text; no tokenizer is needed then (one that
fits the model still supplies the default stop token).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
import time
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", metavar="CHECKPOINT",
                   help="run directory, checkpoints directory or step directory")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="prompt text")
    src.add_argument("--prompt-file", help="file holding the prompt text (UTF-8)")
    src.add_argument("--prompt-ids", type=_ids, metavar="I,J,...",
                     help="the prompt as comma-separated token ids; the output is token ids too")
    p.add_argument("--max-new-tokens", type=int, default=128, help="most tokens to generate (128)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0 = off)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--tokenizer", default=None,
                   help="'byte' or a tokenizer.json (default: the checkpoint's data.tokenizer)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest)")
    p.add_argument("--stop-token", type=int, action="append", default=None, metavar="ID",
                   help="token id that ends generation (repeatable; default: the tokenizer's eos)")
    p.add_argument("--no-bos", action="store_true", help="do not prepend the tokenizer's bos token")
    p.add_argument("--prefill-block", type=int, default=1024, help="prompt tokens per prefill call")
    p.add_argument("--decode-block", type=int, default=32,
                   help="tokens per decode call, looped on the device and streamed a block at a time "
                        "(0 = one call per token)")
    p.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                   help="runtime model setting, e.g. runtime.attention_impl=xla or model.compute_dtype=bfloat16")
    p.add_argument("--mesh", default=None, metavar="AXIS=N,...",
                   help="shard the parameters over a device mesh, e.g. fsdp=4,tensor=2 (axes data, fsdp, "
                        "tensor, context; unnamed axes 1, data -1 = the remaining devices)")
    q = p.add_argument_group("query-only test-time training (qTTT)")
    q.add_argument("--qttt-steps", type=int, default=0, help="gradient steps on the queries (0 = off)")
    q.add_argument("--qttt-span", type=int, default=128, help="tokens per sampled prompt span")
    q.add_argument("--qttt-lr", type=float, default=1e-5, help="AdamW learning rate")
    q.add_argument("--qttt-layers", default="all", help="'all' or comma-separated layer indices")
    q.add_argument("--qttt-rank", type=int, default=0, help="0 = full query kernels, r > 0 = rank-r adapters")


def _ids(text: str) -> list[int]:
    try:
        ids = [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated token ids, got {text!r}") from None
    if not ids or min(ids) < 0:
        raise argparse.ArgumentTypeError(f"expected non-negative token ids, got {text!r}")
    return ids


class _IdStreamer:
    """Writes the generated token ids, comma-separated, as they come (``--prompt-ids``)."""

    def __init__(self, out=None, block: int = 1):
        self.out = out if out is not None else sys.stdout
        self.block, self.first, self.second, self.n = block, None, None, 0

    def __call__(self, step, tokens, active):
        now = time.perf_counter()
        self.first = now if self.first is None else self.first
        self.second = now if step == self.block else self.second
        if active[0]:
            self.out.write(("," if self.n else "") + str(int(tokens[0])))
            self.out.flush()
            self.n += 1

    def finish(self):
        self.out.write("\n")
        self.out.flush()


def _layers(spec: str):
    if spec.strip().lower() == "all":
        return None
    try:
        return tuple(int(x) for x in spec.split(",") if x.strip())
    except ValueError:
        raise ValueError(f"--qttt-layers must be 'all' or comma-separated integers, got {spec!r}") from None


def _mesh(spec: str):
    """``"fsdp=4,tensor=2"`` -> the mesh over all devices."""
    from ttt_jax.parallel.mesh import make_mesh

    sizes = {"data": -1, "fsdp": 1, "tensor": 1, "context": 1}
    for part in filter(None, (x.strip() for x in spec.split(","))):
        name, _, value = part.partition("=")
        if name not in sizes or not value.lstrip("-").isdigit():
            raise ValueError(f"--mesh must look like fsdp=4,tensor=2 with axes {list(sizes)}, got {spec!r}")
        sizes[name] = int(value)
    return make_mesh(**sizes)


def _resolve_tokenizer(spec: str, checkpoint):
    from ttt_jax.data.tokenizer import load_tokenizer
    from ttt_jax.fs import is_remote

    path = Path(spec).expanduser()
    if spec != "byte" and not path.is_absolute() and not path.exists() and not is_remote(checkpoint):
        # A relative path saved in the config: try it next to the run directory too.
        for base in (checkpoint, *checkpoint.parents):
            if (base / spec).exists():
                return load_tokenizer(base / spec)
    return load_tokenizer(spec)


class _Streamer:
    """Decodes the generated ids so far and writes the new text; holds back a trailing U+FFFD
    (an incomplete UTF-8 sequence of a byte-level tokenizer) until it completes. ``block``: the
    steps of the first decode call (they arrive together, after its compilation)."""

    def __init__(self, tokenizer, out=None, block: int = 1):
        # sys.stdout is looked up per call, not bound at import (it may be redirected meanwhile).
        self.tok, self.out, self.ids, self.shown = tokenizer, out if out is not None else sys.stdout, [], 0
        self.block = block
        self.first = None       # when the first token was known (prefill + compilation done)
        self.second = None      # when the first decode call's tokens were (its compilation done)

    def __call__(self, step, tokens, active):
        now = time.perf_counter()
        self.first = now if self.first is None else self.first
        self.second = now if step == self.block else self.second
        if not active[0]:
            return
        self.ids.append(int(tokens[0]))
        text = self.tok.decode(self.ids)
        end = len(text.rstrip("\ufffd"))
        if end > self.shown:
            self.out.write(text[self.shown:end])
            self.out.flush()
            self.shown = end

    def finish(self):
        text = self.tok.decode(self.ids)
        self.out.write(text[self.shown:] + "\n")
        self.out.flush()


def run(args: argparse.Namespace) -> int:
    import jax

    from ttt_jax.infer.generate import GenerationConfig, generate
    from ttt_jax.infer.qttt import QTTTConfig
    from ttt_jax.checkpoint import load_model, read_checkpoint_config
    from ttt_jax.fs import as_path

    if args.prompt_file is not None:
        try:
            prompt = Path(args.prompt_file).read_text(encoding="utf-8")
        except IsADirectoryError:
            raise ValueError(f"--prompt-file {args.prompt_file} is a directory, expected a file") from None
        except OSError as e:
            raise ValueError(f"cannot read --prompt-file {args.prompt_file}: {e.strerror}") from None
        except UnicodeDecodeError as e:
            raise ValueError(f"--prompt-file {args.prompt_file}: invalid UTF-8 at byte {e.start}") from None
    else:
        prompt = args.prompt
    checkpoint = as_path(args.checkpoint, "CHECKPOINT")   # local, or a URL (gs://...)
    saved = read_checkpoint_config(checkpoint, args.step)
    vocab = saved.model.vocab_size
    if args.prompt_ids is not None:
        ids = list(args.prompt_ids)
        if max(ids) >= vocab:
            raise ValueError(f"--prompt-ids: token id {max(ids)} is outside the model's vocabulary of {vocab}")
        try:  # only for the default stop token: ids in, ids out
            tok = _resolve_tokenizer(args.tokenizer or saved.data.tokenizer, checkpoint)
        except (ValueError, OSError):
            tok = None
        if tok is not None and tok.vocab_size > vocab:
            tok = None
    else:
        tok = _resolve_tokenizer(args.tokenizer or saved.data.tokenizer, checkpoint)
        if tok.vocab_size > vocab:
            raise ValueError(f"the tokenizer has {tok.vocab_size} tokens but the model's vocabulary is "
                             f"{vocab}; pass the tokenizer the model was trained with (--tokenizer), "
                             "or give the prompt as token ids (--prompt-ids)")
        ids = ([] if args.no_bos else [tok.bos_id]) + tok.encode(prompt)
        if not ids:
            raise ValueError("the prompt is empty (and --no-bos was given)")
    if args.stop_token is not None:
        stops = tuple(args.stop_token)
    else:
        stops = (tok.eos_id,) if tok is not None else ()
    gen = GenerationConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                           top_k=args.top_k, top_p=args.top_p, seed=args.seed, stop_tokens=stops)
    gen.validate(saved.model.vocab_size)
    qttt = QTTTConfig(steps=args.qttt_steps, span=args.qttt_span, lr=args.qttt_lr,
                      layers=_layers(args.qttt_layers), rank=args.qttt_rank)
    qttt.validate(saved.model.n_layers)
    if args.prefill_block < 1:
        raise ValueError(f"--prefill-block must be >= 1, got {args.prefill_block}")
    if args.decode_block < 0:
        raise ValueError(f"--decode-block must be >= 0, got {args.decode_block}")
    logging.getLogger("absl").setLevel(logging.ERROR)   # orbax notes on items it does not read
    mesh = _mesh(args.mesh) if args.mesh else None
    cfg, model = load_model(checkpoint, step=args.step, overrides=tuple(args.override), mesh=mesh)
    block = max(args.decode_block, 1)
    stream = _IdStreamer(block=block) if args.prompt_ids is not None else _Streamer(tok, block=block)
    t0 = time.perf_counter()
    with (jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext()):
        result = generate(model, [ids], gen, on_token=stream, qttt=qttt, prefill_block=args.prefill_block,
                          decode_block=args.decode_block)
    t1 = time.perf_counter()
    stream.finish()
    n = len(result.tokens[0])
    first = (stream.first or t1) - t0
    # The rate after the first decode call (its compilation): tokens of the later calls / their time.
    later = n - 1 - stream.block
    rate = f", then {later / (t1 - stream.second):.1f} tokens/s" if later > 0 and stream.second else ""
    msg = (f"[{len(ids)} prompt tokens, {n} generated ({result.stop_reasons[0]}); first token after "
           f"{first:.2f} s (prefill{' + qTTT' if qttt.steps else ''} + compilation){rate}]")
    if result.qttt_losses is not None and len(result.qttt_losses):
        losses = result.qttt_losses[:, 0]
        msg += f" [qTTT span loss {losses[0]:.3f} -> {losses[-1]:.3f} over {len(losses)} steps]"
    print(msg, file=sys.stderr)
    return 0
