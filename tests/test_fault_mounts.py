"""Checkpoint storage failing for real: a tmpfs remounted read-only, a tmpfs out of inodes.

The other fault tests patch the writer to raise the OS error; these mount a small tmpfs and make
it fail as a disk does, so that what Orbax and TensorStore really do (which call fails, which
thread waits for what) is covered. Mounting needs root (or CAP_SYS_ADMIN): elsewhere, CI included,
the mount tests skip and say so. One test (the threads a failed save leaves) needs no mount.

The saves run in a child process, because what went wrong was the process's exit: Orbax's
signalling threads of a save that failed early kept it alive for 300 s.
"""

import errno
import gc
import inspect
import os
import shutil
import subprocess
import sys
import textwrap
import time
import types
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[1]


def _try(cmd) -> str:
    """'' when ``cmd`` succeeded, else why not."""
    if shutil.which(cmd[0]) is None:
        return f"{cmd[0]} not found"
    r = subprocess.run(cmd, capture_output=True, text=True)
    return "" if r.returncode == 0 else (r.stderr.strip() or f"exit {r.returncode}")


@pytest.fixture
def tmpfs(tmp_path):
    """A 64 MiB tmpfs at ``tmp_path/mnt`` (unmounted afterwards); skips where mounting is not
    permitted."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    why = _try(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mnt)])
    if why:
        pytest.skip(f"cannot mount a tmpfs here (needs root or CAP_SYS_ADMIN): {why}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


# The child: saves step 1 into DIR, makes DIR fail (BREAK: a shell command run between the saves),
# saves step 2, and reports the error, when it was seen and when the process is about to exit.
CHILD = textwrap.dedent("""
    import os, subprocess, sys, time
    import jax.numpy as jnp
    from flax import nnx
    from ttt_jax.checkpoint import Checkpointer

    d, brk = sys.argv[1], sys.argv[2]
    ck = Checkpointer(d, keep=3)
    ms = nnx.State({f"w{i}": nnx.Param(jnp.ones((64, 64))) for i in range(8)})
    os_ = nnx.State({"m": nnx.Param(jnp.zeros((64, 64)))})
    ck.save(1, ms, os_, {}, {"a": 1})
    ck.wait()
    subprocess.run(brk.replace("DIR", d), shell=True, check=True)
    t0 = time.time()
    try:
        ck.save(2, ms, os_, {}, {"a": 1})
        for _ in range(100):      # a background failure is reported by check() at a step boundary
            time.sleep(0.05)
            ck.check()
        ck.wait()
        print("RESULT no error")
    except Exception as e:
        print(f"RESULT {type(e).__name__} errno={getattr(e, 'errno', None)} after={time.time() - t0:.2f}")
        print(f"MESSAGE {e}")
    ck.close()
    print(f"EXITING {time.time()}", flush=True)
