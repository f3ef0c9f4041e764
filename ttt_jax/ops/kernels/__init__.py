"""Per-device attention kernels: the fused compute that the attention ops call on one device.

* :mod:`ttt_jax.ops.kernels.flash`        -- Pallas (Triton) flash-attention kernels for NVIDIA
  GPUs: block forward / backward with log-sum-exp, causal / window / segment-id masks, and a
  differentiable ``flash_attention`` (single-device ``impl="flash"``; the fused ring's blocks).
* :mod:`ttt_jax.ops.kernels.cudnn_blocks` -- cuDNN flash attention through JAX's private cuDNN
  functions: block forward / backward with the merged log-sum-exp (the fused ring's blocks), one
  sliding-window call, and :func:`~ttt_jax.ops.kernels.cudnn_blocks.cudnn_unsupported_reason`.
* :mod:`ttt_jax.ops.kernels.tpu_splash`   -- TPU (Pallas Mosaic) splash attention: single-device
  ``tpu_attention``, and block forward / backward with the merged log-sum-exp.
* :mod:`ttt_jax.ops.kernels.tpu_context`  -- context-parallel attention on TPU with those blocks:
  ring (contiguous / zigzag), all-gather K/V, and the halo sliding window.

Kernels know nothing about meshes (``tpu_context`` excepted: the TPU ring, all-gather and halo
live beside their blocks until the dispatcher takes them): the context-parallel attention of ``ttt_jax.ops.attention_cp``
runs them per device, between its collectives. Each kernel is tested against a dense reference
(values and gradients).
"""
