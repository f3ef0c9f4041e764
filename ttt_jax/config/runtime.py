"""How the model runs (``runtime:``): kernels, rematerialisation, layer scanning, the loss's
chunking and context parallelism. None of these changes the parameters or the function computed
(each choice is tested against the others for values and gradients), so a checkpoint can be resumed
or loaded under any of them. Why each default is what it is: benchmarks/README.md."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Literal

from ttt_jax.config.base import check

if TYPE_CHECKING:
    from ttt_jax.config.model import ModelConfig


@dataclasses.dataclass(frozen=True)
class ContextConfig:
    """Context parallelism (``mesh.context > 1``: every sequence split over devices). Ignored
    without it. The In-Place TTT layers always exchange their fast-weight summaries in float32 with
    one all-gather (``ttt_jax.parallel.scan``, ``mode="allgather"``): a log-depth ``ppermute`` scan moved
    the same bytes at 4 devices, was no faster and took more memory, and a bfloat16 exchange did
    not change the step time (benchmarks/history/2026-11-notes.md). The fused kernels compute a sliding-window layer as a local call
    plus a small halo block merged by log-sum-exp (``ttt_jax.ops.attention_cp_halo``), which was
    faster than one call over ``[halo | local]`` keys (benchmarks/history/2026-11-notes.md; the
    current weak-scaling table is in benchmarks/README.md)."""

    layout: Literal["contiguous", "zigzag"] = "contiguous"
    """How a row is split over the ``n`` devices. ``contiguous``: device ``i`` holds the ``i``-th
    ``T / n`` tokens; causal attention then gives the last device the most work. ``zigzag``
    (balanced): the row is cut into ``2n`` segments and device ``i`` holds segments ``i`` and
    ``2n - 1 - i``; the trainer permutes each batch on the host (positions travel with it) and the
    results equal the contiguous layout's. Zigzag needs full attention on every layer
    (sliding-window layers are balanced already) and ``T / (2n)`` a multiple of the TTT chunk."""
    attention: Literal["ring", "allgather"] = "ring"
    """How full causal layers see the other devices' keys/values: ``ring`` (``ppermute`` around
    the ring with an online softmax; ``O(T / n)`` memory) or ``allgather`` (one all-gather of K/V;
    ``O(T)`` memory)."""
    kernel: Literal["auto", "xla", "fused", "pallas", "tpu"] = "auto"
    """Per-device attention compute. ``fused``: one cuDNN flash-attention call per ring block and
    per sliding-window layer after the halo exchange (NVIDIA GPU, bf16/fp16; an error where it
    cannot run). ``pallas``: the Pallas flash kernels per ring block. ``tpu``: splash (Pallas
    Mosaic) blocks in the ring or all-gather, one splash call with the halo for sliding windows
    (Pallas interpret mode, slow, where the program is not built for TPU). ``xla``: plain XLA
    blockwise attention (any backend, packed documents). ``auto``: ``tpu`` when the program is
    built for TPU; elsewhere fused where it can run, XLA otherwise."""

    def validate(self, model: "ModelConfig | None" = None) -> None:
        if model is not None:
            swa = [i for i in range(model.n_layers) if model.layer_window(i)]
            check(self.layout == "contiguous" or not swa, "runtime.context.layout", self.layout,
                  f"'contiguous' while layers {swa} use sliding-window attention (their halo "
                  "exchange needs the contiguous layout; their work is balanced already)")


@dataclasses.dataclass(frozen=True)
class RuntimeConfig:
    """Kernel choices, rematerialisation, layer scanning and context parallelism."""

    attention_impl: Literal["auto", "xla", "cudnn", "pallas", "flash", "reference"] = "auto"
    """Single-device attention kernel (:func:`ttt_jax.ops.attention.attention`); ``auto`` picks
    cuDNN or the Pallas flash kernel on GPUs where they apply, XLA otherwise."""
    ttt_impl: Literal["auto", "reference", "associative", "scan", "attention", "pallas"] = "auto"
    """In-Place TTT op implementation (:func:`ttt_jax.ops.inplace_ttt`)."""
    ttt_seq_impl: Literal["dual", "reference"] = "dual"
    """TTT-Linear/MLP implementation: ``dual`` (fast) or ``reference`` (the primal form)."""
    ttt_seq_remat_group: int = 0
    """Mini-batches per checkpointed group of the TTT-Linear/MLP inner scan (0: about the square
    root of the number of mini-batches)."""
    e2e_impl: Literal["chunked", "reference"] = "chunked"
    """TTT-E2E: ``chunked`` (a checkpointed chunk scan with a carried KV window) or ``reference``
    (a per-chunk loop recomputing the prefix; the test oracle, quadratic cost)."""
    remat: bool = False
    """Rematerialise each decoder block in the backward pass (keep only its input). The backward
    pass then runs block by block: a block is recomputed only once the gradient of its output is
    there, and the gradient of its input is released only with its parameter gradients, so the
    compiler cannot keep several blocks' recomputed activations live at once (without that it did,
    raising peak memory in context-parallel runs; benchmarks/history/2026-11-notes.md)."""
    remat_policy: Literal["full", "save_exchanges"] = "save_exchanges"
    """With ``remat``: ``full`` keeps only each block's input. ``save_exchanges`` also keeps the
    results of the block's cross-device exchanges under context parallelism (the TTT carried-in
    state, the halo keys/values, the split halo block's output), so the recomputation repeats no
    collective; without context parallelism the two are the same. ``full`` saves a little memory
    for a slower step (benchmarks/history/2026-11-notes.md)."""
    scan_layers: bool = False
    """Store the decoder layers' parameters stacked and run them as one ``lax.scan`` over periods
    of layers (:mod:`ttt_jax.models.lm`) instead of an unrolled loop: one compilation per period,
    and a bound on what XLA keeps alive across layers under remat. The layer structure must be
    periodic (checked when the model is built). Checkpoints convert between the layouts."""
    loss_chunk: int = 4096
    """Compute the loss from the final hidden states this many positions at a time
    (rematerialised), so the ``[B, T, V]`` fp32 logits never exist at once; 0: whole. Same value
    either way."""
    context: ContextConfig = dataclasses.field(default_factory=ContextConfig)
    """Context parallelism (:class:`ContextConfig`)."""

    def validate(self, model: "ModelConfig | None" = None) -> None:
        """Check the values; with ``model``, also that they fit that architecture."""
        for key in ("remat", "scan_layers"):
            check(isinstance(getattr(self, key), bool), f"runtime.{key}", getattr(self, key),
                  "true or false")
        check(isinstance(self.loss_chunk, int) and self.loss_chunk >= 0, "runtime.loss_chunk",
              self.loss_chunk, "an integer >= 0 (0: whole-sequence logits)")
        check(self.ttt_seq_remat_group >= 0, "runtime.ttt_seq_remat_group", self.ttt_seq_remat_group,
              "0 (auto) or a positive integer")
        self.context.validate(model)
        if model is not None and model.e2e.enabled:
            check(not self.scan_layers, "runtime.scan_layers", self.scan_layers,
                  "false with model.e2e.enabled=true (the E2E blocks run chunk by chunk)")