""")


def _child(directory: Path, brk: str, extra_env=None):
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "JAX_PLATFORMS": "cpu", **(extra_env or {})}
    r = subprocess.run([sys.executable, "-c", CHILD, str(directory), brk], capture_output=True, text=True,
                       env=env, timeout=120)   # Orbax's timeouts were 300 s
    done = time.time()
    lines = dict(ln.split(" ", 1) for ln in r.stdout.splitlines() if ln.split(" ", 1)[0] in
                 ("RESULT", "MESSAGE", "EXITING"))
    assert r.returncode == 0 and "EXITING" in lines, r.stdout[-2000:] + r.stderr[-3000:]
    return lines, done - float(lines["EXITING"]), r.stderr


def _steps(directory: Path):
    return sorted(p.name for p in directory.iterdir())


def test_read_only_remount_between_saves_is_one_error_and_a_prompt_exit(tmpfs):
    """Saved step 1, then the mount turns read-only: saving step 2 fails at once (EROFS) naming
    step 2, and the process exits within seconds, not after Orbax's 300 s signal timeouts, without
    "coroutine was never awaited" warnings. Step 1 stays."""
    lines, exit_s, stderr = _child(tmpfs, "mount -o remount,ro DIR")
    try:
        assert lines["RESULT"].startswith(f"CheckpointWriteError errno={errno.EROFS}"), lines
        assert lines["MESSAGE"].startswith(f"saving the checkpoint of step 2 to {tmpfs / '2'} failed: "
                                           "the filesystem is read-only (EROFS)"), lines
        assert "the checkpoint of step 1 in it is intact" in lines["MESSAGE"]
        assert exit_s < 20, exit_s
        assert "never awaited" not in stderr and "Traceback" not in stderr, stderr[-3000:]
        assert _steps(tmpfs) == ["1"]
    finally:
        subprocess.run(["mount", "-o", "remount,rw", str(tmpfs)], check=False)


def test_inodes_exhausted_during_a_background_save_names_inodes_and_the_step(tmpfs):
    """Bytes free, inodes not: the background save of step 2 fails, check() reports it within the
    next step boundaries naming step 2 and "no inodes", never "disk is full (N MiB free)"; the
    partial save is removed and step 1 stays."""
    brk = "mount -o remount,nr_inodes=$(( $(df --output=iused DIR | tail -1) + 12 )) DIR"
    lines, exit_s, stderr = _child(tmpfs, brk)
    assert lines["RESULT"].startswith(f"CheckpointWriteError errno={errno.ENOSPC}"), lines
    msg = lines["MESSAGE"]
    assert msg.startswith(f"saving the checkpoint of step 2 to {tmpfs / '2'} failed: no inodes (file entries) "
                          "left on the device (ENOSPC), though "), msg
    assert "the checkpoint of step 1 in it is intact" in msg
    assert float(lines["RESULT"].split("after=")[1]) < 5, lines
    assert exit_s < 20, exit_s
    assert "Traceback" not in stderr and "never awaited" not in stderr, stderr[-3000:]
    assert _steps(tmpfs) == ["1"]


def test_a_save_that_fails_before_writing_leaves_no_thread_waiting(tmp_path, monkeypatch):
    """No mount needed: creating the save's directory fails (as on a read-only filesystem). Orbax's
    signalling threads of that save must end at once; they are not daemon threads, and waiting
    for their signals kept the process from exiting for 300 s."""
    import threading

    import jax.numpy as jnp
    from flax import nnx
    from orbax.checkpoint._src.futures import future
    from orbax.checkpoint._src.path import async_path

    from ttt_jax.checkpoint import Checkpointer, CheckpointWriteError

    real = async_path.mkdir

    async def mkdir(path, *a, **k):
        if "/2.orbax-checkpoint-tmp" in str(path):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return await real(path, *a, **k)

    ck = Checkpointer(tmp_path, keep=3)
    ms = nnx.State({"w": nnx.Param(jnp.ones((8, 8)))})
    os_ = nnx.State({"m": nnx.Param(jnp.zeros((8, 8)))})
    ck.save(1, ms, os_, {}, {"a": 1})
    ck.wait()
    monkeypatch.setattr(async_path, "mkdir", mkdir)
    with pytest.raises(CheckpointWriteError, match=r"step 2 .* the filesystem is read-only \(EROFS\)"):
        ck.save(2, ms, os_, {}, {"a": 1})   # Orbax creates the directory at once or in the background
        ck.wait()
    deadline = time.time() + 5
    waiting = [t for t in threading.enumerate() if isinstance(t, future._SignalingThread)]
    for t in waiting:   # the plain Thread.join (Orbax's re-raises the thread's error)
        threading.Thread.join(t, max(deadline - time.time(), 0.01))
    alive = [t.name for t in waiting if t.is_alive()]
    assert not alive, f"{len(alive)} Orbax signalling thread(s) still waiting for the failed save"
    # Its coroutines that never ran are closed: collected at exit, each printed "coroutine ... was
    # never awaited" (a warnings filter alone does not hold where a harness resets the filters).
    unstarted = [c.cr_code.co_name for c in gc.get_objects() if type(c) is types.CoroutineType
                 and "/orbax/" in c.cr_code.co_filename and inspect.getcoroutinestate(c) == inspect.CORO_CREATED]
    assert not unstarted, unstarted
    ck.close()
    assert _steps(tmp_path) == ["1"]
