"""The sections around the model: ``data:`` (corpus, tokenizer, packing), ``train:`` (optimizer,
schedule, checkpoints, logging) and ``mesh:`` (device mesh shape)."""

from __future__ import annotations

import dataclasses
from typing import Literal, Optional

from ttt_jax.config.base import check, resumable_field


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Corpus, tokenizer and packing. A checkpoint's data iterator position is tied to every field
    except those marked resumable."""

    source: Literal["stdlib", "text", "jsonl", "parquet"] = "stdlib"
    """``stdlib`` (the embedded default corpus: this Python's standard-library sources), ``text``
    (``paths``: files, directories or globs), ``jsonl`` (``paths`` + ``field``) or ``parquet``
    (``paths`` + ``column``)."""
    paths: tuple[str, ...] = ()
    """Files, directories or globs of the corpus (not for ``stdlib``)."""
    field: str = "text"
    """JSONL field holding the text."""
    column: str = "text"
    """Parquet column holding the text."""
    tokenizer: str = "byte"
    """``byte`` or the path of a Hugging Face ``tokenizer.json``."""
    seq_len: int = 512
    """Tokens per packed row."""
    batch_size: int = 8
    """Rows per step (global)."""
    chunk_align: bool = False
    """Start every document on a TTT chunk boundary (needs ``seq_len`` a multiple of the chunk)."""
    validation_fraction: float = 0.05
    """Fraction of the documents held out for validation."""
    max_documents: Optional[int] = None
    """Use at most this many documents (null: all)."""
    shuffle: bool = True
    """Shuffle the documents."""
    seed: int = 0
    """Seed of the shuffle and split."""
    worker_count: int = resumable_field(0)
    """Background data workers (0: in the training process)."""
    on_error: Literal["raise", "skip"] = resumable_field("raise")
    """A malformed record (bad UTF-8, invalid JSON line, missing field, unreadable Parquet):
    ``raise`` an error naming file and line/row, or ``skip`` it (counted, with a warning)."""
    check: bool = resumable_field(True)
    """Before the first step, read every record the run will use once and apply ``on_error`` then
    (:mod:`ttt_jax.data.check`; linear in the data, with a progress bar), so malformed data fails
    the run before any compute; ``false`` skips that pass."""

    def validate(self) -> None:
        check(self.seq_len >= 2, "data.seq_len", self.seq_len, "an integer >= 2")
        check(self.batch_size >= 1, "data.batch_size", self.batch_size, "an integer >= 1")
        check(0.0 < self.validation_fraction < 1.0, "data.validation_fraction",
              self.validation_fraction, "a float in (0, 1)")
        check(self.source == "stdlib" or len(self.paths) > 0, "data.paths", list(self.paths),
              f"at least one file, directory or glob for data.source={self.source!r}")
        check(self.max_documents is None or self.max_documents >= 2, "data.max_documents",
              self.max_documents, "null or an integer >= 2")
        check(self.worker_count >= 0, "data.worker_count", self.worker_count, "an integer >= 0")
        check(self.on_error in ("raise", "skip"), "data.on_error", self.on_error, "'raise' or 'skip'")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimizer, schedule, checkpoints and logging."""

    steps: int = 1000
    """Total optimizer steps (defines the schedule)."""
    learning_rate: float = 3e-4
    """Peak learning rate (AdamW)."""
    min_lr_ratio: float = 0.1
    """Final learning rate of the cosine decay, as a fraction of the peak."""
    warmup_steps: int = 100
    """Linear warmup steps."""
    weight_decay: float = 0.1
    """AdamW weight decay."""
    b1: float = 0.9
    """Adam beta1."""
    b2: float = 0.95
    """Adam beta2."""
    eps: float = 1e-8
    """Adam epsilon."""
    grad_clip: float = 1.0
    """Global gradient-norm clip (0: off)."""
    seed: int = 0
    """Seed of the parameter initialisation."""
    run_dir: str = "runs/default"
    """Directory of the run: checkpoints, metrics, config. A local path or a URL (``gs://bucket/run``)."""
    log_every: int = 10
    """Steps between log lines and metric records."""
    eval_every: int = 200
    """Steps between validation evaluations."""
    eval_batches: int = 8
    """Validation batches per evaluation."""
    checkpoint_every: int = 200
    """Steps between checkpoints."""
    keep_checkpoints: int = 3
    """Checkpoints kept (the oldest is deleted)."""
    resume: bool = True
    """Resume from the newest checkpoint in ``run_dir``."""
    progress: bool = True
    """Show a progress bar."""
    tensorboard: bool = True
    """Write TensorBoard event files."""
    peak_tflops: Optional[float] = None
    """The device's peak for MFU (null: looked up)."""
    stop_after: Optional[int] = None
    """End this invocation after that many total steps (with a checkpoint) while the schedule stays
    defined by ``steps``: a long run split over time-limited jobs resumes exactly."""
    on_nonfinite: Literal["skip", "stop"] = "skip"
    """A step with a NaN/inf loss or gradient norm: ``skip`` its update (parameters, moments and
    step counter unchanged; the batch is consumed; the run stops after more than
    ``max_nonfinite_steps`` skips), or ``stop`` at once. No checkpoint is written right after a
    skipped update."""
    max_nonfinite_steps: int = 10
    """Skipped updates tolerated in total (``on_nonfinite=skip``)."""
    init_from: Optional[str] = None
    """Warm start: a fresh run takes its initial parameters from this checkpoint (a converted
    Hugging Face model or any run); optimizer, step and data start fresh; In-Place TTT parameters
    it lacks start at their init. Ignored once ``run_dir`` holds a checkpoint (resuming). See
    :mod:`ttt_jax.train.warm_start`."""
    shard_optimizer: bool = False
    """ZeRO-1: split the Adam moments further over every mesh axis of size > 1 that replicates
    their parameter (``data``, ``context``); each device updates its share and the parameters are
    all-gathered. A memory option, not a speed one (benchmarks/history/2026-11-notes.md). Same values up to
    reduction order."""

    def validate(self) -> None:
        check(isinstance(self.shard_optimizer, bool), "train.shard_optimizer", self.shard_optimizer,
              "true or false")
        check(self.steps >= 1, "train.steps", self.steps, "an integer >= 1")
        check(self.learning_rate > 0, "train.learning_rate", self.learning_rate, "> 0")
        check(0.0 <= self.min_lr_ratio <= 1.0, "train.min_lr_ratio", self.min_lr_ratio, "in [0, 1]")
        check(0 <= self.warmup_steps <= self.steps, "train.warmup_steps", self.warmup_steps,
              f"in [0, train.steps={self.steps}]")
        check(self.weight_decay >= 0, "train.weight_decay", self.weight_decay, ">= 0")
        check(0 <= self.b1 < 1 and 0 <= self.b2 < 1, "train.b1/b2", (self.b1, self.b2), "in [0, 1)")
        check(self.grad_clip >= 0, "train.grad_clip", self.grad_clip, ">= 0 (0 disables clipping)")
        for key in ("log_every", "eval_every", "eval_batches", "checkpoint_every", "keep_checkpoints"):
            check(getattr(self, key) >= 1, f"train.{key}", getattr(self, key), "an integer >= 1")
        check(self.peak_tflops is None or self.peak_tflops > 0, "train.peak_tflops", self.peak_tflops,
              "null (look up the device) or a positive number")
        check(self.stop_after is None or 1 <= self.stop_after <= self.steps, "train.stop_after",
              self.stop_after, f"null or an integer in [1, train.steps={self.steps}]")
        check(self.on_nonfinite in ("skip", "stop"), "train.on_nonfinite", self.on_nonfinite,
              "'skip' or 'stop'")
        check(isinstance(self.max_nonfinite_steps, int) and self.max_nonfinite_steps >= 0,
              "train.max_nonfinite_steps", self.max_nonfinite_steps, "an integer >= 0")
        check(self.init_from is None or str(self.init_from).strip() != "", "train.init_from",
              self.init_from, "null or the path of a checkpoint (a converted model or a run directory)")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh shape. ``-1`` on one axis means "all remaining devices"."""

    data: int = -1
    """Data parallelism (batch split)."""
    fsdp: int = 1
    """Fully sharded data parallelism (parameters and batch split)."""
    tensor: int = 1
    """Tensor parallelism (heads / MLP split)."""
    context: int = 1
    """Context parallelism (sequence split; see ``runtime.context``)."""

    def validate(self) -> None:
        sizes = dataclasses.asdict(self)
        for k, v in sizes.items():
            check(v == -1 or v >= 1, f"mesh.{k}", v, "-1 (fill) or an integer >= 1")
        check(sum(v == -1 for v in sizes.values()) <= 1, "mesh", sizes, "at most one axis set to -1")
