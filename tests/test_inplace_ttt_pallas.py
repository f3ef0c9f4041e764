"""The fused kernel (``impl="pallas"``) in Pallas interpret mode on the CPU: values and gradients
against the oracles (fp32 tolerances), packed documents, odd ``T``, ``initial_state``,
``return_state``; what it does not support is refused (explicit impl) or routed to the scan (auto).
The compiled kernel on a GPU: tests/test_inplace_ttt_gpu.py.
"""

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ttt_jax.ops import inplace_ttt
from ttt_jax.ops import inplace_ttt_pallas as pallas
from ttt_jax.ops import inplace_ttt_reference as ref
from ttt_jax.platform import target

pytestmark = pytest.mark.unit

op_module = importlib.import_module("ttt_jax.ops.inplace_ttt")  # the module, not the function

B, F, D, C = 2, 32, 16, 16
LR = 0.3


def _inputs(length, dtype=jnp.float32, seed=0):
    k = jax.random.split(jax.random.key(seed), 5)
    z = jax.random.normal(k[0], (B, length, F)).astype(dtype)
    v = jax.random.normal(k[1], (B, length, D)).astype(dtype)
    w0 = (0.3 * jax.random.normal(k[2], (F, D))).astype(dtype)
    cot = jax.random.normal(k[3], (B, length, D))
    s0 = 0.1 * jax.random.normal(k[4], (B, F, D))
    return z, v, w0, cot, s0


def _segments(length):
    rows = [[1] * 7 + [2] * 20 + [3] * (length - 27 - 4) + [0] * 4, [5] * 16 + [6] * (length - 16)]
    return jnp.asarray(rows, jnp.int32)


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)


def _vg(fn, *args, cots):
    @jax.jit
    def run(*args):
        out, vjp = jax.vjp(fn, *args)
        return out, vjp(cots)
    return run(*args)


@pytest.mark.parametrize("length,packed", [(48, False), (45, True)], ids=["T48", "T45-packed"])
def test_values_and_grads_match_attention_oracle(length, packed):
    """fp32: 1e-5 on values, 1e-4 on gradients against per-token linear attention (no shared code)."""
    z, v, w0, cot, _ = _inputs(length)
    seg = _segments(length) if packed else None
    kern = lambda z, v, w0: inplace_ttt(z, v, w0, lr=LR, chunk_size=C, segment_ids=seg, impl="pallas")
    oracle = lambda z, v, w0: ref.linear_attention(z, v, w0, lr=LR, chunk_size=C, segment_ids=seg)
    out, grads = _vg(kern, z, v, w0, cots=cot)
    want, gwant = _vg(oracle, z, v, w0, cots=cot)
    assert _rel(out, want) < 1e-5
    for name, a, b in zip(("z", "v", "w0"), grads, gwant):
        assert _rel(a, b) < 1e-4, name


def test_state_in_and_out_match_sequential_oracle():
    """``initial_state`` and ``return_state`` (packed, odd T): values, final state and the gradients
    of both outputs w.r.t. every input, the initial state included, against form 1."""
    length = 45
    z, v, w0, cot, s0 = _inputs(length, seed=1)
    seg = _segments(length).at[:, -4:].set(3)   # the last document stays open at T - 1
    cot_s = jax.random.normal(jax.random.key(5), (B, F, D))

    def kern(z, v, w0, s0):
        return inplace_ttt(z, v, w0, lr=LR, chunk_size=C, segment_ids=seg, impl="pallas", initial_state=s0,
                           return_state=True)

    def oracle(z, v, w0, s0):
        return ref.sequential(z, v, w0, lr=LR, chunk_size=C, segment_ids=seg, initial_state=s0,
                              continues=jnp.ones((B,), bool))

    (out, st), grads = _vg(kern, z, v, w0, s0, cots=(cot, cot_s))
    (want, st_want), gwant = _vg(oracle, z, v, w0, s0, cots=(cot, cot_s))
    assert _rel(out, want) < 1e-5 and _rel(st, st_want) < 1e-5
    for name, a, b in zip(("z", "v", "w0", "s0"), grads, gwant):
        assert _rel(a, b) < 1e-4, name


