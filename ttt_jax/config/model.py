"""The architecture (``model:``): every field here changes the parameters or the function the model
computes. How that function is computed (kernels, remat, layer scanning, context parallelism) is
:mod:`ttt_jax.config.runtime`. A checkpoint must agree with this section to be resumed or loaded,
except for the fields marked resumable (:data:`ttt_jax.config.base.RESUMABLE`)."""

from __future__ import annotations

import dataclasses
from typing import Literal, Optional

from ttt_jax.config.base import MAX_LAYERS, check, layer_ids, resumable_field


@dataclasses.dataclass(frozen=True)
class TTTConfig:
    """In-Place TTT (DESIGN.md section 1): the MLP down-projections of some layers are fast weights,
    updated chunk by chunk towards a target built from the tokens."""

    enabled: bool = True
    """In-Place TTT on (the layers below) or off (every MLP a plain SwiGLU)."""
    layers: Optional[tuple[int, ...]] = None
    """Explicit layer indices, or null: every ``every``-th layer from ``start``."""
    every: int = 6
    """Spacing of the TTT layers when ``layers`` is null (the paper: every 6th layer)."""
    start: int = 0
    """First TTT layer when ``layers`` is null."""
    lr: float = 3.0
    """Fast-weight learning rate."""
    chunk_size: int = 1024
    """Tokens per fast-weight update."""
    conv_kernel: int = 5
    """Width of the centred target conv (odd: ``(K-1)//2`` past and future taps)."""
    target_source: Literal["embeddings", "hidden"] = "embeddings"
    """What the target is built from: the token embeddings or the layer's normed input."""
    target: Literal["aligned", "reconstruction"] = "aligned"
    """``aligned``: the paper's next-token-aligned target (the conv reads ``(K-1)//2`` future tokens
    of the chunk). ``reconstruction``: the ablation, the same conv with its future taps held at
    zero. Same parameters, same compute."""
    clip_tau: Optional[float] = None
    """Clip of the fast-weight update's norm (null: off)."""

    def validate(self, n_layers: int) -> None:
        check(self.chunk_size >= 1, "model.ttt.chunk_size", self.chunk_size, "an integer >= 1")
        check(self.conv_kernel >= 1 and self.conv_kernel % 2 == 1, "model.ttt.conv_kernel",
              self.conv_kernel, "an odd integer >= 1 (the conv is centred: (K-1)//2 past and future taps)")
        check(self.every >= 1, "model.ttt.every", self.every, "an integer >= 1")
        check(0 <= self.start, "model.ttt.start", self.start, "an integer >= 0")
        check(self.target in ("aligned", "reconstruction"), "model.ttt.target", self.target,
              "'aligned' (next-token-aligned, the paper's) or 'reconstruction' (ablation)")
        check(self.clip_tau is None or self.clip_tau > 0, "model.ttt.clip_tau", self.clip_tau,
              "null (off) or a positive float")
        _check_layers("model.ttt.layers", self.layers, n_layers)

    def layer_ids(self, n_layers: int) -> tuple[int, ...]:
        """The layers whose MLP gets In-Place TTT (empty when disabled)."""
        return layer_ids(self, n_layers)


@dataclasses.dataclass(frozen=True)
class TTTSeqConfig:
    """TTT-Linear / TTT-MLP sequence-mixing layers (Sun et al. 2024; ``ttt_jax.nn.ttt_seq``). Not
    supported with context parallelism (``mesh.context > 1``): the layer is not affine in its state,
    so the sequence cannot be split without a sequential carry across devices."""

    enabled: bool = False
    """TTT sequence layers on (the layers below) or off."""
    kind: Literal["linear", "mlp"] = "linear"
    """Inner model: ``linear`` or ``mlp`` (4x hidden, GELU)."""
    layers: Optional[tuple[int, ...]] = None
    """Explicit layer indices, or null: every ``every``-th layer from ``start``."""
    every: int = 1
    """Spacing of the layers when ``layers`` is null."""
    start: int = 0
    """First layer when ``layers`` is null."""
    mode: Literal["replace", "beside"] = "replace"
    """``replace``: the TTT layer takes self-attention's place. ``beside``: it is added next to
    attention (both read the same normed input; their outputs are summed)."""
    mini_batch: int = 16
    """TTT mini-batch size (tokens per inner step)."""
    base_lr: Optional[float] = None
    """Inner learning-rate scale (null: 1.0 for linear, 0.1 for mlp, as published)."""
    output_gate: bool = False
    """Gate the layer's output (as the published TTT blocks do)."""

    def validate(self, n_layers: int) -> None:
        check(self.mini_batch >= 1, "model.ttt_seq.mini_batch", self.mini_batch, "an integer >= 1")
        check(self.every >= 1, "model.ttt_seq.every", self.every, "an integer >= 1")
        check(self.start >= 0, "model.ttt_seq.start", self.start, "an integer >= 0")
        check(self.base_lr is None or self.base_lr > 0, "model.ttt_seq.base_lr", self.base_lr,
              "null (1.0 linear / 0.1 mlp) or a positive float")
        _check_layers("model.ttt_seq.layers", self.layers, n_layers)

    @property
    def resolved_base_lr(self) -> float:
        if self.base_lr is not None:
            return float(self.base_lr)
        return 1.0 if self.kind == "linear" else 0.1

    def layer_ids(self, n_layers: int) -> tuple[int, ...]:
        """The layers with a TTT sequence layer (empty when disabled)."""
        return layer_ids(self, n_layers)


