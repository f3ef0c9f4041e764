"""Names and layouts: Hugging Face (PyTorch ``nn.Linear``, ``[out, in]``) tensors <-> the
:class:`~ttt_jax.models.lm.CausalLM` parameter tree (JAX ``[in, out]``, heads as their own axis).

===================================================  ==========================  ===========================
Hugging Face tensor (``P = model.layers.{i}.``)      HF shape                    ttt-jax parameter
===================================================  ==========================  ===========================
``model.embed_tokens.weight``                        ``[V, D]``                  ``embed`` (same)
``P input_layernorm.weight``                         ``[D]``                     ``layers/i/attn_norm/scale``
``P self_attn.q_proj.weight``                        ``[H*Dh, D]``               ``layers/i/attn/q`` = ``W.T.reshape(D, H, Dh)``
``P self_attn.k_proj.weight`` / ``v_proj``           ``[KV*Dh, D]``              ``attn/k`` / ``attn/v`` = ``W.T.reshape(D, KV, Dh)``
``P self_attn.o_proj.weight``                        ``[D, H*Dh]``               ``attn/o`` = ``W.T.reshape(H, Dh, D)``
``P self_attn.q_norm.weight`` / ``k_norm`` (Qwen3)   ``[Dh]``                    ``attn/q_norm/scale`` / ``k_norm``
``P post_attention_layernorm.weight``                ``[D]``                     ``layers/i/mlp_norm/scale``
``P mlp.gate_proj.weight`` / ``up_proj``             ``[F, D]``                  ``mlp/gate`` / ``mlp/up`` = ``W.T``
``P mlp.down_proj.weight``                           ``[D, F]``                  ``mlp/down`` = ``W.T`` ``[F, D]``
``P mlp.ttt_conv.weight`` (TTT layers)               ``[D, 1, K]``               ``mlp/ttt_conv`` = ``W[:, 0, :].T`` ``[K, D]``
``P mlp.ttt_proj.weight`` (TTT layers)               ``[D, D]``                  ``mlp/ttt_proj`` = ``W`` (untransposed)
``model.norm.weight``                                ``[D]``                     ``final_norm/scale``
``lm_head.weight`` (untied only)                     ``[V, D]``                  ``lm_head`` = ``W.T`` ``[D, V]``
===================================================  ==========================  ===========================

The TTT tensors follow the official PyTorch In-Place TTT code: ``ttt_conv`` is a depthwise
``nn.Conv1d(D, D, 5, padding=2, groups=D)`` (cross-correlation, so tap ``j`` multiplies
``t[c + j - 2]``, as ``ttt_jax.ops.conv`` does) and ``ttt_proj.weight`` multiplies the conv output
from the right without the transpose an ``nn.Linear`` would apply (``V = conv(t) @ W``), exactly
this project's ``V = conv(t) @ ttt_proj``.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

from ttt_jax.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class TensorMap:
    """One tensor: HF name and shape, our parameter path and shape, and the two layout maps."""

    hf_name: str
    path: tuple
    hf_shape: tuple[int, ...]
    shape: tuple[int, ...]
    to_ours: Callable[[np.ndarray], np.ndarray]
    to_hf: Callable[[np.ndarray], np.ndarray]
    ttt: bool = False  # an In-Place TTT parameter (absent from base checkpoints)


def _same(x):
    return x


def _t(x):
    return np.transpose(x)


def tensor_maps(cfg: ModelConfig) -> list[TensorMap]:
    """Every parameter of ``CausalLM(cfg)`` in the unrolled layer layout (``runtime.scan_layers=
    false``; stack afterwards with ``ttt_jax.models.layers.stack_layer_params``) with its HF counterpart."""
    d, f, v = cfg.d_model, cfg.d_ff, cfg.vocab_size
    h, kv, dh, k = cfg.n_heads, cfg.n_kv_heads, cfg.resolved_head_dim, cfg.ttt.conv_kernel
    out = [TensorMap("model.embed_tokens.weight", ("embed",), (v, d), (v, d), _same, _same)]
    ttt_layers = set(cfg.ttt.layer_ids(cfg.n_layers))

    def heads_in(n):
        return (lambda w: w.T.reshape(d, n, dh)), (lambda p: p.reshape(d, n * dh).T)

    for i in range(cfg.n_layers):
        pre, L = f"model.layers.{i}.", ("layers", i)
        q_in, q_out = heads_in(h)
        kv_in, kv_out = heads_in(kv)
        out += [
            TensorMap(pre + "input_layernorm.weight", L + ("attn_norm", "scale"), (d,), (d,), _same, _same),
            TensorMap(pre + "self_attn.q_proj.weight", L + ("attn", "q"), (h * dh, d), (d, h, dh), q_in, q_out),
            TensorMap(pre + "self_attn.k_proj.weight", L + ("attn", "k"), (kv * dh, d), (d, kv, dh), kv_in, kv_out),
            TensorMap(pre + "self_attn.v_proj.weight", L + ("attn", "v"), (kv * dh, d), (d, kv, dh), kv_in, kv_out),
            TensorMap(pre + "self_attn.o_proj.weight", L + ("attn", "o"), (d, h * dh), (h, dh, d),
                      lambda w: w.T.reshape(h, dh, d), lambda p: p.reshape(h * dh, d).T),
        ]
        if cfg.qk_norm:
            out += [TensorMap(pre + "self_attn.q_norm.weight", L + ("attn", "q_norm", "scale"), (dh,), (dh,), _same, _same),
                    TensorMap(pre + "self_attn.k_norm.weight", L + ("attn", "k_norm", "scale"), (dh,), (dh,), _same, _same)]
        out += [
            TensorMap(pre + "post_attention_layernorm.weight", L + ("mlp_norm", "scale"), (d,), (d,), _same, _same),
            TensorMap(pre + "mlp.gate_proj.weight", L + ("mlp", "gate"), (f, d), (d, f), _t, _t),
            TensorMap(pre + "mlp.up_proj.weight", L + ("mlp", "up"), (f, d), (d, f), _t, _t),
            TensorMap(pre + "mlp.down_proj.weight", L + ("mlp", "down"), (d, f), (f, d), _t, _t),
        ]
        if i in ttt_layers:
            out += [
                TensorMap(pre + "mlp.ttt_conv.weight", L + ("mlp", "ttt_conv"), (d, 1, k), (k, d),
                          lambda w: w[:, 0, :].T, lambda p: p.T[:, None, :], ttt=True),
                TensorMap(pre + "mlp.ttt_proj.weight", L + ("mlp", "ttt_proj"), (d, d), (d, d),
                          _same, _same, ttt=True),
            ]
    out.append(TensorMap("model.norm.weight", ("final_norm", "scale"), (d,), (d,), _same, _same))
    if not cfg.tie_embeddings:
        out.append(TensorMap("lm_head.weight", ("lm_head",), (v, d), (d, v), _t, _t))
    return out


# Tensors of HF checkpoints that carry no parameter (buffers some older exports saved).
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
