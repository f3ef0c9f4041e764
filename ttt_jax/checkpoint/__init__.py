"""Checkpoints: run checkpointing, model-only load/save/verify, and the compatibility policy.

* :mod:`~ttt_jax.checkpoint.run` -- :class:`Checkpointer`, the Orbax checkpoints of a training run
  (model + optimizer + data position), asynchronous, atomic, verified by checksums on restore;
* :mod:`~ttt_jax.checkpoint.model_io` -- :func:`load_model`, :func:`save_model`,
  :func:`verify_checkpoint`, :func:`resolve_checkpoint`, :func:`read_checkpoint_config`: the
  parameters of a model, for inference, evaluation, conversion and warm starts;
* :mod:`~ttt_jax.checkpoint.compat` -- :func:`config_differences`, which config changes forbid a
  restore;
* :mod:`~ttt_jax.checkpoint.integrity` -- checksums, sizes, free space, error sorting;
* :mod:`~ttt_jax.checkpoint.storage` -- which steps of a directory are complete, local or at a URL
  (``gs://...``, :mod:`ttt_jax.fs`);
* :mod:`~ttt_jax.checkpoint.errors` -- the exceptions.
"""

from ttt_jax.checkpoint.compat import config_differences
from ttt_jax.checkpoint.errors import (CheckpointCorruptError, CheckpointWarning, CheckpointWriteError,
                                       NonFiniteStateError)
from ttt_jax.checkpoint.integrity import free_bytes, state_checksums, state_nbytes, verify_checksums
from ttt_jax.checkpoint.model_io import (load_model, read_checkpoint_config, resolve_checkpoint, save_model,
                                         verify_checkpoint)
from ttt_jax.checkpoint.run import CORRUPT_SUFFIX, TMP_MARKER, Checkpointer, Restored

__all__ = ["Checkpointer", "Restored", "CORRUPT_SUFFIX", "TMP_MARKER", "load_model", "save_model",
           "verify_checkpoint", "resolve_checkpoint", "read_checkpoint_config", "config_differences",
           "CheckpointCorruptError", "CheckpointWarning", "CheckpointWriteError", "NonFiniteStateError",
           "free_bytes", "state_checksums", "state_nbytes", "verify_checksums"]