@dataclasses.dataclass(frozen=True)
class E2EConfig:
    """TTT-E2E (end-to-end test-time training; ``ttt_jax.models.e2e``). The SwiGLU MLPs of the last
    ``last_k`` blocks are fast weights per sequence: the forward pass runs those blocks chunk by
    chunk, answers each chunk with the current weights, then takes one SGD step on the chunk's mean
    next-token loss. Training differentiates through these steps. Use a sliding-window backbone
    (``model.attention_window``) as published. The last ``last_k`` layers must be plain layers (no
    In-Place TTT, no ``ttt_seq``); ``runtime.scan_layers`` and ``mesh.context > 1`` are not
    supported."""

    enabled: bool = False
    """TTT-E2E on or off."""
    last_k: int = 1
    """Number of final blocks whose MLPs are fast weights."""
    chunk_size: int = 1024
    """Tokens per inner SGD step."""
    lr: float = 1.0
    """Inner learning rate."""
    grad_clip: float = 1.0
    """Global-norm clip of each inner gradient, per sequence (0 = off)."""

    def validate(self, cfg: "ModelConfig") -> None:
        if not self.enabled:
            return
        n = cfg.n_layers
        check(1 <= self.last_k <= n, "model.e2e.last_k", self.last_k, f"an integer in [1, {n}]")
        check(self.chunk_size >= 1, "model.e2e.chunk_size", self.chunk_size, "an integer >= 1")
        check(self.lr > 0, "model.e2e.lr", self.lr, "a positive float")
        check(self.grad_clip >= 0, "model.e2e.grad_clip", self.grad_clip, ">= 0 (0 = off)")
        last = set(range(n - self.last_k, n))
        clash = sorted(last & (set(cfg.ttt.layer_ids(n)) | set(cfg.ttt_seq.layer_ids(n))))
        check(not clash, "model.e2e.last_k", self.last_k,
              f"last layers without In-Place TTT or ttt_seq, but layers {clash} have them; set "
              "model.ttt.layers / model.ttt_seq.layers to avoid them (or model.ttt.enabled=false)")


