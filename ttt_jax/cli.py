"""The ``ttt-jax`` command.

::

    ttt-jax train  CONFIG [key=value ...]   train (or resume) a model; CONFIG is a YAML file or a preset
    ttt-jax config CONFIG [key=value ...]   print the resolved, validated config as YAML
    ttt-jax compile CONFIG --topology v5p-128 [key=value ...]   plan a TPU run (fit, memory, cost)

CONFIG is a path or the name of a preset in ``configs/`` (``tiny``, ``small``, ``qwen3_4b_shape``).
Overrides use dotted keys and YAML values: ``train.steps=200 model.ttt.layers=[0,2] train.peak_tflops=null``.
Errors a user can fix (bad key or value, data/checkpoint mismatch) print one ``error: ...`` line and
exit with status 2 (an unwritable output location or a failed checkpoint write included); a diverged
run (non-finite loss) exits with status 3; SIGTERM or SIGINT stops dispatching, finishes the step in
flight, writes a checkpoint of it and exits with status 4 (run the same command again to resume); a
second signal exits at once with one line and status 128 + the signal number.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

import yaml

from ttt_jax.config import Config, ConfigError, load_config, parse_overrides

EXIT_USAGE = 2       # bad config / arguments / data / checkpoint
EXIT_DIVERGED = 3    # training stopped on a non-finite loss
EXIT_INTERRUPTED = 4  # SIGTERM/SIGINT: the current step was checkpointed; the same command resumes

# Subcommands that live in their own modules. Each module defines ``add_arguments(parser)`` and
# ``run(args) -> int`` (an exit status); it is imported only when its command runs or `--help` asks,
# so `ttt-jax config` never pays for transformers, matplotlib or a JAX backend.
_SUBCOMMANDS = {
    "generate": ("ttt_jax.infer.cli", "sample text from a trained or converted checkpoint"),
    "eval": ("ttt_jax.eval.cli", "sliding-window perplexity and synthetic long-context tasks"),
    "convert": ("ttt_jax.convert.cli", "Hugging Face safetensors <-> ttt-jax checkpoints"),
    "bench": ("ttt_jax.bench.cli", "speed and memory benchmarks"),
    "compile": ("ttt_jax.compile.cli", "AOT-compile a run for a TPU slice: memory, fit, cost estimate"),
}


def _subcommand_module(name: str):
    """The module implementing subcommand ``name``, or None while it is not part of this version."""
    import importlib

    module_name = _SUBCOMMANDS[name][0]
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name is not None and module_name.startswith(e.name):
            return None
        raise


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ttt-jax", description="In-Place Test-Time Training for Transformer LMs.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, help_ in (("train", "train or resume a model"), ("config", "print the resolved config as YAML")):
        sp = sub.add_parser(name, help=help_)
        sp.add_argument("config", metavar="CONFIG", help="YAML file or preset name (e.g. tiny)")
        sp.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    for name, (_, help_) in _SUBCOMMANDS.items():
        module = _subcommand_module(name)
        if module is None:
            sp = sub.add_parser(name, help=f"{help_} (not yet implemented)")
            sp.add_argument("args", nargs=argparse.REMAINDER)
        else:
            module.add_arguments(sub.add_parser(name, help=help_, description=help_))
    return p


def _summary(cfg: Config) -> str:
    m, d, t, tt = cfg.model, cfg.data, cfg.train, cfg.model.ttt
    ttt = (f"In-Place TTT on layers {list(tt.layer_ids(m.n_layers))} (chunk {tt.chunk_size}, lr {tt.lr}, "
           f"target {tt.target_source})" if tt.enabled else "In-Place TTT off")
    return "\n".join([
        f"model: {m.n_layers} layers, d_model {m.d_model}, {m.n_heads} heads / {m.n_kv_heads} kv "
        f"(head_dim {m.resolved_head_dim}), d_ff {m.d_ff}, vocab {m.vocab_size}, compute {m.compute_dtype}",
        f"       {ttt}",
        f"data:  {d.source} corpus, tokenizer {d.tokenizer}, batch {d.batch_size} x {d.seq_len} tokens",
        f"train: {t.steps} steps, lr {t.learning_rate:g} (warmup {t.warmup_steps}, cosine to "
        f"{t.min_lr_ratio:g}x), weight decay {t.weight_decay:g}, clip {t.grad_clip:g}, run dir {t.run_dir}",
    ])


def _load(config: str, overrides: Sequence[str], note=print) -> Config:
    """:func:`load_config`, except that ``train.steps=N`` below the file's warmup (and without a
    ``train.warmup_steps`` override) clamps the warmup to ``N`` with a one-line note: a short run of
    a preset needs no second override."""
    try:
        return load_config(config, overrides)
    except ConfigError as e:
        train = parse_overrides(overrides).get("train", {})
        if not isinstance(train, dict) or "steps" not in train or "warmup_steps" in train:
            raise
        try:
            rest = [o for o in overrides if o.split("=", 1)[0].strip() != "train.steps"]
            file_warmup = load_config(config, rest).train.warmup_steps
            steps = load_config(config, [*overrides, "train.warmup_steps=0"]).train.steps
        except ConfigError:
            raise e from None
        if file_warmup <= steps:
            raise
        note(f"note: train.warmup_steps {file_warmup} clamped to train.steps={steps}")
        return load_config(config, [*overrides, f"train.warmup_steps={steps}"])


def _check_init_from(cfg: Config) -> None:
    """A ``train.init_from`` that does not exist (local or a URL) is one line before anything
    starts (the run directory and its checkpoints are checked by the trainer,
    :func:`ttt_jax.fs.ensure_writable`)."""
    from ttt_jax.fs import as_path

    if cfg.train.init_from and not as_path(cfg.train.init_from, "train.init_from").exists():
        raise ValueError(f"train.init_from {cfg.train.init_from!r} does not exist")


def _cmd_config(cfg: Config) -> int:
    sys.stdout.write(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    return 0


def _cmd_train(cfg: Config) -> int:
    import jax  # deferred: `ttt-jax config` and `--help` should not pay for initialising JAX

    from ttt_jax.parallel.mesh import maybe_initialize_distributed
    from ttt_jax.platform import start_backends
    from ttt_jax.train import NonFiniteLossError, TrainingInterrupted, train

    # Before any other JAX call: joins the other processes when a multi-host launcher started us
    # (no-op on one host).
    maybe_initialize_distributed()
    start_backends()
    main_process = jax.process_index() == 0
    say = print if main_process else (lambda *a, **k: None)
    _check_init_from(cfg)
    say(_summary(cfg), flush=True)
    devices = jax.devices()
    say(f"devices: {len(devices)} x {devices[0].device_kind} ({devices[0].platform}), "
        f"{jax.process_count()} process(es)", flush=True)
    try:
        result = train(cfg)
    except NonFiniteLossError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_DIVERGED
    except TrainingInterrupted as e:
        print(f"interrupted: {e}", file=sys.stderr)
        return EXIT_INTERRUPTED
    if result.val_losses:
        curve = ", ".join(f"{s}: {v:.3f}" for s, v in result.val_losses)
        say(f"validation loss (nats/token) by step: {curve}")
        say(f"final validation loss: {result.val_losses[-1][1]:.4f} at step {result.val_losses[-1][0]}")
    if result.train_loss is not None:
        say(f"last train loss: {result.train_loss:.4f}")
    tb = f", TensorBoard in {result.run_dir / 'tensorboard'}" if cfg.train.tensorboard else ""
    say(f"outputs: {result.run_dir}/ (checkpoints in {result.checkpoint_dir}, metrics in "
        f"{result.metrics_path}{tb}, config in {result.run_dir / 'config.yaml'})")
    return 0


def _one_line_warnings() -> None:
    """Print the project's own warnings (a checkpoint skipped, ...) as one ``warning: ...`` line."""
    import warnings

    previous = warnings.formatwarning
    if getattr(previous, "_ttt_jax", False):
        return

    def formatwarning(message, category, filename, lineno, line=None):
        if category.__module__.startswith("ttt_jax."):
            return f"warning: {message}\n"
        return previous(message, category, filename, lineno, line)

    formatwarning._ttt_jax = True
    warnings.formatwarning = formatwarning


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``ttt-jax`` console script; returns the exit status."""
    _one_line_warnings()
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    # `ttt-jax compile CONFIG --topology v5p-32 key=value ...`: overrides may follow the options.
    if extra and getattr(args, "overrides", None) is not None and all(
            "=" in x and not x.startswith("-") for x in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command in _SUBCOMMANDS:
        module = _subcommand_module(args.command)
        if module is None:
            print(f"error: `ttt-jax {args.command}` ({_SUBCOMMANDS[args.command][1]}) is not yet "
                  "implemented in this version; see README", file=sys.stderr)
            return EXIT_USAGE
        try:
            if args.command != "compile":   # compile loads libtpu's compiler itself
                from ttt_jax.platform import start_backends

                start_backends()
            return module.run(args)
        except (ConfigError, ValueError, OSError) as e:  # OSError: a path that cannot be read/written
            print(f"error: {e}", file=sys.stderr)
            return EXIT_USAGE
    try:
        cfg = _load(args.config, args.overrides, note=lambda m: print(m, file=sys.stderr))
        if args.command == "config":
            return _cmd_config(cfg)
        return _cmd_train(cfg)
    except (ConfigError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
