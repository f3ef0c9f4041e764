"""The training loop: ``train(cfg) -> TrainResult``.

One run lives in ``train.run_dir``::

    config.yaml          the resolved config of the latest start
    metrics.jsonl        one JSON object per logged train step and per evaluation
    tensorboard/         TensorBoard event files (train.tensorboard)
    checkpoints/<step>/  Orbax checkpoints (train.checkpoint_every, and at the end)

Determinism: parameters are initialised from ``train.seed``, batches come from ``data.seed``; with
``train.resume`` a run that finds a checkpoint restores the model, the optimizer (moments and step,
hence the schedule) and the data-iterator position, so stopping at step k and resuming to N gives
bitwise the parameters of one uninterrupted run to N (same devices and mesh; on GPUs only with
``XLA_FLAGS=--xla_gpu_deterministic_ops=true``, since their scatter reductions are otherwise
non-deterministic). ``train.stop_after`` stops a run early without changing its schedule.

``train.run_dir`` may be a URL (``gs://bucket/run``, any scheme etils.epath knows): every file of
the run goes through :mod:`ttt_jax.fs` -- Orbax writes the checkpoints there directly, the metrics
and TensorBoard files are staged locally and copied up at each checkpoint and at the end
(:class:`~ttt_jax.train.metrics.MetricsWriter`), and the free-space checks are skipped.

Faults (README "Guarantees", docs/guarantees.md): the run directory and its checkpoints/ are
checked writable before any compute (:func:`ttt_jax.fs.ensure_writable`). One step is in flight at
a time, so SIGTERM/SIGINT stop dispatching at once: the step in flight finishes and is checkpointed
(:class:`TrainingInterrupted`); a second signal exits at once with one line. On resume, unfinished
saves are removed and corrupt checkpoints moved aside with a warning, and the newest intact one is
restored (:mod:`ttt_jax.checkpoint`); ``metrics.jsonl`` is cut back to its step. Too little disk
space is an error before training and before every save, and a background save that fails is
reported at the next step boundary naming its step, path and OS error. A step with a non-finite
loss or gradient norm is not applied by the jitted step and handled by ``train.on_nonfinite``
(skip, counted, up to ``train.max_nonfinite_steps``, and at once when the parameters themselves
are non-finite; or stop), and no checkpoint is written right after a skipped update or of a state
holding NaN/inf.

Parallelism (``mesh``): the batch is split over ``data`` x ``fsdp``; parameters and Adam moments
are sharded by the logical-axis rules (``embed`` over ``fsdp``, ``vocab`` / ``heads`` / ``kv_heads``
/ ``mlp`` over ``tensor``; :mod:`ttt_jax.sharding`), created directly in their shardings and
checkpointed shard by shard. A checkpoint restores onto any mesh (Orbax reshards); the run then
continues with the same values up to fp32 reduction order.

(Over the ~400-line guide: the loop, ``_train``, is one function because its resume, evaluation,
checkpoint, non-finite and stop paths share the loop's state: the step, the steps saved, the
pending metrics and the timing interval. How a run stops early lives in :mod:`ttt_jax.train.stop`.)
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import time
from typing import Any, Callable, Optional

import jax
import numpy as np
import yaml
from flax import nnx

from ttt_jax import fs, sharding
from ttt_jax.config import Config, ModelConfig, RuntimeConfig, TrainConfig
from ttt_jax.data import check_data, load_tokenizer, make_batches
from ttt_jax.models.flops import flops_per_token
from ttt_jax.models.lm import CausalLM, check_tokens, count_params
from ttt_jax.checkpoint import Checkpointer, CheckpointCorruptError, NonFiniteStateError, state_nbytes
from ttt_jax.train.metrics import MetricsWriter, peak_device_memory_gib, peak_tflops_per_device, throughput
from ttt_jax.train.optim import learning_rate_schedule, make_optimizer, optimizer_fields
from ttt_jax.train.stop import NonFiniteLossError, StopSignals, TrainingInterrupted
from ttt_jax.train.warm_start import restore_model_params
from ttt_jax.train.steps import jit_eval_step, jit_train_step, make_eval_step, make_train_step


@dataclasses.dataclass
class TrainResult:
    """What a finished :func:`train` call did.

    ``val_losses``: ``[(step, mean validation NLL per token)]`` in order, this call's evaluations.
    """

    step: int
    train_loss: Optional[float]
    val_losses: list[tuple[int, float]]
    run_dir: fs.AnyPath          # a local Path, or an etils.epath.Path for a URL
    param_count: int
    checkpoint_dir: fs.AnyPath
    metrics_path: fs.AnyPath
    model: Any = dataclasses.field(default=None, repr=False)  # the trained CausalLM (final state)
    nonfinite_skipped: int = 0   # updates skipped for a non-finite loss/gradient, over the whole run


def preflight(cfg: Config, tokenizer: Any) -> None:
    """Checks a user can fail before any compute (``ValueError`` naming the fix).

    The config's own validation already covers TTT chunk layout (``data.chunk_align`` with a
    ``seq_len`` that is not a multiple of ``model.ttt.chunk_size``) and ``seq_len > max_seq_len``.
    """
    cfg.validate()
    ttt = cfg.model.ttt
    if ttt.enabled and ttt.layer_ids(cfg.model.n_layers) and cfg.data.seq_len <= ttt.chunk_size:
        # One chunk per row: apply-then-update never applies an update, so the TTT parameters
        # would get no gradient and the run would silently train a model without TTT.
        raise ValueError(
            f"data.seq_len={cfg.data.seq_len} is not longer than model.ttt.chunk_size={ttt.chunk_size}: "
            "every training row would be a single TTT chunk and no fast-weight update would ever be "
            "used; lower model.ttt.chunk_size (e.g. to data.seq_len/4), raise data.seq_len, or set "
            "model.ttt.enabled=false")
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise ValueError(
            f"the tokenizer ({cfg.data.tokenizer!r}) has vocab_size={tokenizer.vocab_size} but "
            f"model.vocab_size={cfg.model.vocab_size}: token ids would fall outside the embedding; "
            f"set model.vocab_size >= {tokenizer.vocab_size}")


@jax.jit
def _all_finite(tree: Any) -> jax.Array:
    """Whether every floating-point array of ``tree`` is finite (one scalar reaches the host)."""
    leaves = [x for x in jax.tree.leaves(tree) if jax.numpy.issubdtype(x.dtype, jax.numpy.inexact)]
    return jax.numpy.all(jax.numpy.stack([jax.numpy.all(jax.numpy.isfinite(x)) for x in leaves]))


def _check_batch(batch: dict[str, np.ndarray], vocab_size: int) -> None:
    check_tokens(batch["inputs"], vocab_size)
    check_tokens(batch["targets"], vocab_size)


class _Log:
    """Console messages on process 0, routed through the progress bar when one is shown."""

    def __init__(self, log: Optional[Callable[[str], None]]):
        self._log = log
        self.writer: Optional[MetricsWriter] = None

    def __call__(self, msg: str) -> None:
        if jax.process_index() != 0:
            return
        if self._log is not None:
            self._log(msg)
        elif self.writer is not None:
            self.writer.message(msg)
        else:
            print(msg, flush=True)


@dataclasses.dataclass(frozen=True)
class _Program:
    """Graph definitions, shardings and the jitted init/train/eval functions of one setup."""

    model_def: Any
    opt_def: Any
    model_sh: Any
    opt_sh: Any
    batch_sh: Any
    scalar_sh: Any
    init: Callable[[], Any]
    step: Callable[..., Any]
    eval: Callable[..., Any]


@functools.lru_cache(maxsize=4)
def _program(model_cfg: ModelConfig, runtime: RuntimeConfig, seed: int, opt_fields: tuple,
             mesh: jax.sharding.Mesh) -> _Program:
    """Build (once per process for a given setup) the jitted functions of a run.

    Cached so that calling :func:`train` again with the same model, runtime, seed, optimizer settings and
    mesh -- a resumed run, a sweep over data or run dirs, the test-suite -- reuses the compiled
    executables instead of recompiling them (XLA compilation dominates short runs on CPU).
    """
    tcfg = TrainConfig(**dict(opt_fields))
    tx = make_optimizer(tcfg)

    def build():
        model = CausalLM(model_cfg, runtime=runtime, rngs=nnx.Rngs(seed))
        return model, nnx.Optimizer(model, tx, wrt=nnx.Param)

    abs_model, abs_opt = nnx.eval_shape(build)
    model_def, abs_model_state = nnx.split(abs_model)
    opt_def, abs_opt_state = nnx.split(abs_opt)
    # Parameters and Adam moments (which inherit their parameter's logical axis names) are sharded
    # by the logical rules (embed -> fsdp; vocab/heads/kv_heads/mlp -> tensor); counters, RNG keys
    # replicated. Model first, so that a mesh that does not divide a shape names the parameter.
    model_sh = sharding.state_shardings(abs_model_state, mesh)
    opt_sh = sharding.state_shardings(abs_opt_state, mesh,
                                      zero_axes=sharding.ZERO_AXES if tcfg.shard_optimizer else ())
    batch_sh, scalar_sh = sharding.batch_sharding(mesh), sharding.replicated(mesh)

    def init():
        model, opt = build()
        return nnx.state(model), nnx.state(opt)

    # A jitted init with out_shardings creates every array directly in its sharding, so a large
    # model is never materialised whole on one device.
    init = jax.jit(init, out_shardings=(model_sh, opt_sh))
    loss_kw = {"loss_chunk": runtime.loss_chunk, "loss_groups": mesh.shape.get("context", 1)}
    step = jit_train_step(make_train_step(model_def, opt_def, learning_rate_schedule(tcfg), **loss_kw),
                          model_sh, opt_sh, batch_sh, scalar_sh)
    eval_ = jit_eval_step(make_eval_step(model_def, **loss_kw), model_sh, batch_sh, scalar_sh)
    return _Program(model_def, opt_def, model_sh, opt_sh, batch_sh, scalar_sh, init, step, eval_)


def train_program(cfg: Config, mesh: jax.sharding.Mesh) -> _Program:
    """The jitted init/train/eval functions :func:`train` runs for ``cfg`` on ``mesh``. Nothing is
    traced or compiled yet: ``ttt-jax compile`` lowers ``.step`` with ``jax.ShapeDtypeStruct``
    arguments (``jax.eval_shape(.init)``) for a mesh of TPU devices described on any host."""
    return _program(cfg.model, cfg.runtime, cfg.train.seed, optimizer_fields(cfg.train), mesh)


def _eval(eval_fn, model_state, batches, batch_sh, layout: str = "contiguous") -> float:
    """Mean NLL per token over ``batches`` (token-weighted across batches)."""
    total, count = 0.0, 0.0
    for b in batches:
        nll, n = eval_fn(model_state, sharding.put_batch(b, batch_sh, layout))
        total, count = total + nll, count + n   # device scalars: one sync at the end
    total, count = jax.device_get((total, count))
    return float(total) / max(float(count), 1.0)


class _Interval:
    """Step metrics not yet fetched from the device, and the throughput timer.

    Fetching blocks on the device, so it happens only at log/eval/checkpoint boundaries; every
    fetched step is checked for a finite loss before anything is written.
    """

    def __init__(self, start_step: int):
        self.pending: list[tuple[int, dict[str, jax.Array]]] = []
        self.restart(start_step)

    def restart(self, step: int) -> None:
        self.t0, self.step0 = time.perf_counter(), step

    def fetch(self) -> tuple[list[int], list[dict[str, float]]]:
        steps = [s for s, _ in self.pending]
        values = [{k: float(v) for k, v in m.items()} for m in jax.device_get([m for _, m in self.pending])]
        self.pending.clear()
        return steps, values


def train(cfg: Config, *, log: Optional[Callable[[str], None]] = None) -> TrainResult:
    """Train (or resume training) the model described by ``cfg``; see the module docstring.

    Args:
      cfg: a validated :class:`~ttt_jax.config.Config`.
      log: receives console messages (default: print on process 0, above the progress bar).
    Raises:
      ValueError: a config / data / checkpoint problem, found before any training step.
      NonFiniteLossError: the loss diverged (see ``train.on_nonfinite``); the run stops without
        checkpointing the bad state.
      TrainingInterrupted: SIGTERM/SIGINT; the current step was finished and checkpointed.
      CheckpointWriteError: too little disk space for a checkpoint (checked before training and
        before every save) or the writer found the disk full (an ``OSError`` and a ``ValueError``).
    """
    with contextlib.ExitStack() as stack:
        return _train(cfg, _Log(log), stack)


def check_batch_divisible(batch_size: int, mesh: jax.sharding.Mesh) -> None:
    """Raise a ``ValueError`` unless the global ``batch_size`` (``data.batch_size`` per process times
    the number of processes) splits evenly over the data-parallel axes."""
    dp = sharding.data_parallel_size(mesh)
    if batch_size % dp:
        raise ValueError(
            f"data.batch_size={batch_size} (global) is not divisible by the data-parallel size {dp} "
            f"(mesh.data={mesh.shape['data']} x mesh.fsdp={mesh.shape['fsdp']}); use a batch size "
            f"that is a multiple of {dp} or set mesh.data to a divisor of {batch_size}")


def _train(cfg: Config, say: _Log, stack: contextlib.ExitStack) -> TrainResult:
    tcfg = cfg.train
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    preflight(cfg, tokenizer)
    # Every output location can be written (one line naming the path otherwise), before the
    # checkpoint directory is opened and before any data is read or anything is computed.
    run_dir = fs.ensure_writable(tcfg.run_dir, "run directory (train.run_dir)", urls=True)
    fs.ensure_writable(run_dir / "checkpoints", "checkpoint directory", urls=True)
    mesh = sharding.make_mesh(cfg.mesh)
    ttt_on = bool(cfg.model.ttt.layer_ids(cfg.model.n_layers))
    sharding.check_supported(mesh, cfg.data.seq_len, cfg.model.ttt.chunk_size if ttt_on else None,
                             cfg.runtime.context.layout)
    global_batch = cfg.data.batch_size * jax.process_count()  # data.batch_size is per process
    check_batch_divisible(global_batch, mesh)
    # Shape-only: the parameter shardings are checked against the mesh (ValueError naming the
    # parameter) before any data is read or anything is computed.
    prog = train_program(cfg, mesh)
    is_main = jax.process_index() == 0
    if cfg.data.check:  # every record the run will read, before anything is written or computed
        check_data(cfg.data, progress=tcfg.progress and is_main, log=say)

    # Opening the directory removes saves a killed process left unfinished (with a warning).
    ckpt = Checkpointer(run_dir / "checkpoints", keep=tcfg.keep_checkpoints,
                        warn=lambda msg: say(f"warning: {msg}"))
    stack.callback(ckpt.close)  # waits for pending saves, also when an error ends the run
    existing = ckpt.all_steps()
    if existing and not tcfg.resume:
        raise ValueError(
            f"{ckpt.directory} already holds checkpoints (latest step {existing[-1]}) and train.resume=false; "
            "set train.resume=true to continue that run, or choose a new train.run_dir")
    # Another model/data config: ValueError naming keys. Steps whose records cannot be read are
    # moved aside with a warning (their arrays are verified when restored, below).
    latest = ckpt.latest_readable_step(cfg.to_dict()) if existing else None
    # A full disk is found now, not after the first checkpoint interval (shape-only size).
    abstract_state = jax.eval_shape(prog.init)
    ckpt.check_free_space(state_nbytes(abstract_state), len(jax.tree.leaves(abstract_state)))
    chunk = cfg.model.ttt.chunk_size if cfg.data.chunk_align else None

    # Data first: the validation batches are checked (token ids < vocab) before any compute.
    train_it = make_batches(cfg.data, "train", tokenizer=tokenizer, chunk_size=chunk)
    val_batches = list(itertools.islice(
        make_batches(cfg.data, "validation", tokenizer=tokenizer, chunk_size=chunk), tcfg.eval_batches))
    if not val_batches:
        raise ValueError("the validation split is empty; raise data.validation_fraction or use more documents")
    for b in val_batches:
        _check_batch(b, cfg.model.vocab_size)

    model_state, opt_state = prog.init()  # created sharded (FSDP / tensor), never whole on one device
    # The checksum program of a save compiles now, in the background, beside the step's compile:
    # a signal before the first checkpoint then waits for the step in flight only.
    ckpt.prepare(model_state, opt_state)
    # Entered after building the program: nnx.eval_shape under a mesh would read the parameters'
    # *logical* axis names as mesh axes (mapping them is the job of the rules in parallel/).
    stack.enter_context(jax.set_mesh(mesh))
    n_params = count_params(nnx.merge(prog.model_def, model_state))
    start = 0
    skipped_total = 0   # updates skipped for non-finite values, over the whole run
    # Checks array names and shapes first (ValueError naming them); a step that cannot be read back
    # intact (checksums) is moved aside with a warning and the next older one is tried.
    restored = ckpt.restore_latest(model_state, opt_state, cfg.to_dict()) if latest is not None else None
    if restored is None and ckpt.set_aside:
        raise CheckpointCorruptError(
            ckpt.directory, "no intact checkpoint is left: " + ", ".join(str(p) for p in ckpt.set_aside)
            + " were moved aside. Run the same command again to start from step 0, or use a new "
            "train.run_dir")
    if restored is not None:
        model_state, opt_state = restored.model_state, restored.opt_state
        train_it.set_state(restored.data_state)
        start = restored.step
        skipped_total = int(restored.meta.get("nonfinite_skipped", 0))
        say(f"resumed from {ckpt.directory / str(start)} (step {start})")
    elif tcfg.init_from:
        # Warm start (continual training): the model's parameters only, in their shardings.
        model_state = restore_model_params(tcfg.init_from, model_state, cfg, log=say)
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        fs.write_text(run_dir / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))

    tokens_per_step = global_batch * cfg.data.seq_len
    fpt = flops_per_token(cfg.model, cfg.data.seq_len)
    peak = peak_tflops_per_device(jax.devices()[0].device_kind, tcfg.peak_tflops)
    say(f"parameters: {n_params:,}; {fpt / 1e6:.1f} MFLOP/token (train); mesh "
        + " x ".join(f"{a}={n}" for a, n in mesh.shape.items())
        + f" on {mesh.size} x {jax.devices()[0].device_kind}; run dir {run_dir}")

    writer = stack.enter_context(MetricsWriter(run_dir, total_steps=tcfg.steps, initial_step=start,
                                               tensorboard=tcfg.tensorboard, progress=tcfg.progress,
                                               is_main=is_main))
    say.writer = writer
    val_losses: list[tuple[int, float]] = []
    last_loss: Optional[float] = None
    last_update_skipped = False
    interval = _Interval(start)

    def last_good() -> str:
        ckpt.wait()
        good = ckpt.latest_step()
        return (f"Last good checkpoint: {ckpt.directory / str(good)} (step {good}). " if good is not None
                else "No checkpoint was written. ")

    def evaluate(step: int) -> None:
        loss = _eval(prog.eval, model_state, val_batches, prog.batch_sh, cfg.runtime.context.layout)
        val_losses.append((step, loss))
        writer.write({"kind": "eval", "step": step, "val_loss": loss})
        say(f"step {step}: validation loss {loss:.4f}")

    def flush(step: int) -> None:
        """Fetch pending step metrics (blocks), apply the non-finite policy, write one train record."""
        nonlocal last_loss, skipped_total, last_update_skipped
        if not interval.pending:
            return
        steps, values = interval.fetch()
        now = time.perf_counter()
        for s, m in zip(steps, values):
            if not m["skipped"]:
                continue
            # The step program did not apply this update (non-finite loss or gradient norm).
            writer.write({"kind": "train", "step": s, **m})
            if tcfg.on_nonfinite == "stop":
                raise NonFiniteLossError(
                    f"non-finite training loss at step {s} (loss={m['loss']}, grad_norm={m['grad_norm']}); "
                    "stopped without saving this state (train.on_nonfinite=stop). " + last_good()
                    + "Lower train.learning_rate or raise train.warmup_steps, then resume")
            skipped_total += 1
            if not _all_finite(model_state):
                # The update before this one overflowed the parameters themselves: every later
                # step is non-finite too, and skipping cannot recover.
                raise NonFiniteLossError(
                    f"non-finite training loss at step {s} (loss={m['loss']}, grad_norm={m['grad_norm']}) "
                    "and the parameters themselves hold NaN/inf, so skipping updates cannot recover; "
                    "stopped. " + last_good()
                    + "Lower train.learning_rate or raise train.warmup_steps, then resume")
            if skipped_total > tcfg.max_nonfinite_steps:
                raise NonFiniteLossError(
                    f"non-finite training loss at step {s} (loss={m['loss']}, grad_norm={m['grad_norm']}): "
                    f"{skipped_total} updates skipped, more than train.max_nonfinite_steps="
                    f"{tcfg.max_nonfinite_steps}; stopped. " + last_good()
                    + "Lower train.learning_rate or raise train.warmup_steps (or check the data), then resume")
            say(f"step {s}: non-finite loss ({m['loss']}) or gradient norm ({m['grad_norm']}); update "
                f"skipped ({skipped_total} of at most train.max_nonfinite_steps={tcfg.max_nonfinite_steps})")
        last_update_skipped = bool(values[-1]["skipped"])
        good = [m for m in values if not m["skipped"]]
        if good:
            last_loss = good[-1]["loss"]
        record = {"kind": "train", "step": step,
                  # mean over the interval's applied updates; the skipped ones are counted apart
                  "loss": sum(m["loss"] for m in good) / len(good) if good else float("nan"),
                  "steps_averaged": len(good), "steps_skipped": len(values) - len(good),
                  "grad_norm": values[-1]["grad_norm"], "lr": values[-1]["lr"],
                  "tokens_seen": step * tokens_per_step, "nonfinite_skipped": skipped_total}
        if step > interval.step0:
            record.update(throughput(step - interval.step0, now - interval.t0, tokens_per_step, fpt,
                                     mesh.size, peak))
        peak_mem = peak_device_memory_gib()
        if peak_mem is not None:
            record["peak_memory_gib"] = peak_mem
        writer.write(record)
        interval.restart(step)

    saved: list[int] = []

    def save(step: int) -> None:
        try:
            ckpt.save(step, model_state, opt_state, train_it.get_state(), cfg.to_dict(),
                      extra_meta={"nonfinite_skipped": skipped_total})
        except NonFiniteStateError as e:
            # Finite losses so far, but an update overflowed: never checkpoint it.
            raise NonFiniteLossError(f"{e}; not checkpointed. " + last_good()
                                     + "Lower train.learning_rate or raise train.warmup_steps, "
                                     "then resume") from e
        saved.append(step)
        writer.sync()   # the records up to a checkpoint are in the run directory with it

    def interrupt(step: int) -> None:
        if step not in saved and step > start:
            flush(step)
            save(step)
        ckpt.wait()
        latest = step if step in saved else ckpt.latest_step()
        checkpoint = ckpt.directory / str(latest) if latest is not None else ckpt.directory
        say(f"{stop.received}: checkpoint of step {step} written; stopping" if step in saved else
            f"{stop.received}: stopping before step {step + 1} (newest checkpoint: {checkpoint})")
        raise TrainingInterrupted(step, checkpoint, stop.received)

    end = tcfg.stop_after if tcfg.stop_after is not None else tcfg.steps
    stop = stack.enter_context(StopSignals(
        lambda: f"the newest complete checkpoint in {ckpt.directory} is kept"))
    if start == 0:
        evaluate(0)
    for step in range(start + 1, end + 1):
        if stop.received:
            # Arrived during the evaluation or the save of the previous step: that step is the
            # one to checkpoint (below, if it was not written yet).
            interrupt(step - 1)
        try:
            host_batch = next(train_it)
        except StopIteration:
            raise ValueError(f"the training data ran out at step {step}; add data or lower train.steps") from None
        _check_batch(host_batch, cfg.model.vocab_size)
        model_state, opt_state, metrics = prog.step(model_state, opt_state,
                                                  sharding.put_batch(host_batch, prog.batch_sh,
                                                                    cfg.runtime.context.layout))
        interval.pending.append((step, metrics))
        # One step in flight at a time: a signal then waits for this step only, not for every
        # step dispatched ahead of the device. (The host work of the next step is small next to a
        # step of a model worth training; the data pipeline prefetches in its own threads.)
        jax.block_until_ready(metrics)
        if step == start + 1:
            # Exclude compilation from throughput: the clock starts when the first step is done.
            interval.restart(step)
        ckpt.check()   # a background save that failed is reported now, naming its step
        is_last = step == end
        if step % tcfg.log_every == 0 or is_last:
            flush(step)
        if (step % tcfg.eval_every == 0 or is_last) and not stop.received:
            flush(step)
            evaluate(step)
            interval.restart(step)
        if step % tcfg.checkpoint_every == 0 or is_last or stop.received:
            flush(step)  # never checkpoint a state whose loss was not checked finite
            if last_update_skipped and not (is_last or stop.received):
                # The state is the last applied update's (finite), but its loss on the latest batch
                # was not: a periodic checkpoint waits, so that a diverging run cannot rotate the
                # last good checkpoint out (train.keep_checkpoints) before the limit stops it.
                say(f"step {step}: checkpoint deferred (the latest update was skipped as non-finite)")
            else:
                save(step)
            interval.restart(step)
        if stop.received and not is_last:
            interrupt(step)
    if start >= end:
        say(f"{run_dir} is already trained to step {start} (train.steps={tcfg.steps}, "
            f"train.stop_after={tcfg.stop_after}); raise train.steps to continue")
        evaluate(start)

    return TrainResult(step=max(start, end), train_loss=last_loss, val_losses=val_losses,
                       run_dir=run_dir, param_count=n_params, checkpoint_dir=ckpt.directory,
                       metrics_path=writer.jsonl_path, model=nnx.merge(prog.model_def, model_state),
                       nonfinite_skipped=skipped_total)
