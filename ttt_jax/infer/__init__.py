"""Inference: prefill/decode of the model's cached blocks, generation, sampling, qTTT.

The caches: :class:`Cache` (lengths and one :class:`LayerCache` per layer) of :class:`KVCache`,
:class:`TTTCache` and :class:`TTTSeqCache` -- the per-layer pieces live beside their modules in
``ttt_jax.nn`` and are exported here too.
"""

from ttt_jax.infer.cache import Cache, cache_bytes, init_cache
from ttt_jax.infer.engine import DecodeLoop, Engine, extend, prefill_forward
from ttt_jax.infer.generate import GenerationConfig, GenerationResult, generate
from ttt_jax.infer.qttt import QTTTConfig, adapt_queries
from ttt_jax.infer.sampling import filter_logits, sample_logits
from ttt_jax.models.lm import unrolled_model
from ttt_jax.nn.block import LayerCache
from ttt_jax.nn.kv_cache import KVCache
from ttt_jax.nn.ttt_cache import TTTCache
from ttt_jax.nn.ttt_seq_cache import TTTSeqCache
from ttt_jax.ops.attention_cache import cache_attention

__all__ = [
    "Cache", "DecodeLoop", "Engine", "GenerationConfig", "GenerationResult", "KVCache", "LayerCache",
    "QTTTConfig", "TTTCache", "TTTSeqCache", "adapt_queries", "cache_attention", "cache_bytes",
    "extend", "filter_logits", "generate", "init_cache", "prefill_forward", "sample_logits",
    "unrolled_model",
]
