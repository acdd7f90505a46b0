"""Bounded waits for tests: every wait has a deadline and, when it passes, fails with an
AssertionError saying what was awaited and the last thing seen, so a failure reads as a diagnosis
rather than as a bare timeout (or as a hang that only pytest-timeout ends).

- `eventually(check, timeout=, what=)` polls `check()` (a plain or an async function) until its
  value passes `ok` (truthiness by default) and returns that value.
- `eventually_sync(...)` is its twin for synchronous tests.
- `within(awaitable, timeout=, what=)` is `asyncio.wait_for` with a message.
- `run_process(args, timeout=, what=)` is `subprocess.run` with a message and the output tails.
- `wait_process(popen, timeout=, what=)` is `Popen.wait` with a message (and the output tail when
  it is a file the test can read).
"""

from __future__ import annotations

import asyncio
import inspect
import subprocess
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

_REPR_CHARS = 500


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= _REPR_CHARS else text[:_REPR_CHARS] + f"... ({len(text)} chars)"


def _failure(
    what: str, timeout: float, tries: int, last: object, error: BaseException | None, cut_off: bool = False
) -> AssertionError:
    seen = (
        f"last error: {type(error).__name__}: {error}" if error is not None else f"last value: {_short(last)}"
    )
    hung = f"; check {tries} was still running at the deadline" if cut_off else ""
    return AssertionError(f"{what} not true within {timeout:g} s ({tries} checks); {seen}{hung}")


async def eventually(
    check: Callable[[], T | Awaitable[T]],
    *,
    timeout: float,
    what: str,
    interval: float = 0.05,
    ok: Callable[[T], bool] = bool,
    retry_on: tuple[type[BaseException], ...] = (),
) -> T:
    """Calls `check()` (awaiting it when it returns an awaitable) every `interval` seconds until
    `ok(value)`; returns that value. Exceptions of the `retry_on` types count as "not yet" (and the
    last one is reported); any other exception fails at once. A single check that hangs is cut off
    at the deadline too."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    tries = 0
    last: object = None
    error: BaseException | None = None
    while True:
        tries += 1
        cut_off = False
        try:
            value = check()
            if inspect.isawaitable(value):
                cm = asyncio.timeout_at(deadline)
                try:
                    async with cm:
                        value = await value
                except TimeoutError:
                    if not cm.expired():
                        raise  # the check's own timeout, not ours
                    cut_off = True
            if not cut_off:
                last, error = value, None
                if ok(value):  # type: ignore[arg-type]
                    return value  # type: ignore[return-value]
        except retry_on as exc:
            error = exc
        if cut_off or loop.time() + interval > deadline:
            raise _failure(what, timeout, tries, last, error, cut_off)
        await asyncio.sleep(interval)


def eventually_sync(
    check: Callable[[], T],
    *,
    timeout: float,
    what: str,
    interval: float = 0.05,
    ok: Callable[[T], bool] = bool,
    retry_on: tuple[type[BaseException], ...] = (),
) -> T:
    """`eventually` for synchronous code (blocks the calling thread between checks). A check that
    itself blocks must bound its own wait (e.g. an HTTP timeout)."""
    deadline = time.monotonic() + timeout
    tries = 0
    last: object = None
    error: BaseException | None = None
    while True:
        tries += 1
        try:
            value = check()
            last, error = value, None
            if ok(value):
                return value
        except retry_on as exc:
            error = exc
        if time.monotonic() + interval > deadline:
            raise _failure(what, timeout, tries, last, error)
        time.sleep(interval)


async def within(
    awaitable: Awaitable[T], *, timeout: float, what: str, seen: Callable[[], object] | None = None
) -> T:
    """`await awaitable`, failing after `timeout` seconds with a message naming `what` (and
    `seen()`, e.g. the frames received so far, when given)."""
    try:
        return await asyncio.wait_for(awaitable, timeout)
    except TimeoutError:
        tail = f"; seen so far: {_short(seen())}" if seen is not None else ""
        raise AssertionError(f"{what} did not happen within {timeout:g} s{tail}") from None


def _output_tail(popen: subprocess.Popen[Any], log: Path | None, chars: int = 3000) -> str:
    if log is not None:
        try:
            return log.read_text(errors="replace")[-chars:]
        except OSError as exc:
            return f"(log {log} unreadable: {exc})"
    return "(output not captured)"


def wait_process(popen: subprocess.Popen[Any], *, timeout: float, what: str, log: Path | None = None) -> int:
    """`popen.wait(timeout)`, failing with a message naming `what`, the pid, and the tail of `log`
    when given. The process is left running (the caller's cleanup kills it)."""
    try:
        return popen.wait(timeout)
    except subprocess.TimeoutExpired:
        raise AssertionError(
            f"{what}: pid {popen.pid} still running after {timeout:g} s; "
            f"output ends with:\n{_output_tail(popen, log)}"
        ) from None


def frames_tail(frames: Sequence[object], n: int = 8) -> str:
    """The last `n` frames as `Type#seq` (the seq when the frame has one), for failure messages."""
    return (
        ", ".join(f"{type(f).__name__}{'#' + str(f.seq) if hasattr(f, 'seq') else ''}" for f in frames[-n:])
        or "nothing"
    )


def run_process(
    args: Sequence[str], *, timeout: float, what: str, **kwargs: Any
) -> subprocess.CompletedProcess[Any]:
    """`subprocess.run(args, timeout=timeout, **kwargs)`, failing past the timeout with a message
    naming `what` and the tail of whatever output was captured (the child is killed by `run`)."""
    try:
        return subprocess.run(args, timeout=timeout, **kwargs)  # the caller checks returncode
    except subprocess.TimeoutExpired as exc:

        def tail(out: bytes | str | None) -> str:
            if out is None:
                return "(not captured)"
            text = out.decode(errors="replace") if isinstance(out, bytes) else out
            return text[-3000:] or "(empty)"

        raise AssertionError(
            f"{what}: {args[0]} ... still running after {timeout:g} s (killed); "
            f"stdout ends with:\n{tail(exc.stdout)}\nstderr ends with:\n{tail(exc.stderr)}"
        ) from None
