"""TTT-Linear / TTT-MLP: the inner loop of a test-time-training sequence layer (METHODS.md).

Per head, the hidden state is the parameters ``W`` of a small inner model ``f`` (per-head width
``d``)::

    linear:  f(x) = x W1 + b1                              W1 [d, d]
    mlp:     f(x) = gelu(x W1 + b1) W2 + b2  (tanh GELU)    W1 [d, 4d], W2 [4d, d]

trained online on a reconstruction loss between learned views of each token (train view ``k``,
label view ``v``, test view ``q``), with a LayerNorm (``ln_scale``, ``ln_bias``, per head) and a
residual inside the inner model::

    loss_s(W) = 1/2 || LN(f(k_s; W)) - (v_s - k_s) ||^2        out_t = q_t + LN(f(q_t; W_t))

**Mini-batch TTT** (mini-batch ``b``, 16 by default): the sequence is cut into mini-batches; every
token of a mini-batch takes its gradient at the mini-batch's *start* weights ``W_start``, and token
``t`` (position ``i`` in its mini-batch) is answered with

    W_t = W_start - sum_{s <= t in the mini-batch} eta_{t,s} grad_s(W_start),
    eta_{t,s} = token_factor[i] * lr_s,

where ``lr_s`` is the learned per-token, per-head inner learning rate (the caller computes
``base_lr * sigmoid(x_s w_lr + b_lr) / d``) and ``token_factor`` defaults to ``1 / (i + 1)``. The
next mini-batch starts from ``W_t`` of the mini-batch's last token. Across mini-batches the layer is
sequential (it is not affine in its state), a ``lax.scan``.

Two implementations, equal in values and gradients (tests):

* ``impl="reference"`` -- the primal form: per-token gradients ``grad_s`` by ``jax.grad`` of the
  inner loss, the per-token weights ``W_t`` materialised (``[b, ...]`` copies of the state per
  mini-batch), ``f(q_t; W_t)`` evaluated token by token.
* ``impl="dual"`` -- the dual form: only the gradients w.r.t. the inner model's pre-activations are
  formed; outputs inside a mini-batch follow in closed form, e.g. for the linear model
  ``Z = q W_start + b_start - (eta * tril(q k^T)) G - eta G`` (per layer for the MLP), and the
  weights are updated once per mini-batch: ``W1 <- W_start - (eta_last * k)^T G``. No per-token weight
  copies.

**Memory.** Autodiff of the mini-batch scan would keep every mini-batch's residuals (the state and
its per-layer activations). The scan runs in groups of ``remat_group`` mini-batches, each group under
``jax.checkpoint``: the backward pass keeps only the state at group boundaries and recomputes one
group at a time (about ``2 sqrt(N)`` states for ``N`` mini-batches with the default group size).

**Packed documents.** With ``segment_ids`` the inner model restarts from its initial parameters at
every document: a token whose document began inside the current mini-batch uses the initial
parameters (not ``W_start``) as its base, and only tokens of its own document enter its sum; padding
(id 0) never updates. Mini-batch boundaries stay those of the packed row (so the position factor is
the position in the packed mini-batch); a document that starts on a mini-batch boundary is computed
exactly as if it were alone.

**State.** ``initial_state`` / ``return_state`` carry the inner-model parameters per sequence
(``[B, H, ...]``, fp32) for the document open at position 0 / ``T - 1``: running a sequence in two
pieces whose boundary is a multiple of the mini-batch size equals one run. A piece handed on must
hold a whole number of mini-batches (a decoder keeps the tokens of the open mini-batch and replays
them from the carried state). The inner loop runs in fp32.

**Partial state.** ``keep_mini_batches [B]`` returns, for sequence ``b``, the state after its first
``keep_mini_batches[b]`` mini-batches only; later mini-batches still answer their tokens from the
state in force, but do not move it. A decoder lays every sequence's open mini-batch and new tokens
on its own mini-batch grid and keeps the mini-batches it has completed (``ttt_jax.nn.ttt_seq_cache``);
then ``T`` need not be a multiple of the mini-batch size.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp

IMPLS = ("dual", "reference")
KINDS = ("linear", "mlp")
LN_EPS = 1e-6

Params = dict[str, jax.Array]
_F32 = jnp.float32


# --------------------------------------------------------------------------------------------------
# The inner model
# --------------------------------------------------------------------------------------------------


def param_shapes(kind: str, n_heads: int, head_dim: int, mlp_ratio: int = 4) -> dict[str, tuple]:
    """Shapes of the per-head inner-model parameters: ``{"w1", "b1"}`` (+ ``{"w2", "b2"}`` for mlp)."""
    d, h = head_dim, n_heads
    if kind == "linear":
        return {"w1": (h, d, d), "b1": (h, d)}
    if kind == "mlp":
        f = mlp_ratio * d
        return {"w1": (h, d, f), "b1": (h, f), "w2": (h, f, d), "b2": (h, d)}
    raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")


def _n_layers(params: Params) -> int:
    return 2 if "w2" in params else 1


def _gelu(x: jax.Array) -> jax.Array:
    return jax.nn.gelu(x, approximate=True)


def _gelu_grad(x: jax.Array) -> jax.Array:
    return jax.jvp(_gelu, (x,), (jnp.ones_like(x),))[1]


def layer_norm(z: jax.Array, scale: jax.Array, bias: jax.Array, eps: float = LN_EPS) -> jax.Array:
    """LayerNorm over the last axis: ``(z - mean) / sqrt(var + eps) * scale + bias``."""
    mu = jnp.mean(z, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(z - mu), axis=-1, keepdims=True)
    return (z - mu) * jax.lax.rsqrt(var + eps) * scale + bias


def inner_apply(params: Params, x: jax.Array) -> jax.Array:
    """``f(x; params)`` of one head: ``x [..., d] -> [..., d]`` (params without a head axis)."""
    z = x @ params["w1"] + params["b1"]
    if _n_layers(params) == 2:
        z = _gelu(z) @ params["w2"] + params["b2"]
    return z


def _recon_loss(z: jax.Array, target: jax.Array, scale: jax.Array, bias: jax.Array) -> jax.Array:
    """One token's inner loss given the inner model's output ``z [d]``."""
    return 0.5 * jnp.sum(jnp.square(layer_norm(z, scale, bias) - target))


# --------------------------------------------------------------------------------------------------
# One mini-batch, one sequence, one head
# --------------------------------------------------------------------------------------------------


def _select(mask: jax.Array, a: jax.Array, b: jax.Array) -> jax.Array:
    """Per-token choice ``mask [K]`` between ``a`` and ``b`` (``[K, ...]``)."""
    return jnp.where(mask.reshape(mask.shape + (1,) * (a.ndim - 1)), a, b)


def _eta(lr: jax.Array, seg: Optional[jax.Array], token_factor: jax.Array) -> jax.Array:
    """``eta[t, s] = token_factor[t] * lr[s]`` for ``s <= t`` of the same document, else 0: ``[K, K]``."""
    k = lr.shape[0]
    mask = jnp.tril(jnp.ones((k, k), bool))
    if seg is not None:
        mask = mask & (seg[:, None] == seg[None, :])
    return jnp.where(mask, token_factor[:, None] * lr[None, :], 0.0)


def _primal_step(p_start: Params, p_init: Params, xs, *, ln, token_factor, segmented):
    """Reference: explicit per-token gradients and per-token weights ``W_t`` (module docstring)."""
    q, k, v, lr, seg, carried, valid = xs
    scale, bias = ln
    n = q.shape[0]
    if segmented:
        base = jax.tree.map(lambda s, i: _select(carried, jnp.broadcast_to(s, (n,) + s.shape),
                                                 jnp.broadcast_to(i, (n,) + i.shape)), p_start, p_init)
    else:
        base = jax.tree.map(lambda s: jnp.broadcast_to(s, (n,) + s.shape), p_start)
    eta = _eta(lr, seg if segmented else None, token_factor)

    def token_loss(p, x, y):
        return _recon_loss(inner_apply(p, x), y, scale, bias)

    grads = jax.vmap(jax.grad(token_loss))(base, k, v - k)                  # per token, at its base
    weights = jax.tree.map(lambda b, g: b - jnp.einsum("ts,s...->t...", eta, g), base, grads)
    out = q + layer_norm(jax.vmap(inner_apply)(weights, q), scale, bias)
    new = jax.tree.map(lambda w: w[-1], weights)
    new = jax.tree.map(lambda a, b: jnp.where(valid, a, b), new, p_start)
    return new, out


def _dual_step(p_start: Params, p_init: Params, xs, *, ln, token_factor, segmented):
    """Dual form: gradients w.r.t. pre-activations only, closed-form outputs (module docstring)."""
    q, k, v, lr, seg, carried, valid = xs
    scale, bias = ln
    n_layers = _n_layers(p_start)

    def affine(x, l):
        """``x W_l + b_l`` at each token's base parameters (start, or initial for a new document)."""
        w, b = f"w{l}", f"b{l}"
        y = x @ p_start[w] + p_start[b]
        if segmented:
            y = _select(carried, y, x @ p_init[w] + p_init[b])
        return y

    def back(g, l):
        """``g W_l^T`` at each token's base parameters."""
        w = f"w{l}"
        y = g @ p_start[w].T
        if segmented:
            y = _select(carried, y, g @ p_init[w].T)
        return y

    # Forward of the train view at the base parameters; gradients w.r.t. each layer's output.
    xs_in, zs = [k], []
    for l in range(1, n_layers + 1):
        zs.append(affine(xs_in[-1], l))
        if l < n_layers:
            xs_in.append(_gelu(zs[-1]))
    grads = [jax.vmap(jax.grad(_recon_loss), in_axes=(0, 0, None, None))(zs[-1], v - k, scale, bias)]
    for l in range(n_layers, 1, -1):
        grads.insert(0, back(grads[0], l) * _gelu_grad(zs[l - 2]))

    # Test view through the per-token weights, without forming them.
    eta = _eta(lr, seg if segmented else None, token_factor)
    x = q
    for l in range(1, n_layers + 1):
        x_in, g = xs_in[l - 1], grads[l - 1]
        z = affine(x, l) - (eta * (x @ x_in.T)) @ g - eta @ g
        x = _gelu(z) if l < n_layers else z
    out = q + layer_norm(x, scale, bias)

    # Next start: the last token's weights.
    e_last = eta[-1]
    new = {}
    for l in range(1, n_layers + 1):
        w, b = f"w{l}", f"b{l}"
        if segmented:
            bw = jnp.where(carried[-1], p_start[w], p_init[w])
            bb = jnp.where(carried[-1], p_start[b], p_init[b])
        else:
            bw, bb = p_start[w], p_start[b]
        g = grads[l - 1]
        new[w] = bw - xs_in[l - 1].T @ (e_last[:, None] * g)
        new[b] = bb - e_last @ g
    new = jax.tree.map(lambda a, b: jnp.where(valid, a, b), new, p_start)
    return new, out


