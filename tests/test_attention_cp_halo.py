"""The two-call sliding-window halo (ttt_jax.ops.attention_cp_halo): values and gradients against the
unsharded reference, with dense and Pallas (interpret) kernels on CPU, and compiled cuDNN on GPU."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from ttt_jax.parallel.mesh import make_mesh
from ttt_jax.ops import attention_cp as A
from ttt_jax.ops import attention_cp_halo as HA
from ttt_jax.ops import attention_cp_window as W
from ttt_jax.ops import attention_reference as R

from test_attention_cp_fused import _rand as _rand_qkv

pytestmark = pytest.mark.unit

DH = 16


def _rand(seed, t, dtype=np.float32):
    """``q, k, v, ct`` of batch 2, 4 query / 2 key-value heads, head dim 16."""
    return _rand_qkv(seed, t, dtype, b=2, h=4, kvh=2, dh=DH)


def _value_and_grads(fn, q, k, v, ct):
    def run(q, k, v, ct):
        out, pb = jax.vjp(fn, q, k, v)
        return out, pb(ct.astype(out.dtype))
    return jax.jit(run)(q, k, v, ct)


def _sharded(inner, n, check_vma=True):
    mesh = make_mesh(data=1, context=n, devices=jax.devices()[:n])
    spec = P(None, "context")
    return jax.shard_map(inner, mesh=mesh, in_specs=(spec,) * 3, out_specs=spec, check_vma=check_vma)


def _close(got, want, tol):
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w, np.float32), rtol=tol, atol=tol)


@pytest.mark.parametrize("n,t_local,window", [
    (4, 8, 5),    # even halo (4 keys)
    (4, 8, 6),    # odd halo: exercises nothing special for dense kernels, padding for others
    (4, 8, 9),    # window = T_local + 1: the halo is the neighbour's whole shard
    (2, 12, 2),   # a halo of one key
    (1, 16, 5),   # one device: no neighbour at all
])
def test_halo_split_matches_reference_dense_kernels(n, t_local, window):
    """Merge, reversal, device 0 and the custom VJP (halo gradients returned to the neighbour)."""
    q, k, v, ct = _rand(window, n * t_local)
    scale = 1.0 / np.sqrt(DH)
    inner = lambda q, k, v: HA.halo_split_attention(q, k, v, "context", window=window, scale=scale,
                                                    blocks="dense")
    got = _value_and_grads(_sharded(inner, n), q, k, v, ct)
    want = _value_and_grads(lambda q, k, v: R.attention_reference(q, k, v, window=window, scale=scale),
                            q, k, v, ct)
    _close(got, want, 2e-5)


def test_halo_split_matches_reference_pallas_interpret():
    """The Pallas block kernels (interpret mode), a halo of 19 keys padded to the 16-token tiles."""
    n, t_local, window = 2, 32, 20
    q, k, v, ct = _rand(3, n * t_local)
    scale = 1.0 / np.sqrt(DH)
    inner = lambda q, k, v: HA.halo_split_attention(q, k, v, "context", window=window, scale=scale,
                                                    blocks="interpret")
    # Pallas's interpreter trips over shard_map's axis-variance checks; compiled kernels do not.
    got = _value_and_grads(_sharded(inner, n, check_vma=False), q, k, v, ct)
    want = _value_and_grads(lambda q, k, v: R.attention_reference(q, k, v, window=window, scale=scale),
                            q, k, v, ct)
    _close(got, want, 1e-4)


def test_halo_split_errors():
    q, k, v, _ = _rand(0, 8)
    run = lambda **kw: jax.jit(_sharded(
        lambda q, k, v: HA.halo_split_attention(q, k, v, "context", scale=1.0, **kw), 1))(q, k, v)
    with pytest.raises(ValueError, match="window 10 must be in"):
        run(window=10, blocks="dense")
    with pytest.raises(ValueError, match="multiple of 16"):
        run(window=3, blocks="interpret")
    with pytest.raises(ValueError, match="not one of"):
        run(window=3, blocks="triton")


@pytest.mark.gpu
@pytest.mark.parametrize("window", [257, 256])   # even and odd halo
def test_halo_split_cudnn_on_gpus(window):
    """Compiled cuDNN blocks on the GPUs there are (bf16), against the fp32 reference."""
    n = min(jax.device_count(), 4)
    t_local = 512
    q, k, v, ct = _rand(1, n * t_local)
    scale = 1.0 / np.sqrt(DH)
    bf = lambda x: jnp.asarray(x, jnp.bfloat16)
    inner = lambda q, k, v: HA.halo_split_attention(q, k, v, "context", window=window, scale=scale,
                                                    blocks="cudnn")
    got = _value_and_grads(_sharded(inner, n), bf(q), bf(k), bf(v), ct)
    want = _value_and_grads(lambda q, k, v: R.attention_reference(q, k, v, window=window, scale=scale),
                            q, k, v, ct)
    _close(got, want, 6e-2)


def test_context_attention_routes_the_halo(monkeypatch):
    """``halo="split"`` sends a fused sliding window to halo_split_attention, ``"single"`` to the
    one-call path (the fused path stood in for on CPU); bad values are errors."""
    calls = []
    monkeypatch.setattr(A, "fused_unsupported_reason", lambda *a, **k: None)
    monkeypatch.setattr(HA, "halo_split_attention", lambda q, *a, **kw: calls.append(("split", kw)) or q)
    monkeypatch.setattr(W, "halo_window_attention", lambda q, *a, **kw: calls.append(("single", kw)) or q)
    q, k, v, _ = _rand(0, 32)
    run = lambda halo: jax.jit(_sharded(lambda q, k, v: A.context_attention(
        q, k, v, "context", window=5, kernel="fused", halo=halo), 2))(q, k, v)
    run("split")
    run("single")
    assert [c[0] for c in calls] == ["split", "single"]
    assert calls[0][1]["window"] == 5 and calls[0][1]["blocks"] in ("cudnn", "pallas")
    with pytest.raises(ValueError, match="halo='ring'"):
        run("ring")


def test_split_halo_is_the_default_and_not_a_setting():
    import inspect

    from ttt_jax.config import load_config

    assert inspect.signature(A.context_attention).parameters["halo"].default == "split"
    for key in ("model.context_halo=single", "runtime.context.halo=single"):
        with pytest.raises(ValueError, match="context_halo'; it was removed|did you mean|valid keys"):
            load_config(None, [key])


def test_save_exchanges_keeps_the_halo_block():
    """Under the model's ``save_exchanges`` remat policy the backward pass recomputes the local
    call but not the halo block (two dense einsums fewer than plain remat); same values/grads."""
    from ttt_jax.ops.checkpoint_names import SAVE_EXCHANGES_NAMES

    n, t_local, window = 4, 8, 5
    q, k, v, ct = _rand(3, n * t_local)
    inner = lambda q, k, v: HA.halo_split_attention(q, k, v, "context", window=window, scale=0.25,
                                                    blocks="dense")
    policies = {"full": None,
                "saved": jax.checkpoint_policies.save_only_these_names(*SAVE_EXCHANGES_NAMES)}
    fns = {name: _sharded(jax.checkpoint(lambda q, k, v: inner(jnp.tanh(q), k, v), policy=pol), n)
           for name, pol in policies.items()}

    def dots(fn):
        loss = lambda q, k, v: jnp.sum(fn(q, k, v) * ct)
        return str(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)).count("dot_general")

    assert dots(fns["full"]) - dots(fns["saved"]) == 2
    _close(_value_and_grads(fns["saved"], q, k, v, ct), _value_and_grads(fns["full"], q, k, v, ct), 1e-6)
