"""Test setup: 8 emulated CPU devices (for sharded paths), fp32 matmuls on CPU, markers."""

import os
import shutil
import tempfile

# Must happen before JAX initialises its backends.
os.environ.setdefault("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu" if os.environ.get("TTT_TEST_GPU") is None else "")
# CPU runs: LLVM code generation at -O0 without its expensive passes. Most of the suite's time is
# XLA compiling small programs that then run for milliseconds; this halves the compile CPU time
# (HLO-level optimisation, which the structure tests inspect, is unchanged). Inherited by the CLI
# subprocesses the tests start.
if os.environ.get("TTT_TEST_GPU") is None and "xla_backend_optimization_level" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
# One persistent compilation cache per test run, shared by the xdist workers and the CLI
# subprocesses they start: many tests compile the same programs (the same toy trainer step, the same
# model), and on a 2-core CI machine compiling is most of the suite's time. A fresh directory per
# run, so nothing carries over between runs.
_RUN = os.environ.get("PYTEST_XDIST_TESTRUNUID") or f"pid{os.getpid()}"
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(tempfile.gettempdir(), f"ttt-jax-tests-{_RUN}", "jax-cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


def pytest_collection_modifyitems(config, items):
    has_gpu = any(d.platform == "gpu" for d in jax.devices())
    skip_gpu = pytest.mark.skip(reason="needs an NVIDIA GPU (run with TTT_TEST_GPU=1 on a GPU machine)")
    for item in items:
        if "gpu" in item.keywords and not has_gpu:
            item.add_marker(skip_gpu)


def pytest_sessionfinish(session, exitstatus):
    """The controller (not an xdist worker) removes this run's compilation cache."""
    if os.environ.get("PYTEST_XDIST_WORKER") is None:
        shutil.rmtree(os.path.join(tempfile.gettempdir(), f"ttt-jax-tests-{_RUN}"), ignore_errors=True)
