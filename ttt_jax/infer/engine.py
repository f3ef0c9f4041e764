"""Prefill and decode of a :class:`~ttt_jax.models.lm.CausalLM` with a :class:`~ttt_jax.infer.cache.Cache`.

:func:`extend` is the whole model over ``T`` new tokens of every sequence of a batch, each sequence
at its own position (``cache.lengths``): the model's own blocks run with their layer caches
(``CausalLM.hidden(tokens, cache=..., step=CacheStep(...))``; attention from its KV cache,
:mod:`ttt_jax.nn.kv_cache`, In-Place TTT from its fast weight, :mod:`ttt_jax.nn.ttt_cache`,
TTT-Linear/MLP layers from their inner models' states, :mod:`ttt_jax.nn.ttt_seq_cache`) and compute,
for those tokens, what one forward pass over the whole sequence computes (tested: prefill in
blocks plus token-by-token decode gives the logits of ``model(tokens)``). The engine keeps the
lengths, builds the step, and samples. TTT-E2E models are not supported
(:func:`~ttt_jax.models.lm.check_cacheable`). :class:`Engine` wraps it in jitted functions over the
split model state:

* :meth:`Engine.prefill` -- prompts of different lengths, consumed in blocks of ``prefill_block``
  tokens (memory bounded by the block, not the prompt), returning the logits of each prompt's last
  token;
* :meth:`Engine.decode` -- one token per sequence (sequences marked inactive are left untouched),
  returning the next-token logits and the next token sampled on the device
  (:func:`ttt_jax.infer.sampling.sample_logits`);
* :meth:`Engine.decode_loop` -- up to ``n`` such steps in one call (a ``lax.while_loop`` on the
  device, stop tokens included), so the host is not in the loop of every token.

Parameters may be sharded (a model from ``load_model(path, mesh=...)``): the jitted functions take
the state as an argument, so XLA keeps each weight where it lives and partitions the work.
"""

from __future__ import annotations

import functools
from typing import Mapping, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ttt_jax.infer.cache import Cache, init_cache
from ttt_jax.infer.sampling import sample_logits
from ttt_jax.models.lm import CausalLM, check_cacheable, check_tokens, unrolled_model
from ttt_jax.nn.cache import CacheStep, round_up
from ttt_jax.platform import normalise, target_platform


def extend(model: CausalLM, cache: Cache, tokens: jax.Array, n_valid: jax.Array, *,
           q_deltas: Optional[Mapping[int, jax.Array]] = None, attn_impl: str = "auto",
           attn_block: int = 512, attn_platform: Optional[str] = None) -> tuple[jax.Array, Cache]:
    """The model over ``T`` new tokens of every sequence, continuing from ``cache``.

    Args:
      model: an unrolled :class:`CausalLM` (see :func:`~ttt_jax.models.lm.unrolled_model`).
      cache: the state after ``cache.lengths[b]`` tokens of sequence ``b``.
      tokens: ``[B, T]`` int32; row ``b`` holds ``n_valid[b]`` real tokens then padding (any id in
        the vocabulary).
      n_valid: ``[B]`` int32 in ``[0, T]``.
      q_deltas: optional ``{layer: [B, D, H, Dh]}`` query-kernel additions (query-only TTT).
      attn_impl, attn_block: :func:`ttt_jax.ops.attention_cache.cache_attention` options.
      attn_platform: the platform the step is built for (:class:`~ttt_jax.nn.cache.CacheStep`).

    Returns:
      ``([B, T, D]`` final-normed hidden states (compute dtype; padding rows are garbage), the
      cache after the real tokens, with ``lengths + n_valid``).
    """
    n_valid = n_valid.astype(jnp.int32)
    step = CacheStep(start=cache.lengths, n_valid=n_valid, q_deltas=dict(q_deltas or {}),
                     attn_impl=attn_impl, attn_block=attn_block, attn_platform=attn_platform)
    hidden, layers = model.hidden(tokens, cache=cache.layers, step=step)
    return hidden, Cache(lengths=cache.lengths + n_valid, layers=layers)


