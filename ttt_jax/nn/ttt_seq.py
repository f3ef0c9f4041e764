"""TTT-Linear / TTT-MLP sequence-mixing layer (Sun et al. 2024; "Transformer backbone" variant).

``__call__(x [B, T, D], *, positions [B, T], segment_ids [B, T] | None) -> [B, T, D]``::

    q, k, v = x W_q, x W_k, x W_v                          per head, [B, T, H, Dh]
    q, k    = RoPE(q, k; positions mod mini_batch)         (as published)
    lr      = base_lr * sigmoid(x w_lr + b_lr) / Dh         per token and head, [B, T, H]
    z       = ttt_layer(q, k, v, lr, inner, ...)            q + LN(f(q; W_t)), see ops.ttt_layer
    z       = LayerNorm(z over H*Dh)                        (+ gelu(x W_g) * z with output_gate)
    out     = z W_o

The pieces are methods so that the cached call (``cache=``, ``step=``; the state and its carry in
:mod:`ttt_jax.nn.ttt_seq_cache`) computes exactly the same: :meth:`TTTSeqLayer.project` (views and
inner lr), :meth:`TTTSeqLayer.token_factor`, :meth:`TTTSeqLayer.ln_params`,
:meth:`TTTSeqLayer.output` (norm, gate, output projection). With ``cache=`` (a
:class:`~ttt_jax.nn.ttt_seq_cache.TTTSeqCache`) and ``step=`` (a :class:`~ttt_jax.nn.cache.CacheStep`)
``__call__`` returns ``(out, new cache)``.

The position factor of the inner lr is ``max(1/(i+1) + token_bias[i], 0)`` with a learnable
``token_bias`` (zeros at init). ``H = model.n_heads``, ``Dh = model.head_dim``.

Parameters (``s = model.initializer_range``; ``F = Dh`` for TTT-Linear, ``4 Dh`` for TTT-MLP)::

    q, k, v         [D, H, Dh]   (embed, heads, head_dim)    N(0, s^2)
    o               [H, Dh, D]   (heads, head_dim, embed)    N(0, s^2)
    gate            [D, H, Dh]   (embed, heads, head_dim)    N(0, s^2)     output_gate only
    lr_w            [D, H]       (embed, heads)              N(0, s^2)
    lr_b            [H]          (heads,)                    0
    token_bias      [mini_batch] (None,)                     0
    inner_w1        [H, Dh, F]   (heads, head_dim, None)     N(0, s^2)
    inner_b1        [H, F]       (heads, None)               0
    inner_w2        [H, F, Dh]   (heads, None, head_dim)     N(0, s^2)     mlp only
    inner_b2        [H, Dh]      (heads, head_dim)           0             mlp only
    ttt_norm_scale  [H, Dh]      (heads, head_dim)           1             LayerNorm inside the inner model
    ttt_norm_bias   [H, Dh]      (heads, head_dim)           0
    post_norm_scale [H, Dh]      (heads, head_dim)           1             LayerNorm over H*Dh
    post_norm_bias  [H, Dh]      (heads, head_dim)           0

Context parallelism is not supported (a ``ValueError`` when the ``context`` mesh axis is > 1).
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

from ttt_jax.config import ModelConfig, RuntimeConfig
from ttt_jax.nn.cache import CacheStep
from ttt_jax.nn.context import context_size
from ttt_jax.nn.params import dense, make_param, normal_init, ones_init, zeros_init
from ttt_jax.nn.rope import apply_rope
from ttt_jax.nn.ttt_seq_cache import TTTSeqCache, ttt_seq_extend
from ttt_jax.ops.ttt_layer import default_token_factor, layer_norm, ttt_layer

_INNER_AXES = {"w1": ("heads", "head_dim", None), "b1": ("heads", None),
               "w2": ("heads", None, "head_dim"), "b2": ("heads", "head_dim")}


class TTTSeqLayer(nnx.Module):
    """TTT-Linear / TTT-MLP layer of one decoder block (module docstring); ``runtime`` picks the
    implementation and remat grouping (``runtime.ttt_seq_impl``, ``runtime.ttt_seq_remat_group``)."""

    def __init__(self, cfg: ModelConfig, *, runtime: Optional[RuntimeConfig] = None, rngs: nnx.Rngs):
        s = cfg.ttt_seq
        rt = runtime or RuntimeConfig()
        self.kind = s.kind
        self.mini_batch = int(s.mini_batch)
        self.base_lr = s.resolved_base_lr
        self.impl = rt.ttt_seq_impl
        self.remat_group = int(rt.ttt_seq_remat_group) or None
        self.rope_theta = float(cfg.rope_theta)
        self.dtype = jnp.dtype(cfg.compute_dtype)
        pd = jnp.dtype(cfg.param_dtype)
        init = normal_init(cfg.initializer_range)
        d, h, dh = cfg.d_model, cfg.n_heads, cfg.resolved_head_dim
        self.head_dim = dh
        proj = ("embed", "heads", "head_dim")
        self.q = make_param(init, rngs.params(), (d, h, dh), proj, pd)
        self.k = make_param(init, rngs.params(), (d, h, dh), proj, pd)
        self.v = make_param(init, rngs.params(), (d, h, dh), proj, pd)
        self.o = make_param(init, rngs.params(), (h, dh, d), ("heads", "head_dim", "embed"), pd)
        self.gate = make_param(init, rngs.params(), (d, h, dh), proj, pd) if s.output_gate else None
        self.lr_w = make_param(init, rngs.params(), (d, h), ("embed", "heads"), pd)
        self.lr_b = make_param(zeros_init, None, (h,), ("heads",), pd)
        self.token_bias = make_param(zeros_init, None, (self.mini_batch,), (None,), pd)
        f = dh if s.kind == "linear" else 4 * dh
        self.inner_w1 = make_param(init, rngs.params(), (h, dh, f), _INNER_AXES["w1"], pd)
        self.inner_b1 = make_param(zeros_init, None, (h, f), _INNER_AXES["b1"], pd)
        if s.kind == "mlp":
            self.inner_w2 = make_param(init, rngs.params(), (h, f, dh), _INNER_AXES["w2"], pd)
            self.inner_b2 = make_param(zeros_init, None, (h, dh), _INNER_AXES["b2"], pd)
        else:
            self.inner_w2 = None
            self.inner_b2 = None
        norm = ("heads", "head_dim")
        self.ttt_norm_scale = make_param(ones_init, None, (h, dh), norm, pd)
        self.ttt_norm_bias = make_param(zeros_init, None, (h, dh), norm, pd)
        self.post_norm_scale = make_param(ones_init, None, (h, dh), norm, pd)
        self.post_norm_bias = make_param(zeros_init, None, (h, dh), norm, pd)

    def inner_params(self) -> dict[str, jax.Array]:
        """The inner model's initial parameters (fp32), as ``ttt_layer`` takes them."""
        p = {"w1": self.inner_w1[...], "b1": self.inner_b1[...]}
        if self.inner_w2 is not None:
            p.update(w2=self.inner_w2[...], b2=self.inner_b2[...])
        return jax.tree.map(lambda x: x.astype(jnp.float32), p)

    def project(self, x: jax.Array, positions: jax.Array) -> tuple[jax.Array, ...]:
        """The views and inner learning rates of tokens ``x [B, T, D]`` at ``positions [B, T]``:
        ``q, k, v [B, T, H, Dh]`` (compute dtype, RoPE at ``positions mod mini_batch``) and
        ``lr [B, T, H]`` fp32 (base lr included)."""
        dt = self.dtype
        q = dense(x, self.q[...], "btd,dhk->bthk", dt)
        k = dense(x, self.k[...], "btd,dhk->bthk", dt)
        v = dense(x, self.v[...], "btd,dhk->bthk", dt)
        rope_pos = positions % self.mini_batch
        q = apply_rope(q, rope_pos, theta=self.rope_theta)
        k = apply_rope(k, rope_pos, theta=self.rope_theta)
        lr_logit = jnp.einsum("btd,dh->bth", x.astype(jnp.float32), self.lr_w[...].astype(jnp.float32))
        lr = self.base_lr * jax.nn.sigmoid(lr_logit + self.lr_b[...].astype(jnp.float32)) / self.head_dim
        return q, k, v, lr

    def token_factor(self) -> jax.Array:
        """``[mini_batch]`` fp32 position factor of the inner lr: ``max(1/(i+1) + token_bias[i], 0)``."""
        return jnp.maximum(default_token_factor(self.mini_batch)
                           + self.token_bias[...].astype(jnp.float32), 0.0)

    def ln_params(self) -> tuple[jax.Array, jax.Array]:
        """The inner model's LayerNorm ``(scale, bias)``, ``[H, Dh]`` fp32 each."""
        return (self.ttt_norm_scale[...].astype(jnp.float32),
                self.ttt_norm_bias[...].astype(jnp.float32))

    def output(self, z: jax.Array, x: jax.Array) -> jax.Array:
        """The layer output from the inner loop's ``z [B, T, H, Dh]`` and the input ``x [B, T, D]``:
        LayerNorm over ``H*Dh``, the optional gate, the output projection -> ``[B, T, D]``."""
        b, t, h, dh = z.shape
        z = layer_norm(z.astype(jnp.float32).reshape(b, t, h * dh),
                       self.post_norm_scale[...].astype(jnp.float32).reshape(h * dh),
                       self.post_norm_bias[...].astype(jnp.float32).reshape(h * dh))
        z = z.reshape(b, t, h, dh)
        if self.gate is not None:
            g = dense(x, self.gate[...], "btd,dhk->bthk", jnp.float32)
            z = jax.nn.gelu(g, approximate=True) * z
        return dense(z.astype(self.dtype), self.o[...], "bthk,hkd->btd", self.dtype)

    def __call__(self, x: jax.Array, *, positions: jax.Array, segment_ids: Optional[jax.Array] = None,
                 cache: Optional[TTTSeqCache] = None, step: Optional[CacheStep] = None):
        if cache is not None:
            # New tokens continue from the carried state; with step.fill too (the layer is sequential
            # in its state: no context-parallel forward to take the outputs from).
            return ttt_seq_extend(self, x, step.start, step.n_valid, cache)
        if context_size() > 1:
            raise ValueError(
                "model.ttt_seq (TTT-Linear/TTT-MLP layers) does not support context parallelism "
                f"(mesh.context={context_size()}): the layer is sequential in its state; set "
                "mesh.context=1 or model.ttt_seq.enabled=false")
        q, k, v, lr = self.project(x, positions)
        z = ttt_layer(q, k, v, lr, self.inner_params(), *self.ln_params(), mini_batch=self.mini_batch,
                      token_factor=self.token_factor(), segment_ids=segment_ids, impl=self.impl,
                      remat_group=self.remat_group)
        return self.output(z, x)
