"""Typed, validated configuration: YAML presets plus ``key=value`` overrides.

A run is described by one :class:`Config` made of four sections::

    model:  architecture (Qwen3/Llama-compatible) and the In-Place TTT settings (model.ttt.*)
    data:   corpus, tokenizer, sequence packing
    train:  optimizer, schedule, checkpoints, logging
    mesh:   device mesh shape (data, fsdp, tensor, context)

Presets live in ``configs/*.yaml``; any field can be overridden on the command line with dotted keys
(``train.steps=200 model.ttt.lr=1.0``). Every value is checked when the config is built, so a user's
mistake surfaces as a ``ValueError`` naming the field, before any compute.
"""

from __future__ import annotations

import dataclasses
import math
import difflib
import importlib.resources
import typing
from pathlib import Path
from typing import Any, Literal, Optional, Sequence

import yaml



def _preset_dir() -> Path:
    """The presets: the package ``ttt_jax.configs`` when installed (the wheel maps the top-level
    ``configs/`` folder there), else ``configs/`` beside this package (a source checkout)."""
    try:
        return Path(str(importlib.resources.files("ttt_jax.configs")))
    except ModuleNotFoundError:
        return Path(__file__).resolve().parents[1] / "configs"


CONFIG_DIR = _preset_dir()
# Upper bound on model.n_layers: validation and the layer-placement rules build per-layer lists.
MAX_LAYERS = 65536


class ConfigError(ValueError):
    """A configuration value a user supplied is invalid; the message names the key and the fix."""


# --------------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------------


def _layer_ids(cfg: Any, n_layers: int) -> tuple[int, ...]:
    """Layer indices of a per-layer feature with ``enabled``, explicit ``layers`` (or None) and
    ``start`` / ``every``: the explicit list when given, else every ``every``-th from ``start``."""
    if not cfg.enabled:
        return ()
    if cfg.layers is not None:
        return tuple(sorted(set(cfg.layers)))
    return tuple(range(cfg.start, n_layers, cfg.every))


@dataclasses.dataclass(frozen=True)
class TTTConfig:
    """In-Place TTT settings (DESIGN.md section 1).

    ``layers`` is either an explicit list of layer indices or ``None``, in which case TTT is on every
    ``every``-th layer starting at ``start`` (paper default: every 6th layer from 0).

    ``target`` chooses what the fast weights are trained towards: ``aligned`` (the paper's
    next-token-aligned target: the centred conv reads ``(K-1)//2`` future tokens of the chunk) or
    ``reconstruction`` (the ablation: the same conv with its future taps held at zero, so the target
    at a position is built from that token and earlier ones only). Same parameters, same compute.
    """

    enabled: bool = True
    layers: Optional[tuple[int, ...]] = None
    every: int = 6
    start: int = 0
    lr: float = 3.0
    chunk_size: int = 1024
    conv_kernel: int = 5
    target_source: Literal["embeddings", "hidden"] = "embeddings"
    target: Literal["aligned", "reconstruction"] = "aligned"
    clip_tau: Optional[float] = None
    impl: Literal["auto", "reference", "associative", "scan", "attention", "pallas"] = "auto"

    def validate(self, n_layers: int) -> None:
        _check(self.chunk_size >= 1, "model.ttt.chunk_size", self.chunk_size, "an integer >= 1")
        _check(self.conv_kernel >= 1 and self.conv_kernel % 2 == 1, "model.ttt.conv_kernel",
               self.conv_kernel, "an odd integer >= 1 (the conv is centred: (K-1)//2 past and future taps)")
        _check(self.every >= 1, "model.ttt.every", self.every, "an integer >= 1")
        _check(0 <= self.start, "model.ttt.start", self.start, "an integer >= 0")
        _check(self.target in ("aligned", "reconstruction"), "model.ttt.target", self.target,
               "'aligned' (next-token-aligned, the paper's) or 'reconstruction' (ablation)")
        _check(self.clip_tau is None or self.clip_tau > 0, "model.ttt.clip_tau", self.clip_tau,
               "null (off) or a positive float")
        if self.layers is not None:
            bad = [i for i in self.layers if not 0 <= i < n_layers]
            _check(not bad, "model.ttt.layers", list(self.layers),
                   f"layer indices in [0, {n_layers}) (model.n_layers={n_layers}); out of range: {bad}")

    def layer_ids(self, n_layers: int) -> tuple[int, ...]:
        """The layers whose MLP gets In-Place TTT (empty when disabled)."""
        return _layer_ids(self, n_layers)