def prefill_forward(model: CausalLM, cache: Cache, tokens: jax.Array) -> tuple[jax.Array, Cache]:
    """Fill *empty* caches with whole prompts of equal length through the model's forward pass.

    The layer outputs come from the modules' forward pass -- under a mesh with a ``context`` axis
    that is the context-parallel forward (ring / halo attention, the cross-device In-Place TTT
    scan), so a long prompt is split over devices -- and the caches are filled position-wise
    (``CacheStep(fill=True)``): keys and values of every position (the last ``window`` for ring
    buffers), the fast weight after the complete chunks and the rows of the final partial chunk.
    TTT-Linear/MLP layers are sequential in their state and run as in :func:`extend` (one device
    along the sequence). Equal to :func:`extend` from an empty cache (tested).

    Args:
      model: an unrolled :class:`CausalLM`.
      cache: an empty cache (``lengths == 0``) of batch ``B``.
      tokens: ``[B, T]`` int32, every row a whole prompt of ``T`` tokens.

    Returns:
      ``([B, T, D]`` final-normed hidden states, the cache with ``lengths = T``).
    """
    b, t = tokens.shape
    step = CacheStep(start=cache.lengths, n_valid=jnp.full((b,), t, jnp.int32), fill=True)
    hidden, layers = model.hidden(tokens, cache=cache.layers, step=step)
    return hidden, Cache(lengths=cache.lengths + t, layers=layers)


def _last_rows(x: jax.Array, n_valid: jax.Array) -> jax.Array:
    """``x [B, T, ...]`` -> ``x[b, n_valid[b] - 1]`` (row 0 when ``n_valid`` is 0)."""
    idx = jnp.maximum(n_valid - 1, 0)[:, None]
    return jnp.take_along_axis(x, idx.reshape(idx.shape + (1,) * (x.ndim - 2)), axis=1)[:, 0]


def _block_size(longest: int, prefill_block: int) -> int:
    """Prefill block length: the prompt rounded up to a power of two (few distinct compilations),
    at most ``prefill_block``."""
    size = 16
    while size < longest and size < prefill_block:
        size *= 2
    return min(size, prefill_block)


class StaticGraph:
    """A graph definition as a static jit argument, hashed once (hashing a GraphDef walks the whole
    graph, which would cost about a millisecond on every decode step)."""

    def __init__(self, graphdef):
        self.graphdef = graphdef
        self._hash = hash(graphdef)

    def __hash__(self):
        return self._hash

    def __eq__(self, other):
        return self is other or (isinstance(other, StaticGraph) and self.graphdef == other.graphdef)


# Jitted at module level with the graph definition static: engines of the same model structure
# (a reloaded checkpoint, another Engine over the same model) share compilations.
@functools.partial(jax.jit, static_argnames=("graphdef", "logits", "attn_impl", "attn_block",
                                             "attn_platform"), donate_argnames=("cache",))
def extend_step(graphdef, state, cache, tokens, n_valid, q_deltas, *, logits: str, attn_impl: str,
                attn_block: int, attn_platform: Optional[str] = None):
    """Jitted :func:`extend` of ``tokens [B, T]`` plus logits (``logits="all"``: ``[B, T, V]``;
    ``"last"``: ``[B, V]`` at each row's last real token), with the cache donated. ``graphdef`` is a
    :class:`StaticGraph`. Public so that ``ttt-jax compile`` lowers the same program."""
    model = nnx.merge(graphdef.graphdef, state)
    hidden, cache = extend(model, cache, tokens, n_valid, q_deltas=q_deltas, attn_impl=attn_impl,
                           attn_block=attn_block, attn_platform=attn_platform)
    if logits == "all":
        return model.logits(hidden), cache
    return model.logits(_last_rows(hidden, n_valid)[:, None])[:, 0], cache


@functools.partial(jax.jit, static_argnames=("graphdef", "attn_impl", "attn_block", "attn_platform"),
                   donate_argnames=("cache",))
