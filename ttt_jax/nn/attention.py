"""Grouped-query self-attention with optional Qwen3 QK-norm, RoPE, sliding window and segments.

Parameters (JAX layout ``[in, out]``, heads kept as their own axis):

=========  ===========================  ==================================
name       shape                        logical axes
=========  ===========================  ==================================
``q``      ``[D, H, Dh]``               ``("embed", "heads", "head_dim")``
``k``      ``[D, KV, Dh]``              ``("embed", "kv_heads", "head_dim")``
``v``      ``[D, KV, Dh]``              ``("embed", "kv_heads", "head_dim")``
``o``      ``[H, Dh, D]``               ``("heads", "head_dim", "embed")``
``q_norm`` ``scale [Dh]`` (qk_norm)     ``("norm",)``
``k_norm`` ``scale [Dh]`` (qk_norm)     ``("norm",)``
=========  ===========================  ==================================

A Hugging Face ``q_proj.weight [H*Dh, D]`` maps to ``q`` as ``weight.T.reshape(D, H, Dh)``;
``o_proj.weight [D, H*Dh]`` maps to ``o`` as ``weight.T.reshape(H, Dh, D)``.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

from ttt_jax.ops.attention_cp import context_attention, runs_mosaic
from ttt_jax.config import ModelConfig, RuntimeConfig
from ttt_jax.nn.cache import CacheStep
from ttt_jax.nn.context import AXIS, context_size, run_over_context
from ttt_jax.nn.kv_cache import KVCache
from ttt_jax.nn.norm import RMSNorm
from ttt_jax.nn.params import dense, make_param, normal_init
from ttt_jax.nn.rope import apply_rope
from ttt_jax.ops.attention import attention


class Attention(nnx.Module):
    """Causal GQA self-attention of one decoder layer.

    ``__call__(x [B, T, D], *, positions [B, T] int, segment_ids [B, T] int | None) -> [B, T, D]``
    in the compute dtype. ``window`` is this layer's sliding window (0 = full causal); ``runtime``
    picks the kernels (default :class:`~ttt_jax.config.RuntimeConfig`).

    With ``cache=`` (the layer's :class:`~ttt_jax.nn.kv_cache.KVCache`) and ``step=`` (a
    :class:`~ttt_jax.nn.cache.CacheStep`) it returns ``(output, new cache)``: the new tokens attend
    to the cache and are written into it (:meth:`KVCache.extend
    <ttt_jax.nn.kv_cache.KVCache.extend>`), or with ``step.fill`` the output is the forward pass
    above and the empty cache is filled. ``q_delta [B, D, H, Dh]`` adds to the query kernel.
    """

    def __init__(self, cfg: ModelConfig, *, window: int = 0, runtime: Optional[RuntimeConfig] = None,
                 rngs: nnx.Rngs):
        rt = runtime or RuntimeConfig()
        self.d_model = cfg.d_model
        self.n_heads = cfg.n_heads
        self.n_kv_heads = cfg.n_kv_heads
        self.head_dim = cfg.resolved_head_dim
        self.window = int(window)
        self.context_layout = rt.context.layout
        self.context_impl = rt.context.attention
        self.context_kernel = rt.context.kernel
        self.rope_theta = float(cfg.rope_theta)
        self.rope_scaling = cfg.rope_scaling  # None, or yarn / llama3 frequency scaling
        self.impl = rt.attention_impl
        self.dtype = jnp.dtype(cfg.compute_dtype)
        pd = jnp.dtype(cfg.param_dtype)
        init = normal_init(cfg.initializer_range)
        d, h, kv, dh = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, self.head_dim
        self.q = make_param(init, rngs.params(), (d, h, dh), ("embed", "heads", "head_dim"), pd)
        self.k = make_param(init, rngs.params(), (d, kv, dh), ("embed", "kv_heads", "head_dim"), pd)
        self.v = make_param(init, rngs.params(), (d, kv, dh), ("embed", "kv_heads", "head_dim"), pd)
        self.o = make_param(init, rngs.params(), (h, dh, d), ("heads", "head_dim", "embed"), pd)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(dh, eps=cfg.rms_norm_eps, param_dtype=pd)
            self.k_norm = RMSNorm(dh, eps=cfg.rms_norm_eps, param_dtype=pd)
        else:
            self.q_norm = None
            self.k_norm = None

    def project(self, x: jax.Array, positions: jax.Array,
                q_delta: Optional[jax.Array] = None) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Projections of ``x [B, T, D]`` at ``positions [B, T]``: ``(q, k, v)``, each
        ``[B, T, heads, Dh]`` after QK-norm and RoPE. ``q_delta``: optional per-sequence addition
        to the query kernel, ``[B, D, H, Dh]`` (query-only TTT, :mod:`ttt_jax.infer.qttt`)."""
        dt = self.dtype
        q = dense(x, self.q[...], "btd,dhk->bthk", dt)
        if q_delta is not None:
            q = q + dense(x, q_delta, "btd,bdhk->bthk", dt)
        k = dense(x, self.k[...], "btd,dhk->bthk", dt)
        v = dense(x, self.v[...], "btd,dhk->bthk", dt)
        if self.q_norm is not None:
            q = self.q_norm(q)
            k = self.k_norm(k)
        q = apply_rope(q, positions, theta=self.rope_theta, scaling=self.rope_scaling)
        k = apply_rope(k, positions, theta=self.rope_theta, scaling=self.rope_scaling)
        return q, k, v

    def output(self, out: jax.Array) -> jax.Array:
        """The output projection: ``[B, T, H, Dh]`` attention output -> ``[B, T, D]``."""
        return dense(out, self.o[...], "bthk,hkd->btd", self.dtype)

    def __call__(self, x: jax.Array, *, positions: jax.Array, segment_ids: Optional[jax.Array] = None,
                 cache: Optional[KVCache] = None, step: Optional[CacheStep] = None,
                 q_delta: Optional[jax.Array] = None):
        q, k, v = self.project(x, positions, q_delta)
        if cache is not None and not step.fill:
            # New tokens against the cache (``positions`` are ``step.positions(T)``).
            out, cache = cache.extend(q, k, v, step.start, step.n_valid, impl=step.attn_impl,
                                      block=step.attn_block, platform=step.attn_platform)
            return self.output(out), cache
        if context_size() > 1:
            # Sequence split over the context axis: ring attention (full) or halo exchange (window),
            # with fused per-device kernels on GPU (runtime.context.kernel).
            def local(q, k, v, seg):
                return context_attention(q, k, v, AXIS, segment_ids=seg, window=self.window,
                                         layout=self.context_layout, impl=self.context_impl,
                                         kernel=self.context_kernel)
            # TPU kernels: every mesh axis manual around the Mosaic calls (rows and heads split).
            out = run_over_context(local, (q, k, v), segment_ids=segment_ids,
                                   whole_mesh=runs_mosaic(self.context_kernel))
        else:
            out = attention(q, k, v, segment_ids=segment_ids, window=self.window, impl=self.impl)
        if cache is None:
            return self.output(out)
        return self.output(out), cache.fill(k, v)          # step.fill: whole prompts, empty cache
