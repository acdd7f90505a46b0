"""Supervised background work: one failure policy for every loop that runs for a process's life.

A loop's step that raises is logged at WARNING with its traceback (at most once per `quiet_s` per
loop, with the count of failures since the last report), counted in
`tidewire_background_failures{loop}`, and retried after a backoff that doubles up to
`max_backoff_s` and resets on the next success. A loop never dies quietly: only cancellation
ends it. Named retry policies for single calls live here too, so every retry has a name.
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


class _Reporter:
    __slots__ = ("name", "quiet_s", "last", "suppressed")

    def __init__(self, name: str, quiet_s: float) -> None:
        self.name, self.quiet_s, self.last, self.suppressed = name, quiet_s, -1e18, 0

    def failed(self, exc: BaseException, logger: logging.Logger) -> None:
        _failures[self.name] += 1
        now = time.monotonic()
        if now - self.last < self.quiet_s:
            self.suppressed += 1
            return
        more = f" ({self.suppressed} more failures since the last report)" if self.suppressed else ""
        logger.warning("background loop %s failed%s: %s", self.name, more, exc, exc_info=exc)
        self.last, self.suppressed = now, 0


async def supervised(
    name: str,
    step: Callable[[], Awaitable[object]],
    *,
    every_s: float,
    max_backoff_s: float = 5.0,
    quiet_s: float = 30.0,
    logger: logging.Logger | None = None,
) -> None:
    """Runs `step()` every `every_s` seconds (measured from the end of the previous step) for ever."""
    _register()
    _failures.setdefault(name, 0)  # served at 0 from the start, so an alert can rely on it
    reporter = _Reporter(name, quiet_s)
    backoff = every_s
    while True:
        try:
            await step()
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - the policy: report, count, back off, go on
            reporter.failed(e, logger or log)
            backoff = min(max(backoff * 2, every_s, 0.05), max(max_backoff_s, every_s))
            await asyncio.sleep(backoff)
            continue
        backoff = every_s
        await asyncio.sleep(every_s)


def report_failure(name: str, exc: BaseException, logger: logging.Logger | None = None) -> None:
    """For loops shaped otherwise (one task per message): the same report and count."""
    _register()
    _failures[name] += 1
    (logger or log).warning("%s failed: %s", name, exc, exc_info=exc)


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