def test_unsegmented_state_gradient_and_dw0():
    """One document with an incoming final-state cotangent: dW0 is read off the state gradient (minus
    that cotangent); checked against the scan."""
    length = 32
    z, v, w0, cot, s0 = _inputs(length, seed=2)
    cot_s = 3.0 * jax.random.normal(jax.random.key(6), (B, F, D))
    run = lambda impl: _vg(lambda z, v, w0, s0: inplace_ttt(
        z, v, w0, lr=LR, chunk_size=C, impl=impl, initial_state=s0, return_state=True), z, v, w0, s0,
        cots=(cot, cot_s))
    (out, st), grads = run("pallas")
    (want, st_want), gwant = run("scan")
    assert _rel(out, want) < 1e-5 and _rel(st, st_want) < 1e-5
    for name, a, b in zip(("z", "v", "w0", "s0"), grads, gwant):
        assert _rel(a, b) < 1e-4, name


@pytest.mark.slow
def test_bf16_matches_scan():
    """bf16 operands: the kernel rounds where the scan rounds (W0 + S, lr G and dz to bf16)."""
    length = 48
    z, v, w0, cot, _ = _inputs(length, jnp.bfloat16, seed=3)
    seg = _segments(length)
    run = lambda impl: _vg(lambda z, v, w0: inplace_ttt(z, v, w0, lr=LR, chunk_size=C, segment_ids=seg,
                                                       impl=impl), z, v, w0, cots=cot.astype(jnp.bfloat16))
    out, grads = run("pallas")
    want, gwant = run("scan")
    assert _rel(out.astype(jnp.float32), want.astype(jnp.float32)) < 1e-2
    for name, a, b in zip(("z", "v", "w0"), grads, gwant):
        assert _rel(a.astype(jnp.float32), b.astype(jnp.float32)) < 2e-2, name


def test_unsupported_calls_refused_or_routed_to_scan(monkeypatch):
    z, v, w0, _, _ = _inputs(32)
    with pytest.raises(ValueError, match="clip_tau"):
        inplace_ttt(z, v, w0, lr=LR, chunk_size=C, impl="pallas", clip_tau=1.0)
    with pytest.raises(ValueError, match="chunk_size = 12 is not a multiple of 16"):
        inplace_ttt(z, v, w0, lr=LR, chunk_size=12, impl="pallas")
    with pytest.raises(ValueError, match="d_ff"):
        inplace_ttt(z[..., :24], v, w0[:24], lr=LR, chunk_size=C, impl="pallas")
    # auto, for a GPU where the kernel is preferred: taken unless unsupported; never off the GPU.
    monkeypatch.setattr(pallas, "auto_prefers_kernel", lambda *a: True)
    assert op_module._resolve_auto(F, D, C, False, None) == "scan"
    with target("gpu"):
        assert op_module._resolve_auto(F, D, C, False, None) == "pallas"
        assert op_module._resolve_auto(F, D, C, False, 1.0) == "scan"
        assert op_module._resolve_auto(F, D, 12, False, None) == "scan"
        monkeypatch.setattr(pallas, "auto_prefers_kernel", lambda *a: False)
        assert op_module._resolve_auto(F, D, C, False, None) == "scan"


def test_epilogue_apply_matches_scan():
    """``KernelConfig(apply="epilogue")`` (the update kernel emits the bf16 weight, the applies are
    XLA matmuls): one document (odd T, the last chunk's update masked) with an initial state and the
    final state's cotangent, values and gradients against the scan."""
    from ttt_jax.ops.inplace_ttt_layout import chunk_layout, pad_to_chunks
    from ttt_jax.ops.inplace_ttt_scan import scan_chunks

    length = 45
    z, v, w0, cot, s0 = _inputs(length, seed=4)
    cot_s = jax.random.normal(jax.random.key(8), (B, F, D))
    lay = chunk_layout(B, length, C)
    zc, vc, cotc = pad_to_chunks(z, C), pad_to_chunks(v, C), pad_to_chunks(cot, C)
    cfg = pallas.KernelConfig(apply="epilogue")
    kern = lambda zc, vc, w0, s0: pallas.pallas_chunks(zc, vc, w0, lay.use, lay.upd, lay.a, s0, LR, False, cfg)
    scan = lambda zc, vc, w0, s0: scan_chunks(zc, vc * lay.upd[..., None], w0, lay.use, lay.a, s0, LR, None,
                                              False)
    (out, st), grads = _vg(kern, zc, vc, w0, s0, cots=(cotc, cot_s))
    (want, st_want), gwant = _vg(scan, zc, vc, w0, s0, cots=(cotc, cot_s))
    assert _rel(out, want) < 1e-5 and _rel(st, st_want) < 1e-5
    for name, a, b in zip(("z", "v", "w0", "s0"), grads, gwant):
        assert _rel(a, b) < 1e-4, name
