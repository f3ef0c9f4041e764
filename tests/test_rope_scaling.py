"""RoPE scaling (yarn, llama3) against transformers' own frequency functions, and the config field."""

import numpy as np
import pytest

import jax.numpy as jnp

from ttt_jax.config import ConfigError, RopeScalingConfig, load_config
from ttt_jax.nn.rope import apply_rope, rope_cos_sin, rope_frequencies

pytestmark = pytest.mark.unit

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS  # noqa: E402


def _hf(head_dim, theta, params, max_pos=131072):
    cfg = transformers.LlamaConfig(hidden_size=head_dim * 4, num_attention_heads=4, head_dim=head_dim,
                                   max_position_embeddings=max_pos,
                                   rope_parameters={"rope_theta": theta, **params})
    inv_freq, factor = ROPE_INIT_FUNCTIONS[params["rope_type"]](cfg, "cpu")
    return inv_freq.numpy(), float(factor)


YARN_CASES = [
    (128, 1e6, dict(factor=4.0, original_max_position_embeddings=32768)),              # Qwen3 128k
    (64, 1e4, dict(factor=8.0, original_max_position_embeddings=4096, beta_fast=16, beta_slow=2)),
    (128, 5e5, dict(factor=2.5, original_max_position_embeddings=8192, attention_factor=1.3)),
    (96, 1e4, dict(factor=16.0, original_max_position_embeddings=2048, mscale=0.707, mscale_all_dim=0.707)),
    (64, 1e4, dict(factor=8.0, original_max_position_embeddings=4096, mscale=1.0, mscale_all_dim=0.5)),
    (64, 1e6, dict(factor=4.0, original_max_position_embeddings=32768, truncate=False)),
]
LLAMA3_CASES = [
    (128, 5e5, dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                    original_max_position_embeddings=8192)),                              # Llama 3.1
    (64, 5e5, dict(factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=8192)),                               # Llama 3.2
    (32, 1e4, dict(factor=4.0, low_freq_factor=2.0, high_freq_factor=8.0,
                   original_max_position_embeddings=512)),
]


@pytest.mark.parametrize("head_dim,theta,params", YARN_CASES + LLAMA3_CASES)
def test_inv_freq_and_attention_factor_match_transformers(head_dim, theta, params):
    kind = "yarn" if (head_dim, theta, params) in YARN_CASES else "llama3"
    ref_inv, ref_factor = _hf(head_dim, theta, {"rope_type": kind, **params})
    ours_inv, ours_factor = rope_frequencies(head_dim, theta, RopeScalingConfig(type=kind, **params))
    assert ours_inv.dtype == np.float32 and ours_inv.shape == (head_dim // 2,)
    # Equal up to one fp32 ulp (torch and numpy round a few powers differently).
    np.testing.assert_allclose(ours_inv, ref_inv, rtol=1.2e-7, atol=0)
    assert ours_factor == pytest.approx(ref_factor, rel=1e-12)
    # The scaling really changes the frequencies (the test would pass vacuously otherwise).
    assert not np.allclose(ours_inv, rope_frequencies(head_dim, theta)[0])


def test_cos_sin_match_transformers_rotary_embedding():
    """The full rotary embedding (frequencies x positions, attention factor on cos and sin)."""
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RotaryEmbedding

    params = dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=32768)
    cfg = transformers.Qwen3Config(hidden_size=256, num_attention_heads=2, head_dim=128,
                                   max_position_embeddings=131072,
                                   rope_parameters={"rope_theta": 1e6, **params})
    emb = Qwen3RotaryEmbedding(cfg)
    pos = np.array([[0, 1, 7, 1000, 32767, 70000, 131071]])
    cos_ref, sin_ref = emb(torch.zeros(1, dtype=torch.float32), torch.as_tensor(pos))
    sc = RopeScalingConfig(type="yarn", factor=4.0, original_max_position_embeddings=32768)
    cos, sin = rope_cos_sin(jnp.asarray(pos), 128, 1e6, sc)
    # Up to 131k positions: a one-ulp difference in one frequency moves its angle by ~1e-5 rad.
    np.testing.assert_allclose(np.asarray(cos), cos_ref.numpy(), atol=1e-5)
    np.testing.assert_allclose(np.asarray(sin), sin_ref.numpy(), atol=1e-5)
    np.testing.assert_allclose(np.asarray(cos)[:, :4], cos_ref.numpy()[:, :4], atol=1e-6)


def test_yarn_scales_attention_logits_by_factor_squared():
    sc = RopeScalingConfig(type="yarn", factor=4.0, original_max_position_embeddings=64)
    _, m = rope_frequencies(16, 1e4, sc)
    rng = np.random.default_rng(0)
    q, k = (jnp.asarray(rng.normal(size=(1, 1, 1, 16)), jnp.float32) for _ in range(2))
    at = lambda p, s: apply_rope(q if s == "q" else k, jnp.full((1, 1), p), theta=1e4, scaling=sc)
    plain_inv, _ = rope_frequencies(16, 1e4, None)
    # At position 0 the rotation is the identity: the only effect is the factor m on q and k.
    np.testing.assert_allclose(np.sum(at(0, "q") * at(0, "k")), m * m * np.sum(q * k), rtol=1e-5)
    assert m == pytest.approx(0.1 * np.log(4.0) + 1.0)
    assert plain_inv.shape == (8,)


def test_no_scaling_is_unchanged_and_config_validates():
    cfg = load_config("tiny")
    assert cfg.model.rope_scaling is None
    cfg = load_config("tiny", ["model.rope_scaling.type=yarn", "model.rope_scaling.factor=4",
                               "model.rope_scaling.original_max_position_embeddings=1024"])
    assert cfg.model.rope_scaling == RopeScalingConfig(type="yarn", factor=4.0,
                                                       original_max_position_embeddings=1024)
    with pytest.raises(ConfigError, match="original_max_position_embeddings"):
        load_config("tiny", ["model.rope_scaling.type=llama3", "model.rope_scaling.factor=8"])
    with pytest.raises(ConfigError, match="model.rope_scaling.type"):
        load_config("tiny", ["model.rope_scaling.type=longrope"])
    with pytest.raises(ConfigError, match="factor"):
        load_config("tiny", ["model.rope_scaling.factor=0.5",
                             "model.rope_scaling.original_max_position_embeddings=64"])
