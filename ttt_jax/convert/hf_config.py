"""Hugging Face ``config.json`` <-> :class:`~ttt_jax.config.ModelConfig` (Qwen3, Llama 3.x).

Supported architectures: ``Qwen3ForCausalLM`` (QK-norm) and ``LlamaForCausalLM`` (Llama 3.x:
GQA, ``llama3`` RoPE scaling), with plain, ``yarn`` or ``llama3`` RoPE, tied or untied embeddings,
and Qwen3's sliding-window layers. Anything the decoder does not implement (attention or MLP
biases, an activation other than SiLU, partial rotary embeddings, other RoPE types) is a
``ValueError`` that names the field, so a checkpoint never converts into a model that computes
something else.

In-Place TTT settings travel in ``config.json`` under the names of the official PyTorch code
(``ttt_mode``, ``ttt_layers``, ``ttt_lr``, ``ttt_chunk``, ``ttt_proj``, ``ttt_target``:
``hidden_states`` | ``input_embed``, ``ttt_clip_tau``: <= 0 disables clipping), plus
``ttt_conv_kernel`` (the official code fixes 5).
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

from ttt_jax.config import ModelConfig, RopeScalingConfig, TTTConfig

SUPPORTED_ARCHITECTURES = ("Qwen3ForCausalLM", "LlamaForCausalLM")
_MODEL_TYPES = {"qwen3": "Qwen3ForCausalLM", "llama": "LlamaForCausalLM"}
_TTT_TARGETS = {"hidden_states": "hidden", "input_embed": "embeddings"}


def architecture(hf: Mapping[str, Any]) -> str:
    """The architecture name of an HF config (``architectures[0]``, else from ``model_type``);
    ``ValueError`` naming it unless it is one of :data:`SUPPORTED_ARCHITECTURES`."""
    archs = hf.get("architectures") or []
    arch = archs[0] if archs else _MODEL_TYPES.get(hf.get("model_type", ""), hf.get("model_type"))
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"unsupported architecture {arch!r} (config.json architectures={archs}, "
                         f"model_type={hf.get('model_type')!r}); supported: "
                         f"{', '.join(SUPPORTED_ARCHITECTURES)}")
    return arch


def _rope(hf: Mapping[str, Any]) -> tuple[float, Optional[RopeScalingConfig]]:
    """``(rope_theta, rope_scaling)`` from either transformers-5 ``rope_parameters`` or the older
    top-level ``rope_theta`` + ``rope_scaling``."""
    params = dict(hf.get("rope_parameters") or {})
    if hf.get("rope_scaling"):
        params = {**dict(hf["rope_scaling"]), **params}
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    kind = params.get("rope_type", params.get("type", "default"))
    partial = params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    if partial not in (None, 1, 1.0):
        raise ValueError(f"unsupported partial_rotary_factor={partial}: the decoder rotates the "
                         "whole head dimension")
    if kind == "default":
        return float(theta), None
    if kind not in ("yarn", "llama3"):
        raise ValueError(f"unsupported RoPE type {kind!r} in config.json (rope_scaling / "
                         "rope_parameters); supported: default, yarn, llama3")
    orig = params.get("original_max_position_embeddings", hf.get("original_max_position_embeddings",
                                                                 hf.get("max_position_embeddings")))
    factor = params.get("factor")
    if factor is None and kind == "yarn":   # transformers infers it from the two lengths
        factor = hf["max_position_embeddings"] / orig
    fields = dict(type=kind, factor=float(factor), original_max_position_embeddings=int(orig))
    if kind == "yarn":
        fields.update(beta_fast=float(params.get("beta_fast") or 32.0),
                      beta_slow=float(params.get("beta_slow") or 1.0),
                      truncate=bool(params.get("truncate", True)))
        for key in ("attention_factor", "mscale", "mscale_all_dim"):
            if params.get(key) is not None:
                fields[key] = float(params[key])
    else:
        fields.update(low_freq_factor=float(params["low_freq_factor"]),
                      high_freq_factor=float(params["high_freq_factor"]))
    scaling = RopeScalingConfig(**fields)
    scaling.validate()
    return float(theta), scaling


def _window(hf: Mapping[str, Any], n_layers: int) -> tuple[int, tuple[int, ...]]:
    """``(attention_window, full_attention_layers)`` from Qwen3's sliding-window fields."""
    if not hf.get("use_sliding_window") or not hf.get("sliding_window"):
        types = hf.get("layer_types") or []
        if any(t != "full_attention" for t in types):
            raise ValueError(f"unsupported layer_types {sorted(set(types))} without use_sliding_window")
        return 0, ()
    types = hf.get("layer_types") or [
        "sliding_attention" if i >= hf.get("max_window_layers", n_layers) else "full_attention"
        for i in range(n_layers)]
    bad = sorted(set(types) - {"full_attention", "sliding_attention"})
    if bad:
        raise ValueError(f"unsupported layer_types {bad}")
    full = tuple(i for i, t in enumerate(types) if t == "full_attention")
    return int(hf["sliding_window"]), full


