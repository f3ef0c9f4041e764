"""Query-only test-time training (qTTT; Bansal et al., arXiv 2512.13898; ../METHODS.md summary).

After the prompt is prefilled, take ``steps`` gradient steps on the query projections only. Each
step samples, per sequence, one span of ``span`` consecutive prompt tokens (start uniform over the
positions whose span and next-token targets lie inside the prompt) and minimises the mean
next-token NLL over the span. The span's queries are recomputed at their original absolute
positions and attend to the *frozen* KV cache -- keys and values are never recomputed, including
the span's own entries -- so only ``W_Q`` receives gradients. Decoding then uses the adapted
queries with the same cache.

What is adapted is a per-sequence addition to the query kernel ``[D, H, Dh]`` of the chosen
layers (every sequence of a batch gets its own, learned from its own prompt): either the full
matrix (``rank=0``) or a low-rank adapter ``A B`` (``A [D, r]`` random, ``B [r, H, Dh]`` zero, so the
adapter starts at exactly zero). The model's parameters and the cache are never modified.
Optimiser: per-sequence gradient-norm clipping (``grad_clip``), then AdamW (``lr``,
``weight_decay`` on the adaptation, i.e. towards the pretrained ``W_Q``).

Choices where the method leaves a model like ours unspecified:

* Sliding-window layers need their old keys for spans deep in the prompt, so qTTT builds full
  (not ring-buffer) caches for them; they still attend within their window.
* In-Place TTT layers: the fast weight in force at a span's chunk is not kept after prefill
  (only the current one is), and the current one has learned from the span's own next tokens, so
  during span training those layers use their slow weight ``W0`` (the fast-weight contribution is
  left out; decoding afterwards uses the real fast weights).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from ttt_jax.infer.cache import Cache
from ttt_jax.ops.attention_cache import cache_attention


@dataclasses.dataclass(frozen=True)
class QTTTConfig:
    """Options of query-only TTT (see the module docstring).

    Attributes:
      steps: gradient steps (0 = off).
      span: tokens per sampled span (shortened to the shortest prompt minus one when longer).
      lr: AdamW learning rate (the method reports flat results for 1e-5 .. 1e-6 on a 4B model).
      layers: attention layers whose queries adapt (``None`` = all).
      rank: 0 = full query kernels; ``r > 0`` = a rank-``r`` adapter per layer.
      weight_decay: AdamW weight decay of the adaptation.
      grad_clip: per-sequence global gradient-norm clip.
      seed: span sampling (and adapter initialisation) seed.
    """

    steps: int = 0
    span: int = 128
    lr: float = 1e-5
    layers: Optional[tuple[int, ...]] = None
    rank: int = 0
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    seed: int = 0

    def validate(self, n_layers: int) -> None:
        if self.steps < 0:
            raise ValueError(f"qttt steps must be >= 0, got {self.steps}")
        if self.span < 1:
            raise ValueError(f"qttt span must be >= 1, got {self.span}")
        if self.lr < 0:
            raise ValueError(f"qttt lr must be >= 0, got {self.lr}")
        if self.rank < 0:
            raise ValueError(f"qttt rank must be >= 0 (0 = full query kernels), got {self.rank}")
        if self.layers is not None:
            bad = [i for i in self.layers if not 0 <= i < n_layers]
            if bad or not self.layers:
                raise ValueError(f"qttt layers must be a non-empty list of layer indices in [0, {n_layers}), "
                                 f"got {list(self.layers)}")

    def layer_ids(self, n_layers: int) -> tuple[int, ...]:
        return tuple(range(n_layers)) if self.layers is None else tuple(sorted(set(self.layers)))


def span_hidden(model, cache: Cache, tokens: jax.Array, start: jax.Array,
                q_deltas: dict, platform: Optional[str] = None) -> jax.Array:
    """Final-normed hidden states ``[B, k, D]`` of span tokens ``[B, k]`` at positions
    ``start[b] + i``, attending to the frozen cache (read only; see the module docstring).
    ``platform``: the cache attention's target (``Engine.platform``)."""
    k = tokens.shape[1]
    positions = start[:, None] + jnp.arange(k, dtype=jnp.int32)[None, :]
    x = model.embed_tokens(tokens)
    for i, (block, lc) in enumerate(zip(model.layers, cache.layers)):
        attn = block.attn
        q, _, _ = attn.project(block.attn_norm(x), positions, q_deltas.get(i))
        kv = lc.kv
        out = cache_attention(q, positions, jax.lax.stop_gradient(kv.k), jax.lax.stop_gradient(kv.v),
                              kv.slot_positions(cache.lengths), window=kv.window, platform=platform)
        x = x + jnp.einsum("bthk,hkd->btd", out, attn.o[...].astype(attn.dtype),
                           preferred_element_type=jnp.float32).astype(attn.dtype)
        h = block.mlp_norm(x)
        mlp = block.mlp
        # In-Place TTT layers: slow weight W0 only (module docstring).
        x = x + jnp.einsum("btf,fd->btd", mlp.activation(h), mlp.down[...].astype(mlp.dtype),
                           preferred_element_type=jnp.float32).astype(mlp.dtype)
    return model.final_norm(x)


def _deltas(params: dict) -> dict:
    """Adapter parameters -> ``{layer: [B, D, H, Dh]}`` query-kernel additions."""
    out = {}
    for name, p in params.items():
        layer = int(name)
        out[layer] = p["full"] if "full" in p else jnp.einsum("bdr,brhk->bdhk", p["a"], p["b"])
    return out


