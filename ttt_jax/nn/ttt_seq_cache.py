"""The state of one TTT-Linear / TTT-MLP layer over new tokens: its type, its initial value, its carry.

Semantics are those of the full forward pass (``ttt_jax.ops.ttt_layer``, mini-batch ``M``): token
``t`` at position ``i`` of its mini-batch is answered with
``W_t = W_start - token_factor[i] * sum_{s <= t in the mini-batch} lr_s grad_s(W_start)``, every
gradient taken at the mini-batch's start parameters ``W_start``; the next mini-batch starts from the
last token's ``W_t``. So a token arriving in the middle of a mini-batch needs ``W_start`` and the
earlier tokens of its mini-batch (their train/label views and learning rates), which is exactly what
:class:`TTTSeqCache` keeps; the state moves only when a mini-batch completes.

:func:`ttt_seq_extend` (what :class:`ttt_jax.nn.ttt_seq.TTTSeqLayer` calls with a cache) handles
``T`` new tokens per sequence (a prefill block, or ``T = 1`` when decoding) the same way: each
sequence's buffered rows and new rows are laid out on its own absolute mini-batch grid
(``round_up(M - 1 + T, M)`` rows: the open mini-batch first) and run through the training op from
the carried state, which keeps the state after the mini-batches that are now complete
(``keep_mini_batches``) and answers the new tokens; the rows of the mini-batch left open become the
buffer. Decoding thus replays the open mini-batch's rows (at most ``M - 1``) at every step: ``M``
times the flops of a recurrent update, but the same memory traffic (the per-sequence state is read
once either way), and the op's own arithmetic rather than a second implementation. Prompts, blocks
and mini-batches need not align; ragged batches are exact per sequence.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from ttt_jax.config import ModelConfig
from ttt_jax.nn.cache import gather_rows, round_up
from ttt_jax.ops.ttt_layer import param_shapes, ttt_layer


@dataclasses.dataclass(frozen=True)
class TTTSeqCache:
    """State of one TTT-Linear / TTT-MLP layer (``ttt_jax.ops.ttt_layer``).

    Attributes:
      params: the inner model's parameters per sequence and head at the start of the open
        mini-batch, fp32: ``{"w1": [B, H, Dh, F], "b1": [B, H, F]}`` (+ ``"w2" [B, H, F, Dh]``,
        ``"b2" [B, H, Dh]`` for TTT-MLP). Read only once the sequence has completed a mini-batch
        (``lengths >= M``); before that the layer's learned initial parameters are in force (a
        cache built from the config alone cannot hold them, so it starts at zeros).
      k, v: ``[B, M, H, Dh]`` compute dtype, train and label views (after RoPE) of the open
        mini-batch's tokens so far (``M`` = mini-batch size); row ``r`` holds position
        ``mini_batch_start + r``, rows at or after ``lengths % M`` are stale.
      lr: ``[B, M, H]`` fp32, their inner learning rates.
    """

    params: dict
    k: jax.Array
    v: jax.Array
    lr: jax.Array


jax.tree_util.register_dataclass(TTTSeqCache, data_fields=["params", "k", "v", "lr"], meta_fields=[])


def init_ttt_seq_cache(cfg: ModelConfig, batch_size: int) -> TTTSeqCache:
    """An empty :class:`TTTSeqCache` (``params`` zeros: unread until a mini-batch completes)."""
    s = cfg.ttt_seq
    h, dh, m = cfg.n_heads, cfg.resolved_head_dim, s.mini_batch
    shapes = param_shapes(s.kind, h, dh)
    params = {n: jnp.zeros((batch_size,) + shape, jnp.float32) for n, shape in shapes.items()}
    cdt = jnp.dtype(cfg.compute_dtype)
    return TTTSeqCache(params=params, k=jnp.zeros((batch_size, m, h, dh), cdt),
                       v=jnp.zeros((batch_size, m, h, dh), cdt),
                       lr=jnp.zeros((batch_size, m, h), jnp.float32))


def _where_rows(mask: jax.Array, a: jax.Array, b) -> jax.Array:
    """Per-row choice ``mask [B, L]`` between ``a [B, L, ...]`` and ``b``."""
    return jnp.where(mask.reshape(mask.shape + (1,) * (a.ndim - 2)), a, b)


def _where_seq(mask: jax.Array, a, b):
    """Per-sequence choice ``mask [B]`` between the pytrees ``a`` and ``b`` (``[B, ...]`` leaves)."""
    return jax.tree.map(lambda x, y: jnp.where(mask.reshape((-1,) + (1,) * (x.ndim - 1)), x, y), a, b)


def ttt_seq_extend(layer, x: jax.Array, start: jax.Array, n_valid: jax.Array,
                   st: TTTSeqCache) -> tuple[jax.Array, TTTSeqCache]:
    """Run a :class:`ttt_jax.nn.ttt_seq.TTTSeqLayer` over ``T`` new tokens per sequence.

    Args:
      layer: the module (its projections, inner-model initial parameters, norms, gate).
      x: ``[B, T, D]`` the layer's (normed) inputs of the new tokens; row ``i`` is position
        ``start[b] + i``.
      start: ``[B]`` int32 tokens of each sequence consumed before this call.
      n_valid: ``[B]`` int32 real rows per sequence; later rows are padding (garbage outputs,
        never buffered or learned from). A sequence with ``n_valid = 0`` keeps its state bit for bit.
      st: the layer's :class:`TTTSeqCache`.

    Returns:
      ``([B, T, D]`` layer outputs in the compute dtype, the updated state).
    """
    b, t, _ = x.shape
    m = layer.mini_batch
    start = start.astype(jnp.int32)
    n_valid = n_valid.astype(jnp.int32)
    positions = start[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]
    q, k, v, lr = layer.project(x, positions)

    # Row r of the layout is position (open mini-batch start + r): buffered rows, then new rows.
    offset = start % m
    length = round_up(m - 1 + t, m)
    r = jnp.arange(length, dtype=jnp.int32)[None, :]
    take = jnp.clip(jnp.where(r < offset[:, None], r, m + r - offset[:, None]), 0, m + t - 1)
    real = r < (offset + n_valid)[:, None]

    def combine(buf, new):
        rows = gather_rows(jnp.concatenate([buf.astype(new.dtype), new], axis=1), take)
        return _where_rows(real, rows, 0)

    kc, vc, lrc = combine(st.k, k), combine(st.v, v), combine(st.lr, lr)
    qc = combine(jnp.zeros_like(st.k), q)            # buffered rows were answered before

    # Until its first mini-batch completes a sequence runs from the learned initial parameters.
    init = layer.inner_params()
    fresh = start < m
    s0 = _where_seq(fresh, jax.tree.map(lambda p: jnp.broadcast_to(p, (b,) + p.shape), init),
                    st.params)
    done = (offset + n_valid) // m                   # mini-batches of the layout now complete
    z, state = ttt_layer(qc, kc, vc, lrc, init, *layer.ln_params(), mini_batch=m,
                         token_factor=layer.token_factor(), impl=layer.impl, initial_state=s0,
                         return_state=True, keep_mini_batches=done, remat_group=length // m)
    z = gather_rows(z, jnp.clip(offset[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :], 0,
                                 length - 1))
    out = layer.output(z, x)

    # The mini-batch left open: rows [done M, done M + M) of the layout.
    rows = jnp.clip(done[:, None] * m + jnp.arange(m, dtype=jnp.int32)[None, :], 0, length - 1)
    moved = n_valid > 0
    new = TTTSeqCache(params=_where_seq(done > 0, state, st.params),
                      k=gather_rows(kc, rows).astype(st.k.dtype),
                      v=gather_rows(vc, rows).astype(st.v.dtype),
                      lr=gather_rows(lrc, rows).astype(st.lr.dtype))
    new = TTTSeqCache(params=new.params, k=_where_seq(moved, new.k, st.k),
                      v=_where_seq(moved, new.v, st.v), lr=_where_seq(moved, new.lr, st.lr))
    return out, new
