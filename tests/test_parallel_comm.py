"""Analytic context-parallel communication volume (parallel/comm.py)."""

from ttt_jax.parallel.comm import context_comm_bytes
import pytest

pytestmark = pytest.mark.unit


def test_ring_halo_and_scan_volumes():
    # 4 devices, 2 rows of 4096 tokens (1024 per device), 2 kv heads of 64, bf16.
    kw = dict(n=4, batch=2, seq_len=4096, kv_heads=2, head_dim=64, act_bytes=2)
    kv = 2 * 2 * 1024 * 2 * 64 * 2  # K and V of one block
    ring = context_comm_bytes(layer_windows=[0], **kw)
    assert ring["attention_fwd"] == 3 * kv
    assert ring["attention_bwd"] == 3 * kv + 4 * 2 * kv  # fp32 dK/dV: twice the bf16 size
    assert ring["total"] == ring["attention_fwd"] + ring["attention_bwd"]
    gather = context_comm_bytes(layer_windows=[0], attention="allgather", **kw)
    assert gather["attention_bwd"] == 3 * kv
    halo = context_comm_bytes(layer_windows=[129], **kw)
    assert halo["attention_fwd"] == halo["attention_bwd"] == 2 * 2 * 128 * 2 * 64 * 2
    # Two TTT layers with a [16, 8] fast weight: summary = 4 * 2 * (1 + 128) bytes.
    summary = 4 * 2 * 129
    ttt = dict(layer_windows=[], ttt_layers=2, ttt_shape=(16, 8), **kw)
    assert context_comm_bytes(**ttt)["ttt_scan_fwd"] == 2 * 3 * summary
    eight = dict(ttt, n=8)
    assert context_comm_bytes(**eight)["ttt_scan_fwd"] == 2 * 7 * summary           # n - 1
    assert context_comm_bytes(scan="ppermute", **eight)["ttt_scan_fwd"] == 2 * 4 * summary  # log2 n + 1
    assert context_comm_bytes(layout="zigzag", **ttt)["ttt_scan_bwd"] == 2 * 2 * 3 * summary
    remat = context_comm_bytes(remat=True, **ttt)
    assert remat["ttt_scan_fwd"] == 2 * remat["ttt_scan_bwd"]


def test_no_context_no_communication():
    assert context_comm_bytes(n=1, batch=1, seq_len=8, layer_windows=[0], kv_heads=1,
                              head_dim=8)["total"] == 0