def init_adapters(model, batch: int, cfg: QTTTConfig, key: jax.Array) -> dict:
    """Zero-valued adaptation parameters ``{"<layer>": {"full": [B, D, H, Dh]} | {"a", "b"}}``."""
    out = {}
    for i in cfg.layer_ids(model.cfg.n_layers):
        d, h, dh = model.layers[i].attn.q.shape
        if cfg.rank == 0:
            out[str(i)] = {"full": jnp.zeros((batch, d, h, dh), jnp.float32)}
        else:
            key, sub = jax.random.split(key)
            out[str(i)] = {"a": jax.random.normal(sub, (batch, d, cfg.rank), jnp.float32) / np.sqrt(d),
                           "b": jnp.zeros((batch, cfg.rank, h, dh), jnp.float32)}
    return out


def _per_sequence_clip(grads, max_norm: float):
    """Scale each sequence's gradient (index ``b`` of every leaf) to global norm <= ``max_norm``."""
    sq = sum(jnp.sum(jnp.square(g), axis=tuple(range(1, g.ndim))) for g in jax.tree.leaves(grads))
    norm = jnp.sqrt(sq)
    scale = jnp.where(norm > max_norm, max_norm / jnp.maximum(norm, 1e-30), 1.0)
    return jax.tree.map(lambda g: g * scale.reshape((-1,) + (1,) * (g.ndim - 1)), grads)


def span_loss(model, cache: Cache, params: dict, tokens: jax.Array, start: jax.Array, span: int,
              platform: Optional[str] = None):
    """Per-sequence mean next-token NLL ``[B]`` over spans ``tokens[b, start[b] : start[b] + span]``
    (targets one position later); ``tokens [B, L]`` the padded prompts."""
    idx = start[:, None] + jnp.arange(span + 1, dtype=jnp.int32)[None, :]
    seq = jnp.take_along_axis(tokens, idx, axis=1)
    hidden = span_hidden(model, cache, seq[:, :-1], start, _deltas(params), platform)
    logits = model.logits(hidden)
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, seq[:, 1:, None], axis=-1)[..., 0]
    return jnp.mean(nll, axis=-1)


def _optimizer(cfg: QTTTConfig, lr):
    return optax.adamw(lr, weight_decay=cfg.weight_decay)


@functools.partial(jax.jit, static_argnames=("graphdef", "cfg", "span", "platform"))
def _step(graphdef, cfg, span, state, cache, params, opt_state, tokens, lens, key, lr, platform=None):
    """One qTTT step: sample spans, per-sequence gradient, clip, AdamW. Returns the new params,
    optimizer state and the ``[B]`` span losses before the update."""
    model = nnx.merge(graphdef.graphdef, state)
    # Start uniform in [0, len - 1 - span]: the span and its targets lie inside the prompt.
    start = jax.random.randint(key, lens.shape, 0, lens - span).astype(jnp.int32)

    def loss_fn(p):
        per_seq = span_loss(model, cache, p, tokens, start, span, platform)
        return jnp.sum(per_seq), per_seq

    grads, per_seq = jax.grad(loss_fn, has_aux=True)(params)
    grads = _per_sequence_clip(grads, cfg.grad_clip)
    updates, opt_state = _optimizer(cfg, lr).update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, per_seq


def adapt_queries(engine, cache: Cache, prompts: Sequence[Sequence[int]], cfg: QTTTConfig):
    """Run qTTT for a prefilled batch.

    Args:
      engine: the :class:`ttt_jax.infer.engine.Engine` that prefilled ``cache``.
      cache: the cache after prefilling exactly ``prompts`` (full, not ring, KV caches; read only).
      prompts: the ``B`` prompts' tokens.
      cfg: :class:`QTTTConfig`.

    Returns:
      ``(q_deltas, losses)``: ``{layer: [B, D, H, Dh]}`` for :meth:`Engine.decode` (empty when
      ``steps == 0``) and the ``[steps, B]`` span losses measured at each step before its update.
    """
    from ttt_jax.infer.engine import pad_prompts

    model_cfg = engine.cfg
    cfg.validate(model_cfg.n_layers)
    if model_cfg.ttt_seq.layer_ids(model_cfg.n_layers):
        raise ValueError("qTTT does not support models with TTT-Linear/MLP layers (model.ttt_seq)")
    if cfg.steps == 0:
        return {}, np.zeros((0, cache.batch_size), np.float32)
    tokens, lens = pad_prompts(prompts, None)
    if not np.array_equal(np.asarray(cache.lengths), lens):
        raise ValueError("qTTT needs the cache right after prefilling exactly these prompts")
    for i, lc in enumerate(cache.layers):
        if lc.kv.ring and lc.kv.window < int(lens.max()):
            raise ValueError(f"qTTT re-reads old positions, but layer {i} keeps only a ring buffer of "
                             f"{lc.kv.window} tokens; build the cache with ring=False")
    span = min(cfg.span, int(lens.min()) - 1)
    if span < 1:
        raise ValueError("qTTT needs prompts of at least 2 tokens")
    key = jax.random.key(cfg.seed)
    key, init_key = jax.random.split(key)
    model = engine.model()
    params = init_adapters(model, cache.batch_size, cfg, init_key)
    opt_state = _optimizer(cfg, cfg.lr).init(params)
    tokens_d, lens_d = jnp.asarray(tokens), jnp.asarray(lens, jnp.int32)
    static = dataclasses.replace(cfg, steps=1, seed=0, lr=0.0)   # what the compiled step may vary on
    losses = []
    for s in range(cfg.steps):
        params, opt_state, loss = _step(engine._static, static, span, engine.state, cache, params, opt_state,
                                        tokens_d, lens_d, jax.random.fold_in(key, s), jnp.float32(cfg.lr),
                                        platform=engine.platform)
        losses.append(np.asarray(loss))
    deltas = {i: d.astype(jnp.dtype(model_cfg.compute_dtype)) for i, d in _deltas(params).items()}
    return deltas, np.stack(losses)
