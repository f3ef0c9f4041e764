"""Pre-norm decoder block: ``x + attn(norm(x))`` then ``x + mlp(norm(x))``, and its cache.

Sub-modules: ``attn_norm`` (RMSNorm), ``attn`` (:class:`Attention`), ``mlp_norm`` (RMSNorm), ``mlp``
(:class:`InPlaceTTTMLP` on the layers of ``cfg.ttt.layer_ids``, :class:`SwiGLUMLP` elsewhere).
On the layers of ``cfg.ttt_seq.layer_ids`` a ``ttt_seq`` (:class:`TTTSeqLayer`) sequence mixer reads
the same normed input as attention: with ``mode="replace"`` there is no ``attn`` and
``x + ttt_seq(norm(x))``; with ``mode="beside"`` ``x + attn(norm(x)) + ttt_seq(norm(x))``.

One block serves training and cached inference: given its :class:`LayerCache` (what
:func:`init_layer_cache` builds) and a :class:`~ttt_jax.nn.cache.CacheStep`, each sub-module runs
its cached call and the block returns ``(x, new LayerCache)``.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

from ttt_jax.config import ModelConfig, RuntimeConfig
from ttt_jax.nn.attention import Attention
from ttt_jax.nn.cache import CacheStep
from ttt_jax.nn.kv_cache import KVCache, init_kv_cache
from ttt_jax.nn.mlp import InPlaceTTTMLP, SwiGLUMLP
from ttt_jax.nn.norm import RMSNorm
from ttt_jax.nn.ttt_cache import TTTCache, init_ttt_cache
from ttt_jax.nn.ttt_seq import TTTSeqLayer
from ttt_jax.nn.ttt_seq_cache import TTTSeqCache, init_ttt_seq_cache


@dataclasses.dataclass(frozen=True)
class LayerCache:
    """What one decoder layer keeps per sequence: its KV cache (``None`` where a TTT-Linear/MLP
    layer replaces attention), on In-Place TTT layers the fast weight, on TTT-Linear/MLP layers
    their state."""

    kv: Optional[KVCache]
    ttt: Optional[TTTCache] = None
    seq: Optional[TTTSeqCache] = None


jax.tree_util.register_dataclass(LayerCache, data_fields=["kv", "ttt", "seq"], meta_fields=[])


def init_layer_cache(cfg: ModelConfig, layer: int, batch_size: int, max_len: int, *,
                     ring: bool = True, kv_dtype=None) -> LayerCache:
    """The empty :class:`LayerCache` of layer ``layer`` (the pieces its block has; see
    :func:`~ttt_jax.nn.kv_cache.init_kv_cache` for ``max_len``, ``ring`` and ``kv_dtype``)."""
    kv = init_kv_cache(cfg, layer, batch_size, max_len, ring=ring, kv_dtype=kv_dtype)
    seq = None
    if layer in cfg.ttt_seq.layer_ids(cfg.n_layers):
        seq = init_ttt_seq_cache(cfg, batch_size)
        if cfg.ttt_seq.mode == "replace":
            kv = None
    ttt = init_ttt_cache(cfg, batch_size) if layer in cfg.ttt.layer_ids(cfg.n_layers) else None
    return LayerCache(kv=kv, ttt=ttt, seq=seq)


class DecoderBlock(nnx.Module):
    """Layer ``layer`` of the decoder.

    ``__call__(x [B, T, D], *, x0 [B, T, D], positions [B, T], segment_ids [B, T] | None)
    -> [B, T, D]`` in the compute dtype. ``x0`` (token embeddings) feeds the In-Place TTT target.
    ``runtime`` picks the kernels (default :class:`~ttt_jax.config.RuntimeConfig`).

    With ``cache=`` (this layer's :class:`LayerCache`) and ``step=`` (a
    :class:`~ttt_jax.nn.cache.CacheStep`; ``positions`` must be ``step.positions(T)`` and
    ``segment_ids`` ``None``) it returns ``(x, new cache)``.
    """

    def __init__(self, cfg: ModelConfig, layer: int, *, runtime: Optional[RuntimeConfig] = None,
                 rngs: nnx.Rngs):
        pd = jnp.dtype(cfg.param_dtype)
        self.layer = layer
        self.is_ttt = layer in cfg.ttt.layer_ids(cfg.n_layers)
        self.attn_norm = RMSNorm(cfg.d_model, eps=cfg.rms_norm_eps, param_dtype=pd)
        has_seq = layer in cfg.ttt_seq.layer_ids(cfg.n_layers)
        if has_seq and cfg.ttt_seq.mode == "replace":
            self.attn = None
        else:
            self.attn = Attention(cfg, window=cfg.layer_window(layer), runtime=runtime, rngs=rngs)
        self.ttt_seq = TTTSeqLayer(cfg, runtime=runtime, rngs=rngs) if has_seq else None
        self.mlp_norm = RMSNorm(cfg.d_model, eps=cfg.rms_norm_eps, param_dtype=pd)
        self.mlp = InPlaceTTTMLP(cfg, runtime=runtime, rngs=rngs) if self.is_ttt else SwiGLUMLP(cfg, rngs=rngs)

    def __call__(self, x: jax.Array, *, x0: Optional[jax.Array], positions: jax.Array,
                 segment_ids: Optional[jax.Array] = None, cache: Optional[LayerCache] = None,
                 step: Optional[CacheStep] = None):
        if cache is not None and step is None:
            raise ValueError("a cached block call needs step= (a CacheStep) with cache=")
        kv, ttt, seq = (None, None, None) if cache is None else (cache.kv, cache.ttt, cache.seq)

        def run(layer, state, *args, **kw):
            # A sub-layer over the normed input: with its cache in a cached call, -> (out, state).
            if cache is None:
                return layer(*args, **kw), None
            return layer(*args, cache=state, step=step, **kw)

        # Named scopes label the ops for profiles (ttt_jax.bench.trace); they change no values.
        h = self.attn_norm(x)
        mix = None
        if self.ttt_seq is not None:
            mix, seq = run(self.ttt_seq, seq, h, positions=positions, segment_ids=segment_ids)
        if self.attn is not None:
            q_delta = None if step is None else step.q_deltas.get(self.layer)
            with jax.named_scope("attention"):
                att, kv = run(self.attn, kv, h, positions=positions, segment_ids=segment_ids,
                              q_delta=q_delta)
            mix = att if mix is None else mix + att
        x = x + mix
        with jax.named_scope("mlp"):
            if self.is_ttt:
                out, ttt = run(self.mlp, ttt, self.mlp_norm(x), x0=x0, segment_ids=segment_ids)
            else:
                out = self.mlp(self.mlp_norm(x), x0=x0, segment_ids=segment_ids)
            x = x + out
        return x if cache is None else (x, LayerCache(kv=kv, ttt=ttt, seq=seq))
