"""runtimes.run_in_child, which check and bench measure every runtime through: an answer, a crash, a hang."""

from __future__ import annotations

import os
import time

from edge_rnn.bench.runtimes import THREAD_ENV, run_in_child


def _answer(value, queue) -> None:
    queue.put({"value": value, "threads": {k: os.environ.get(k) for k in THREAD_ENV}})


def _crash(code, queue) -> None:
    os._exit(code)  # as a runtime that aborts the process (tract panics do) without answering


def _hang(seconds, queue) -> None:
    time.sleep(seconds)


def test_the_child_answers_with_the_threads_it_was_given():
    before = {k: os.environ.get(k) for k in THREAD_ENV}
    got = run_in_child(_answer, (42,), threads=3, timeout_s=60)
    assert got.died is None and not got.timed_out
    assert got.value == {"value": 42, "threads": {k: "3" for k in THREAD_ENV}}
    assert {k: os.environ.get(k) for k in THREAD_ENV} == before  # the parent's settings are back


def test_a_crashed_child_reports_its_exit_code():
    got = run_in_child(_crash, (7,), threads=1, timeout_s=60)
    assert got.died == 7 and got.value is None and not got.timed_out


def test_a_hung_child_is_given_up_on_and_killed():
    start = time.monotonic()
    got = run_in_child(_hang, (600,), threads=1, timeout_s=3, poll_s=0.2)
    assert got.timed_out and got.value is None
    assert time.monotonic() - start < 30  # the deadline, then join(10) and kill — not the child's 600 s