@dataclasses.dataclass(frozen=True)
class TTTSeqConfig:
    """TTT-Linear / TTT-MLP sequence-mixing layers (Sun et al. 2024; ``ttt_jax.nn.ttt_seq``).

    Off by default. ``layers`` (explicit indices) or every ``every``-th layer from ``start`` get a
    TTT layer, which ``mode="replace"`` puts in place of self-attention and ``mode="beside"`` adds
    next to it (both read the same normed input; their outputs are summed, e.g. beside
    sliding-window attention). ``kind``: inner model ``linear`` or ``mlp`` (4x hidden, GELU).
    ``base_lr``: inner learning rate scale (null: 1.0 for linear, 0.1 for mlp, as published).
    ``mini_batch``: TTT mini-batch size. ``impl``: ``dual`` (fast) or ``reference`` (primal form).
    ``remat_group``: mini-batches per checkpointed group of the inner-loop scan (0 = about
    sqrt(number of mini-batches)). Not supported with context parallelism (``mesh.context > 1``):
    the layer is not affine in its state, so the sequence cannot be split without a sequential
    carry across devices.
    """

    enabled: bool = False
    kind: Literal["linear", "mlp"] = "linear"
    layers: Optional[tuple[int, ...]] = None
    every: int = 1
    start: int = 0
    mode: Literal["replace", "beside"] = "replace"
    mini_batch: int = 16
    base_lr: Optional[float] = None
    output_gate: bool = False
    impl: Literal["dual", "reference"] = "dual"
    remat_group: int = 0

    def validate(self, n_layers: int) -> None:
        _check(self.mini_batch >= 1, "model.ttt_seq.mini_batch", self.mini_batch, "an integer >= 1")
        _check(self.every >= 1, "model.ttt_seq.every", self.every, "an integer >= 1")
        _check(self.start >= 0, "model.ttt_seq.start", self.start, "an integer >= 0")
        _check(self.base_lr is None or self.base_lr > 0, "model.ttt_seq.base_lr", self.base_lr,
               "null (1.0 linear / 0.1 mlp) or a positive float")
        _check(self.remat_group >= 0, "model.ttt_seq.remat_group", self.remat_group,
               "0 (auto) or a positive integer")
        if self.layers is not None:
            bad = [i for i in self.layers if not 0 <= i < n_layers]
            _check(not bad, "model.ttt_seq.layers", list(self.layers),
                   f"layer indices in [0, {n_layers}) (model.n_layers={n_layers}); out of range: {bad}")

    @property
    def resolved_base_lr(self) -> float:
        if self.base_lr is not None:
            return float(self.base_lr)
        return 1.0 if self.kind == "linear" else 0.1

    def layer_ids(self, n_layers: int) -> tuple[int, ...]:
        """The layers with a TTT sequence layer (empty when disabled)."""
        return _layer_ids(self, n_layers)


@dataclasses.dataclass(frozen=True)
class E2EConfig:
    """TTT-E2E (end-to-end test-time training; ``ttt_jax.models.e2e``). Off by default.

    The SwiGLU MLPs (gate, up, down) of the last ``last_k`` blocks are fast weights, per sequence:
    the forward pass runs those blocks chunk by chunk (``chunk_size`` tokens), answers each chunk with
    the current weights, then takes one SGD step (``lr``) on the chunk's mean next-token loss, the
    gradient clipped to global norm ``grad_clip`` per sequence (0 = off). Training differentiates
    through these steps. The first blocks run once over the whole sequence; use a sliding-window
    backbone (``model.attention_window``) as published. The last ``last_k`` layers must be plain
    layers (no In-Place TTT, no ``ttt_seq``); ``model.scan_layers`` and ``mesh.context > 1`` are not
    supported. ``impl``: ``chunked`` (a checkpointed chunk scan with a carried KV window) or
    ``reference`` (a per-chunk loop recomputing the prefix; the test oracle, quadratic cost).
    """

    enabled: bool = False
    last_k: int = 1
    chunk_size: int = 1024
    lr: float = 1.0
    grad_clip: float = 1.0
    impl: Literal["chunked", "reference"] = "chunked"

    def validate(self, cfg: "ModelConfig") -> None:
        if not self.enabled:
            return
        n = cfg.n_layers
        _check(1 <= self.last_k <= n, "model.e2e.last_k", self.last_k, f"an integer in [1, {n}]")
        _check(self.chunk_size >= 1, "model.e2e.chunk_size", self.chunk_size, "an integer >= 1")
        _check(self.lr > 0, "model.e2e.lr", self.lr, "a positive float")
        _check(self.grad_clip >= 0, "model.e2e.grad_clip", self.grad_clip, ">= 0 (0 = off)")
        last = set(range(n - self.last_k, n))
        clash = sorted(last & (set(cfg.ttt.layer_ids(n)) | set(cfg.ttt_seq.layer_ids(n))))
        _check(not clash, "model.e2e.last_k", self.last_k,
               f"last layers without In-Place TTT or ttt_seq, but layers {clash} have them; set "
               "model.ttt.layers / model.ttt_seq.layers to avoid them (or model.ttt.enabled=false)")
        _check(not cfg.scan_layers, "model.scan_layers", cfg.scan_layers,
               "false with model.e2e.enabled=true (the E2E blocks run chunk by chunk)")


