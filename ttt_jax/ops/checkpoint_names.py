"""Names that the context-parallel ops give their values with ``jax.ad_checkpoint.checkpoint_name``.

Remat policies refer to them (``runtime.remat_policy="save_exchanges"`` keeps
:data:`SAVE_EXCHANGES_NAMES` besides each block's input): the results of the cross-device
exchanges, i.e. the work a single device does not have.
"""

CONTEXT_EXCHANGE = "context_exchange"
"""The result of a cross-device exchange: the TTT carried-in state (``ttt_jax.ops.inplace_ttt_cp``),
the halo keys/values of sliding-window attention (``ttt_jax.ops.attention_cp_window``,
``ttt_jax.ops.attention_cp_halo``)."""

HALO_BLOCK = "context_halo_block"
"""The split halo's block result (output and log-sum-exp before the merge,
``ttt_jax.ops.attention_cp_halo``): saving it lets the recomputation rerun only the local call."""

SAVE_EXCHANGES_NAMES = (CONTEXT_EXCHANGE, HALO_BLOCK)
"""What ``runtime.remat_policy="save_exchanges"`` saves besides each block's input."""