def decode_step(graphdef, state, cache, tokens, active, q_deltas, key, temperature, top_k, top_p, *,
                attn_impl: str, attn_block: int, attn_platform: Optional[str] = None):
    """One jitted decode step: feed ``tokens [B]`` (rows with ``active`` false leave their cache
    unchanged), sample the next ``[B]`` tokens; returns ``(next tokens, logits [B, V], cache)``."""
    model = nnx.merge(graphdef.graphdef, state)
    hidden, cache = extend(model, cache, tokens[:, None], active.astype(jnp.int32), q_deltas=q_deltas,
                           attn_impl=attn_impl, attn_block=attn_block, attn_platform=attn_platform)
    logits = model.logits(hidden)[:, 0]
    return sample_logits(logits, key, temperature, top_k, top_p), logits, cache


@functools.partial(jax.jit, static_argnames=("graphdef", "size", "return_logits", "attn_impl",
                                             "attn_block", "attn_platform"), donate_argnames=("cache",))
def _decode_loop_jit(graphdef, state, cache, tokens, active, stop, q_deltas, key, step0, n, temperature,
                     top_k, top_p, *, size: int, return_logits: bool, attn_impl: str, attn_block: int,
                     attn_platform: Optional[str]):
    model = nnx.merge(graphdef.graphdef, state)
    b = tokens.shape[0]
    vocab = model.cfg.vocab_size

    def step(i, cache, tok, active):
        # Exactly the one-token step of decode_step: feed `tok`, sample with fold_in(key, step0 + i).
        hidden, cache = extend(model, cache, tok[:, None], active.astype(jnp.int32), q_deltas=q_deltas,
                               attn_impl=attn_impl, attn_block=attn_block, attn_platform=attn_platform)
        logits = model.logits(hidden)[:, 0]
        new = sample_logits(logits, jax.random.fold_in(key, step0 + i), temperature, top_k, top_p)
        return new, logits, cache

    def cond(carry):
        i, _, _, active, _, _ = carry
        return (i < n) & jnp.any(active)

    def body(carry):
        i, cache, tok, active, toks, rows = carry
        tok, logits, cache = step(i, cache, tok, active)
        toks = toks.at[i].set(tok)
        if return_logits:
            rows = rows.at[i].set(logits.astype(rows.dtype))
        # A stop token ends its sequence: from the next step on it is inactive (cache untouched).
        active = active & ~jnp.any(tok[:, None] == stop[None, :], axis=-1)
        return i + 1, cache, tok, active, toks, rows

    toks = jnp.zeros((size, b), jnp.int32)
    rows = jnp.zeros((size, b, vocab) if return_logits else (0,), jnp.float32)
    i, cache, tok, active, toks, rows = jax.lax.while_loop(
        cond, body, (jnp.int32(0), cache, tokens, active, toks, rows))
    return DecodeLoop(tokens=toks, logits=rows if return_logits else None, steps=i, last=tok,
                      active=active, cache=cache)


@functools.partial(jax.jit, static_argnames=("graphdef",), donate_argnames=("cache",))
def _prefill_forward_jit(graphdef, state, cache, tokens):
    model = nnx.merge(graphdef.graphdef, state)
    hidden, cache = prefill_forward(model, cache, tokens)
    return model.logits(hidden[:, -1:])[:, 0], cache


class DecodeLoop(NamedTuple):
    """What :meth:`Engine.decode_loop` returns (device arrays; ``S`` = ``size``).

    Attributes:
      tokens: ``[S, B]`` int32; row ``i`` holds the tokens sampled at step ``i`` (rows from ``steps``
        on are zero; entries of sequences inactive at step ``i`` are meaningless).
      logits: ``[S, B, V]`` fp32 logits row ``i`` was sampled from (``None`` unless requested).
      steps: int32 scalar, the steps run: ``n``, or fewer once every sequence had stopped.
      last: ``[B]`` int32, the tokens of the last step run (the input tokens when none ran): the
        next call's ``tokens``.
      active: ``[B]`` bool, the sequences still going (the next call's ``active``).
      cache: the cache after the steps.
    """

    tokens: jax.Array
    logits: Optional[jax.Array]
    steps: jax.Array
    last: jax.Array
    active: jax.Array
    cache: Cache