@dataclasses.dataclass(frozen=True)
class RopeScalingConfig:
    """RoPE frequency scaling of long-context checkpoints (``model.rope_scaling``), computed as
    transformers computes it (:mod:`ttt_jax.nn.rope`).

    ``type``: ``yarn`` (Qwen3 beyond its native 32k: ``factor``, ``original_max_position_embeddings``,
    ``beta_fast``/``beta_slow``, optional ``attention_factor`` or ``mscale``/``mscale_all_dim``,
    ``truncate``) or ``llama3`` (Llama 3.1+: ``factor``, ``low_freq_factor``, ``high_freq_factor``,
    ``original_max_position_embeddings``). Fields of the other type are ignored. Example (Qwen3 at
    128k): ``{type: yarn, factor: 4.0, original_max_position_embeddings: 32768}``.
    """

    type: Literal["yarn", "llama3"] = "yarn"
    factor: float = 1.0
    original_max_position_embeddings: int = 0
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: Optional[float] = None
    mscale: Optional[float] = None
    mscale_all_dim: Optional[float] = None
    truncate: bool = True
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0

    def validate(self) -> None:
        _check(self.type in ("yarn", "llama3"), "model.rope_scaling.type", self.type, "'yarn' or 'llama3'")
        _check(self.factor >= 1.0, "model.rope_scaling.factor", self.factor, "a number >= 1")
        _check(self.original_max_position_embeddings >= 1,
               "model.rope_scaling.original_max_position_embeddings",
               self.original_max_position_embeddings,
               "the checkpoint's pretraining context length (an integer >= 1)")
        if self.type == "yarn":
            _check(self.beta_fast > 0 and self.beta_slow > 0 and self.beta_fast >= self.beta_slow,
                   "model.rope_scaling.beta_fast/beta_slow", (self.beta_fast, self.beta_slow),
                   "positive numbers with beta_fast >= beta_slow")
            _check(self.attention_factor is None or self.attention_factor > 0,
                   "model.rope_scaling.attention_factor", self.attention_factor, "null or > 0")
        else:
            _check(0 < self.low_freq_factor < self.high_freq_factor,
                   "model.rope_scaling.low_freq_factor/high_freq_factor",
                   (self.low_freq_factor, self.high_freq_factor), "0 < low_freq_factor < high_freq_factor")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """A Qwen3/Llama-style decoder-only LM.

    ``attention_window`` > 0 makes every layer sliding-window (window = number of keys a query sees,
    itself included) unless ``full_attention_layers`` lists it; 0 means full causal attention everywhere.

    ``rope_scaling`` (default null: plain RoPE with base ``rope_theta``) selects the ``yarn`` or
    ``llama3`` frequency scaling of long-context checkpoints (:class:`RopeScalingConfig`).

    ``scan_layers`` stores the decoder layers' parameters stacked along a leading ``layers`` axis
    and runs them as the iterations of one ``lax.scan`` (``nnx.scan``; with ``remat`` every layer in
    it is checkpointed), instead of an unrolled Python loop. This bounds what XLA keeps alive across
    layers under ``remat`` (with the In-Place TTT op it otherwise holds extra buffers per TTT layer)
    and compiles once per period of layers. The layer structure must be periodic: with TTT the
    period is ``ttt.every`` (``ttt.start < ttt.every``, ``n_layers`` a multiple of ``ttt.every``; an
    explicit ``ttt.layers`` list must be evenly spaced in the same way), without it 1; the attention
    window of layer ``i`` must depend only on ``i % period``. A non-periodic structure is rejected
    when the model is built. The stacked parameter tree is described in :mod:`ttt_jax.models.lm`.

    ``context_layout`` is how a row is split over ``mesh.context`` devices (ignored without context
    parallelism). ``"contiguous"``: device ``i`` holds the ``i``-th ``T / n`` tokens; causal attention
    then gives the last device the most work. ``"zigzag"`` (load-balanced): the row is cut into
    ``2n`` segments and device ``i`` holds segments ``i`` and ``2n - 1 - i``, so every device does the
    same attention work; the trainer permutes each batch on the host (positions travel with it),
    the In-Place TTT scan still combines the segments' summaries in position order, and the loss is
    a sum over tokens, so results equal the contiguous layout's. Zigzag needs full attention on
    every layer (sliding-window attention is balanced already and uses the contiguous halo
    exchange) and ``T / (2n)`` a multiple of the TTT chunk size.

    Under context parallelism, ``context_attention`` picks how full causal layers see the other
    devices' keys/values: ``"ring"`` (``ppermute`` around the ring with an online softmax;
    ``O(T / n)`` memory) or ``"allgather"`` (one all-gather of K/V; ``O(T)`` memory). ``context_scan``
    picks the cross-device exclusive scan of the fast-weight summaries: ``"allgather"`` (one
    all-gather of the ``n`` summaries, combined locally) or ``"ppermute"`` (``log2 n`` rounds of
    neighbour exchanges; for many devices). Results are the same (tested); only speed and memory
    differ. ``context_exchange_dtype``: the dtype the summaries (``[B, F, D]`` per TTT layer and
    device) travel in; ``"bfloat16"`` halves the bytes, combined in float32 on arrival, at the cost
    of bf16 rounding of the carried-in state (close to, not equal to, the unsharded result;
    tested); ``"float32"`` (default) is exact. ``context_kernel`` picks the per-device attention compute under context parallelism:
    ``"fused"`` (one cuDNN flash-attention call per ring block -- the Pallas kernels where this
    JAX's private cuDNN functions are not as expected, see ``parallel/cudnn_blocks.py`` -- and one
    cuDNN call per device for sliding-window layers after the halo exchange; NVIDIA GPU, bf16/fp16;
    packed documents only in full-attention layers, by the Pallas blocks -- an error where it
    cannot run), ``"pallas"`` (as fused, with the Pallas flash
    kernels per ring block), ``"tpu"`` (splash / Pallas Mosaic blocks in the ring or all-gather and
    one splash call per device for sliding-window layers; segment ids everywhere; TPU, Pallas
    interpret mode elsewhere), ``"xla"`` (plain XLA blockwise attention: any backend, segment ids) or
    ``"auto"`` (``"tpu"`` when the program is built for TPU, else fused where it can run, XLA
    otherwise). ``context_halo`` picks how
    the fused path computes a sliding-window layer across devices: ``"single"`` (one cuDNN call
    over ``[halo | local]`` keys with ``window - 1`` zero query rows) or ``"split"`` (a local call
    and a small halo block merged by log-sum-exp, ``parallel/halo_attention.py``: no zero rows, and
    the halo exchange can overlap the local call). Same results (tested). On 4 x H100 (m1b,
    SWA + TTT, 4 x 32k) ``split`` was about 2% faster but raised peak memory from ~17 to 27-30 GiB:
    XLA then schedules the backward pass with four or five layers' recomputed activations live at
    once (benchmarks/README.md; ``remat_pinned`` removes that). That grows with the local length,
    so ``single`` is the default.

    ``remat_policy`` (with ``remat``): ``"full"`` keeps only each block's input and recomputes the
    rest in the backward pass; ``"save_exchanges"`` (default) also keeps the results of the block's
    cross-device exchanges under context parallelism (the In-Place TTT carried-in state,
    ``[B, F, D]`` fp32 per TTT layer, and the sliding-window halo keys/values, ``2 x [B, window - 1,
    KV, Dh]`` per layer) and, with ``context_halo="split"``, the halo block's output and
    log-sum-exp (``[B, window - 1, H, Dh]`` + ``[B, H, window - 1]`` per layer), so the
    recomputation repeats no collective and only work a single device has too: the TTT layers'
    forward chunk scan is not rerun for its summary, the halo block not at all. Same results
    (tested); without context parallelism the two are the same. On 4 x H100 (m1b, SWA + TTT, 4 x 32k) it made the step 2.5% faster for
    1-1.7 GiB more peak memory (benchmarks/README.md).

    ``remat_pinned`` (with ``remat``): the backward pass runs block by block. Two optimization
    barriers per block: its recomputation waits for the gradient of its output, and the gradient
    of its input is released only together with its parameter gradients. So the compiler cannot
    keep several blocks' recomputed activations live at once. Same results (tested). Meant for the
    GPU schedules where that happened (the split halo's and the 4-GPU strong row's peak memory,
    benchmarks/README.md: consumers run late). Measured there (m1b, 4 x 32k, split halo): peak
    memory 29.3 -> 14.6 GiB, step time +0.7% (before the saved halo block); the first barrier
    alone had changed nothing.
    """

    vocab_size: int = 259
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 2
    head_dim: Optional[int] = None
    d_ff: int = 768
    max_seq_len: int = 4096
    rope_theta: float = 10000.0
    rope_scaling: Optional[RopeScalingConfig] = None
    rms_norm_eps: float = 1e-6
    tie_embeddings: bool = True
    qk_norm: bool = True
    attention_window: int = 0
    full_attention_layers: tuple[int, ...] = ()
    attention_impl: Literal["auto", "xla", "cudnn", "pallas", "flash", "reference"] = "auto"
    initializer_range: float = 0.02
    param_dtype: Literal["float32", "bfloat16"] = "float32"
    compute_dtype: Literal["float32", "bfloat16"] = "bfloat16"
    remat: bool = False
    remat_policy: Literal["full", "save_exchanges"] = "save_exchanges"
    remat_pinned: bool = False
    scan_layers: bool = False
    context_layout: Literal["contiguous", "zigzag"] = "contiguous"
    context_attention: Literal["ring", "allgather"] = "ring"
    context_scan: Literal["allgather", "ppermute"] = "allgather"
    context_exchange_dtype: Literal["float32", "bfloat16"] = "float32"
    context_kernel: Literal["auto", "xla", "fused", "pallas", "tpu"] = "auto"
    context_halo: Literal["single", "split"] = "single"
    ttt: TTTConfig = dataclasses.field(default_factory=TTTConfig)
    ttt_seq: TTTSeqConfig = dataclasses.field(default_factory=TTTSeqConfig)
    e2e: E2EConfig = dataclasses.field(default_factory=E2EConfig)

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim if self.head_dim is not None else self.d_model // self.n_heads

    def layer_window(self, layer: int) -> int:
        """Sliding window of ``layer`` (0 = full causal attention)."""
        if self.attention_window > 0 and layer not in self.full_attention_layers:
            return self.attention_window
        return 0

    def validate(self) -> None:
        for key in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff", "max_seq_len"):
            v = getattr(self, key)
            _check(isinstance(v, int) and v >= 1, f"model.{key}", v, "an integer >= 1")
        # Layer lists below are built per layer; a bound keeps a typo from hanging validation.
        _check(self.n_layers <= MAX_LAYERS, "model.n_layers", self.n_layers, f"at most {MAX_LAYERS}")
        _check(self.n_heads % self.n_kv_heads == 0, "model.n_kv_heads", self.n_kv_heads,
               f"a divisor of model.n_heads={self.n_heads} (grouped-query attention)")
        if self.head_dim is None:
            _check(self.d_model % self.n_heads == 0, "model.head_dim", None,
                   f"set explicitly, since model.d_model={self.d_model} is not a multiple of "
                   f"model.n_heads={self.n_heads}")
        _check(self.resolved_head_dim % 2 == 0, "model.head_dim", self.resolved_head_dim,
               "an even integer (RoPE rotates pairs)" + (
                   "" if self.head_dim is not None else
                   f"; it is model.d_model={self.d_model} / model.n_heads={self.n_heads}: change "
                   "those or set model.head_dim"))
        _check(self.rope_theta > 0, "model.rope_theta", self.rope_theta, "a positive float")
        if self.rope_scaling is not None:
            self.rope_scaling.validate()
        _check(self.attention_window >= 0, "model.attention_window", self.attention_window,
               "0 (full attention) or a positive window length")
        _check(self.initializer_range > 0, "model.initializer_range", self.initializer_range, "> 0")
        bad = [i for i in self.full_attention_layers if not 0 <= i < self.n_layers]
        _check(not bad, "model.full_attention_layers", list(self.full_attention_layers),
               f"layer indices in [0, {self.n_layers})")
        _check(isinstance(self.scan_layers, bool), "model.scan_layers", self.scan_layers,
               "true or false")
        swa = [i for i in range(self.n_layers) if self.layer_window(i)]
        _check(self.context_layout == "contiguous" or not swa, "model.context_layout",
               self.context_layout, f"'contiguous' while layers {swa} use sliding-window attention "
               "(their halo exchange needs the contiguous layout; their work is balanced already)")
        self.ttt.validate(self.n_layers)
        self.ttt_seq.validate(self.n_layers)
        self.e2e.validate(self)


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Corpus, tokenizer and packing.

    ``source``: ``stdlib`` (the embedded default corpus: this Python's standard-library sources),
    ``text`` (``paths``: files, directories or globs), ``jsonl`` (``paths`` + ``field``) or
    ``parquet`` (``paths`` + ``column``). ``tokenizer``: ``byte`` or a path to a Hugging Face
    ``tokenizer.json``. ``on_error``: what a malformed record (bad UTF-8, invalid JSON line, missing
    field, unreadable Parquet) does: ``raise`` a ``ValueError`` naming file and line/row, or ``skip``
    it (counted, with a warning). ``check``: before the first step, read every record the run will
    use once and apply ``on_error`` then (:mod:`ttt_jax.data.check`; linear in the data, with a
    progress bar); ``false`` skips that pass.
    """

    source: Literal["stdlib", "text", "jsonl", "parquet"] = "stdlib"
    paths: tuple[str, ...] = ()
    field: str = "text"
    column: str = "text"
    tokenizer: str = "byte"
    seq_len: int = 512
    batch_size: int = 8
    chunk_align: bool = False
    validation_fraction: float = 0.05
    max_documents: Optional[int] = None
    shuffle: bool = True
    seed: int = 0
    worker_count: int = 0
    on_error: Literal["raise", "skip"] = "raise"
    check: bool = True

    def validate(self) -> None:
        _check(self.seq_len >= 2, "data.seq_len", self.seq_len, "an integer >= 2")
        _check(self.batch_size >= 1, "data.batch_size", self.batch_size, "an integer >= 1")
        _check(0.0 < self.validation_fraction < 1.0, "data.validation_fraction",
               self.validation_fraction, "a float in (0, 1)")
        _check(self.source == "stdlib" or len(self.paths) > 0, "data.paths", list(self.paths),
               f"at least one file, directory or glob for data.source={self.source!r}")
        _check(self.max_documents is None or self.max_documents >= 2, "data.max_documents",
               self.max_documents, "null or an integer >= 2")
        _check(self.worker_count >= 0, "data.worker_count", self.worker_count, "an integer >= 0")
        _check(self.on_error in ("raise", "skip"), "data.on_error", self.on_error, "'raise' or 'skip'")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimizer, schedule, checkpoints and logging.

    ``stop_after`` ends this invocation after that many total steps (with a checkpoint) while the
    schedule stays defined by ``steps``: a long run split over time-limited jobs resumes exactly.

    ``on_nonfinite``: what a step with a NaN/inf loss or gradient norm does. ``skip`` (default):
    its update is not applied (parameters, Adam moments and the optimizer's step counter stay as
    they were; the batch is consumed), the step is counted and logged, and the run stops once more
    than ``max_nonfinite_steps`` updates have been skipped in total. ``stop``: the run stops at the
    first one. Either way no checkpoint is written right after a skipped update, so the last good
    checkpoint stays intact.
    ``init_from``: warm start (continual training). A fresh run (no checkpoint in ``run_dir`` yet)
    takes its initial model parameters from this checkpoint -- a converted Hugging Face model
    (``ttt-jax convert hf``) or any run -- instead of a random init; optimizer, step and data start
    fresh. In-Place TTT parameters the checkpoint lacks start at their init. Ignored once ``run_dir``
    holds a checkpoint of its own (resuming). See :mod:`ttt_jax.train.warm_start`.
    ``loss_chunk``: the training and validation loss are computed from the final hidden states
    ``loss_chunk`` positions at a time (rematerialised), so the ``[B, T, V]`` fp32 logits never
    exist at once (at 32k tokens and a 152k vocabulary they alone are 20 GB); ``0`` computes them
    whole. The value is the same either way.
    ``shard_optimizer``: ZeRO-1. The Adam moments are split further over every mesh axis of size
    > 1 that replicates their parameter (``data``, ``context``), on the largest dimension those
    axes divide (a moment no dimension of which they divide keeps its parameter's sharding). Each
    device then updates only its share of the parameters, XLA all-gathers the updated parameters
    (and may turn the gradient all-reduce into a reduce-scatter), and the moments take 1/n of the
    memory. Same values up to reduction order. On 4 x H100 it saved 3.5 GiB per GPU and cost 1.2%
    of step time: the parameters' all-gather ends the step (benchmarks/README.md).
    """

    steps: int = 1000
    learning_rate: float = 3e-4
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    seed: int = 0
    run_dir: str = "runs/default"
    log_every: int = 10
    eval_every: int = 200
    eval_batches: int = 8
    checkpoint_every: int = 200
    keep_checkpoints: int = 3
    resume: bool = True
    progress: bool = True
    tensorboard: bool = True
    peak_tflops: Optional[float] = None
    stop_after: Optional[int] = None
    on_nonfinite: Literal["skip", "stop"] = "skip"
    max_nonfinite_steps: int = 10
    init_from: Optional[str] = None
    loss_chunk: int = 4096
    shard_optimizer: bool = False

    def validate(self) -> None:
        _check(isinstance(self.shard_optimizer, bool), "train.shard_optimizer", self.shard_optimizer,
               "true or false")
        _check(self.steps >= 1, "train.steps", self.steps, "an integer >= 1")
        _check(isinstance(self.loss_chunk, int) and self.loss_chunk >= 0, "train.loss_chunk",
               self.loss_chunk, "an integer >= 0 (0: whole-sequence logits)")
        _check(self.learning_rate > 0, "train.learning_rate", self.learning_rate, "> 0")
        _check(0.0 <= self.min_lr_ratio <= 1.0, "train.min_lr_ratio", self.min_lr_ratio, "in [0, 1]")
        _check(0 <= self.warmup_steps <= self.steps, "train.warmup_steps", self.warmup_steps,
               f"in [0, train.steps={self.steps}]")
        _check(self.weight_decay >= 0, "train.weight_decay", self.weight_decay, ">= 0")
        _check(0 <= self.b1 < 1 and 0 <= self.b2 < 1, "train.b1/b2", (self.b1, self.b2), "in [0, 1)")
        _check(self.grad_clip >= 0, "train.grad_clip", self.grad_clip, ">= 0 (0 disables clipping)")
        for key in ("log_every", "eval_every", "eval_batches", "checkpoint_every", "keep_checkpoints"):
            _check(getattr(self, key) >= 1, f"train.{key}", getattr(self, key), "an integer >= 1")
        _check(self.peak_tflops is None or self.peak_tflops > 0, "train.peak_tflops", self.peak_tflops,
               "null (look up the device) or a positive number")
        _check(self.stop_after is None or 1 <= self.stop_after <= self.steps, "train.stop_after",
               self.stop_after, f"null or an integer in [1, train.steps={self.steps}]")
        _check(self.on_nonfinite in ("skip", "stop"), "train.on_nonfinite", self.on_nonfinite,
               "'skip' or 'stop'")
        _check(isinstance(self.max_nonfinite_steps, int) and self.max_nonfinite_steps >= 0,
               "train.max_nonfinite_steps", self.max_nonfinite_steps, "an integer >= 0")
        _check(self.init_from is None or str(self.init_from).strip() != "", "train.init_from",
               self.init_from, "null or the path of a checkpoint (a converted model or a run directory)")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh shape. ``-1`` on one axis means "all remaining devices"."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    context: int = 1

    def validate(self) -> None:
        sizes = dataclasses.asdict(self)
        for k, v in sizes.items():
            _check(v == -1 or v >= 1, f"mesh.{k}", v, "-1 (fill) or an integer >= 1")
        _check(sum(v == -1 for v in sizes.values()) <= 1, "mesh", sizes, "at most one axis set to -1")


@dataclasses.dataclass(frozen=True)
class Config:
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)

    def validate(self) -> "Config":
        self.model.validate()
        self.data.validate()
        self.train.validate()
        self.mesh.validate()
        if self.data.seq_len > self.model.max_seq_len:
            raise ConfigError(
                f"data.seq_len={self.data.seq_len} exceeds model.max_seq_len={self.model.max_seq_len}; "
                "raise model.max_seq_len or lower data.seq_len")
        for key, on in (("model.ttt_seq.enabled", bool(self.model.ttt_seq.layer_ids(self.model.n_layers))),
                        ("model.e2e.enabled", self.model.e2e.enabled)):
            if on and self.mesh.context > 1:
                raise ConfigError(
                    f"{key}=true is not supported with mesh.context={self.mesh.context} (context "
                    "parallelism): the layer is not affine in its state; set mesh.context=1")
        if self.data.chunk_align and self.model.ttt.enabled and self.data.seq_len % self.model.ttt.chunk_size:
            raise ConfigError(
                f"data.chunk_align=true needs data.seq_len ({self.data.seq_len}) to be a multiple of "
                f"model.ttt.chunk_size ({self.model.ttt.chunk_size}) so every document can start on a "
                "chunk boundary; change one of them or set data.chunk_align=false")
        return self

    def to_dict(self) -> dict[str, Any]:
        return _to_plain(dataclasses.asdict(self))


