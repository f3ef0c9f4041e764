"""Cross-device exclusive scans (parallel/scan.py) against the sequential reference, values and VJPs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from ttt_jax.parallel import scan
from ttt_jax.parallel.layout import from_zigzag, to_zigzag
from ttt_jax.parallel.mesh import make_mesh

pytestmark = pytest.mark.unit

F, D = 2, 3


def _mesh(n):
    return make_mesh(data=1, context=n, devices=jax.devices()[:n])


def _summaries(seed, n, batch, resets=True):
    """Per-segment summaries in position order: a [n, *batch] (some resets a=0), b [n, *batch, F, D].

    Test data is made with numpy: eager JAX ops each compile, which dominates CPU test time."""
    rng = np.random.default_rng(seed)
    a = rng.uniform(0.5, 1.5, (n, *batch)).astype(np.float32)
    if resets and n > 2:
        a[n // 2] = 0.0       # a reset of every batch row
        a[1, ..., 0] = 0.0    # and of one row only
    b = rng.standard_normal((n, *batch, F, D)).astype(np.float32)
    return a, b


def _value_and_vjp(fn, a, b, seed):
    """``fn(a, b) -> (a_in, b_in)``: outputs and the VJP of random cotangents, in one jit."""
    rng = np.random.default_rng(seed)
    ct = (rng.standard_normal(a.shape).astype(np.float32), rng.standard_normal(b.shape).astype(np.float32))

    @jax.jit
    def run(a, b):
        out, pullback = jax.vjp(fn, a, b)
        return out, pullback(ct)

    return run(a, b)


def _assert_close(got, want, tol=1e-5):
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=tol, atol=tol)


def _device_scan(n, mode, order=None, check_vma=True):
    """Global [n, ...] summaries (device i holds row i) -> the carried-in states, device order."""
    def inner(a, b):
        a_in, b_in = scan.exclusive_device_scan(a[0], b[0], "context", mode=mode, order=order)
        return a_in[None], b_in[None]
    return jax.shard_map(inner, mesh=_mesh(n), in_specs=P("context"), out_specs=P("context"),
                         check_vma=check_vma)


@pytest.mark.parametrize("mode", scan.MODES)
@pytest.mark.parametrize("n,batch", [(2, (3,)), (4, (1,)), (8, (2, 3))])
def test_device_scan_matches_reference(mode, n, batch):
    a, b = _summaries(n, n, batch)
    got = _value_and_vjp(_device_scan(n, mode), a, b, (1))
    want = _value_and_vjp(scan.exclusive_scan_reference, a, b, (1))
    _assert_close(got, want)
    # identity on device 0, and the reference really is the sequential composition
    np.testing.assert_array_equal(np.asarray(got[0][0][0]), 1.0)
    np.testing.assert_array_equal(np.asarray(got[0][1][0]), 0.0)


def test_reference_is_sequential():
    a, b = _summaries(0, 5, (2,))
    a_in, b_in = jax.jit(scan.exclusive_scan_reference)(a, b)
    w = np.zeros((2, F, D), np.float32)
    for i in range(5):
        np.testing.assert_allclose(np.asarray(b_in[i]), w, rtol=1e-6, atol=1e-6)
        w = a[i][:, None, None] * w + b[i]


@pytest.mark.parametrize("mode", scan.MODES)
def test_device_scan_order(mode):
    n = 4
    order = [2, 0, 3, 1]  # device i's segment is at position order[i]
    a, b = _summaries(3, n, (2,))  # position order
    # device i holds the summary at position order[i]
    perm = np.array(order)
    inv = np.argsort(perm)
    got = _value_and_vjp(_device_scan(n, mode, order=order), a[perm], b[perm], 2)
    # the reference in position order, read back in device order
    ref = lambda a, b: tuple(x[perm] for x in scan.exclusive_scan_reference(a[inv], b[inv]))
    want = _value_and_vjp(ref, a[perm], b[perm], 2)
    _assert_close(got, want)


@pytest.mark.parametrize("mode", scan.MODES)
@pytest.mark.parametrize("n", [1, 2, 4])
def test_zigzag_scan(mode, n):
    a, b = _summaries(10 + n, 2 * n, (3,))  # 2n segments, position order
    # device i holds segments i and 2n-1-i: to_zigzag on the segment axis, then [n, 2, ...] rows
    zz = np.array([s for i in range(n) for s in (i, 2 * n - 1 - i)])
    az, bz = a[zz], b[zz]

    def inner(a2, b2):
        return scan.exclusive_device_scan_zigzag(a2, b2, "context", mode=mode)

    fn = jax.shard_map(inner, mesh=_mesh(n), in_specs=P("context"), out_specs=P("context"))
    got = _value_and_vjp(fn, az, bz, 4)
    ref = lambda a, b: tuple(to_zigzag(x, n, axis=0) for x in scan.exclusive_scan_reference(
        from_zigzag(a, n, axis=0), from_zigzag(b, n, axis=0)))
    want = _value_and_vjp(ref, az, bz, 4)
    _assert_close(got, want)


def test_device_scan_bf16_inputs_and_no_vma_check():
    n = 4
    a, b = _summaries(5, n, (2,))
    a, b = jnp.asarray(a, jnp.bfloat16), jnp.asarray(b, jnp.bfloat16)
    got = jax.jit(_device_scan(n, "ppermute", check_vma=False))(a, b)
    assert got[0].dtype == jnp.float32 and got[1].dtype == jnp.float32
    want = jax.jit(scan.exclusive_scan_reference)(a, b)
    _assert_close(got, want)


def test_single_device_is_identity():
    a, b = _summaries(6, 1, (2,))
    for mode in scan.MODES:
        a_in, b_in = jax.jit(_device_scan(1, mode))(a, b)
        np.testing.assert_array_equal(np.asarray(a_in), 1.0)
        np.testing.assert_array_equal(np.asarray(b_in), 0.0)


def test_combine_is_associative():
    rng = np.random.default_rng(7)
    x, y, z = [(rng.standard_normal(2), rng.standard_normal((2, F, D))) for _ in range(3)]
    _assert_close(scan.combine(scan.combine(x, y), z), scan.combine(x, scan.combine(y, z)))
    _assert_close(scan.combine(scan.identity_like(*x), x), x)


def test_errors():
    mesh = _mesh(2)
    a, b = _summaries(8, 2, (2,))

    def run(inner, *args):
        return jax.shard_map(inner, mesh=mesh, in_specs=P("context"), out_specs=P("context"))(*args)

    with pytest.raises(ValueError, match="same leading dims"):
        run(lambda a, b: scan.exclusive_device_scan(a[0], b[0, 0], "context"), a, b)
    with pytest.raises(ValueError, match="permutation"):
        run(lambda a, b: scan.exclusive_device_scan(a[0], b[0], "context", order=[0, 0]), a, b)
    with pytest.raises(ValueError, match="mode"):
        run(lambda a, b: scan.exclusive_device_scan(a[0], b[0], "context", mode="tree"), a, b)
    with pytest.raises(ValueError, match=r"\[2, \.\.\.\]"):
        run(lambda a, b: scan.exclusive_device_scan_zigzag(a[:1], b[:1], "context"), a, b)


@pytest.mark.gpu
def test_device_scans_on_gpus():
    devices = [d for d in jax.devices() if d.platform == "gpu"]
    n = len(devices)
    mesh = make_mesh(data=1, context=n, devices=devices)
    a, b = _summaries(0, 2 * n, (2,))
    b = np.repeat(np.repeat(b, 16, axis=-2), 16, axis=-1)  # [2n, 2, 32, 48]
    for mode in scan.MODES:
        def inner(a, b):
            a_in, b_in = scan.exclusive_device_scan(a[0], b[0], "context", mode=mode)
            return a_in[None], b_in[None]
        fn = jax.shard_map(inner, mesh=mesh, in_specs=P("context"), out_specs=P("context"))
        got = _value_and_vjp(fn, a[:n], b[:n], 1)
        want = _value_and_vjp(scan.exclusive_scan_reference, a[:n], b[:n], 1)
        _assert_close(got, want, 1e-4)
        zz = np.array([s for i in range(n) for s in (i, 2 * n - 1 - i)])
        fz = jax.shard_map(lambda a2, b2: scan.exclusive_device_scan_zigzag(a2, b2, "context", mode=mode),
                           mesh=mesh, in_specs=P("context"), out_specs=P("context"))
        got = _value_and_vjp(fz, a[zz], b[zz], 2)
        ref = lambda a, b: tuple(x[zz] for x in scan.exclusive_scan_reference(a[np.argsort(zz)],
                                                                               b[np.argsort(zz)]))
        want = _value_and_vjp(ref, a[zz], b[zz], 2)
        _assert_close(got, want, 1e-4)
