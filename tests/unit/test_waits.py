"""The bounded-wait helpers the suite relies on: they return what was awaited, and fail in time
with a message that names it and the last thing seen."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time

import pytest

from tests.waits import eventually, eventually_sync, frames_tail, run_process, wait_process, within


async def test_eventually_returns_the_first_passing_value_of_a_sync_or_async_check() -> None:
    calls = 0

    def grows() -> int:
        nonlocal calls
        calls += 1
        return calls

    assert await eventually(grows, timeout=2, interval=0.001, ok=lambda n: n >= 3, what="three calls") == 3

    async def ready() -> str:
        return "yes"

    assert await eventually(ready, timeout=1, what="ready") == "yes"


async def test_eventually_fails_naming_what_and_the_last_value() -> None:
    with pytest.raises(
        AssertionError, match=r"the queue drains not true within 0.1 s \(\d+ checks\); last value: \[1\]"
    ):
        await eventually(lambda: [1], timeout=0.1, interval=0.02, ok=lambda q: not q, what="the queue drains")


async def test_eventually_cuts_off_a_check_that_hangs_at_the_deadline() -> None:
    async def hangs() -> None:
        await asyncio.sleep(60)

    t0 = time.monotonic()
    with pytest.raises(AssertionError, match="still running at the deadline"):
        await eventually(hangs, timeout=0.2, what="a hanging check")
    assert time.monotonic() - t0 < 2


async def test_eventually_retries_only_the_named_errors_and_reports_the_last() -> None:
    def refused() -> None:
        raise ConnectionRefusedError("nobody listening")

    with pytest.raises(AssertionError, match="last error: ConnectionRefusedError: nobody listening"):
        await eventually(refused, timeout=0.1, interval=0.02, retry_on=(OSError,), what="a listener")
    with pytest.raises(ConnectionRefusedError):
        await eventually(refused, timeout=5, what="a listener")  # not retried: fails at once

    async def own_timeout() -> None:
        raise TimeoutError("the check's own")

    with pytest.raises(TimeoutError, match="the check's own"):
        await eventually(own_timeout, timeout=5, what="x")  # not mistaken for the deadline


def test_eventually_sync_fails_naming_what() -> None:
    assert eventually_sync(lambda: 7, timeout=1, what="seven") == 7
    with pytest.raises(AssertionError, match="zero is truthy not true within 0.05 s"):
        eventually_sync(lambda: 0, timeout=0.05, interval=0.01, what="zero is truthy")


async def test_within_names_what_and_what_was_seen() -> None:
    assert await within(asyncio.sleep(0, "done"), timeout=1, what="nothing") == "done"
    with pytest.raises(
        AssertionError, match=r"the pong did not happen within 0.05 s; seen so far: \['ping'\]"
    ):
        await within(asyncio.sleep(5), timeout=0.05, what="the pong", seen=lambda: ["ping"])


def test_process_waits_name_the_process_and_show_its_output(tmp_path) -> None:
    log = tmp_path / "child.log"
    with log.open("wb") as out:
        child = subprocess.Popen(
            [sys.executable, "-c", "print('starting', flush=True); import time; time.sleep(30)"], stdout=out
        )
    try:
        eventually_sync(lambda: "starting" in log.read_text(), timeout=10, what="the child's first line")
        with pytest.raises(
            AssertionError, match=r"the child exiting: pid \d+ still running after 0.1 s(.|\n)*starting"
        ):
            wait_process(child, timeout=0.1, what="the child exiting", log=log)
    finally:
        child.kill()
        child.wait(5)
    with pytest.raises(
        AssertionError, match=r"a sleeper: .* still running after 0.2 s(.|\n)*stdout ends with:\nbefore"
    ):
        run_process(
            [sys.executable, "-c", "print('before', flush=True); import time; time.sleep(30)"],
            timeout=0.2,
            what="a sleeper",
            capture_output=True,
            text=True,
        )


def test_frames_tail_shows_types_and_seqs() -> None:
    class Delta:
        def __init__(self, seq: int) -> None:
            self.seq = seq

    class Pong:
        pass

    assert frames_tail([]) == "nothing"
    assert frames_tail([Delta(1), Pong(), Delta(2)]) == "Delta#1, Pong, Delta#2"