# --------------------------------------------------------------------------------------------------
# Loading, overrides
# --------------------------------------------------------------------------------------------------


def _check(ok: bool, key: str, value: Any, expected: str) -> None:
    if not ok:
        raise ConfigError(f"invalid {key}={value!r}: expected {expected}")


def _to_plain(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _to_plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_to_plain(v) for v in x]
    return x


def _suggest(key: str, options: Sequence[str]) -> str:
    close = difflib.get_close_matches(key, list(options), n=1, cutoff=0.5)
    return f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(sorted(options))}"


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert a YAML/CLI value to the annotated type ``tp``, or raise ConfigError naming ``key``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Union:  # Optional[X]
        if value is None or (isinstance(value, str) and value.lower() in ("null", "none", "~")):
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"invalid {key}={value!r}: expected one of {list(args)}")
        return value
    if origin is tuple:
        if isinstance(value, str):
            value = yaml.safe_load(value) if value.strip().startswith("[") else \
                [v for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            value = [value]
        return tuple(_coerce(v, args[0], f"{key}[]") for v in value)
    if dataclasses.is_dataclass(tp):
        if isinstance(tp, type) and isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"invalid {key}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return _build(tp, value, prefix=f"{key}.")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no", "on", "off"):
            return value.lower() in ("true", "1", "yes", "on")
        raise ConfigError(f"invalid {key}={value!r}: expected true or false")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"invalid {key}={value!r}: expected an integer")
        if isinstance(value, int):
            return value
        try:
            f = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"invalid {key}={value!r}: expected an integer") from None
        # Floats name an integer only while every integer is representable (|f| <= 2^53); beyond
        # that, e.g. 4.8e118, the value is not one the user could have meant exactly.
        if not math.isfinite(f) or f != int(f) or abs(f) > 2 ** 53:
            raise ConfigError(f"invalid {key}={value!r}: expected an integer")
        return int(f)
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"invalid {key}={value!r}: expected a number")
        try:
            f = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"invalid {key}={value!r}: expected a number") from None
        if math.isnan(f):
            raise ConfigError(f"invalid {key}={value!r}: expected a number, not NaN")
        return f
    if tp is str:
        if not isinstance(value, (str, int, float)):
            raise ConfigError(f"invalid {key}={value!r}: expected a string")
        return str(value)
    return value


