"""The benchmark scripts' one-process-per-variant runner."""

import os
import signal

from ttt_jax.bench.isolate import run_variant_process
import pytest

pytestmark = pytest.mark.unit


def test_result_line_is_parsed():
    row = run_variant_process(["-c", "print('noise'); print('RESULT {\"variant\": \"a\", \"step_s\": 1.5}')"], "a")
    assert row == {"variant": "a", "step_s": 1.5}


def test_failure_keeps_exit_code_and_last_lines():
    row = run_variant_process(["-c", "import sys; print('one', file=sys.stderr); "
                                     "print('boom', file=sys.stderr); sys.exit(3)"], "b")
    assert row == {"variant": "b", "returncode": 3, "error": "one | boom", "stderr_tail": ["one", "boom"]}


def test_killed_child_reports_the_signal():
    row = run_variant_process(["-c", f"import os; os.kill(os.getpid(), {int(signal.SIGKILL)})"], "c")
    assert row["variant"] == "c" and row["returncode"] == -signal.SIGKILL


def test_missing_result_line_is_an_error():
    row = run_variant_process(["-c", "print('no result')"], "d", env=dict(os.environ))
    assert row["returncode"] == 0 and row["error"] == "no result"


def test_failure_keeps_the_exception_line_above_trailing_notes():
    code = ("import sys; print('Traceback (most recent call last):', file=sys.stderr); "
            "print('ValueError: the real cause', file=sys.stderr); "
            "print('note 1', file=sys.stderr); print('note 2', file=sys.stderr); "
            "print('note 3', file=sys.stderr); sys.exit(1)")
    row = run_variant_process(["-c", code], "e")
    assert row["error"] == "ValueError: the real cause | note 1 | note 2 | note 3"
    assert row["stderr_tail"][0].startswith("Traceback") and row["returncode"] == 1