class Engine:
    """Jitted prefill / decode of one model.

    Args:
      model: a :class:`CausalLM` (scanned layers are unrolled, sharing the values).
      prefill_block: prompt tokens per prefill call (bounds activation memory).
      attn_block: keys per block of the cache attention (blockwise and TPU kernel).
      attn_impl: :func:`ttt_jax.ops.attention_cache.cache_attention` implementation.
      platform: the platform the steps are built for (``"cpu" | "gpu" | "tpu"``); default: that of
        the devices holding the model's parameters (:func:`state_platform`). With
        ``attn_impl="auto"`` the cache attention is the Pallas TPU kernel on TPU.
    """

    def __init__(self, model: CausalLM, *, prefill_block: int = 1024, attn_block: int = 512,
                 attn_impl: str = "auto", platform: Optional[str] = None):
        if prefill_block < 1:
            raise ValueError(f"prefill_block must be >= 1, got {prefill_block}")
        check_cacheable(model.cfg)
        model = unrolled_model(model)
        self.cfg = model.cfg
        self.prefill_block = int(prefill_block)
        self.attn_block = int(attn_block)
        self.attn_impl = attn_impl
        self.graphdef, self.state = nnx.split(model)
        self._static = StaticGraph(self.graphdef)
        self.platform = state_platform(self.state) if platform is None else normalise(platform)

    def model(self, state=None) -> CausalLM:
        """The model (``state`` replaces the parameters, e.g. inside a jitted function)."""
        return nnx.merge(self.graphdef, self.state if state is None else state)

    def _extend(self, cache, tokens, n_valid, q_deltas, *, logits: str):
        return extend_step(self._static, self.state, cache, tokens, n_valid, q_deltas, logits=logits,
                           attn_impl=self.attn_impl, attn_block=self.attn_block,
                           attn_platform=self.platform)

    # -- host API -------------------------------------------------------------------------------

    def init_cache(self, batch_size: int, max_len: int, *, ring: bool = True) -> Cache:
        """An empty cache for ``batch_size`` sequences of at most ``max_len`` tokens."""
        return init_cache(self.cfg, batch_size, max_len, ring=ring)

    def _check_room(self, cache: Cache, extra: np.ndarray) -> None:
        need = int(np.max(np.asarray(cache.lengths) + extra))
        for i, lc in enumerate(cache.layers):
            if lc.kv is not None and not lc.kv.ring and need > lc.kv.capacity:
                raise ValueError(f"the KV cache of layer {i} holds {lc.kv.capacity} tokens but "
                                 f"{need} are needed; build the cache with a larger max_len")

    def prefill(self, cache: Cache, prompts: Sequence[Sequence[int]] | np.ndarray, *,
                lengths: Optional[Sequence[int]] = None, logits: str = "last",
                q_deltas: Optional[Mapping[int, jax.Array]] = None):
        """Consume one prompt per sequence (different lengths allowed) in blocks.

        Args:
          cache: the batch's cache (donated: do not reuse the object passed in).
          prompts: ``B`` token lists, or a ``[B, L]`` array with per-row ``lengths``.
          logits: ``"last"`` -> ``[B, V]`` fp32 logits of each prompt's last token (a sequence
            with an empty prompt gets zeros); ``"all"`` -> ``[B, L, V]`` logits of every prompt
            position (padding rows garbage).

        Returns:
          ``(logits, cache)``.
        """
        if logits not in ("last", "all"):
            raise ValueError(f"logits must be 'last' or 'all', got {logits!r}")
        tokens, lens = pad_prompts(prompts, lengths)
        if tokens.shape[0] != cache.batch_size:
            raise ValueError(f"{tokens.shape[0]} prompts for a cache of batch {cache.batch_size}")
        check_tokens(tokens, self.cfg.vocab_size)
        self._check_room(cache, lens)
        longest = max(int(lens.max()), 1)
        blk = _block_size(longest, self.prefill_block)
        total = round_up(longest, blk)
        tokens = np.pad(tokens, [(0, 0), (0, total - tokens.shape[1])])
        q_deltas = dict(q_deltas or {})
        out = []
        last = jnp.zeros((cache.batch_size, self.cfg.vocab_size), jnp.float32)
        for s in range(0, total, blk):
            n = np.clip(lens - s, 0, blk).astype(np.int32)
            res, cache = self._extend(cache, jnp.asarray(tokens[:, s:s + blk]), jnp.asarray(n), q_deltas,
                                      logits=logits)
            if logits == "all":
                out.append(res)
            else:
                last = jnp.where(jnp.asarray(n > 0)[:, None], res, last)
        if logits == "all":
            return jnp.concatenate(out, axis=1)[:, :int(lens.max())], cache
        return last, cache

    def prefill_parallel(self, cache: Cache, tokens) -> tuple[jax.Array, Cache]:
        """Prefill empty caches with ``tokens [B, T]`` (equal-length prompts) in one forward pass
        (:func:`prefill_forward`): under ``jax.set_mesh(mesh)`` with ``mesh.context = n > 1`` the
        sequence is split over ``n`` devices (``T`` must be a multiple of ``n`` times the TTT chunk
        size). Returns the ``[B, V]`` logits of the last token and the cache. Memory grows with ``T``
        (divided over the devices): this is the path for long prompts on a mesh; :meth:`prefill`
        bounds memory on one device."""
        from ttt_jax.nn.context import context_size

        tokens = np.asarray(tokens, np.int32)
        if tokens.ndim != 2 or tokens.shape[0] != cache.batch_size:
            raise ValueError(f"tokens must be [B, T] with B = {cache.batch_size}, got {tokens.shape}")
        if np.any(np.asarray(cache.lengths)):
            raise ValueError("prefill_parallel fills empty caches; use prefill to continue a sequence")
        check_tokens(tokens, self.cfg.vocab_size)
        self._check_room(cache, np.full((cache.batch_size,), tokens.shape[1], np.int64))
        n = context_size()
        if n > 1 and self.cfg.ttt_seq.layer_ids(self.cfg.n_layers):
            raise ValueError("TTT-Linear/MLP layers (model.ttt_seq) are sequential in their state and "
                             "cannot be prefilled with context parallelism; use prefill")
        unit = n * (self.cfg.ttt.chunk_size if self.cfg.ttt.layer_ids(self.cfg.n_layers) and n > 1 else 1)
        if tokens.shape[1] % unit:
            raise ValueError(f"prompt length {tokens.shape[1]} must be a multiple of mesh.context={n} x "
                             f"the TTT chunk size = {unit} for a context-parallel prefill")
        return _prefill_forward_jit(self._static, self.state, cache, jnp.asarray(tokens))

    def decode(self, cache: Cache, tokens, *, active=None, key=None, temperature: float = 0.0,
               top_k: int = 0, top_p: float = 1.0, q_deltas: Optional[Mapping[int, jax.Array]] = None,
               check: bool = True):
        """Feed one token per sequence: ``tokens [B]`` int; ``active [B]`` bool (default all).

        Returns ``(next_tokens [B] int32 sampled from the new logits, logits [B, V] fp32, cache)``;
        inactive sequences' caches are unchanged. The cache passed in is donated. ``check=False``
        skips the host-side checks (token range, cache room), which wait for the previous step:
        for loops that have checked once up front and keep the device busy.
        """
        b = cache.batch_size
        if check:
            check_tokens(np.asarray(tokens), self.cfg.vocab_size)
            self._check_room(cache, np.ones((b,), np.int64) if active is None else np.asarray(active, np.int64))
        tokens = jnp.asarray(tokens, jnp.int32).reshape(b)
        active = jnp.ones((b,), bool) if active is None else jnp.asarray(active, bool).reshape(b)
        key = jax.random.key(0) if key is None else key
        return decode_step(self._static, self.state, cache, tokens, active, dict(q_deltas or {}), key,
                           jnp.float32(temperature), jnp.int32(top_k), jnp.float32(top_p),
                           attn_impl=self.attn_impl, attn_block=self.attn_block,
                           attn_platform=self.platform)

    def decode_loop(self, cache: Cache, tokens, n: int, *, active=None, key=None, step0: int = 0,
                    stop_tokens: Sequence[int] = (), temperature: float = 0.0, top_k: int = 0,
                    top_p: float = 1.0, q_deltas: Optional[Mapping[int, jax.Array]] = None,
                    size: Optional[int] = None, return_logits: bool = False,
                    check: bool = True) -> DecodeLoop:
        """Up to ``n`` decode steps in one jitted call: a ``lax.while_loop`` on the device.

        Step ``i`` is :meth:`decode` with ``key = jax.random.fold_in(key, step0 + i)``: it feeds the
        previous step's tokens (``tokens [B]`` at step 0) of the active sequences and samples the
        next ones. A sequence whose sampled token is in ``stop_tokens`` becomes inactive after that
        step (the stop token is never fed, its cache stays as it was), and the loop ends early once
        no sequence is active. So the tokens and logits are those of the per-token loop of
        :func:`ttt_jax.infer.generate.generate` with ``decode_block=0`` (tested); the host sees the
        results once per call instead of once per token.

        ``size`` (default ``n``) is the length of the output buffers and part of the compiled
        function; ``n <= size`` is a traced value, so a shorter last block reuses the compilation.
        The cache passed in is donated. Returns a :class:`DecodeLoop`.
        """
        b = cache.batch_size
        size = int(n if size is None else size)
        if not 0 <= n <= size or size < 1:
            raise ValueError(f"need 0 <= n <= size and size >= 1, got n={n}, size={size}")
        if check:
            check_tokens(np.asarray(tokens), self.cfg.vocab_size)
            steps = n * (np.ones((b,), np.int64) if active is None else np.asarray(active, np.int64))
            self._check_room(cache, steps)
        tokens = jnp.asarray(tokens, jnp.int32).reshape(b)
        active = jnp.ones((b,), bool) if active is None else jnp.asarray(active, bool).reshape(b)
        key = jax.random.key(0) if key is None else key
        # -1 matches no token; at least one entry keeps the shape non-empty.
        stop = np.full((max(len(stop_tokens), 1),), -1, np.int32)
        stop[:len(stop_tokens)] = np.asarray(stop_tokens, np.int32)
        return _decode_loop_jit(self._static, self.state, cache, tokens, active, jnp.asarray(stop),
                                dict(q_deltas or {}), key, jnp.int32(step0), jnp.int32(n),
                                jnp.float32(temperature), jnp.int32(top_k), jnp.float32(top_p),
                                size=size, return_logits=bool(return_logits), attn_impl=self.attn_impl,
                                attn_block=self.attn_block, attn_platform=self.platform)


