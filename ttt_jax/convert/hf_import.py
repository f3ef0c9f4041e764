"""Import a Hugging Face Qwen3 / Llama checkpoint: ``load_hf`` (a ready ``CausalLM``, sharded over
a mesh if given) and ``convert_hf`` (a model-only Orbax checkpoint that ``ttt-jax train`` (with
``train.init_from``), ``load_model`` and the generator use directly).

Streaming: the source is read one tensor at a time (memory-mapped safetensors); each tensor is
laid out, cast to ``param_dtype`` and placed -- with a mesh, by
``jax.make_array_from_callback`` so that every device receives only its own shard -- before the
next is read. The converted model itself is held once (on the device(s), or the host on CPU):
there is no second full copy.

With ``ttt`` (:func:`~ttt_jax.convert.hf_config.ttt_config`) In-Place TTT is added to the chosen
layers; their ``ttt_conv`` starts at zero and ``ttt_proj`` at its diagonal init, so the converted
model computes exactly what the checkpoint computes (tested).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Optional

import jax
import numpy as np
from flax import nnx

from ttt_jax.config import Config, DataConfig, RuntimeConfig, TTTConfig
from ttt_jax.convert.hf_config import model_config_from_hf
from ttt_jax.convert.mapping import IGNORED_SUFFIXES, TensorMap, tensor_maps
from ttt_jax.convert.safetensors_io import FLOAT_DTYPES, SafetensorsCheckpoint

# Files copied next to a converted checkpoint (tokenizer, generation defaults); the source
# config.json is kept as hf_config.json for the export back to Hugging Face format.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json", "vocab.json", "merges.txt")
HF_CONFIG_COPY = "hf_config.json"


def read_hf_config(src: str | Path) -> dict[str, Any]:
    path = Path(src).expanduser() / "config.json"
    if not path.is_file():
        raise ValueError(f"{path} not found: expected a Hugging Face model directory (config.json "
                         "and safetensors weights)")
    return json.loads(path.read_text())


def _shown(items: list[str], n: int = 12) -> str:
    return ", ".join(items[:n]) + (f" ... and {len(items) - n} more" if len(items) > n else "")


def _plan(ckpt: SafetensorsCheckpoint, maps: list[TensorMap], *, new_ttt: bool, identity_proj: bool,
          tied: bool) -> list[TensorMap]:
    """The maps to read from ``ckpt``; raises ``ValueError`` naming every missing, unexpected,
    wrongly shaped or non-float tensor."""
    def optional(m: TensorMap) -> bool:
        return m.ttt and (new_ttt or (identity_proj and m.hf_name.endswith("ttt_proj.weight")))

    missing = [m.hf_name for m in maps if m.hf_name not in ckpt and not optional(m)]
    if missing:
        raise ValueError(f"{ckpt.path}: {len(missing)} tensor(s) the config requires are missing: "
                         f"{_shown(missing)}")
    known = {m.hf_name for m in maps}
    if tied:
        known.add("lm_head.weight")   # some tied checkpoints store the shared matrix twice
    extra = [n for n in ckpt.names() if n not in known and not n.endswith(IGNORED_SUFFIXES)]
    if extra:
        hint = ""
        if any(n.endswith(".bias") for n in extra):
            hint = " (biases are not supported by the decoder)"
        elif any(".ttt_" in n for n in extra):
            hint = " (In-Place TTT tensors on layers config.json does not list in ttt_layers)"
        raise ValueError(f"{ckpt.path}: {len(extra)} tensor(s) have no place in the converted model"
                         f"{hint}: {_shown(extra)}")
    present = [m for m in maps if m.hf_name in ckpt]
    bad_shape = [f"{m.hf_name}: {list(ckpt.shape(m.hf_name))} (expected {list(m.hf_shape)})"
                 for m in present if ckpt.shape(m.hf_name) != tuple(m.hf_shape)]
    if bad_shape:
        raise ValueError(f"{ckpt.path}: tensor shapes do not match config.json: {_shown(bad_shape)}")
    bad_dtype = [f"{m.hf_name}: {ckpt.dtype(m.hf_name)}" for m in present
                 if ckpt.dtype(m.hf_name) not in FLOAT_DTYPES]
    if bad_dtype:
        raise ValueError(f"{ckpt.path}: tensors must be floating point ({', '.join(FLOAT_DTYPES)}); "
                         f"got {_shown(bad_dtype)} (quantised checkpoints are not supported)")
    return present


def _flatten(tree: Any, prefix: tuple = ()) -> dict[tuple, Any]:
    """Nested dict -> ``{path tuple: leaf}``."""
    if isinstance(tree, dict):
        out: dict[tuple, Any] = {}
        for k, v in tree.items():
            out.update(_flatten(v, prefix + (k,)))
        return out
    return {prefix: tree}


def _unflatten(flat: dict[tuple, Any]) -> dict:
    root: dict = {}
    for path, v in flat.items():
        node = root
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = v
    return root


def load_hf(src: str | Path, *, ttt: Optional[TTTConfig] = None, param_dtype: str = "float32",
            compute_dtype: str = "bfloat16", mesh: Optional[jax.sharding.Mesh] = None, seed: int = 0,
            progress: bool = False, runtime: Optional[RuntimeConfig] = None,
            **model_overrides: Any) -> tuple[Config, Any]:
    """Load the Hugging Face model directory ``src`` as ``(Config, CausalLM)``.

    Args:
      src: a directory with ``config.json`` and ``model.safetensors`` or sharded safetensors with
        ``model.safetensors.index.json`` (``tokenizer.json`` optional).
      ttt: In-Place TTT to add (None: the checkpoint's own TTT settings, else none).
      param_dtype / compute_dtype: ``float32`` or ``bfloat16``.
      mesh: place every parameter directly in its sharding on this mesh (FSDP / tensor rules of
        :mod:`ttt_jax.sharding`); None = the default device.
      seed: initialisation of parameters the checkpoint does not hold (new TTT parameters).
      progress: show a progress bar over tensors.
      runtime: how the model runs (kernels, remat; default :class:`~ttt_jax.config.RuntimeConfig`).
      model_overrides: further ``ModelConfig`` fields (``max_seq_len``, ``attention_window``, ...).
    Raises:
      ValueError: unsupported architecture or feature, missing / unexpected / misshapen tensors.
    """
    from ttt_jax.models.lm import CausalLM
    from ttt_jax import sharding

    src = Path(src).expanduser()
    hf = read_hf_config(src)
    mcfg = model_config_from_hf(hf, ttt=ttt, param_dtype=param_dtype, compute_dtype=compute_dtype,
                                **model_overrides)
    tokenizer = str((src / "tokenizer.json").absolute()) if (src / "tokenizer.json").is_file() else "byte"
    runtime = runtime or RuntimeConfig()
    cfg = Config(model=mcfg, runtime=runtime, data=DataConfig(tokenizer=tokenizer, seq_len=min(512, mcfg.max_seq_len)))
    cfg.validate()
    ckpt = SafetensorsCheckpoint(src)
    identity_proj = bool(hf.get("ttt_mode")) and hf.get("ttt_proj") is False
    plan = _plan(ckpt, tensor_maps(mcfg), new_ttt=ttt is not None, identity_proj=identity_proj,
                 tied=mcfg.tie_embeddings)

    def build():
        return CausalLM(mcfg, runtime=runtime, rngs=nnx.Rngs(seed))

    graphdef, abs_state = nnx.split(nnx.eval_shape(build))
    abs_flat = _flatten(nnx.to_pure_dict(abs_state))
    if mesh is None:
        dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        shardings = {p: dev for p in abs_flat}
    else:
        shardings = _flatten(nnx.to_pure_dict(sharding.state_shardings(abs_state, mesh)))
    values: dict[tuple, Any] = {}
    # Parameters the checkpoint does not hold (new TTT layers) get their initial values from one
    # compiled initialisation of which XLA keeps only those outputs (the rest is dead code).
    fresh = [p for p in abs_flat if p not in {m.path for m in plan}]
    if identity_proj:
        fresh = [p for p in fresh if p[-1] != "ttt_proj"]
    if fresh:
        def init_fresh():
            flat = _flatten(nnx.to_pure_dict(nnx.state(build())))
            return [flat[p] for p in fresh]
        values.update(zip(fresh, jax.jit(init_fresh, out_shardings=[shardings[p] for p in fresh])()))
    dtype = jax.numpy.dtype(param_dtype)
    it = plan
    if progress:
        from tqdm.auto import tqdm
        it = tqdm(plan, desc=f"import {src.name}", unit="tensor")
    for m in it:
        arr = np.asarray(m.to_ours(ckpt.get(m.hf_name))).astype(dtype)
        if tuple(arr.shape) != tuple(m.shape):   # a mapping bug, not a user error
            raise AssertionError(f"{m.hf_name} mapped to shape {arr.shape}, expected {m.shape}")
        # Each device receives only its own slice of the (memory-mapped) tensor.
        values[m.path] = jax.make_array_from_callback(arr.shape, shardings[m.path],
                                                      lambda idx, a=arr: a[idx])
        del arr
    if identity_proj:   # official ttt_proj=false: V = conv(t), i.e. the identity projection
        for p in abs_flat:
            if p[-1] == "ttt_proj":
                eye = np.eye(mcfg.d_model, dtype=dtype)
                values[p] = jax.make_array_from_callback(eye.shape, shardings[p], lambda idx: eye[idx])
    nnx.replace_by_pure_dict(abs_state, _unflatten(values))
    ckpt.close()
    return cfg, nnx.merge(graphdef, abs_state)


def convert_hf(src: str | Path, out: str | Path, **kwargs: Any) -> Path:
    """Convert ``src`` (as :func:`load_hf`, same keyword arguments) into a model-only checkpoint in
    ``out`` (``out/checkpoints/0``, ``out/config.yaml``), with the tokenizer files copied next to
    it and ``data.tokenizer`` pointing at ``out/tokenizer.json``; the source ``config.json`` is kept
    as ``out/hf_config.json`` for :func:`~ttt_jax.convert.hf_export.export_hf`. Returns ``out``."""
    from ttt_jax.config import replace
    from ttt_jax.checkpoint import save_model

    src, out = Path(src).expanduser(), Path(out).expanduser().absolute()
    if (out / "checkpoints").exists():
        raise ValueError(f"{out} already holds a checkpoint; choose a new output directory")
    cfg, model = load_hf(src, **kwargs)
    out.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, out / name)
    shutil.copy2(src / "config.json", out / HF_CONFIG_COPY)
    if (out / "tokenizer.json").is_file():
        cfg = replace(cfg, data={"tokenizer": str(out / "tokenizer.json")})
    save_model(out, model, cfg)
    return out
