"""Kernel modules behind the ops (Pallas TPU: ``tpu_*``)."""
