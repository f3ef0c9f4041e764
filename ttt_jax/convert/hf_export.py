"""Export a ttt-jax checkpoint to Hugging Face format: safetensors (sharded above
``max_shard_bytes``) + ``config.json``, with In-Place TTT parameters named and shaped as the
official PyTorch code names them (``model.layers.{i}.mlp.ttt_conv.weight [D, 1, K]``,
``model.layers.{i}.mlp.ttt_proj.weight [D, D]``) and the TTT settings in ``config.json``
(``ttt_mode``, ``ttt_layers``, ``ttt_lr``, ``ttt_chunk``, ``ttt_proj``, ``ttt_target``,
``ttt_clip_tau``). A model without TTT layers exports as a plain Qwen3 / Llama checkpoint that
transformers loads directly.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator, Optional

import jax
import numpy as np
from flax import nnx

from ttt_jax.convert.hf_config import hf_config_from_model
from ttt_jax.convert.hf_import import HF_CONFIG_COPY, TOKENIZER_FILES
from ttt_jax.convert.mapping import tensor_maps
from ttt_jax.convert.safetensors_io import numpy_dtype, write_safetensors


def _checkpoint_root(path: Path) -> Path:
    from ttt_jax.checkpoint import resolve_checkpoint

    ckdir, _ = resolve_checkpoint(path)
    return ckdir.parent if ckdir.name == "checkpoints" else ckdir


def export_hf(ckpt: str | Path, out: str | Path, *, step: Optional[int] = None,
              dtype: Optional[str] = None, max_shard_bytes: int = 5 * 2**30,
              progress: bool = False) -> Path:
    """Write the model of checkpoint ``ckpt`` (a run directory, a converted directory or a step
    directory; newest step unless ``step``) to ``out`` in Hugging Face format.

    ``dtype``: ``float32`` / ``bfloat16`` / ``float16`` of the written tensors (default: the
    model's ``param_dtype``). Tokenizer files found next to the checkpoint (or at the config's
    ``data.tokenizer``) are copied. Returns ``out``.
    """
    from ttt_jax.checkpoint import load_model
    from ttt_jax.models.layers import unstack_layer_params

    from ttt_jax.fs import as_path

    ckpt, out = as_path(ckpt, "checkpoint"), Path(out).expanduser()   # the checkpoint may be a URL
    # Hugging Face's layout is the unrolled one: a stacked (scan_layers) checkpoint is unstacked.
    cfg, model = load_model(ckpt, step=step, overrides=["runtime.scan_layers=false"])
    mcfg = cfg.model
    state = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    dtype = dtype or mcfg.param_dtype
    np_dtype = numpy_dtype(dtype)
    maps = tensor_maps(mcfg)

    def tensors() -> Iterator[tuple[str, np.ndarray]]:
        it = maps
        if progress:
            from tqdm.auto import tqdm
            it = tqdm(maps, desc="export", unit="tensor")
        for m in it:
            node: Any = state
            for key in m.path:
                node = node[key]
            arr = m.to_hf(np.asarray(jax.device_get(node))).astype(np_dtype)
            yield m.hf_name, np.ascontiguousarray(arr)

    out.mkdir(parents=True, exist_ok=True)
    write_safetensors(out, tensors(), max_shard_bytes=max_shard_bytes)
    root = _checkpoint_root(ckpt)
    # The source config.json (token ids, generation fields) is next to a converted checkpoint, or
    # next to the checkpoint a warm-started run began from.
    origins = [root] + ([Path(cfg.train.init_from).expanduser()] if cfg.train.init_from else [])
    base = next((json.loads((d / HF_CONFIG_COPY).read_text()) for d in origins
                 if (d / HF_CONFIG_COPY).is_file()), None)
    hf = hf_config_from_model(mcfg, base=base, dtype=dtype)
    (out / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
    tok_dirs = list(origins)
    if cfg.data.tokenizer != "byte":
        t = Path(cfg.data.tokenizer)
        tok_dirs.append(t if t.is_dir() else t.parent)
    for name in TOKENIZER_FILES:
        for d in tok_dirs:
            if (d / name).is_file() and not (out / name).exists():
                (out / name).write_bytes((d / name).read_bytes())
    return out
