"""Ahead-of-time compilation and memory planning for TPU slices (``ttt-jax compile``)."""
