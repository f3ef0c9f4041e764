"""The presets (``*.yaml``); installed as ``ttt_jax.configs`` and read by ``ttt_jax.config``."""
