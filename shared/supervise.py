"""Supervised background work: one failure policy for every loop that runs for a process's life.

A loop's step that raises is logged at WARNING with its traceback (at most once per `quiet_s` per
loop, with the count of failures since the last report), counted in
`tidewire_background_failures{loop}`, and retried after a backoff that doubles up to
`max_backoff_s` and resets on the next success (logged at INFO: the loop recovered). A loop never
dies quietly: only cancellation ends it, and cancellation is never counted as a failure. A loop
that keeps something alive (a lease, a key with a TTL) passes `max_backoff_s=every_s`: a backoff
must never outlast what the step renews. Loops shaped otherwise (one task per message, a lease
keeper that must act on a failure at once) report through `report_failure`: the same log, rate
limit and count, no backoff. Named retry policies for single calls live in shared/retry.py.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Awaitable, Callable

from shared import telemetry

log = logging.getLogger(__name__)

_failures: collections.Counter[str] = collections.Counter()
_reporters: dict[str, _Reporter] = {}  # report_failure's, one per name
_registered = False


def failures() -> dict[str, int]:
    return dict(_failures)


def _register() -> None:
    global _registered
    if _registered:
        return
    _registered = True
    telemetry.observe(
        "tidewire_background_failures",
        lambda: [({"loop": k}, v) for k, v in _failures.items()],
        kind="counter",
        description="Failed steps of supervised background loops, by loop",
    )


def count_failures_of(name: str) -> None:
    """Serves `name`'s failure count from now on, at 0 until it fails (so an alert can rely on it);
    `supervised` does this itself, a loop that uses `report_failure` calls it when it starts."""
    _register()
    _failures.setdefault(name, 0)


class _Reporter:
    """Counts every failure of one loop, logs at most one per `quiet_s` (a loop failing at 10 Hz
    must not flood the log with tracebacks) and says how many it kept quiet."""

    __slots__ = ("name", "what", "quiet_s", "last", "suppressed", "streak")

    def __init__(self, name: str, quiet_s: float, what: str) -> None:
        self.name, self.what, self.quiet_s = name, what, quiet_s
        self.last, self.suppressed, self.streak = -1e18, 0, 0

    def failed(self, exc: BaseException, logger: logging.Logger) -> None:
        _failures[self.name] += 1
        self.streak += 1
        now = time.monotonic()
        if now - self.last < self.quiet_s:
            self.suppressed += 1
            return
        more = f" ({self.suppressed} more failures since the last report)" if self.suppressed else ""
        logger.warning("%s failed%s: %s", self.what, more, exc, exc_info=exc)
        self.last, self.suppressed = now, 0

    def recovered(self, logger: logging.Logger) -> None:
        logger.info("%s recovered after %d failed steps", self.what, self.streak)
        self.streak = 0


async def supervised(
    name: str,
    step: Callable[[], Awaitable[object]],
    *,
    every_s: float,
    max_backoff_s: float = 5.0,
    quiet_s: float = 30.0,
    fixed_rate: bool = False,
    logger: logging.Logger | None = None,
) -> None:
    """Runs `step()` every `every_s` seconds for ever, measured from the end of the previous step,
    or from its start with `fixed_rate` (a sampler's clock: a step that took longer than `every_s`
    is followed at once). After a failure the next step waits the backoff instead."""
    count_failures_of(name)
    logger = logger or log
    reporter = _Reporter(name, quiet_s, f"background loop {name}")
    backoff = every_s
    while True:
        started = time.monotonic()
        try:
            await step()
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - the policy: report, count, back off, go on
            reporter.failed(e, logger)
            backoff = min(max(backoff * 2, every_s, 0.05), max(max_backoff_s, every_s))
            await asyncio.sleep(backoff)
            continue
        if reporter.streak:
            reporter.recovered(logger)
        backoff = every_s
        await asyncio.sleep(max(0.0, every_s - (time.monotonic() - started)) if fixed_rate else every_s)


def report_failure(
    name: str, exc: BaseException, logger: logging.Logger | None = None, *, quiet_s: float = 30.0
) -> None:
    """For loops shaped otherwise (one task per message, a keeper that acts on its own failures):
    the same report, rate limit and count as `supervised`, without its backoff. `name` is the
    metric's label: a fixed name per loop, never one per message."""
    count_failures_of(name)
    reporter = _reporters.get(name)
    if reporter is None:
        reporter = _reporters[name] = _Reporter(name, quiet_s, name)
    reporter.failed(exc, logger or log)


def install_task_dump(loop: asyncio.AbstractEventLoop) -> None:
    """SIGUSR1 logs every task of the process with its stack (at WARNING): what a process is
    waiting on when it does not stop or does not progress."""
    import io
    import signal

    def dump() -> None:
        for task in asyncio.all_tasks(loop):
            buf = io.StringIO()
            task.print_stack(limit=12, file=buf)
            log.warning("task %s: %s", task.get_name(), buf.getvalue())

    loop.add_signal_handler(signal.SIGUSR1, dump)