def _build(cls: type, values: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for k, v in values.items():
        if k not in names:
            raise ConfigError(f"unknown config key '{prefix}{k}'" + _suggest(k, names))
        kwargs[k] = _coerce(v, hints[k], f"{prefix}{k}")
    return cls(**kwargs)


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"cannot set {dotted!r}: {p!r} is not a section")
    node[parts[-1]] = value


def parse_overrides(overrides: Sequence[str]) -> dict[str, Any]:
    """Turn ``["a.b=1", "c=[1, 2]"]`` into a nested dict; values are parsed as YAML scalars/lists."""
    tree: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. train.steps=100)")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key:
            raise ConfigError(f"override {item!r} has an empty key")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        _set_dotted(tree, key, value)
    return tree


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def resolve_config_path(name_or_path: str | Path) -> Path:
    """A path to a YAML file, or the name of a preset in ``configs/`` (``tiny`` -> configs/tiny.yaml)."""
    p = Path(name_or_path)
    if p.is_file():
        return p
    for cand in (CONFIG_DIR / f"{name_or_path}.yaml", CONFIG_DIR / str(name_or_path)):
        if cand.is_file():
            return cand
    presets = sorted(x.stem for x in CONFIG_DIR.glob("*.yaml")) if CONFIG_DIR.is_dir() else []
    raise ConfigError(f"config {str(name_or_path)!r} is neither a YAML file nor a preset; "
                      f"presets: {', '.join(presets) or '(none found)'}")


