"""SwiGLU MLP and the In-Place TTT MLP (DESIGN.md section 1).

Parameters (JAX layout ``[in, out]``):

============  ===========  ====================  ==============================================
name          shape        logical axes          init
============  ===========  ====================  ==============================================
``gate``      ``[D, F]``   ``("embed", "mlp")``  N(0, initializer_range^2)
``up``        ``[D, F]``   ``("embed", "mlp")``  N(0, initializer_range^2)
``down``      ``[F, D]``   ``("mlp", "embed")``  N(0, initializer_range^2); the TTT fast weight W0
``ttt_conv``  ``[K, D]``   ``("conv", "embed")`` zeros (TTT only)
``ttt_proj``  ``[D, D]``   ``("embed", None)``   diagonal ~ N(0, initializer_range^2), zeros off
                                                 the diagonal (TTT only)
============  ===========  ====================  ==============================================

Because ``ttt_conv`` starts at zero the target ``V`` is zero at initialisation, so an
:class:`InPlaceTTTMLP` computes exactly what a :class:`SwiGLUMLP` with the same gate/up/down does.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

from ttt_jax.config import ModelConfig, RuntimeConfig
from ttt_jax.nn.cache import CacheStep
from ttt_jax.nn.context import AXIS, context_size, run_over_context
from ttt_jax.nn.params import dense, make_param, normal_init, zeros_init
from ttt_jax.nn.ttt_cache import TTTCache, ttt_extend, ttt_fill
from ttt_jax.ops import inplace_ttt, inplace_ttt_target
from ttt_jax.ops.inplace_ttt_cp import inplace_ttt_sharded
from ttt_jax.ops.precision import matmul_f32_out


def _mlp_keys(rngs: nnx.Rngs) -> jax.Array:
    """Both MLP kinds draw one key and split it, so a TTT and a plain model built from the same
    seed share every other parameter (gate/up/down included)."""
    return jax.random.split(rngs.params(), 4)


def _diag_normal_init(stddev: float):
    def init(key, shape, dtype):
        d = shape[0]
        diag = stddev * jax.random.normal(key, (d,), jnp.float32)
        return jnp.diag(diag).astype(dtype)
    return init


class SwiGLUMLP(nnx.Module):
    """``out = (silu(h W_gate) * (h W_up)) W_down``.

    ``__call__(h [B, T, D], **unused) -> [B, T, D]`` in the compute dtype (fp32 accumulation).
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self._build(cfg, _mlp_keys(rngs))

    def _build(self, cfg: ModelConfig, keys: jax.Array) -> None:
        self.dtype = jnp.dtype(cfg.compute_dtype)
        pd = jnp.dtype(cfg.param_dtype)
        init = normal_init(cfg.initializer_range)
        d, f = cfg.d_model, cfg.d_ff
        self.gate = make_param(init, keys[0], (d, f), ("embed", "mlp"), pd)
        self.up = make_param(init, keys[1], (d, f), ("embed", "mlp"), pd)
        self.down = make_param(init, keys[2], (f, d), ("mlp", "embed"), pd)

    def activation(self, h: jax.Array) -> jax.Array:
        """``z = silu(h W_gate) * (h W_up)``: ``[B, T, D] -> [B, T, F]`` in the compute dtype."""
        dt = self.dtype
        # fp32 results for the product; backward matmuls in dt (see matmul_f32_out).
        g = matmul_f32_out("btd,df->btf", h.astype(dt), self.gate[...].astype(dt))
        u = matmul_f32_out("btd,df->btf", h.astype(dt), self.up[...].astype(dt))
        return (jax.nn.silu(g) * u).astype(dt)

    def __call__(self, h: jax.Array, *, x0: Optional[jax.Array] = None,
                 segment_ids: Optional[jax.Array] = None) -> jax.Array:
        del x0, segment_ids
        return dense(self.activation(h), self.down[...], "btf,fd->btd", self.dtype)


