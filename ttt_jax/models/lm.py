"""The causal language model (Qwen3/Llama-compatible decoder, optional In-Place TTT MLPs).

Parameter tree of :class:`CausalLM` (``L = n_layers``, ``D = d_model``, ``F = d_ff``,
``H = n_heads``, ``KV = n_kv_heads``, ``Dh = head_dim``, ``V = vocab_size``, ``K = ttt.conv_kernel``)::

    embed                       [V, D]        (vocab, embed)
    layers/{i}/attn_norm/scale  [D]           (norm,)
    layers/{i}/attn/q           [D, H, Dh]    (embed, heads, head_dim)
    layers/{i}/attn/k           [D, KV, Dh]   (embed, kv_heads, head_dim)
    layers/{i}/attn/v           [D, KV, Dh]   (embed, kv_heads, head_dim)
    layers/{i}/attn/o           [H, Dh, D]    (heads, head_dim, embed)
    layers/{i}/attn/q_norm/scale [Dh]         (norm,)      -- qk_norm only
    layers/{i}/attn/k_norm/scale [Dh]         (norm,)      -- qk_norm only
    layers/{i}/mlp_norm/scale   [D]           (norm,)
    layers/{i}/mlp/gate         [D, F]        (embed, mlp)
    layers/{i}/mlp/up           [D, F]        (embed, mlp)
    layers/{i}/mlp/down         [F, D]        (mlp, embed)
    layers/{i}/mlp/ttt_conv     [K, D]        (conv, embed)   -- In-Place TTT layers only
    layers/{i}/mlp/ttt_proj     [D, D]        (embed, None)   -- In-Place TTT layers only
    layers/{i}/ttt_seq/...      TTT-Linear/MLP layer (model.ttt_seq layers only; ttt_jax.nn.ttt_seq);
                                with ttt_seq.mode=replace the layer has no layers/{i}/attn
    final_norm/scale            [D]           (norm,)
    lm_head                     [D, V]        (embed, vocab)  -- only when tie_embeddings=false

With ``runtime.scan_layers=true`` the layers are stored stacked over groups of a period and run by
one ``nnx.scan``: :mod:`ttt_jax.models.layers` (layouts, conversion between them, the stack's
forward pass). Remat of the blocks: :mod:`ttt_jax.models.remat`.

The same blocks run cached inference: ``hidden(tokens, cache=layer_caches, step=CacheStep(...))``
walks the (unrolled) layers, each :class:`~ttt_jax.nn.block.DecoderBlock` with its own
:class:`~ttt_jax.nn.block.LayerCache`, and returns the new caches with the hidden states
(``ttt_jax.infer.engine`` keeps the lengths, builds the step and samples).
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ttt_jax.config import ModelConfig, RuntimeConfig
from ttt_jax.models.e2e import e2e_hidden, e2e_hidden_reference
from ttt_jax.models.layers import run_layers, scan_period, stacked_block, unstack_layer_params
from ttt_jax.models.remat import remat_block
from ttt_jax.nn.block import DecoderBlock, LayerCache
from ttt_jax.nn.cache import CacheStep
from ttt_jax.nn.context import context_size
from ttt_jax.nn.norm import RMSNorm
from ttt_jax.nn.params import make_param, normal_init


def check_tokens(tokens, vocab_size: int) -> None:
    """Raise ``ValueError`` if concrete ``tokens`` are not integers in ``[0, vocab_size)``.

    A no-op for traced arrays (inside ``jit``), where values are unknown; callers that feed data
    into a jitted step should call this on the host batch first.
    """
    if isinstance(tokens, jax.core.Tracer):
        return
    dtype = getattr(tokens, "dtype", None)
    if dtype is not None and not jnp.issubdtype(dtype, jnp.integer):
        raise ValueError(f"token ids must be integers, got dtype {dtype}")
    arr = np.asarray(tokens)
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"token ids must be integers, got dtype {arr.dtype}")
    if arr.size == 0:
        return
    lo, hi = int(arr.min()), int(arr.max())
    if lo < 0 or hi >= vocab_size:
        raise ValueError(
            f"token ids must lie in [0, {vocab_size}) (model.vocab_size={vocab_size}), got min {lo} "
            f"max {hi}; the tokenizer does not match the model -- set model.vocab_size to the "
            "tokenizer's vocabulary size")


def positions_from_segments(segment_ids: jax.Array) -> jax.Array:
    """``[B, T]`` position of every token within its document (a maximal run of equal ids)."""
    b, t = segment_ids.shape
    idx = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    change = jnp.concatenate([jnp.ones((b, 1), bool), segment_ids[:, 1:] != segment_ids[:, :-1]],
                             axis=1)
    start = jax.lax.cummax(jnp.where(change, idx, 0), axis=1)
    return idx - start


class CausalLM(nnx.Module):
    """Decoder-only LM. ``__call__(tokens [B, T] int32, *, segment_ids=None, positions=None)``
    returns ``[B, T, vocab_size]`` float32 logits.

    * ``segment_ids`` ``[B, T]`` int: packed documents (0 = padding); attention, the TTT conv and the
      fast weights never cross documents.
    * ``positions`` ``[B, T]`` int RoPE positions; default ``arange(T)``, or the position within each
      document when ``segment_ids`` are given.

    ``runtime`` (default :class:`~ttt_jax.config.RuntimeConfig`) says how it runs: kernels, remat,
    layer scanning, context parallelism; it changes no parameter values.
    With ``runtime.scan_layers`` the layers are stored stacked and run by one ``nnx.scan``
    (:mod:`ttt_jax.models.layers`); ``self.layers[p]`` is then the block of slot ``p`` of the
    period (``self.period`` slots; ``None`` when unrolled), its parameters carrying a leading axis
    of ``cfg.n_layers // self.period`` groups. Construction raises a ``ValueError`` when the layer
    structure is not periodic (:func:`~ttt_jax.models.layers.scan_period`).
    """

    def __init__(self, cfg: ModelConfig, *, runtime: Optional[RuntimeConfig] = None, rngs: nnx.Rngs):
        runtime = runtime or RuntimeConfig()
        cfg.validate()
        runtime.validate(cfg)
        self.cfg = cfg
        self.runtime = runtime
        self.dtype = jnp.dtype(cfg.compute_dtype)
        pd = jnp.dtype(cfg.param_dtype)
        self.embed = make_param(normal_init(cfg.initializer_range), rngs.params(),
                                (cfg.vocab_size, cfg.d_model), ("vocab", "embed"), pd)
        if runtime.scan_layers:
            self.period = scan_period(cfg)
            groups = cfg.n_layers // self.period
            self.layers = nnx.List([stacked_block(cfg, p, groups, rngs, runtime=runtime)
                                    for p in range(self.period)])
        else:
            self.period = None
            self.layers = nnx.List([DecoderBlock(cfg, i, runtime=runtime, rngs=rngs)
                                    for i in range(cfg.n_layers)])
        self.final_norm = RMSNorm(cfg.d_model, eps=cfg.rms_norm_eps, param_dtype=pd)
        if cfg.tie_embeddings:
            self.lm_head = None
        else:
            self.lm_head = make_param(normal_init(cfg.initializer_range), rngs.params(),
                                      (cfg.d_model, cfg.vocab_size), ("embed", "vocab"), pd)

    def embed_tokens(self, tokens: jax.Array) -> jax.Array:
        """``[B, T]`` int -> ``[B, T, D]`` token embeddings in the compute dtype."""
        return jnp.take(self.embed[...], tokens, axis=0).astype(self.dtype)

    def __call__(self, tokens: jax.Array, *, segment_ids: Optional[jax.Array] = None,
                 positions: Optional[jax.Array] = None) -> jax.Array:
        """``[B, T]`` int tokens -> ``[B, T, V]`` float32 logits."""
        return self.logits(self.hidden(tokens, segment_ids=segment_ids, positions=positions))

    def head(self) -> jax.Array:
        """The output projection as ``[D, V]`` in the compute dtype (the embedding when tied)."""
        if self.lm_head is None:
            return self.embed[...].astype(self.dtype).T
        return self.lm_head[...].astype(self.dtype)

    def logits(self, hidden: jax.Array) -> jax.Array:
        """``[B, T, D]`` final hidden states -> ``[B, T, V]`` float32 logits."""
        return jnp.einsum("btd,dv->btv", hidden.astype(self.dtype), self.head(),
                          preferred_element_type=jnp.float32)

    def hidden(self, tokens: jax.Array, *, segment_ids: Optional[jax.Array] = None,
               positions: Optional[jax.Array] = None, cache: Optional[Sequence[LayerCache]] = None,
               step: Optional[CacheStep] = None):
        """``[B, T]`` int tokens -> ``[B, T, D]`` final-normed hidden states (compute dtype).

        Long-context training uses this with a chunked loss so that ``[B, T, V]`` logits are never
        materialised at once (``ttt_jax.ops.loss.chunked_cross_entropy``, ``runtime.loss_chunk``).

        The cached call: with ``cache`` (one :class:`~ttt_jax.nn.block.LayerCache` per layer) and
        ``step`` (a :class:`~ttt_jax.nn.cache.CacheStep`: where the new tokens sit, how many are
        real, prefill or continue) the tokens are the next ``T`` of each sequence, every block runs
        with its cache, and the result is ``(hidden, new layer caches)``; the positions are
        ``step.positions(T)``. It needs unrolled layers (:func:`unrolled_model`) and a model kind
        that :func:`check_cacheable` accepts; packed documents (``segment_ids``) are not supported.
        """
        cfg = self.cfg
        if tokens.ndim != 2:
            raise ValueError(f"tokens must be [B, T], got shape {tokens.shape}")
        check_tokens(tokens, cfg.vocab_size)
        if cache is not None:
            return self._cached_hidden(tokens, cache, step, segment_ids, positions)
        b, t = tokens.shape
        if segment_ids is not None and tuple(segment_ids.shape) != (b, t):
            raise ValueError(f"segment_ids must be [B, T] = {(b, t)}, got {tuple(segment_ids.shape)}")
        if positions is None:
            if segment_ids is None:
                positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
            else:
                positions = positions_from_segments(segment_ids)
        elif tuple(positions.shape) != (b, t):
            raise ValueError(f"positions must be [B, T] = {(b, t)}, got {tuple(positions.shape)}")

        x0 = self.embed_tokens(tokens)
        x0_arg = x0 if self.needs_x0 else None

        def run_block(block, x, x0, positions, segment_ids):
            return block(x, x0=x0, positions=positions, segment_ids=segment_ids)

        rt = self.runtime
        if rt.remat:
            run_block = remat_block(run_block, policy=rt.remat_policy)

        if cfg.e2e.enabled:
            # TTT-E2E: the first blocks once over the sequence, the last ones chunk by chunk with
            # inner SGD on their MLPs (ttt_jax.models.e2e); already final-normed.
            if context_size() > 1:
                raise ValueError(f"model.e2e.enabled=true does not support context parallelism "
                                 f"(mesh.context={context_size()}); set mesh.context=1")
            first = cfg.n_layers - cfg.e2e.last_k
            x = x0
            for block in self.layers[:first]:
                x = run_block(block, x, x0_arg, positions, segment_ids)
            e2e = e2e_hidden if rt.e2e_impl == "chunked" else e2e_hidden_reference
            return e2e(list(self.layers[first:]), self.final_norm, self.head(), x, tokens, positions,
                       segment_ids, chunk_size=cfg.e2e.chunk_size, lr=float(cfg.e2e.lr),
                       grad_clip=float(cfg.e2e.grad_clip))
        x = run_layers(self.layers, run_block, x0, x0_arg, positions, segment_ids,
                       scanned=rt.scan_layers)
        return self.final_norm(x)

    def _cached_hidden(self, tokens, cache, step, segment_ids, positions):
        check_cacheable(self.cfg)
        if self.runtime.scan_layers:
            raise ValueError("a cached call needs unrolled layers; pass unrolled_model(model)")
        if step is None or segment_ids is not None or positions is not None:
            raise ValueError("a cached call takes step= (a CacheStep), and neither segment_ids nor "
                             "positions (they follow from step.start)")
        if len(cache) != len(self.layers):
            raise ValueError(f"{len(cache)} layer caches for a model of {len(self.layers)} layers")
        x0 = self.embed_tokens(tokens)
        x0_arg = x0 if self.needs_x0 else None
        positions = step.positions(tokens.shape[1])
        x, new = x0, []
        for block, lc in zip(self.layers, cache):
            x, lc = block(x, x0=x0_arg, positions=positions, cache=lc, step=step)
            new.append(lc)
        return self.final_norm(x), tuple(new)

    @property
    def needs_x0(self) -> bool:
        """Whether blocks read the token embeddings: only In-Place TTT layers with
        ``target_source="embeddings"`` do (elsewhere ``x0`` is not passed into the possibly
        rematerialised / scanned blocks, where it would be saved per layer)."""
        cfg = self.cfg
        return bool(cfg.ttt.layer_ids(cfg.n_layers)) and cfg.ttt.target_source == "embeddings"


def check_cacheable(cfg: ModelConfig) -> None:
    """Raise a ``ValueError`` for model kinds the cached call (and so cached inference) does not
    implement.

    TTT-E2E (``model.e2e``) is not implemented. What its decode needs, per sequence: the fast MLP
    weights of the last ``k`` blocks (fp32, ``3 D F k`` values); KV caches of those blocks that hold
    the window before the open chunk as well as the chunk itself (``window + chunk`` slots: keys as
    computed with the weights of their own chunk); and the open chunk's inputs to the first fast
    block. A chunk's SGD step needs the next-token target of its last token, i.e. the first token
    of the next chunk: when that token arrives, the last ``k`` blocks are re-run over the completed
    chunk from the chunk-start KV window with the chunk's weights, differentiated (mean NLL, global
    norm clip per sequence) and the weights updated -- before the new token is answered. So decode
    is cheap except at chunk boundaries (a ``chunk``-token forward and backward through ``k`` blocks,
    under ``lax.cond`` as for In-Place TTT), and ragged batches cross boundaries at different steps.
    """
    e2e = getattr(cfg, "e2e", None)
    if e2e is not None and e2e.enabled:
        raise ValueError("cached inference does not support TTT-E2E models (model.e2e) yet; "
                         "evaluate them with the full forward pass")


def unrolled_model(model: CausalLM) -> CausalLM:
    """``model`` itself, or for ``runtime.scan_layers=true`` an unrolled copy sharing its values
    (the cached call walks the layers one by one, each with its own cache)."""
    if not model.runtime.scan_layers:
        return model
    runtime = dataclasses.replace(model.runtime, scan_layers=False)
    abstract = nnx.eval_shape(lambda: CausalLM(model.cfg, runtime=runtime, rngs=nnx.Rngs(0)))
    graphdef, abs_state = nnx.split(abstract)
    values = nnx.to_pure_dict(unstack_layer_params(nnx.state(model), model.cfg))
    nnx.replace_by_pure_dict(abs_state, values)
    return nnx.merge(graphdef, abs_state)


def count_params(model: nnx.Module) -> int:
    """Total number of parameter elements (``nnx.Param`` leaves) in ``model``."""
    state = nnx.state(model, nnx.Param)
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(state)))
