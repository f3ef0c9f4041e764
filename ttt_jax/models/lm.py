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

With ``runtime.scan_layers=true`` the layers are grouped in periods of ``P`` layers (``P =
ttt.every`` with In-Place TTT, 1 without; see :func:`scan_period`) and their parameters are stored
*stacked* over the ``G = L / P`` groups: layer ``i`` is slot ``p = i % P`` of group ``g = i // P``,
and ``layers/{p}/...`` holds the parameter of ``layers/{i}/...`` above at index ``g`` of a new
leading axis whose logical name is ``"layers"`` (:data:`LAYERS_AXIS`)::

    layers/{p}/attn_norm/scale  [G, D]         (layers, norm)                        p in [0, P)
    layers/{p}/attn/q           [G, D, H, Dh]  (layers, embed, heads, head_dim)
    layers/{p}/mlp/down         [G, F, D]      (layers, mlp, embed)
    layers/{p}/mlp/ttt_conv     [G, K, D]      (layers, conv, embed)  -- the TTT slot p = ttt.start only
    layers/{p}/mlp/ttt_proj     [G, D, D]      (layers, embed, None)  -- the TTT slot only
    ...                                         (every layers/{i}/... entry above likewise)

``embed``, ``final_norm`` and ``lm_head`` are unchanged. ``"layers"`` is not one of
``ttt_jax.nn.params.LOGICAL_AXES`` and has no rule in ``parallel.rules.DEFAULT_RULES`` yet (map it
to ``None`` to keep the group axis unsharded). The forward pass runs one ``nnx.scan``
over ``g`` whose body applies the ``P`` blocks of the group in order (each one under ``nnx.remat``
when ``runtime.remat``), so under remat every layer keeps only its ``[B, T, D]`` input for the
backward pass. :func:`stack_layer_params` / :func:`unstack_layer_params` convert a state between
the two layouts (weights of an unrolled model into a scanned one, checkpoints, HF conversion).
"""

from __future__ import annotations

import functools
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ttt_jax.config import ConfigError, ModelConfig, RuntimeConfig
from ttt_jax.models.e2e import e2e_hidden, e2e_hidden_reference
from ttt_jax.nn.block import DecoderBlock
from ttt_jax.nn.context import context_size
from ttt_jax.nn.norm import RMSNorm
from ttt_jax.nn.params import make_param, normal_init
from ttt_jax.ops.checkpoint_names import SAVE_EXCHANGES_NAMES

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


LAYERS_AXIS = "layers"
"""Logical name of the leading (group) axis of the stacked layer parameters (``runtime.scan_layers``)."""

_SCAN_METADATA = {nnx.PARTITION_NAME: LAYERS_AXIS}


def scan_period(cfg: ModelConfig) -> int:
    """The period ``P`` of the layer structure that ``runtime.scan_layers`` scans over.

    ``P = ttt.every`` when In-Place TTT is on and placed by ``ttt.every``/``ttt.start``; with an
    explicit ``ttt.layers`` list, its spacing (``[1, 3, 5, 7]`` gives 2; a single layer gives
    ``n_layers``); 1 without TTT layers. Raises :class:`~ttt_jax.config.ConfigError` (a
    ``ValueError``) naming the reason and the fix unless ``n_layers % P == 0``, the TTT layers are
    exactly ``{i : i % P == start}`` with ``start < P``, and the attention window of layer ``i``
    depends only on ``i % P``.
    """
    n, t = cfg.n_layers, cfg.ttt
    off = "; or set runtime.scan_layers=false"
    ids = list(t.layer_ids(n))
    if not ids:
        period = 1
    elif t.layers is None:
        period, start = t.every, t.start
        if start >= period:
            raise ConfigError(
                f"runtime.scan_layers=true needs model.ttt.start < model.ttt.every (every period of "
                f"{period} layers must hold its TTT layer at the same slot), got ttt.start={start}, "
                f"ttt.every={period}; set ttt.start={start % period}" + off)
        if n % period:
            raise ConfigError(
                f"model.n_layers={n} is not a multiple of model.ttt.every={period} (scanned layers "
                f"come in whole periods of {period} layers); make n_layers a multiple of "
                "ttt.every" + off)
    else:
        start = ids[0]
        period = ids[1] - ids[0] if len(ids) > 1 else n
        if start >= period or n % period or ids != list(range(start, n, period)):
            raise ConfigError(
                f"runtime.scan_layers=true needs periodic In-Place TTT layers {{i : i % P == start}} "
                f"with start < P and model.n_layers={n} a multiple of P, but model.ttt.layers="
                f"{list(t.layers)} is not of that form; use evenly spaced layers (e.g. "
                "model.ttt.layers=null with ttt.every/ttt.start)" + off)
    seq = set(cfg.ttt_seq.layer_ids(n))
    bad = [i for i in range(n) if (i in seq) != ((i % period) in seq)]
    if bad:
        raise ConfigError(
            f"runtime.scan_layers=true needs the TTT sequence layers (model.ttt_seq) to repeat with the "
            f"layer period {period}, but layer {bad[0]} differs from layer {bad[0] % period} "
            f"(ttt_seq layers: {sorted(seq)}); place them on every layer or periodically" + off)
    bad = [i for i in range(n) if cfg.layer_window(i) != cfg.layer_window(i % period)]
    if bad:
        i = bad[0]
        raise ConfigError(
            f"runtime.scan_layers=true needs the attention window of layer i to depend only on "
            f"i % {period} (the layer period), but layer {i} has window {cfg.layer_window(i)} and "
            f"layer {i % period} window {cfg.layer_window(i % period)} "
            f"(model.attention_window={cfg.attention_window}, "
            f"model.full_attention_layers={list(cfg.full_attention_layers)}); make "
            f"full_attention_layers periodic in i % {period}" + off)
    return period


def _is_leaf(x: Any) -> bool:
    return isinstance(x, nnx.Variable) or not isinstance(x, Mapping)


def _flatten(tree: Mapping, prefix: tuple = ()) -> dict[tuple, Any]:
    out: dict[tuple, Any] = {}
    for k, v in tree.items():
        if _is_leaf(v):
            out[prefix + (k,)] = v
        else:
            out.update(_flatten(v, prefix + (k,)))
    return out


def _unflatten(flat: Mapping[tuple, Any], like: Mapping) -> Mapping:
    root: dict = {}
    for path, v in flat.items():
        node = root
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = v
    return nnx.State(root) if isinstance(like, nnx.State) else root


def _path_key(path: tuple) -> tuple:
    """Sort key of a state path: integer keys (layer indices) numerically, then names."""
    return tuple((0, k, "") if isinstance(k, int) else (1, 0, str(k)) for k in path)


def _value(leaf: Any) -> Any:
    return leaf.get_value() if isinstance(leaf, nnx.Variable) else leaf


def _stack_values(values: list) -> Any:
    v0 = values[0]
    if isinstance(v0, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct((len(values),) + tuple(v0.shape), v0.dtype)
    if all(isinstance(v, np.ndarray) for v in values):
        return np.stack(values)
    return jnp.stack(values)


def _index_value(value: Any, g: int) -> Any:
    if isinstance(value, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct(tuple(value.shape[1:]), value.dtype)
    return value[g]


def _with_value(leaf: Any, value: Any, add_axis: bool) -> Any:
    """``value`` in a copy of ``leaf``'s Variable (logical names with / without ``layers`` first)."""
    if not isinstance(leaf, nnx.Variable):
        return value
    names = leaf.get_metadata().get("out_sharding")
    if not names:
        return leaf.replace(value)
    names = tuple(names)
    if add_axis:
        names = (LAYERS_AXIS,) + names
    elif names[0] == LAYERS_AXIS:
        names = names[1:]
    else:
        raise ValueError(f"expected logical names starting with {LAYERS_AXIS!r}, got {names}")
    return leaf.replace(value, out_sharding=names)


