"""Hugging Face conversion: parity with transformers on small random Qwen3 / Llama models (logits
and greedy continuations), round trips, the exported In-Place TTT model in a PyTorch
reimplementation of the official MLP forward, and the errors a user can cause."""

import json
import shutil

import numpy as np
import pytest

import jax
import jax.numpy as jnp
from flax import nnx

pytestmark = pytest.mark.integration

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from ttt_jax.config import RuntimeConfig  # noqa: E402
from ttt_jax.convert import (SafetensorsCheckpoint, convert_hf, export_hf, load_hf,  # noqa: E402
                             model_config_from_hf, ttt_config)
from ttt_jax.checkpoint import load_model, save_model  # noqa: E402

V, PROMPT, NEW = 96, 16, 32
SMALL = dict(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
             num_attention_heads=4, head_dim=16, max_position_embeddings=128, rms_norm_eps=1e-6,
             initializer_range=0.08)

CASES = {
    # name: (config class, model class, extra config fields, save_pretrained kwargs)
    "qwen3_tied_gqa": ("Qwen3Config", "Qwen3ForCausalLM",
                       dict(num_key_value_heads=2, tie_word_embeddings=True), {}),
    "qwen3_untied_yarn_sharded": ("Qwen3Config", "Qwen3ForCausalLM",
                                  dict(num_key_value_heads=1, tie_word_embeddings=False,
                                       rope_parameters=dict(rope_type="yarn", rope_theta=1e4, factor=4.0,
                                                            original_max_position_embeddings=32)),
                                  dict(max_shard_size="40KB")),
    "qwen3_sliding_window": ("Qwen3Config", "Qwen3ForCausalLM",
                             dict(num_key_value_heads=2, tie_word_embeddings=True, use_sliding_window=True,
                                  sliding_window=8, max_window_layers=1), {}),
    "llama_untied_llama3_sharded": ("LlamaConfig", "LlamaForCausalLM",
                                    dict(num_key_value_heads=2, tie_word_embeddings=False,
                                         rope_parameters=dict(rope_type="llama3", rope_theta=5e5, factor=8.0,
                                                              low_freq_factor=1.0, high_freq_factor=4.0,
                                                              original_max_position_embeddings=16)),
                                    dict(max_shard_size="40KB")),
    "llama_tied_mha": ("LlamaConfig", "LlamaForCausalLM",
                       dict(num_key_value_heads=4, tie_word_embeddings=True), {}),
}


def _save_hf(tmp_path, name, seed=0):
    cfg_cls, model_cls, extra, save_kw = CASES[name]
    torch.manual_seed(seed)
    hf_cfg = getattr(transformers, cfg_cls)(**SMALL, **extra)
    hf_cfg._attn_implementation = "eager"
    model = getattr(transformers, model_cls)(hf_cfg).eval()
    path = tmp_path / name
    model.save_pretrained(path, **save_kw)
    return path, model


@nnx.jit
def _logits(model, tokens):
    """One jitted forward, compiled once per model structure and token shape."""
    return model(tokens)


def _greedy_ours(model, prompt, n):
    """Greedy decoding by full forward passes over a fixed-size buffer (causal: the padding after
    the current position cannot affect it), so one compiled program serves every step."""
    buf = np.zeros((2, prompt.shape[1] + n), np.int32)   # the batch shape of the logits test
    buf[:, :prompt.shape[1]] = prompt[0]
    for t in range(prompt.shape[1], prompt.shape[1] + n):
        logits = np.asarray(_logits(model, jnp.asarray(buf)))
        buf[:, t] = int(np.argmax(logits[0, t - 1]))
    return buf[0, prompt.shape[1]:]


def _greedy_hf(model, prompt, n):
    with torch.no_grad():
        out = model.generate(torch.as_tensor(prompt), max_new_tokens=n, min_new_tokens=n,
                             do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, prompt.shape[1]:].numpy()


@pytest.mark.parametrize("name", list(CASES))
def test_logits_and_greedy_match_transformers(tmp_path, name):
    path, hf_model = _save_hf(tmp_path, name)
    if "sharded" in name:
        assert (path / "model.safetensors.index.json").is_file()
        assert len(list(path.glob("model-*.safetensors"))) > 2
    cfg, model = load_hf(path, compute_dtype="float32", runtime=RuntimeConfig(attention_impl="xla"))
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, V, (2, PROMPT + NEW))
    with torch.no_grad():
        ref = hf_model(torch.as_tensor(tokens)).logits.numpy()
    ours = np.asarray(_logits(model, jnp.asarray(tokens)))
    assert np.abs(ref).max() > 0.5          # not vacuous: logits of a real size
    assert np.abs(ours - ref).max() <= 1e-4, np.abs(ours - ref).max()
    prompt = tokens[:1, :PROMPT]
    hf_gen = _greedy_hf(hf_model, prompt, NEW)
    if not cfg.model.tie_embeddings:     # (tied random models tend to repeat their last token)
        assert len(set(hf_gen.tolist())) > 3    # a continuation that depends on the weights
    np.testing.assert_array_equal(_greedy_ours(model, prompt, NEW), hf_gen)
    if "yarn" in name:
        assert cfg.model.rope_scaling.type == "yarn" and cfg.model.qk_norm
    if "llama3" in name:
        assert cfg.model.rope_scaling.type == "llama3" and not cfg.model.qk_norm


