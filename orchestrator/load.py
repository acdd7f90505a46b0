"""What this orchestrator tells the gateways about its load, for admission (gateway/limits.py).

Reported twice a second: the longest pickup delay of the last window (from the gateway's receipt
of a user message to its turn starting here: queueing in JetStream and in this process), the
shortest one when the window had at least `MIN_EVIDENCE` pickups (when even the quickest turn
waited, there is a standing queue, not a burst: what the gateways' delay-based shedding follows,
gateway/shedding.py), and the event loop's lag (how late a 100 ms timer fires). Both grow before anything
breaks; a gateway that sees them high refuses new sends with `degraded` instead of letting the
queue, the loop lag and then lease lapses grow (PERF-LEDGER §5: past the knee the stack drowned).
The window is a max over fixed slots, so recording a pickup is a compare, not an allocation.
"""

from __future__ import annotations

import asyncio
import logging
import time

from shared.checkpoints import CheckpointStore
from shared.supervise import supervised

log = logging.getLogger(__name__)

REPORT_S = 0.5
LAG_TICK_S = 0.1
MIN_EVIDENCE = 8  # pickups in a window before its shortest one counts as a standing queue


class LoadReporter:
    def __init__(self, store: CheckpointStore, instance: str) -> None:
        self._store = store
        self._instance = instance
        self._delay_s = 0.0  # max pickup delay since the last report
        self._min_s = float("inf")  # min pickup delay since the last report
        self._picked = 0
        self._lag_s = 0.0  # max loop lag since the last report
        self.last_report: tuple[int, int] = (0, 0)

    def picked(self, delay_s: float) -> None:
        """A fresh turn started `delay_s` after its gateway received it."""
        if delay_s > self._delay_s:
            self._delay_s = delay_s
        if delay_s < self._min_s:
            self._min_s = delay_s
        self._picked += 1

    async def run(self) -> None:
        """Owned by the service for the life of the process."""
        lag = asyncio.create_task(self._measure_lag(), name="loop-lag")
        try:
            await supervised("load-report", self._report, every_s=REPORT_S, logger=log)
        finally:
            lag.cancel()
            await asyncio.gather(lag, return_exceptions=True)
            await asyncio.gather(
                asyncio.shield(self._store.withdraw_load(self._instance)), return_exceptions=True
            )

    async def _measure_lag(self) -> None:
        while True:
            t0 = time.monotonic()
            await asyncio.sleep(LAG_TICK_S)
            late = time.monotonic() - t0 - LAG_TICK_S
            if late > self._lag_s:
                self._lag_s = late

    async def _report(self) -> None:
        delay_ms, lag_ms = int(self._delay_s * 1000), int(self._lag_s * 1000)
        min_ms = int(self._min_s * 1000) if self._picked >= MIN_EVIDENCE else -1
        self._delay_s = self._lag_s = 0.0
        self._min_s, self._picked = float("inf"), 0
        self.last_report = (delay_ms, lag_ms)
        await self._store.report_load(self._instance, delay_ms, lag_ms, min_ms)