def ttt_from_hf(hf: Mapping[str, Any], n_layers: int) -> Optional[TTTConfig]:
    """The In-Place TTT settings of an exported checkpoint (``ttt_mode: true``), else None."""
    if not hf.get("ttt_mode"):
        return None
    target = hf.get("ttt_target", "hidden_states")
    if target not in _TTT_TARGETS:
        raise ValueError(f"unsupported ttt_target={target!r}; expected one of {list(_TTT_TARGETS)}")
    tau = hf.get("ttt_clip_tau")
    return TTTConfig(enabled=True, layers=tuple(int(i) for i in hf.get("ttt_layers", ())),
                     lr=float(hf.get("ttt_lr", 3.0)), chunk_size=int(hf.get("ttt_chunk", 1024)),
                     conv_kernel=int(hf.get("ttt_conv_kernel", 5)),
                     target_source=_TTT_TARGETS[target],
                     clip_tau=float(tau) if tau is not None and float(tau) > 0 else None)


def model_config_from_hf(hf: Mapping[str, Any], *, ttt: Optional[TTTConfig] = None,
                         param_dtype: str = "float32", compute_dtype: str = "bfloat16",
                         **overrides: Any) -> ModelConfig:
    """A validated :class:`ModelConfig` for the HF config dict ``hf``.

    ``ttt``: In-Place TTT settings for the converted model; None takes those of the checkpoint
    (``ttt_mode``), and without them TTT is off. ``overrides``: further ModelConfig fields
    (``max_seq_len``, ``attention_window``, ...). Raises ``ValueError`` naming unsupported features.
    """
    arch = architecture(hf)
    problems = []
    if hf.get("attention_bias"):
        problems.append("attention_bias=true (biases on q/k/v/o projections)")
    if hf.get("mlp_bias"):
        problems.append("mlp_bias=true (biases on the MLP projections)")
    act = hf.get("hidden_act", hf.get("hidden_activation", "silu"))
    if act != "silu":
        problems.append(f"hidden_act={act!r} (the MLP is SwiGLU with SiLU)")
    if problems:
        raise ValueError(f"{arch} checkpoint uses features the decoder does not implement: "
                         + "; ".join(problems))
    n_layers = int(hf["num_hidden_layers"])
    n_heads = int(hf["num_attention_heads"])
    head_dim = hf.get("head_dim") or int(hf["hidden_size"]) // n_heads
    theta, scaling = _rope(hf)
    window, full_layers = _window(hf, n_layers)
    saved_ttt = ttt_from_hf(hf, n_layers)
    if ttt is not None and saved_ttt is not None:
        raise ValueError(f"the checkpoint already has In-Place TTT on layers {list(saved_ttt.layers)} "
                         "(config.json ttt_mode=true); it is converted with its own TTT settings, "
                         "so do not pass TTT layers")
    ttt = ttt if ttt is not None else (saved_ttt if saved_ttt is not None else TTTConfig(enabled=False))
    fields = dict(
        vocab_size=int(hf["vocab_size"]), d_model=int(hf["hidden_size"]), n_layers=n_layers,
        n_heads=n_heads, n_kv_heads=int(hf.get("num_key_value_heads") or n_heads),
        head_dim=int(head_dim), d_ff=int(hf["intermediate_size"]),
        max_seq_len=int(hf.get("max_position_embeddings", 4096)), rope_theta=theta,
        rope_scaling=scaling, rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        qk_norm=arch == "Qwen3ForCausalLM", attention_window=window,
        full_attention_layers=full_layers if window else (),
        initializer_range=float(hf.get("initializer_range", 0.02)),
        param_dtype=param_dtype, compute_dtype=compute_dtype, ttt=ttt)
    fields.update(overrides)
    cfg = ModelConfig(**fields)
    cfg.validate()
    return cfg


