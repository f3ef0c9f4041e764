"""Per-device attention kernels: the fused compute that the attention ops call on one device.

* :mod:`ttt_jax.ops.kernels.flash`        -- Pallas (Triton) flash-attention kernels for NVIDIA
  GPUs: block forward / backward with log-sum-exp, causal / window / segment-id masks, and a
  differentiable ``flash_attention`` (single-device ``impl="flash"``; the fused ring's blocks).
* :mod:`ttt_jax.ops.kernels.cudnn_blocks` -- cuDNN flash attention through JAX's private cuDNN
  functions: block forward / backward with the merged log-sum-exp (the fused ring's blocks), one
  sliding-window call, and :func:`~ttt_jax.ops.kernels.cudnn_blocks.cudnn_unsupported_reason`.
* :mod:`ttt_jax.ops.kernels.tpu_splash`   -- TPU (Pallas Mosaic) splash attention: single-device
  ``tpu_attention``, and block forward / backward with the merged log-sum-exp.
* :mod:`ttt_jax.ops.kernels.tpu_cache`    -- TPU (Pallas Mosaic) attention of new queries against a
  KV cache (prefill and decode; forward only): ``tpu_cache_attention``, behind
  ``cache_attention(impl="pallas")`` of :mod:`ttt_jax.ops.attention_cache`.

Kernels know nothing about meshes: the context-parallel attention of :mod:`ttt_jax.ops.attention_cp`
(on TPU with splash blocks, :mod:`ttt_jax.ops.attention_cp_tpu`) runs them per device, between its
collectives. Each kernel is tested against a dense reference (values and gradients; the forward-only
cache kernel on values, its custom VJP's XLA backward on gradients).
"""
