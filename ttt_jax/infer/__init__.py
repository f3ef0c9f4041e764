"""Inference: KV caches, In-Place TTT and TTT-Linear/MLP state, prefill/decode, generation, qTTT."""

from ttt_jax.infer.attention import attention_extend, cache_attention
from ttt_jax.infer.cache import (Cache, KVCache, LayerCache, TTTCache, TTTSeqCache, cache_bytes,
                                 init_cache)
from ttt_jax.infer.engine import DecodeLoop, Engine, extend, unrolled_model
from ttt_jax.infer.generate import GenerationConfig, GenerationResult, generate
from ttt_jax.infer.qttt import QTTTConfig, adapt_queries
from ttt_jax.infer.sampling import filter_logits, sample_logits
from ttt_jax.infer.ttt import ttt_extend
from ttt_jax.infer.ttt_seq import ttt_seq_extend

__all__ = [
    "Cache", "DecodeLoop", "Engine", "GenerationConfig", "GenerationResult", "KVCache", "QTTTConfig", "adapt_queries",
    "generate", "LayerCache", "TTTCache", "TTTSeqCache", "attention_extend", "cache_attention",
    "cache_bytes", "extend", "filter_logits", "init_cache", "sample_logits", "ttt_extend",
    "ttt_seq_extend", "unrolled_model",
]