def state_platform(state) -> str:
    """The platform of the devices holding ``state``'s arrays (its first committed leaf), else
    :func:`ttt_jax.platform.target_platform`."""
    for leaf in jax.tree.leaves(state):
        devices = getattr(getattr(leaf, "sharding", None), "device_set", None)
        if devices:
            return normalise(next(iter(devices)).platform)
    return target_platform()


def pad_prompts(prompts, lengths) -> tuple[np.ndarray, np.ndarray]:
    """Prompts -> ``([B, L]`` int32 right-padded with 0, ``[B]`` lengths)."""
    if isinstance(prompts, (np.ndarray, jax.Array)) and np.ndim(prompts) == 2:
        arr = np.asarray(prompts).astype(np.int32)
        lens = np.full((arr.shape[0],), arr.shape[1], np.int64) if lengths is None else \
            np.asarray(lengths, np.int64)
        if lens.shape != (arr.shape[0],) or lens.min() < 0 or lens.max() > arr.shape[1]:
            raise ValueError(f"lengths must be [B] = [{arr.shape[0]}] in [0, {arr.shape[1]}], got {lens}")
        return arr, lens
    rows = [np.asarray(p, np.int64).reshape(-1) for p in prompts]
    if not rows:
        raise ValueError("no prompts given")
    lens = np.asarray([len(r) for r in rows], np.int64)
    arr = np.zeros((len(rows), max(int(lens.max()), 1)), np.int32)
    for i, r in enumerate(rows):
        arr[i, :len(r)] = r
    return arr, lens
