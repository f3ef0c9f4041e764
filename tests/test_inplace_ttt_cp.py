"""In-Place TTT under context parallelism (8 emulated CPU devices) == the unsharded op."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from ttt_jax.parallel.layout import from_zigzag, to_zigzag
from ttt_jax.parallel.mesh import make_mesh
from ttt_jax.ops import inplace_ttt
from ttt_jax.ops.inplace_ttt_cp import inplace_ttt_sharded

pytestmark = pytest.mark.unit

F, D, C = 8, 4, 4


def _mesh(n):
    return make_mesh(data=1, context=n, devices=jax.devices()[:n])


def _inputs(batch, length, seed=0):
    k = jax.random.split(jax.random.key(seed), 3)
    return (jax.random.normal(k[0], (batch, length, F)), jax.random.normal(k[1], (batch, length, D)),
            0.3 * jax.random.normal(k[2], (F, D)))


def _segments(batch, length, seed):
    """Documents of random lengths that often cross device boundaries, some padding at the end."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(batch):
        row, sid = [], 1
        while len(row) < length:
            row += [sid] * int(rng.integers(1, 3 * C * 2))
            sid += 1
        row = np.array(row[:length])
        row[-3:] = 0
        rows.append(row)
    return jnp.asarray(np.stack(rows), jnp.int32)


def _sharded(n, layout, mode, seg, impl="auto", clip_tau=None):
    mesh = _mesh(n)
    spec = P(None, "context")

    def local(z, v, w0, s):
        return inplace_ttt_sharded(z, v, w0, lr=0.3, chunk_size=C, axis_name="context",
                                   segment_ids=s, layout=layout, mode=mode, impl=impl, clip_tau=clip_tau)

    in_specs = (spec, spec, P(), spec if seg is not None else None)
    fn = jax.shard_map(local, mesh=mesh, in_specs=in_specs, out_specs=spec)

    def run(z, v, w0):
        s = seg
        if layout == "zigzag":
            z, v = to_zigzag(z, n, axis=1), to_zigzag(v, n, axis=1)
            s = None if seg is None else to_zigzag(seg, n, axis=1)
        out = fn(z, v, w0, s)
        return from_zigzag(out, n, axis=1) if layout == "zigzag" else out

    return run


CASES = [  # (devices, layout, scan mode, packed documents, implementation)
    (2, "contiguous", "allgather", False, "fused"),
    (4, "contiguous", "allgather", True, "fused"),
    (4, "contiguous", "ppermute", True, "fused"),
    (8, "contiguous", "ppermute", True, "fused"),
    (2, "zigzag", "allgather", False, "fused"),
    (4, "zigzag", "allgather", True, "fused"),
    (4, "zigzag", "ppermute", True, "fused"),
    (4, "contiguous", "allgather", True, "correction"),
    (8, "contiguous", "ppermute", False, "correction"),
    (4, "zigzag", "ppermute", True, "correction"),
]


def _value_and_grads(fn, cot):
    """One compiled call: outputs and gradients w.r.t. (z, v, w0) of sum(out * cot)."""
    @jax.jit
    def run(z, v, w0):
        out, vjp = jax.vjp(fn, z, v, w0)
        return out, vjp(cot)
    return run


@pytest.mark.parametrize("n, layout, mode, segs, impl", CASES)
def test_sharded_equals_unsharded(n, layout, mode, segs, impl):
    parts = 2 if layout == "zigzag" else 1
    length = n * parts * C * 2
    z, v, w0 = _inputs(3, length, seed=n)
    seg = _segments(3, length, seed=n + 10) if segs else None
    cot = jax.random.normal(jax.random.key(1), (3, length, D))
    got, g_got = _value_and_grads(_sharded(n, layout, mode, seg, impl), cot)(z, v, w0)
    want, g_want = _value_and_grads(
        lambda z, v, w0: inplace_ttt(z, v, w0, lr=0.3, chunk_size=C, segment_ids=seg, impl="attention"),
        cot)(z, v, w0)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-4, rtol=1e-4)
    for name, a, b in zip("z v w0".split(), g_got, g_want):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-4, rtol=2e-4, err_msg=name)