def _split_layer_path(path: tuple) -> tuple[int, tuple]:
    try:
        return int(path[1]), tuple(path[2:])
    except (IndexError, TypeError, ValueError):
        raise ValueError(f"unexpected parameter path {'/'.join(map(str, path))}: expected "
                         "layers/<int>/...") from None


def stack_layer_params(state: Mapping, cfg: ModelConfig) -> Mapping:
    """Convert a state of the unrolled layout (``layers/{i}/...``) into the ``scan_layers`` layout
    (``layers/{i % P}/...`` stacked over ``i // P``, see the module docstring).

    ``state`` is an ``nnx.State`` (``nnx.state(model)``, gradients, an abstract state from
    ``nnx.eval_shape``) or a nested dict (``nnx.to_pure_dict``); the result is of the same kind.
    Leaves may be ``nnx.Variable`` (their logical axis names get ``"layers"`` prepended), arrays or
    ``jax.ShapeDtypeStruct``. Entries outside ``layers`` are passed through. Load the result with
    ``nnx.update(scanned_model, stacked)``.
    """
    period = scan_period(cfg)
    groups = cfg.n_layers // period
    out: dict[tuple, Any] = {}
    slots: dict[tuple, dict[int, Any]] = {}
    for path, leaf in _flatten(state).items():
        if path[0] != "layers":
            out[path] = leaf
            continue
        i, rest = _split_layer_path(path)
        if not 0 <= i < cfg.n_layers:
            raise ValueError(f"layer index {i} of layers/{i}/{'/'.join(map(str, rest))} is outside "
                             f"[0, model.n_layers={cfg.n_layers})")
        slots.setdefault((i % period,) + rest, {})[i // period] = leaf
    for key, by_group in sorted(slots.items(), key=lambda kv: _path_key(kv[0])):
        missing = [g * period + key[0] for g in range(groups) if g not in by_group]
        if missing:
            raise ValueError(f"layers/{{i}}/{'/'.join(map(str, key[1:]))} is missing for layers "
                             f"{missing}; the state does not match model config {cfg}")
        leaves = [by_group[g] for g in range(groups)]
        out[("layers",) + key] = _with_value(leaves[0], _stack_values([_value(x) for x in leaves]),
                                            add_axis=True)
    return _unflatten(out, state)


def unstack_layer_params(state: Mapping, cfg: ModelConfig) -> Mapping:
    """The inverse of :func:`stack_layer_params`: ``scan_layers`` layout -> unrolled layout."""
    period = scan_period(cfg)
    groups = cfg.n_layers // period
    out: dict[tuple, Any] = {}
    for path, leaf in _flatten(state).items():
        if path[0] != "layers":
            out[path] = leaf
            continue
        p, rest = _split_layer_path(path)
        value = _value(leaf)
        if not 0 <= p < period or len(value.shape) == 0 or value.shape[0] != groups:
            raise ValueError(f"layers/{p}/{'/'.join(map(str, rest))} of shape {tuple(value.shape)} "
                             f"is not a stacked parameter of {groups} groups of period {period}")
        for g in range(groups):
            out[("layers", g * period + p) + rest] = _with_value(leaf, _index_value(value, g),
                                                                 add_axis=False)
    out = dict(sorted(out.items(), key=lambda kv: _path_key(kv[0])))
    return _unflatten(out, state)


def _stacked_block(cfg: ModelConfig, runtime: RuntimeConfig, slot: int, groups: int,
                   rngs: nnx.Rngs) -> DecoderBlock:
    """A :class:`DecoderBlock` for slot ``slot`` of the period whose parameters are stacked over
    ``groups`` (independent initialisations: one split of the RNG streams per group)."""

    @nnx.split_rngs(splits=groups)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata=_SCAN_METADATA)
    def make(r: nnx.Rngs) -> DecoderBlock:
        return DecoderBlock(cfg, slot, runtime=runtime, rngs=r)

    return make(rngs)


