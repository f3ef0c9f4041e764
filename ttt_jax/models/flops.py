"""Analytic training FLOPs per token (model FLOPs, the convention of MFU reports).

``flops_per_token(cfg, T) = 6 * N_matmul + attention + ttt`` where

* ``N_matmul`` = parameters that take part in a matmul per token: per layer
  ``D*H*Dh + 2*D*KV*Dh + H*Dh*D`` (q, k, v, o) + ``3*D*F`` (gate, up, down), plus the LM head
  ``D*V`` (counted once, tied or not; the embedding lookup is free). ``6 = 2`` (multiply-add)
  ``x 3`` (forward + backward: the backward pass is two matmuls per forward matmul).
  Norm scales and the TTT conv/projection are not in ``N_matmul`` (the latter are counted in
  ``ttt``).
* ``attention`` = ``sum over layers of 12 * T_eff * H * Dh``: per token and head, ``q k^T`` and
  ``p v`` are ``2 * T_eff * Dh`` FLOPs each forward (``4 T_eff H Dh``), times 3 for fwd+bwd.
  ``T_eff`` is the mean number of keys a query sees: causal masking halves the full-attention count,
  ``T_eff = (T + 1) / 2``; a sliding window ``w`` gives
  ``T_eff = (w (w + 1) / 2 + (T - w) w) / T`` for ``T >= w`` (about ``w`` for ``T >> w``).
  Masked work that an implementation computes and discards is not counted.
* ``ttt`` = ``3 * (2*D*D + 2*K*D + 4*F*D)`` per In-Place TTT layer: the target projection
  ``conv @ P`` (``2 D^2``), the depthwise conv (``2 K D``), and the fast-weight update ``z^T v`` and
  apply ``z @ S`` (``2 F D`` each) forward, times 3 for fwd+bwd. (The plain ``z @ W0`` is already in
  ``N_matmul``. A state-recomputing backward costs more hardware FLOPs than this model count.)
"""

from __future__ import annotations

from ttt_jax.config import ModelConfig


def matmul_params(cfg: ModelConfig) -> int:
    """``N_matmul`` of the module docstring."""
    d, f, h, kv, dh = cfg.d_model, cfg.d_ff, cfg.n_heads, cfg.n_kv_heads, cfg.resolved_head_dim
    per_layer = d * h * dh + 2 * d * kv * dh + h * dh * d + 3 * d * f
    return cfg.n_layers * per_layer + d * cfg.vocab_size


def effective_keys(seq_len: int, window: int = 0) -> float:
    """Mean number of keys a causal query attends to over a length-``seq_len`` sequence."""
    t = seq_len
    if window <= 0 or window >= t:
        return (t + 1) / 2
    w = window
    return (w * (w + 1) / 2 + (t - w) * w) / t


def attention_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """The ``attention`` term of :func:`flops_per_token` (forward + backward, all layers)."""
    h, dh = cfg.n_heads, cfg.resolved_head_dim
    return sum(12.0 * effective_keys(seq_len, cfg.layer_window(layer)) * h * dh
               for layer in range(cfg.n_layers))


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training (forward + backward) FLOPs per token at sequence length ``seq_len``; see module doc."""
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    d, f = cfg.d_model, cfg.d_ff
    total = 6.0 * matmul_params(cfg) + attention_flops_per_token(cfg, seq_len)
    n_ttt = len(cfg.ttt.layer_ids(cfg.n_layers))
    total += n_ttt * 3.0 * (2 * d * d + 2 * cfg.ttt.conv_kernel * d + 4 * f * d)
    return total