_STEPS = {"reference": _primal_step, "dual": _dual_step}


# --------------------------------------------------------------------------------------------------
# The scan over mini-batches (one sequence, one head)
# --------------------------------------------------------------------------------------------------


def _scan(step: Callable, state0: Params, xs: tuple, group: int) -> tuple[Params, jax.Array]:
    """``lax.scan(step)`` over ``N`` mini-batches (``N % group == 0``) in checkpointed groups."""
    n = xs[0].shape[0]
    grouped = jax.tree.map(lambda a: a.reshape((n // group, group) + a.shape[1:]), xs)

    @jax.checkpoint
    def run_group(state, xg):
        return jax.lax.scan(step, state, xg)

    state, out = jax.lax.scan(run_group, state0, grouped)
    return state, out.reshape((n,) + out.shape[2:])


def _sequence_head(q, k, v, lr, seg, carried, valid, p_init, state0, ln_scale, ln_bias,
                   token_factor, *, impl, segmented, group):
    """One sequence, one head: ``q/k/v [N, K, d]``, ``lr/seg/carried [N, K]``, ``valid [N]``."""
    step = _STEPS[impl]

    def body(state, xs):
        return step(state, p_init, xs, ln=(ln_scale, ln_bias), token_factor=token_factor,
                    segmented=segmented)

    return _scan(body, state0, (q, k, v, lr, seg, carried, valid), group)


# --------------------------------------------------------------------------------------------------
# Public op
# --------------------------------------------------------------------------------------------------


def default_token_factor(mini_batch: int) -> jax.Array:
    """``1 / (i + 1)`` for positions ``i`` of a mini-batch: ``[mini_batch]`` fp32."""
    return 1.0 / jnp.arange(1, mini_batch + 1, dtype=_F32)


def _check_args(q, k, v, lr, params, ln_scale, ln_bias, mini_batch, impl, segment_ids,
                initial_state, return_state, token_factor, remat_group, keep_mini_batches):
    if q.ndim != 4:
        raise ValueError(f"q must be [B, T, H, d], got shape {q.shape}")
    b, t, h, d = q.shape
    for name, x in (("k", k), ("v", v)):
        if x.shape != q.shape:
            raise ValueError(f"{name} must have q's shape {q.shape}, got {x.shape}")
    if lr.shape != (b, t, h):
        raise ValueError(f"lr must be [B, T, H] = {(b, t, h)}, got {lr.shape}")
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if not isinstance(mini_batch, int) or mini_batch < 1:
        raise ValueError(f"mini_batch must be a positive integer, got {mini_batch!r}")
    if remat_group is not None and (not isinstance(remat_group, int) or remat_group < 1):
        raise ValueError(f"remat_group must be None (auto) or a positive integer, got {remat_group!r}")
    kind = "mlp" if "w2" in params else "linear"
    f = params["w1"].shape[-1]
    expected = param_shapes(kind, h, d, f // d if kind == "mlp" else 4)
    if set(params) != set(expected) or any(tuple(params[n].shape) != s for n, s in expected.items()):
        raise ValueError(f"params must be {expected} (per-head inner model for q of shape {q.shape}), "
                         f"got { {n: tuple(x.shape) for n, x in params.items()} }")
    for name, x in (("ln_scale", ln_scale), ("ln_bias", ln_bias)):
        if x.shape != (h, d):
            raise ValueError(f"{name} must be [H, d] = {(h, d)}, got {x.shape}")
    if segment_ids is not None and segment_ids.shape != (b, t):
        raise ValueError(f"segment_ids must be [B, T] = {(b, t)}, got {segment_ids.shape}")
    if token_factor is not None and token_factor.shape != (mini_batch,):
        raise ValueError(f"token_factor must be [mini_batch] = {(mini_batch,)}, got {token_factor.shape}")
    if initial_state is not None:
        want = {n: (b,) + s for n, s in expected.items()}
        got = {n: tuple(x.shape) for n, x in initial_state.items()}
        if got != want:
            raise ValueError(f"initial_state must be {want}, got {got}")
    if keep_mini_batches is not None:
        if not return_state:
            raise ValueError("keep_mini_batches selects the returned state: pass return_state=True")
        if keep_mini_batches.shape != (b,):
            raise ValueError(f"keep_mini_batches must be [B] = {(b,)}, got {keep_mini_batches.shape}")
    elif return_state and t % mini_batch:
        raise ValueError(f"return_state needs a whole number of mini-batches: T={t} is not a multiple "
                         f"of mini_batch={mini_batch} (or keep_mini_batches)")


def _doc_continues(segment_ids: jax.Array, mini_batch: int) -> jax.Array:
    """``[B, T]`` bool: the token's document began before its mini-batch (or is the document open at
    position 0, which continues from ``initial_state``)."""
    b, t = segment_ids.shape
    idx = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    change = jnp.concatenate([jnp.zeros((b, 1), bool), segment_ids[:, 1:] != segment_ids[:, :-1]],
                             axis=1)
    doc_start = jax.lax.cummax(jnp.where(change, idx, -1), axis=1)
    return doc_start < (idx // mini_batch) * mini_batch


def ttt_layer(q: jax.Array, k: jax.Array, v: jax.Array, lr: jax.Array, params: Params,
              ln_scale: jax.Array, ln_bias: jax.Array, *, mini_batch: int = 16,
              token_factor: Optional[jax.Array] = None, segment_ids: Optional[jax.Array] = None,
              impl: str = "dual", initial_state: Optional[Params] = None, return_state: bool = False,
              remat_group: Optional[int] = None, keep_mini_batches: Optional[jax.Array] = None) -> Any:
    """TTT-Linear / TTT-MLP inner loop over a sequence (module docstring).

    Args:
      q, k, v: ``[B, T, H, d]`` test, train and label views (per head). ``T`` need not be a multiple
        of ``mini_batch`` (padding is internal and never reaches real tokens).
      lr: ``[B, T, H]`` per-token, per-head inner learning rate (``>= 0``; the base lr included).
      params: initial inner-model parameters, per head: linear ``{"w1": [H, d, d], "b1": [H, d]}``;
        mlp ``{"w1": [H, d, F], "b1": [H, F], "w2": [H, F, d], "b2": [H, d]}`` (``F = 4d``).
      ln_scale, ln_bias: ``[H, d]`` the LayerNorm inside the inner model.
      mini_batch: tokens per mini-batch (16 in the paper).
      token_factor: ``[mini_batch]`` factor of ``eta`` by position in the mini-batch; default
        ``1 / (i + 1)``.
      segment_ids: optional ``[B, T]`` int packed-document ids (0 = padding).
      impl: ``"dual"`` (fast) or ``"reference"`` (primal, per-token weights).
      initial_state: optional parameters with a leading batch axis (``[B, H, ...]``) to start from,
        for the document open at position 0; default ``params`` for every sequence.
      return_state: also return the state after the last token (needs ``T % mini_batch == 0``
        unless ``keep_mini_batches`` is given).
      remat_group: mini-batches per checkpointed group (default ``ceil(sqrt(N))``).
      keep_mini_batches: optional ``[B]`` int, with ``return_state``: the state returned for
        sequence ``b`` is the one after its first ``keep_mini_batches[b]`` mini-batches (clipped to
        ``[0, ceil(T / mini_batch)]``); the tokens of later mini-batches are answered from that
        state (exact only for the first mini-batch not kept: the one a decoder leaves open).

    Returns:
      ``out [B, T, H, d]`` in ``q.dtype`` (``q + LN(f(q; W_t))``), and with ``return_state`` the
      ``[B, H, ...]`` fp32 state.
    """
    _check_args(q, k, v, lr, params, ln_scale, ln_bias, mini_batch, impl, segment_ids,
                initial_state, return_state, token_factor, remat_group, keep_mini_batches)
    b, t, h, d = q.shape
    kb = mini_batch
    n = -(-t // kb)
    group = remat_group or max(1, math.ceil(math.sqrt(n)))
    group = min(group, n)
    n_pad = -(-n // group) * group
    pad = n_pad * kb - t

    def to_heads(x, fill=0):
        """``[B, T, ...]`` -> ``[B, ..., N, K]`` / ``[B, H, N, K, d]`` (padded)."""
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2), constant_values=fill)
        x = x.reshape((b, n_pad, kb) + x.shape[2:])
        if x.ndim == 3:                                                  # [B, N, K]
            return x
        if x.ndim == 4:                                                  # [B, N, K, H]
            return jnp.moveaxis(x, (1, 2), (-2, -1))
        return jnp.moveaxis(x, 3, 1)                                     # [B, N, K, H, d]

    f32 = lambda x: x.astype(_F32)  # noqa: E731
    qh, kh, vh = (to_heads(f32(x)) for x in (q, k, v))                  # [B, H, N, K, d]
    lr_h = f32(lr)
    segmented = segment_ids is not None
    if segmented:
        lr_h = lr_h * (segment_ids != 0)[..., None]
        seg = to_heads(segment_ids.astype(jnp.int32))                    # [B, N, K]
        carried = to_heads(_doc_continues(segment_ids, kb), fill=False)
    else:
        seg = jnp.ones((b, n_pad, kb), jnp.int32)
        carried = jnp.ones((b, n_pad, kb), bool)
    lr_h = to_heads(lr_h)                                                # [B, H, N, K]
    kept = jnp.full((b,), n, jnp.int32) if keep_mini_batches is None else \
        jnp.clip(keep_mini_batches.astype(jnp.int32), 0, n)
    valid = jnp.arange(n_pad)[None, :] < kept[:, None]                 # [B, N]: moves the state
    p_init = jax.tree.map(f32, params)
    state0 = (jax.tree.map(lambda x: jnp.broadcast_to(x, (b,) + x.shape), p_init)
              if initial_state is None else jax.tree.map(f32, initial_state))
    tf = default_token_factor(kb) if token_factor is None else f32(token_factor)

    def per_head(q, k, v, lr, seg, carried, valid, p_init, s0, scale, bias):
        return _sequence_head(q, k, v, lr, seg, carried, valid, p_init, s0, scale, bias, tf,
                              impl=impl, segmented=segmented, group=group)

    over_heads = jax.vmap(per_head, in_axes=(0, 0, 0, 0, None, None, None, 0, 0, 0, 0))
    over_batch = jax.vmap(over_heads, in_axes=(0, 0, 0, 0, 0, 0, 0, None, 0, None, None))
    state, out = over_batch(qh, kh, vh, lr_h, seg, carried, valid, p_init, state0,
                            f32(ln_scale), f32(ln_bias))               # out [B, H, N, K, d]
    out = jnp.moveaxis(out, 1, 3).reshape(b, n_pad * kb, h, d)[:, :t].astype(q.dtype)
    return (out, state) if return_state else out
