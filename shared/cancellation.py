"""Cancellation that the drivers lose, kept.

On Python 3.11, `asyncio.wait_for` returns the inner result and drops an outer cancel that lands
as the inner call completes (fixed in 3.12), and nats-py's `_flush_pending` catches
CancelledError outright. redis-py uses `wait_for` around socket writes and reads: with the
project's pool, 1 cancel in 2 that hit a Redis command was lost (a probe of 2,000 cancels). A task
that then went on as if never cancelled kept a SIGTERMed gateway from exiting for 12 s (an SSE
stream's replay, cancelled by the drain, carried on to wait for live events). Every adapter call
into those drivers goes through `keep_cancel`, so a cancel requested during the call is raised at
its end. The same call can also come back with the wrong exception: a cancel that lands while
`wait_for` handles its own timeout is turned into TimeoutError (nats-py's pull `fetch`), which a
fetch loop takes for "no messages" and goes on; `keep_cancel` raises CancelledError instead.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

T = TypeVar("T")


async def keep_cancel(aw: Awaitable[T]) -> T:
    task = asyncio.current_task()
    before = task.cancelling() if task is not None else 0
    try:
        result = await aw
    except asyncio.CancelledError:
        raise
    except BaseException:
        if task is not None and task.cancelling() > before:
            raise asyncio.CancelledError from None
        raise
    if task is not None and task.cancelling() > before:
        raise asyncio.CancelledError
    return result