def config_from_dict(values: dict[str, Any]) -> Config:
    """Build and validate a :class:`Config` from a nested dict (unknown keys are errors)."""
    return _build(Config, values or {}).validate()


def load_config(name_or_path: str | Path | None = None, overrides: Sequence[str] = ()) -> Config:
    """Load a preset or YAML file, apply ``key=value`` overrides, validate.

    Example::

        cfg = load_config("tiny", ["train.steps=50", "model.ttt.chunk_size=64"])
    """
    base: dict[str, Any] = {}
    if name_or_path is not None:
        path = resolve_config_path(name_or_path)
        with open(path) as f:
            base = yaml.safe_load(f) or {}
        if not isinstance(base, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
        base.pop("base", None)
    return config_from_dict(_merge(base, parse_overrides(overrides)))


def replace(cfg: Config, **sections: dict[str, Any]) -> Config:
    """Return ``cfg`` with fields changed, e.g. ``replace(cfg, model={"n_layers": 2})``; validated."""
    return config_from_dict(_merge(cfg.to_dict(), sections))


def apply_overrides(cfg: Config, overrides: Sequence[str]) -> Config:
    """``cfg`` with ``key=value`` overrides applied (as on the command line); validated."""
    return config_from_dict(_merge(cfg.to_dict(), parse_overrides(overrides)))
