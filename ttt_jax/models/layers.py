"""The layer stack of :class:`ttt_jax.models.lm.CausalLM`: unrolled, or scanned over stacked groups.

With ``runtime.scan_layers=true`` the layers are grouped in periods of ``P`` layers (``P =
ttt.every`` with In-Place TTT, 1 without; see :func:`scan_period`) and their parameters are stored
*stacked* over the ``G = L / P`` groups: layer ``i`` is slot ``p = i % P`` of group ``g = i // P``,
and ``layers/{p}/...`` holds the parameter of ``layers/{i}/...`` (the unrolled tree in
:mod:`ttt_jax.models.lm`) at index ``g`` of a new
leading axis whose logical name is ``"layers"`` (:data:`LAYERS_AXIS`)::

    layers/{p}/attn_norm/scale  [G, D]         (layers, norm)                        p in [0, P)
    layers/{p}/attn/q           [G, D, H, Dh]  (layers, embed, heads, head_dim)
    layers/{p}/mlp/down         [G, F, D]      (layers, mlp, embed)
    layers/{p}/mlp/ttt_conv     [G, K, D]      (layers, conv, embed)  -- the TTT slot p = ttt.start only
    layers/{p}/mlp/ttt_proj     [G, D, D]      (layers, embed, None)  -- the TTT slot only
    ...                                         (every layers/{i}/... entry above likewise)

``embed``, ``final_norm`` and ``lm_head`` are unchanged. ``"layers"`` is not one of
``ttt_jax.nn.params.LOGICAL_AXES`` and has no rule in ``ttt_jax.parallel.rules.DEFAULT_RULES`` yet (map it
to ``None`` to keep the group axis unsharded). The forward pass runs one ``nnx.scan``
over ``g`` whose body applies the ``P`` blocks of the group in order (each one under ``nnx.remat``
when ``runtime.remat``), so under remat every layer keeps only its ``[B, T, D]`` input for the
backward pass. :func:`stack_layer_params` / :func:`unstack_layer_params` convert a state between
the two layouts (weights of an unrolled model into a scanned one, checkpoints, HF conversion).

:func:`run_layers` applies the stack in either layout.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ttt_jax.config import ConfigError, ModelConfig, RuntimeConfig
from ttt_jax.nn.block import DecoderBlock


LAYERS_AXIS = "layers"
"""Logical name of the leading (group) axis of the stacked layer parameters (``scan_layers``)."""

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


def stacked_block(cfg: ModelConfig, slot: int, groups: int, rngs: nnx.Rngs,
                  runtime: Optional[RuntimeConfig] = None) -> DecoderBlock:
    """A :class:`DecoderBlock` for slot ``slot`` of the period whose parameters are stacked over
    ``groups`` (independent initialisations: one split of the RNG streams per group)."""

    @nnx.split_rngs(splits=groups)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata=_SCAN_METADATA)
    def make(r: nnx.Rngs) -> DecoderBlock:
        return DecoderBlock(cfg, slot, runtime=runtime, rngs=r)

    return make(rngs)


def run_layers(layers, run_block: Callable, x: jax.Array, x0: Optional[jax.Array], positions: jax.Array,
               segment_ids: Optional[jax.Array], *, scanned: bool) -> jax.Array:
    """Apply the decoder blocks ``layers`` to ``x [B, T, D]`` in order.

    ``run_block(block, x, x0, positions, segment_ids) -> x`` runs one block (possibly under remat,
    :mod:`ttt_jax.models.remat`). ``scanned``: ``layers`` are the ``P`` stacked slot blocks of the
    ``scan_layers`` layout, run by one ``nnx.scan`` over the groups (each step applies the ``P``
    blocks of a group); otherwise the unrolled blocks, one after another.
    """
    if scanned:
        @nnx.scan(in_axes=(0, nnx.Carry, None, None, None), out_axes=nnx.Carry,
                  transform_metadata=_SCAN_METADATA)
        def run_group(blocks, x, x0, positions, segment_ids):
            for block in blocks:
                x = run_block(block, x, x0, positions, segment_ids)
            return x

        return run_group(layers, x, x0, positions, segment_ids)
    for block in layers:
        x = run_block(block, x, x0, positions, segment_ids)
    return x