class CausalLM(nnx.Module):
    """Decoder-only LM. ``__call__(tokens [B, T] int32, *, segment_ids=None, positions=None)``
    returns ``[B, T, vocab_size]`` float32 logits.

    * ``segment_ids`` ``[B, T]`` int: packed documents (0 = padding); attention, the TTT conv and the
      fast weights never cross documents.
    * ``positions`` ``[B, T]`` int RoPE positions; default ``arange(T)``, or the position within each
      document when ``segment_ids`` are given.

    ``runtime`` (default :class:`~ttt_jax.config.RuntimeConfig`) says how it runs: kernels, remat,
    layer scanning, context parallelism; it changes no parameter values.
    With ``runtime.scan_layers`` the layers are stored stacked and run by one ``nnx.scan`` (module
    docstring); ``self.layers[p]`` is then the block of slot ``p`` of the period (``self.period``
    slots; ``None`` when unrolled), its parameters carrying a leading axis of
    ``cfg.n_layers // self.period`` groups.
    Construction raises a ``ValueError`` when the layer structure is not periodic
    (:func:`scan_period`).
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
            self.layers = nnx.List([_stacked_block(cfg, runtime, p, groups, rngs)
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
               positions: Optional[jax.Array] = None) -> jax.Array:
        """``[B, T]`` int tokens -> ``[B, T, D]`` final-normed hidden states (compute dtype).

        Long-context training uses this with a chunked loss so that ``[B, T, V]`` logits are never
        materialised at once (``ttt_jax.ops.loss.chunked_cross_entropy``, ``runtime.loss_chunk``).
        """
        cfg, rt = self.cfg, self.runtime
        if tokens.ndim != 2:
            raise ValueError(f"tokens must be [B, T], got shape {tokens.shape}")
        check_tokens(tokens, cfg.vocab_size)
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
        # Only In-Place TTT layers with target_source="embeddings" read x0; otherwise it is not
        # passed into the (rematerialised / scanned) blocks, where it would be saved per layer.
        needs_x0 = bool(cfg.ttt.layer_ids(cfg.n_layers)) and cfg.ttt.target_source == "embeddings"
        x0_arg = x0 if needs_x0 else None

        def run_block(block, x, x0, positions, segment_ids):
            return block(x, x0=x0, positions=positions, segment_ids=segment_ids)

        if rt.remat:
            policy = (jax.checkpoint_policies.save_only_these_names(*SAVE_EXCHANGES_NAMES)
                      if rt.remat_policy == "save_exchanges" else None)
            run_block = pinned_remat(run_block, policy)

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
        if rt.scan_layers:
            @nnx.scan(in_axes=(0, nnx.Carry, None, None, None), out_axes=nnx.Carry,
                      transform_metadata=_SCAN_METADATA)
            def run_group(blocks, x, x0, positions, segment_ids):
                for block in blocks:
                    x = run_block(block, x, x0, positions, segment_ids)
                return x

            x = run_group(self.layers, x0, x0_arg, positions, segment_ids)
        else:
            x = x0
            for block in self.layers:
                x = run_block(block, x, x0_arg, positions, segment_ids)
        return self.final_norm(x)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _pinned_call(f, *args):
    return f(*args)


def _pinned_fwd(f, *args):
    return jax.vjp(f, *args)   # the VJP closure is a pytree of f's saved residuals


def _pinned_bwd(f, vjp_fn, dy):
    # The first barrier makes the residuals -- and so the recomputation that starts from them --
    # depend on the output cotangent: the recomputation cannot be scheduled before the block above
    # has finished its backward pass.
    leaves, tree = jax.tree.flatten(vjp_fn)
    leaves, dy = jax.lax.optimization_barrier((leaves, dy))
    grads = jax.tree.unflatten(tree, leaves)(dy)
    # The second ties the block's gradients together: the input cotangent (which the block below
    # waits for) is released only with the parameter gradients. Without it XLA may postpone the
    # weight-gradient matmuls, keeping the recomputed activations they read live across several
    # blocks (benchmarks/README.md: the 4-GPU strong row's memory). Integer inputs' float0
    # cotangents stay outside the barrier.
    flat, gtree = jax.tree.flatten(grads)
    floats = [i for i, g in enumerate(flat) if jnp.issubdtype(g.dtype, jnp.inexact)]
    pinned = jax.lax.optimization_barrier([flat[i] for i in floats])
    for i, g in zip(floats, pinned):
        flat[i] = g
    return jax.tree.unflatten(gtree, flat)


_pinned_call.defvjp(_pinned_fwd, _pinned_bwd)


def pinned_remat(run_block, policy):
    """``nnx.remat(run_block, policy=policy)`` whose backward pass runs block by block
    (what ``runtime.remat`` uses): a block is recomputed only once the gradient of its output is there,
    and the gradient of its input is released only together with its parameter gradients.

    Plain remat lets the compiler recompute a block as soon as its saved input exists, and finish
    its weight gradients whenever it likes; XLA's GPU scheduler then keeps several blocks'
    recomputed activations live together (benchmarks/README.md: the split halo's and the 4-GPU
    strong row's extra memory). Same values and gradients as plain remat (tested).

    ``run_block(block, x, x0, positions, segment_ids) -> y``; the block's parameters and the float
    inputs get gradients, ``positions`` / ``segment_ids`` (integers) none.
    """
    def run(block, x, x0, positions, segment_ids):
        graphdef, state = nnx.split(block)

        def f(state, x, x0, positions, segment_ids):
            return run_block(nnx.merge(graphdef, state), x, x0, positions, segment_ids)

        return _pinned_call(jax.checkpoint(f, policy=policy), state, x, x0, positions, segment_ids)

    return run


def count_params(model: nnx.Module) -> int:
    """Total number of parameter elements (``nnx.Param`` leaves) in ``model``."""
    state = nnx.state(model, nnx.Param)
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(state)))