def _perturb_ttt(model, seed=0):
    """Give the TTT parameters non-trivial values (at init the conv is zero and TTT is a no-op)."""
    rng = np.random.default_rng(seed)
    for block in model.layers:
        mlp = block.mlp
        if hasattr(mlp, "ttt_conv"):
            mlp.ttt_conv.set_value(jnp.asarray(rng.normal(0, 0.5, mlp.ttt_conv.shape), jnp.float32))
            mlp.ttt_proj.set_value(jnp.asarray(rng.normal(0, 0.3, mlp.ttt_proj.shape), jnp.float32))


def test_ttt_at_conversion_keeps_logits_and_round_trips(tmp_path):
    path, hf_model = _save_hf(tmp_path, "qwen3_untied_yarn_sharded")
    tokens = jnp.asarray(np.random.default_rng(2).integers(0, V, (1, 40)))
    _, base = load_hf(path, compute_dtype="float32")
    ttt = ttt_config(layers=[0, 2], chunk_size=8, lr=3.0)
    out = convert_hf(path, tmp_path / "converted", ttt=ttt, compute_dtype="float32", progress=False)
    cfg, model = load_model(out)
    assert cfg.model.ttt.layer_ids(3) == (0, 2) and cfg.model.ttt.target_source == "hidden"
    np.testing.assert_array_equal(np.asarray(_logits(model, tokens)), np.asarray(_logits(base, tokens)))  # new params at init
    assert (out / "hf_config.json").is_file()

    # import -> export -> import gives identical parameters (TTT ones included, made non-trivial).
    _perturb_ttt(model)
    save_model(tmp_path / "perturbed", model, cfg)
    exported = export_hf(tmp_path / "perturbed", tmp_path / "exported", max_shard_bytes=60_000)
    hf_json = json.loads((exported / "config.json").read_text())
    assert hf_json["ttt_mode"] is True and hf_json["ttt_layers"] == [0, 2]
    assert hf_json["ttt_chunk"] == 8 and hf_json["ttt_lr"] == 3.0 and hf_json["ttt_target"] == "hidden_states"
    st = SafetensorsCheckpoint(exported)
    assert st.shape("model.layers.0.mlp.ttt_conv.weight") == (64, 1, 5)
    assert st.shape("model.layers.2.mlp.ttt_proj.weight") == (64, 64)
    assert "model.layers.1.mlp.ttt_conv.weight" not in st
    cfg2, again = load_hf(exported, compute_dtype="float32")
    assert cfg2.model == cfg.model
    a, b = nnx.to_pure_dict(nnx.state(model, nnx.Param)), nnx.to_pure_dict(nnx.state(again, nnx.Param))
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)
    # Without TTT the export is a plain checkpoint: the source tensors bit for bit, and
    # transformers loads it with the same logits.
    plain = export_hf(convert_hf(path, tmp_path / "plain_ckpt"), tmp_path / "plain_hf")
    src, back = SafetensorsCheckpoint(path), SafetensorsCheckpoint(plain)
    assert src.names() == back.names()
    for name in src.names():
        np.testing.assert_array_equal(back.get(name), src.get(name))
    reloaded = transformers.Qwen3ForCausalLM.from_pretrained(plain, attn_implementation="eager").eval()
    t = torch.as_tensor(np.array(tokens))
    with torch.no_grad():
        np.testing.assert_array_equal(reloaded(t).logits.numpy(), hf_model(t).logits.numpy())


# --- The exported TTT model in PyTorch: a reimplementation of the official In-Place TTT MLP ---------