def test_carried_state_is_used():
    """A sharded run that dropped the carried-in state would equal per-device independent runs; check
    that the real result differs from that (the test above therefore exercises the carry)."""
    n, length = 4, 4 * C * 2
    z, v, w0 = _inputs(1, length)
    got = jax.jit(_sharded(n, "contiguous", "allgather", None))(z, v, w0)
    t = length // n
    independent = jax.jit(lambda z, v, w0: jnp.concatenate(
        [inplace_ttt(z[:, i * t:(i + 1) * t], v[:, i * t:(i + 1) * t], w0, lr=0.3, chunk_size=C)
         for i in range(n)], axis=1))(z, v, w0)
    assert float(jnp.abs(got[:, t:] - independent[:, t:]).max()) > 1e-2


def test_local_length_must_be_whole_chunks():
    n = 2
    z, v, w0 = _inputs(1, n * (C + 2))
    with pytest.raises(ValueError, match="multiple of the TTT chunk size"):
        _sharded(n, "contiguous", "allgather", None)(z, v, w0)


def test_clipped_updates_take_the_correction_path():
    """``clip_tau``: ``auto`` uses the correction implementation (equal to the unsharded op);
    ``fused`` refuses it, since a clipped update is not linear in its chunk's tokens."""
    n, length, tau = 4, 4 * C * 2, 0.5
    z, v, w0 = _inputs(2, length, seed=3)
    seg = _segments(2, length, seed=4)
    cot = jax.random.normal(jax.random.key(2), (2, length, D))
    got, g_got = _value_and_grads(_sharded(n, "contiguous", "allgather", seg, "auto", tau), cot)(z, v, w0)
    want, g_want = _value_and_grads(
        lambda z, v, w0: inplace_ttt(z, v, w0, lr=0.3, chunk_size=C, segment_ids=seg, clip_tau=tau,
                                     impl="reference"), cot)(z, v, w0)
    unclipped = inplace_ttt(z, v, w0, lr=0.3, chunk_size=C, segment_ids=seg, impl="reference")
    assert float(jnp.abs(want - unclipped).max()) > 1e-2      # the bound is active
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-4, rtol=1e-4)
    for name, a, b in zip("z v w0".split(), g_got, g_want):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-4, rtol=2e-4, err_msg=name)
    with pytest.raises(ValueError, match="cannot clip"):
        _sharded(n, "contiguous", "allgather", seg, "fused", tau)(z, v, w0)
    with pytest.raises(ValueError, match="impl must be one of"):
        _sharded(n, "contiguous", "allgather", seg, "fast")(z, v, w0)


def test_fused_backward_needs_one_matmul_less():
    """Per token, in units of ``F x D`` matmuls: the correction implementation does 3 forward
    (apply, update, correction) and 7 backward; the fused one 3 forward (summary, apply, update)
    and 6 backward (dL/dS_in, then one state-recomputing backward scan of 5)."""
    mesh = _mesh(2)

    def dots(impl):
        def local(z, v, w0):
            return inplace_ttt_sharded(z, v, w0, lr=0.3, chunk_size=C, axis_name="context", impl=impl)

        fn = jax.shard_map(local, mesh=mesh, in_specs=(P(None, "context"),) * 2 + (P(),),
                           out_specs=P(None, "context"))
        z, v, w0 = _inputs(1, 4 * C)
        fwd = str(jax.make_jaxpr(fn)(z, v, w0))
        both = str(jax.make_jaxpr(jax.grad(lambda *a: (fn(*a) ** 2).sum(), argnums=(0, 1, 2)))(z, v, w0))
        return fwd.count("dot_general["), both.count("dot_general[")

    assert dots("correction") == (3, 10)
    assert dots("fused") == (3, 9)
