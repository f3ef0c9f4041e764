"""Property-based tests (hypothesis): the op on random shapes and layouts, config parsing."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ttt_jax.config import ConfigError, load_config
from ttt_jax.ops import inplace_ttt
from ttt_jax.ops import inplace_ttt_reference as ref


@st.composite
def op_case(draw):
    b = draw(st.integers(1, 3))
    t = draw(st.integers(1, 40))
    c = draw(st.integers(1, 12))
    f = draw(st.integers(1, 6))
    d = draw(st.integers(1, 5))
    packed = draw(st.booleans())
    seg = None
    if packed:
        rows = []
        for _ in range(b):
            cuts = sorted(draw(st.lists(st.integers(1, max(1, t - 1)), max_size=4, unique=True)))
            row = np.zeros(t, np.int32)
            bounds = [0] + [x for x in cuts if x < t] + [t]
            for i, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
                row[lo:hi] = i + 1
            pad = draw(st.integers(0, t // 3))
            if pad:
                row[t - pad:] = 0
            rows.append(row)
        seg = jnp.asarray(np.stack(rows))
    seed = draw(st.integers(0, 2 ** 16))
    return b, t, c, f, d, seg, seed


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(op_case(), st.sampled_from(["scan", "associative"]))
def test_op_matches_oracle_on_random_layouts(case, impl):
    b, t, c, f, d, seg, seed = case
    k = jax.random.split(jax.random.key(seed), 3)
    z = jax.random.normal(k[0], (b, t, f))
    v = jax.random.normal(k[1], (b, t, d))
    w0 = jax.random.normal(k[2], (f, d))
    got = inplace_ttt(z, v, w0, lr=0.2, chunk_size=c, segment_ids=seg, impl=impl)
    want = ref.linear_attention(z, v, w0, lr=0.2, chunk_size=c, segment_ids=seg)
    valid = np.ones((b, t), bool) if seg is None else np.asarray(seg) != 0
    np.testing.assert_allclose(np.asarray(got)[valid], np.asarray(want)[valid], atol=1e-4, rtol=1e-4)


_INT_KEYS = ["model.d_model", "model.n_layers", "model.n_heads", "model.n_kv_heads", "model.d_ff",
             "model.ttt.chunk_size", "model.ttt.conv_kernel", "data.seq_len", "data.batch_size",
             "train.steps", "train.warmup_steps", "train.log_every"]


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(_INT_KEYS),
       st.one_of(st.integers(-5, 5000), st.floats(allow_nan=True), st.text(max_size=6), st.booleans()))
def test_config_overrides_validate_or_name_the_key(key, value):
    """Any override either yields a validated config or a ConfigError naming the key -- never
    another exception and never a silently accepted invalid value."""
    try:
        cfg = load_config("tiny", [f"{key}={value}"])
    except ConfigError as e:
        assert key.split(".")[-1] in str(e), str(e)
        return
    section, *rest = key.split(".")
    obj = getattr(cfg, section)
    for part in rest:
        obj = getattr(obj, part)
    assert isinstance(obj, int) and obj >= 0