class OfficialTTTMLP(torch.nn.Module):
    """The official PyTorch In-Place TTT MLP forward (training form), written from its description:
    ``ttt_conv`` a depthwise ``Conv1d(D, D, K, padding=K//2, groups=D)`` applied to each chunk of
    the target separately, ``dW_i = lr * (conv(t_i) @ ttt_proj.weight)^T h_i`` in the layout of
    ``down_proj.weight [D, F]``, chunk ``i`` computed with ``down_proj.weight + sum_{j<i} dW_j``.
    The target ``t`` is the MLP input (``ttt_target="hidden_states"``)."""

    def __init__(self, mlp, conv_w, proj_w, lr, chunk):
        super().__init__()
        self.mlp, self.lr, self.chunk = mlp, lr, chunk
        d, _, k = conv_w.shape
        self.ttt_conv = torch.nn.Conv1d(d, d, k, padding=k // 2, groups=d, bias=False)
        self.ttt_conv.weight.data.copy_(conv_w)
        self.ttt_proj = torch.nn.Linear(d, d, bias=False)
        self.ttt_proj.weight.data.copy_(proj_w)

    def _chunks(self, x):
        b, t, d = x.shape
        pad = (-t) % self.chunk
        x = torch.cat([x, x.new_zeros(b, pad, d)], dim=1)
        return x.reshape(b, -1, self.chunk, d)

    def forward(self, x):
        m = self.mlp
        h = m.act_fn(m.gate_proj(x)) * m.up_proj(x)
        tc, hc = self._chunks(x), self._chunks(h)
        b, n, c, d = tc.shape
        conv = self.ttt_conv(tc.transpose(-1, -2).reshape(b * n, d, c)).transpose(-1, -2).reshape(b, n, c, d)
        dw = torch.einsum("btch,btcd,de->bteh", hc[:, :-1], conv[:, :-1], self.ttt_proj.weight)
        w = torch.cat([m.down_proj.weight.expand(b, 1, *m.down_proj.weight.shape), dw * self.lr], dim=1)
        y = torch.einsum("btdh,btch->btcd", w.cumsum(dim=1), hc)
        return y.reshape(b, n * c, d)[:, :x.shape[1]]


def test_exported_ttt_model_matches_official_mlp_in_pytorch(tmp_path):
    path, _ = _save_hf(tmp_path, "qwen3_tied_gqa")
    ttt = ttt_config(layers=[0, 2], chunk_size=8, lr=3.0)
    cfg, model = load_hf(path, ttt=ttt, compute_dtype="float32")
    _perturb_ttt(model, seed=3)
    save_model(tmp_path / "ttt", model, cfg)
    exported = export_hf(tmp_path / "ttt", tmp_path / "ttt_hf")

    from safetensors.torch import load_file
    weights = load_file(str(exported / "model.safetensors"))
    hf_json = json.loads((exported / "config.json").read_text())
    torch_model = transformers.Qwen3ForCausalLM.from_pretrained(exported).eval()  # TTT tensors: unexpected keys
    for i in hf_json["ttt_layers"]:
        layer = torch_model.model.layers[i]
        layer.mlp = OfficialTTTMLP(layer.mlp, weights[f"model.layers.{i}.mlp.ttt_conv.weight"],
                                   weights[f"model.layers.{i}.mlp.ttt_proj.weight"],
                                   hf_json["ttt_lr"], hf_json["ttt_chunk"])
    tokens = np.random.default_rng(4).integers(0, V, (2, 45))    # 45: not a multiple of the chunk
    with torch.no_grad():
        ref = torch_model(torch.as_tensor(tokens)).logits.numpy()
    ours = np.asarray(_logits(model, jnp.asarray(tokens)))
    _, plain = load_hf(path, compute_dtype="float32")
    assert np.abs(ours - np.asarray(_logits(plain, jnp.asarray(tokens)))).max() > 1e-2   # TTT really acts
    assert np.abs(ours - ref).max() <= 1e-4, np.abs(ours - ref).max()


# --- Errors ------------------------------------------------------------------------------------


def _write_config(path, **changes):
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(changes)
    (path / "config.json").write_text(json.dumps(cfg))


def test_errors_name_the_problem(tmp_path):
    path, _ = _save_hf(tmp_path, "llama_tied_mha")
    hf = json.loads((path / "config.json").read_text())
    with pytest.raises(ValueError, match="unsupported architecture 'MistralForCausalLM'"):
        model_config_from_hf({**hf, "architectures": ["MistralForCausalLM"]})
    with pytest.raises(ValueError, match="attention_bias=true"):
        model_config_from_hf({**hf, "attention_bias": True})
    with pytest.raises(ValueError, match="hidden_act='gelu'"):
        model_config_from_hf({**hf, "hidden_act": "gelu"})
    with pytest.raises(ValueError, match="unsupported RoPE type 'longrope'"):
        model_config_from_hf({**hf, "rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4}})
    with pytest.raises(ValueError, match="partial_rotary_factor"):
        model_config_from_hf({**hf, "partial_rotary_factor": 0.5})

    from safetensors.numpy import load_file, save_file
    tensors = load_file(str(path / "model.safetensors"))
    broken = tmp_path / "broken"
    shutil.copytree(path, broken)
    missing = dict(tensors)
    del missing["model.layers.1.mlp.up_proj.weight"]
    save_file(missing, str(broken / "model.safetensors"))
    with pytest.raises(ValueError, match=r"missing: model\.layers\.1\.mlp\.up_proj\.weight"):
        load_hf(broken)
    save_file({**tensors, "model.layers.0.mlp.down_proj.weight": np.zeros((64, 95), np.float32)},
              str(broken / "model.safetensors"))
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.down_proj\.weight: \[64, 95\] \(expected \[64, 96\]\)"):
        load_hf(broken)
    save_file({**tensors, "model.layers.0.self_attn.q_proj.bias": np.zeros(64, np.float32)},
              str(broken / "model.safetensors"))
    with pytest.raises(ValueError, match=r"biases are not supported.*q_proj\.bias"):
        load_hf(broken)
    save_file({**tensors, "model.norm.weight": np.ones(64, np.int32)}, str(broken / "model.safetensors"))
    with pytest.raises(ValueError, match="model.norm.weight: I32"):
        load_hf(broken)
    (broken / "model.safetensors").unlink()
    with pytest.raises(ValueError, match="no model.safetensors"):
        load_hf(broken)
    with pytest.raises(ValueError, match="config.json not found"):
        load_hf(tmp_path / "nowhere")


def test_load_onto_a_mesh_places_each_shard(tmp_path):
    from ttt_jax.config import MeshConfig
    from ttt_jax.sharding import make_mesh

    path, _ = _save_hf(tmp_path, "llama_untied_llama3_sharded")
    ttt = ttt_config(layers=[1], chunk_size=8)
    _, ref = load_hf(path, ttt=ttt, compute_dtype="float32")
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    _, model = load_hf(path, ttt=ttt, compute_dtype="float32", mesh=mesh)
    q = model.layers[0].attn.q[...]
    assert q.sharding.mesh.shape == mesh.shape and len(q.sharding.device_set) == 8
    assert q.addressable_shards[0].data.shape == (32, 2, 16)       # embed / fsdp, heads / tensor
    a, b = nnx.to_pure_dict(nnx.state(ref, nnx.Param)), nnx.to_pure_dict(nnx.state(model, nnx.Param))
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


# config.json of the released checkpoints (transformers 4.x format: top-level rope_theta, rope_scaling).
QWEN3_4B = {"architectures": ["Qwen3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
            "bos_token_id": 151643, "eos_token_id": 151645, "head_dim": 128, "hidden_act": "silu",
            "hidden_size": 2560, "initializer_range": 0.02, "intermediate_size": 9728,
            "max_position_embeddings": 40960, "max_window_layers": 36, "model_type": "qwen3",
            "num_attention_heads": 32, "num_hidden_layers": 36, "num_key_value_heads": 8,
            "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 1000000, "sliding_window": None,
            "tie_word_embeddings": True, "torch_dtype": "bfloat16", "use_cache": True,
            "use_sliding_window": False, "vocab_size": 151936}
LLAMA31_8B = {"architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
              "bos_token_id": 128000, "eos_token_id": 128001, "hidden_act": "silu", "hidden_size": 4096,
              "initializer_range": 0.02, "intermediate_size": 14336, "max_position_embeddings": 131072,
              "mlp_bias": False, "model_type": "llama", "num_attention_heads": 32, "num_hidden_layers": 32,
              "num_key_value_heads": 8, "pretraining_tp": 1, "rms_norm_eps": 1e-05,
              "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                               "original_max_position_embeddings": 8192, "rope_type": "llama3"},
              "rope_theta": 500000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
              "use_cache": True, "vocab_size": 128256}


@pytest.mark.parametrize("preset,hf,changed", [
    ("qwen3_4b_stage1", QWEN3_4B, set()),
    ("qwen3_4b_stage2", QWEN3_4B, {"max_seq_len", "rope_scaling"}),   # the stage-2 YaRN extension
    ("llama31_8b", LLAMA31_8B, set()),
])
def test_recipe_presets_match_the_released_checkpoints(preset, hf, changed):
    from ttt_jax.config import load_config

    cfg = load_config(preset)
    ours = model_config_from_hf(hf, ttt=cfg.model.ttt, initializer_range=0.01)
    differ = {k for k in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "d_ff",
                          "max_seq_len", "rope_theta", "rope_scaling", "rms_norm_eps", "tie_embeddings",
                          "qk_norm", "attention_window") if getattr(ours, k) != getattr(cfg.model, k)}
    assert differ == changed
    t = cfg.model.ttt
    assert (t.every, t.start, t.lr, t.chunk_size, t.target_source) == (6, 0, 3.0, 1024, "hidden")
    assert load_config(preset, ["model.ttt.enabled=false"]).model.ttt.layer_ids(cfg.model.n_layers) == ()
    tr = cfg.train
    assert (tr.learning_rate, tr.weight_decay, tr.grad_clip) == (5e-6, 0.1, 1.0)
    assert tr.warmup_steps == round(0.02 * tr.steps)
