"""Models: the causal LM (:mod:`~ttt_jax.models.lm`), its layer stack (:mod:`~ttt_jax.models.layers`:
unrolled or scanned), block remat (:mod:`~ttt_jax.models.remat`), TTT-E2E and the FLOP count."""

from ttt_jax.models.flops import effective_keys, flops_per_token, matmul_params
from ttt_jax.models.lm import (CausalLM, check_cacheable, check_tokens, count_params,
                               positions_from_segments, unrolled_model)

__all__ = ["CausalLM", "check_cacheable", "check_tokens", "count_params", "effective_keys",
           "flops_per_token", "matmul_params", "positions_from_segments", "unrolled_model"]
