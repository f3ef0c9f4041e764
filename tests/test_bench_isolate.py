"""The benchmark scripts' one-process-per-variant runner."""

import os
import signal

from ttt_jax.bench.isolate import run_variant_process


def test_result_line_is_parsed():
    row = run_variant_process(["-c", "print('noise'); print('RESULT {\"variant\": \"a\", \"step_s\": 1.5}')"], "a")
    assert row == {"variant": "a", "step_s": 1.5}


def test_failure_keeps_exit_code_and_last_lines():
    row = run_variant_process(["-c", "import sys; print('one', file=sys.stderr); "
                                     "print('boom', file=sys.stderr); sys.exit(3)"], "b")
    assert row == {"variant": "b", "returncode": 3, "error": "one | boom"}


def test_killed_child_reports_the_signal():
    row = run_variant_process(["-c", f"import os; os.kill(os.getpid(), {int(signal.SIGKILL)})"], "c")
    assert row["variant"] == "c" and row["returncode"] == -signal.SIGKILL


def test_missing_result_line_is_an_error():
    row = run_variant_process(["-c", "print('no result')"], "d", env=dict(os.environ))
    assert row["returncode"] == 0 and row["error"] == "no result"
