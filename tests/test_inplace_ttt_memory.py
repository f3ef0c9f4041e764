"""The ``scan`` impl's chunk loops start from buffers that depend on their layer's data.

Constant zero loop buffers (``lax.scan``'s stacked outputs, zero initial states) are identical in
every layer of a model, so XLA merges them and creates all layers' backward-pass buffers at once:
on an H100 that held 1.6 GiB per rematerialised layer at T = 32k (benchmarks/README.md, model
level). Whether a buffer is a constant is visible in the jaxpr, so this is checked on CPU: every
loop carry of the forward and backward passes must be computed from data, not broadcast from a
literal.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.extend import core as jex_core

from ttt_jax.ops import inplace_ttt

pytestmark = pytest.mark.structure


def _sub_jaxprs(params):
    for value in params.values():
        for item in value if isinstance(value, (tuple, list)) else (value,):
            if isinstance(item, jex_core.ClosedJaxpr):
                yield item.jaxpr
            elif isinstance(item, jex_core.Jaxpr):
                yield item


def _constant_carries(jaxpr, found):
    """Append ``(scan index, carry index)`` of every scan carry that is a literal or a broadcast of
    one; returns the number of scans seen."""
    producers = {}
    n_scans = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "scan":
            n_consts, n_carry = eqn.params["num_consts"], eqn.params["num_carry"]
            for k, var in enumerate(eqn.invars[n_consts:n_consts + n_carry]):
                src = producers.get(var)
                if isinstance(var, jex_core.Literal) or (
                        src is not None and src.primitive.name == "broadcast_in_dim"
                        and isinstance(src.invars[0], jex_core.Literal)):
                    found.append((n_scans, k))
            n_scans += 1
        for sub in _sub_jaxprs(eqn.params):
            n_scans += _constant_carries(sub, found)
        for out in eqn.outvars:
            producers[out] = eqn
    return n_scans


@pytest.mark.parametrize("segmented", [False, True])
def test_scan_loops_start_from_data_dependent_buffers(segmented):
    b, t, f, d, c = 1, 64, 16, 8, 16
    rng = np.random.default_rng(0)
    z = jnp.asarray(rng.normal(size=(b, t, f)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(b, t, d)), jnp.float32)
    w0 = jnp.asarray(rng.normal(size=(f, d)), jnp.float32)
    seg = jnp.asarray([[1] * 40 + [2] * 24], jnp.int32) if segmented else None

    def loss(z, v, w0):
        return jnp.sum(inplace_ttt(z, v, w0, lr=0.5, chunk_size=c, segment_ids=seg, impl="scan") ** 2)

    jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2)))(z, v, w0).jaxpr
    found = []
    n_scans = _constant_carries(jaxpr, found)
    assert n_scans >= 3            # forward, and the backward pass's two loops
    assert found == [], f"scan carries started from constants: {found}"
