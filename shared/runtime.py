"""The event loop every service runs on: uvloop where it is installed (TIDEWIRE_UVLOOP=0 turns it
off), else asyncio's own. Measured on the turn path (PERF-LEDGER §6): uvloop took the gateway's CPU
per turn down ~10 %, and with hiredis (picked up by redis-py on its own) and sampled tracing the
Python processes ~20 %; the loop's own bookkeeping was a quarter of every profile."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    if os.environ.get("TIDEWIRE_UVLOOP", "1").strip().lower() in ("0", "false", "no", "off"):
        return None
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def new_loop() -> asyncio.AbstractEventLoop:
    factory = loop_factory()
    return factory() if factory is not None else asyncio.new_event_loop()


def run(main: Coroutine[Any, Any, T]) -> T:
    """`asyncio.run(main)` on the chosen loop."""
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        return runner.run(main)
