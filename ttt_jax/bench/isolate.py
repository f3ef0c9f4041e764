"""Run one benchmark variant per process.

Peak device memory (``peak_bytes_in_use``) is a per-process counter, and a variant that runs out of
memory or crashes a kernel compiler must not take the others down, so the benchmark scripts run
each variant as a child process that prints one ``RESULT <json>`` line.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
from typing import Optional, Sequence


_EXCEPTION_LINE = re.compile(r"^(\w+\.)*\w*(Error|Exception|Interrupt)\b(: .*)?$")


def run_variant_process(args: Sequence[str], variant: str, env: Optional[dict] = None) -> dict:
    """Run ``python -X faulthandler <args...>`` and return its ``RESULT`` record.

    Args:
      args: the child's command line after the interpreter (``["-m", "pkg.mod", ...]`` or a script
        path and its flags); the child prints ``RESULT `` followed by one JSON object.
      variant: the variant's name, for the error record.
      env: the child's environment (default: this process's).

    Returns:
      The child's JSON object, or ``{"variant", "returncode", "error"}`` when it failed: the last
      three lines of its stderr (or stdout), and the exit code (negative: the signal that killed
      it, e.g. -11 = SIGSEGV in a kernel compiler, -9 = the host's OOM killer; faulthandler makes
      such a child print its Python stack).
    """
    cmd = [sys.executable, "-X", "faulthandler", *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ) if env is None else env)
    # The child's stderr (its progress lines: compiled, step times) is passed through as it comes,
    # so a long compile or a hang is visible, and kept for the error record.
    err_lines: list = []

    def pump():
        for text in proc.stderr:
            err_lines.append(text.rstrip("\n"))
            print(text, end="", file=sys.stderr, flush=True)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    stdout = proc.stdout.read()
    proc.wait()
    reader.join()
    line = [x for x in stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode or not line:
        lines = err_lines if err_lines else stdout.strip().splitlines()
        # The exception's own line sits above JAX's traceback notes; keep it with the last lines.
        exc = [x for x in lines if _EXCEPTION_LINE.match(x)][-1:]
        err = exc + [x for x in lines[-3:] if x not in exc]
        return dict(variant=variant, returncode=proc.returncode, error=" | ".join(err),
                    stderr_tail=lines[-60:])
    return json.loads(line[-1][len("RESULT "):])