class InPlaceTTTMLP(SwiGLUMLP):
    """SwiGLU MLP whose down-projection is an In-Place TTT fast weight.

    ``__call__(h [B, T, D], *, x0 [B, T, D] | None, segment_ids [B, T] | None) -> [B, T, D]``:
    ``z = silu(h W_gate) * (h W_up)``; target source ``t = x0`` (``target_source="embeddings"``, the
    token embeddings) or ``h`` (``"hidden"``); ``v = inplace_ttt_target(t, ttt_conv, ttt_proj)``
    (with ``ttt.target="reconstruction"`` the conv's future taps are zeroed: no look-ahead);
    ``out = inplace_ttt(z, v, down, lr, chunk_size, segment_ids, impl, clip_tau)``.

    With ``cache=`` (the layer's :class:`~ttt_jax.nn.ttt_cache.TTTCache`) and ``step=`` (a
    :class:`~ttt_jax.nn.cache.CacheStep`) it returns ``(out, new cache)``: the new tokens continue
    from the carried fast weight (:func:`~ttt_jax.nn.ttt_cache.ttt_extend`), or with ``step.fill``
    ``out`` is the forward pass and the empty state is filled (:func:`~ttt_jax.nn.ttt_cache.ttt_fill`).
    """

    def __init__(self, cfg: ModelConfig, *, runtime: Optional[RuntimeConfig] = None, rngs: nnx.Rngs):
        rt = runtime or RuntimeConfig()
        keys = _mlp_keys(rngs)
        self._build(cfg, keys)
        t = cfg.ttt
        self.lr = float(t.lr)
        self.chunk_size = int(t.chunk_size)
        self.target_source = t.target_source
        self.target = t.target
        self.impl = rt.ttt_impl
        self.clip_tau = None if t.clip_tau is None else float(t.clip_tau)
        self.context_layout = rt.context.layout
        pd = jnp.dtype(cfg.param_dtype)
        d = cfg.d_model
        self.ttt_conv = make_param(zeros_init, None, (t.conv_kernel, d), ("conv", "embed"), pd)
        self.ttt_proj = make_param(_diag_normal_init(cfg.initializer_range), keys[3], (d, d),
                                   ("embed", None), pd)

    def target_conv(self) -> jax.Array:
        """The target conv ``[K, D]`` in the compute dtype, as every path applies it (the training
        forward here, cached inference in :mod:`ttt_jax.nn.ttt_cache`): with
        ``ttt.target="reconstruction"`` (ablation: no look-ahead, so the target describes the
        current token and earlier ones, not the next) the future taps ``j > (K - 1) // 2`` are held
        at zero."""
        dt = self.dtype
        conv = self.ttt_conv[...].astype(dt)
        if self.target == "reconstruction":
            k = conv.shape[0]
            conv = conv * (jnp.arange(k) <= (k - 1) // 2)[:, None].astype(dt)
        return conv

    def target_values(self, src: jax.Array, *, chunk_size: Optional[int] = None,
                      segment_ids: Optional[jax.Array] = None) -> jax.Array:
        """``v = inplace_ttt_target(src, target_conv, ttt_proj)``: ``src [B, T, D]`` (the token
        embeddings or the normed hidden states, per ``target_source``) -> ``[B, T, D]`` in the
        compute dtype; ``chunk_size`` defaults to the layer's."""
        dt = self.dtype
        return inplace_ttt_target(src.astype(dt), self.target_conv(), self.ttt_proj[...].astype(dt),
                                  chunk_size=chunk_size or self.chunk_size, segment_ids=segment_ids)

    def __call__(self, h: jax.Array, *, x0: Optional[jax.Array] = None,
                 segment_ids: Optional[jax.Array] = None, cache: Optional[TTTCache] = None,
                 step: Optional[CacheStep] = None):
        if cache is None:
            return self.forward(h, x0, segment_ids)
        if step.fill:
            return self.forward(h, x0, None), ttt_fill(self, h, x0, cache)
        return ttt_extend(self, h, x0, step.start, step.n_valid, cache)

    def forward(self, h: jax.Array, x0: Optional[jax.Array],
                segment_ids: Optional[jax.Array]) -> jax.Array:
        """The forward pass over whole sequences (context parallel under a ``context`` mesh axis)."""
        dt = self.dtype
        z = self.activation(h)
        if self.target_source == "embeddings":
            if x0 is None:
                raise ValueError("InPlaceTTTMLP with target_source='embeddings' needs x0 (the token "
                                 "embeddings); pass x0=... or set model.ttt.target_source=hidden")
            src = x0
        else:
            src = h
        with jax.named_scope("ttt_target"):
            v = self.target_values(src, segment_ids=segment_ids)
        w0 = self.down[...].astype(dt)
        with jax.named_scope("ttt_scan"):
            if context_size() > 1:
                # Sequence split over the context axis: per-device scan + cross-device summary scan.
                def local(z, v, w0, seg):
                    return inplace_ttt_sharded(z, v, w0, lr=self.lr, chunk_size=self.chunk_size,
                                               axis_name=AXIS, segment_ids=seg, clip_tau=self.clip_tau,
                                               layout=self.context_layout)
                return run_over_context(local, (z, v), (w0,), segment_ids)
            return inplace_ttt(z, v, w0, lr=self.lr, chunk_size=self.chunk_size,
                               segment_ids=segment_ids, impl=self.impl, clip_tau=self.clip_tau)