def hf_config_from_model(cfg: ModelConfig, *, base: Optional[Mapping[str, Any]] = None,
                         dtype: str = "float32") -> dict[str, Any]:
    """The HF ``config.json`` dict of ``cfg`` (Qwen3 when ``qk_norm``, else Llama), on top of
    ``base`` (the source checkpoint's config: token ids and other fields are kept), with the
    In-Place TTT settings under the official code's names."""
    arch = "Qwen3ForCausalLM" if cfg.qk_norm else "LlamaForCausalLM"
    out = {k: v for k, v in dict(base or {}).items()
           if k not in ("rope_scaling", "rope_theta", "rope_parameters", "torch_dtype")
           and not k.startswith("ttt_")}
    rope: dict[str, Any] = {"rope_theta": cfg.rope_theta, "rope_type": "default"}
    s = cfg.rope_scaling
    if s is not None:
        rope.update(rope_type=s.type, factor=s.factor,
                    original_max_position_embeddings=s.original_max_position_embeddings)
        if s.type == "yarn":
            rope.update(beta_fast=s.beta_fast, beta_slow=s.beta_slow, truncate=s.truncate)
            for key in ("attention_factor", "mscale", "mscale_all_dim"):
                if getattr(s, key) is not None:
                    rope[key] = getattr(s, key)
        else:
            rope.update(low_freq_factor=s.low_freq_factor, high_freq_factor=s.high_freq_factor)
    out.update(
        architectures=[arch], model_type="qwen3" if cfg.qk_norm else "llama",
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.d_ff,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_kv_heads, head_dim=cfg.resolved_head_dim, hidden_act="silu",
        max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.rms_norm_eps,
        initializer_range=cfg.initializer_range, tie_word_embeddings=cfg.tie_embeddings,
        attention_bias=False, rope_parameters=rope, dtype=dtype)
    # Both spellings of the RoPE settings, so older transformers (and the official TTT code, which
    # reads config.rope_scaling) see them too.
    out["rope_theta"] = cfg.rope_theta
    out["rope_scaling"] = None if s is None else {k: v for k, v in rope.items() if k != "rope_theta"}
    if arch == "LlamaForCausalLM":
        out.setdefault("mlp_bias", False)
    if cfg.attention_window:
        out.update(use_sliding_window=True, sliding_window=cfg.attention_window,
                   layer_types=["full_attention" if cfg.layer_window(i) == 0 else "sliding_attention"
                                for i in range(cfg.n_layers)])
    elif arch == "Qwen3ForCausalLM":
        out.update(use_sliding_window=False, sliding_window=None,
                   layer_types=["full_attention"] * cfg.n_layers)
    ttt_layers = list(cfg.ttt.layer_ids(cfg.n_layers))
    inv_targets = {v: k for k, v in _TTT_TARGETS.items()}
    out.update(ttt_mode=bool(ttt_layers), ttt_layers=ttt_layers, ttt_proj=True, ttt_lr=cfg.ttt.lr,
               ttt_chunk=cfg.ttt.chunk_size, ttt_target=inv_targets[cfg.ttt.target_source],
               ttt_clip_tau=cfg.ttt.clip_tau if cfg.ttt.clip_tau is not None else 0.0,
               ttt_conv_kernel=cfg.ttt.conv_kernel)
    return out


def ttt_config(layers: Optional[Sequence[int]] = None, every: Optional[int] = None, *,
               start: int = 0, **fields: Any) -> Optional[TTTConfig]:
    """TTT settings for conversion: explicit ``layers`` or every ``every``-th layer from ``start``
    (None when neither is given). ``fields``: other :class:`TTTConfig` fields (``lr``,
    ``chunk_size``, ``target_source``; default target ``hidden``, the continual-training recipe)."""
    if layers is not None and every is not None:
        raise ValueError("give either TTT layers or a TTT period (every), not both")
    if layers is None and every is None:
        return None
    fields.setdefault("target_source", "hidden")
    if layers is not None:
        return TTTConfig(enabled=True, layers=tuple(int(i) for i in layers), **fields)
    return TTTConfig(enabled=True, every=int(every), start=int(start), **fields)