@dataclasses.dataclass(frozen=True)
class RopeScalingConfig:
    """RoPE frequency scaling of long-context checkpoints (``model.rope_scaling``), computed as
    transformers computes it (:mod:`ttt_jax.nn.rope`). Fields of the other ``type`` are ignored.
    Example (Qwen3 at 128k): ``{type: yarn, factor: 4.0, original_max_position_embeddings: 32768}``."""

    type: Literal["yarn", "llama3"] = "yarn"
    """``yarn`` (Qwen3 beyond its native 32k) or ``llama3`` (Llama 3.1+)."""
    factor: float = 1.0
    """Context extension factor."""
    original_max_position_embeddings: int = 0
    """The checkpoint's pretraining context length."""
    beta_fast: float = 32.0
    """yarn: high-frequency boundary (rotations)."""
    beta_slow: float = 1.0
    """yarn: low-frequency boundary (rotations)."""
    attention_factor: Optional[float] = None
    """yarn: attention temperature (null: from ``factor`` / ``mscale``)."""
    mscale: Optional[float] = None
    """yarn: DeepSeek-style mscale (null: unused)."""
    mscale_all_dim: Optional[float] = None
    """yarn: DeepSeek-style mscale_all_dim (null: unused)."""
    truncate: bool = True
    """yarn: round the correction range to whole dimensions (transformers' default)."""
    low_freq_factor: float = 1.0
    """llama3: low-frequency factor."""
    high_freq_factor: float = 4.0
    """llama3: high-frequency factor."""

    def validate(self) -> None:
        check(self.type in ("yarn", "llama3"), "model.rope_scaling.type", self.type, "'yarn' or 'llama3'")
        check(self.factor >= 1.0, "model.rope_scaling.factor", self.factor, "a number >= 1")
        check(self.original_max_position_embeddings >= 1,
              "model.rope_scaling.original_max_position_embeddings",
              self.original_max_position_embeddings,
              "the checkpoint's pretraining context length (an integer >= 1)")
        if self.type == "yarn":
            check(self.beta_fast > 0 and self.beta_slow > 0 and self.beta_fast >= self.beta_slow,
                  "model.rope_scaling.beta_fast/beta_slow", (self.beta_fast, self.beta_slow),
                  "positive numbers with beta_fast >= beta_slow")
            check(self.attention_factor is None or self.attention_factor > 0,
                  "model.rope_scaling.attention_factor", self.attention_factor, "null or > 0")
        else:
            check(0 < self.low_freq_factor < self.high_freq_factor,
                  "model.rope_scaling.low_freq_factor/high_freq_factor",
                  (self.low_freq_factor, self.high_freq_factor), "0 < low_freq_factor < high_freq_factor")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """A Qwen3/Llama-style decoder-only LM with optional In-Place TTT, TTT-Linear/MLP and TTT-E2E
    layers."""

    vocab_size: int = 259
    """Vocabulary size (the tokenizer's)."""
    d_model: int = 256
    """Hidden size ``D``."""
    n_layers: int = 4
    """Number of decoder layers."""
    n_heads: int = 4
    """Query heads ``H``."""
    n_kv_heads: int = 2
    """Key/value heads (grouped-query attention; divides ``n_heads``)."""
    head_dim: Optional[int] = None
    """Per-head size (null: ``d_model / n_heads``)."""
    d_ff: int = 768
    """MLP hidden size ``F``."""
    max_seq_len: int = resumable_field(4096)
    """Longest sequence the model is run on (``data.seq_len`` must not exceed it). RoPE is computed
    on the fly, so a run may resume with another value (context extension)."""
    rope_theta: float = 10000.0
    """RoPE base."""
    rope_scaling: Optional[RopeScalingConfig] = None
    """RoPE frequency scaling (null: plain RoPE); :class:`RopeScalingConfig`."""
    rms_norm_eps: float = 1e-6
    """RMSNorm epsilon."""
    tie_embeddings: bool = True
    """Output projection = the embedding matrix transposed."""
    qk_norm: bool = True
    """Qwen3's RMSNorm of queries and keys per head."""
    attention_window: int = 0
    """Sliding window (keys a query sees, itself included) of every layer not listed in
    ``full_attention_layers``; 0: full causal attention everywhere."""
    full_attention_layers: tuple[int, ...] = ()
    """Layers with full causal attention when ``attention_window > 0``."""
    initializer_range: float = 0.02
    """Standard deviation of the normal initialisation."""
    param_dtype: Literal["float32", "bfloat16"] = "float32"
    """Dtype the parameters are stored (and checkpointed) in."""
    compute_dtype: Literal["float32", "bfloat16"] = resumable_field("bfloat16")
    """Dtype of activations and matmul inputs (accumulation is fp32). It changes no parameter, so a
    run may resume with another value."""
    ttt: TTTConfig = dataclasses.field(default_factory=TTTConfig)
    """In-Place TTT (:class:`TTTConfig`)."""
    ttt_seq: TTTSeqConfig = dataclasses.field(default_factory=TTTSeqConfig)
    """TTT-Linear / TTT-MLP sequence layers (:class:`TTTSeqConfig`)."""
    e2e: E2EConfig = dataclasses.field(default_factory=E2EConfig)
    """TTT-E2E (:class:`E2EConfig`)."""

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
            check(isinstance(v, int) and v >= 1, f"model.{key}", v, "an integer >= 1")
        # Layer lists below are built per layer; a bound keeps a typo from hanging validation.
        check(self.n_layers <= MAX_LAYERS, "model.n_layers", self.n_layers, f"at most {MAX_LAYERS}")
        check(self.n_heads % self.n_kv_heads == 0, "model.n_kv_heads", self.n_kv_heads,
              f"a divisor of model.n_heads={self.n_heads} (grouped-query attention)")
        if self.head_dim is None:
            check(self.d_model % self.n_heads == 0, "model.head_dim", None,
                  f"set explicitly, since model.d_model={self.d_model} is not a multiple of "
                  f"model.n_heads={self.n_heads}")
        check(self.resolved_head_dim % 2 == 0, "model.head_dim", self.resolved_head_dim,
              "an even integer (RoPE rotates pairs)" + (
                  "" if self.head_dim is not None else
                  f"; it is model.d_model={self.d_model} / model.n_heads={self.n_heads}: change "
                  "those or set model.head_dim"))
        check(self.rope_theta > 0, "model.rope_theta", self.rope_theta, "a positive float")
        if self.rope_scaling is not None:
            self.rope_scaling.validate()
        check(self.attention_window >= 0, "model.attention_window", self.attention_window,
              "0 (full attention) or a positive window length")
        check(self.initializer_range > 0, "model.initializer_range", self.initializer_range, "> 0")
        _check_layers("model.full_attention_layers", self.full_attention_layers, self.n_layers)
        self.ttt.validate(self.n_layers)
        self.ttt_seq.validate(self.n_layers)
        self.e2e.validate(self)


def _check_layers(key: str, layers, n_layers: int) -> None:
    if layers is not None:
        bad = [i for i in layers if not 0 <= i < n_layers]
        check(not bad, key, list(layers),
              f"layer indices in [0, {n_layers}) (model.n_layers={n_layers}); out of range: {bad}")
