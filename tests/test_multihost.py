"""Multi-host for real: two processes on localhost joined by ``jax.distributed`` (gloo CPU
collectives, 4 emulated devices each) run context-parallel train steps (mesh ``data=2, context=4``:
the sequence split across devices of both processes) and get the single-process result.
Each process supplies only its own devices' rows of the batch; the data pipeline's per-process
shards are tested in tests/test_data.py."""

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.integration

WORKER = Path(__file__).with_name("_multihost_worker.py")
ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _env():
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    # Each worker sets its own device count; conftest's fast-compilation flags are passed on.
    env["XLA_FLAGS"] = re.sub(r"--xla_force_host_platform_device_count=\d+", "", env.get("XLA_FLAGS", ""))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


@pytest.mark.slow
def test_two_processes_match_one(tmp_path):
    single, multi = tmp_path / "single.json", tmp_path / "multi.json"
    ref = subprocess.Popen([sys.executable, str(WORKER), str(single), "single"], env=_env(),
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, str(WORKER), str(multi), "multi", str(i), str(port)],
                              env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    for p in [ref, *procs]:
        out, _ = p.communicate(timeout=600)
        assert p.returncode == 0, out[-3000:]
    a, b = json.loads(single.read_text()), json.loads(multi.read_text())
    assert b["process_count"] == 2 and a["process_count"] == 1
    np.testing.assert_allclose(b["losses"], a["losses"], rtol=1e-5)
    assert a["param_sq_sums"].keys() == b["param_sq_sums"].keys()
    for k in a["param_sq_sums"]:
        np.testing.assert_allclose(b["param_sq_sums"][k], a["param_sq_sums"][k], rtol=1e-5, err_msg=k)
    # The steps changed the parameters (the comparison can fail): the loss moved.
    assert a["losses"][0] != a["losses"][1]
