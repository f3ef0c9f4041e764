"""Hugging Face Qwen3 / Llama checkpoints <-> ttt-jax (see README, "Pretrained checkpoints").

* :func:`load_hf` / :func:`convert_hf`: import a Hugging Face directory (``config.json`` +
  safetensors, sharded or not), optionally adding In-Place TTT to chosen layers.
* :func:`export_hf`: write a ttt-jax checkpoint back as safetensors + ``config.json``, TTT
  parameters named as the official PyTorch code names them.
* :func:`model_config_from_hf` / :func:`hf_config_from_model`: the config mapping alone.
"""

from ttt_jax.convert.hf_config import (SUPPORTED_ARCHITECTURES, hf_config_from_model,
                                       model_config_from_hf, ttt_config)
from ttt_jax.convert.hf_export import export_hf
from ttt_jax.convert.hf_import import convert_hf, load_hf, read_hf_config
from ttt_jax.convert.safetensors_io import SafetensorsCheckpoint, write_safetensors

__all__ = ["SUPPORTED_ARCHITECTURES", "SafetensorsCheckpoint", "convert_hf", "export_hf",
           "hf_config_from_model", "load_hf", "model_config_from_hf", "read_hf_config", "ttt_config",
           "write_safetensors"]
