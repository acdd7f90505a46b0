"""Keeps this process's session leases alive: one pipelined renewal per tick for all of them.

Renewing each lease from its own task cost a Redis round trip per session every 80 ms and, on a
busy event loop or behind queued checkpoint writes, renewals arrived late and leases lapsed while
their owner was healthy (lease churn). One keeper, on connections of its own, renews them all at
once; a runner learns at once when its lease was refused or could not be renewed before it lapsed.
With no lease held the keeper sleeps until one is (no 12.5 Hz tick on an idle orchestrator).

The keeper is not a `supervised` loop: a failed renewal must lose, on time, every lease whose last
renewal is older than the TTL, and the next tick must come at the renewal period, never after a
backoff (which would let healthy leases lapse). Any failure of a tick (Redis, a timeout, an answer
of the wrong shape) takes that path and is reported through `report_failure` (WARNING with the
traceback, rate-limited, counted as `tidewire_background_failures{loop="lease-keeper"}`).
"""

from __future__ import annotations

import asyncio
import logging
import time

from shared.checkpoints import CheckpointStore, Lease
from shared.supervise import count_failures_of, report_failure

log = logging.getLogger(__name__)
LOOP = "lease-keeper"  # its label in tidewire_background_failures


class LeaseKeeper:
    def __init__(self, store: CheckpointStore, *, ttl_ms: int, renew_ms: int) -> None:
        self._store = store
        self._ttl_ms = ttl_ms
        self._renew_s = renew_ms / 1000
        self._held: dict[str, tuple[Lease, asyncio.Event, float]] = {}
        self._some_held = asyncio.Event()
        self.late_ticks = 0

    def hold(self, lease: Lease) -> asyncio.Event:
        """Starts renewing `lease`; the returned event is set the moment it is lost."""
        lost = asyncio.Event()
        self._held[lease.session_id] = (lease, lost, time.monotonic())
        self._some_held.set()
        return lost

    def drop(self, lease: Lease) -> None:
        held = self._held.get(lease.session_id)
        if held is not None and held[0] == lease:
            del self._held[lease.session_id]

    def lapsed(self, lease: Lease) -> bool:
        """True once `lease` is lost or its last renewal is older than the TTL: it may be someone
        else's by now. A store error in a turn whose lease lapsed is the lease's loss (a partition,
        a freeze), not the turn's failure."""
        held = self._held.get(lease.session_id)
        if held is None or held[0] != lease or held[1].is_set():
            return True
        return time.monotonic() - held[2] > self._ttl_ms / 1000

    async def run(self) -> None:
        """Owned by the service for the life of the process; only cancellation ends it (a failing
        tick is handled in `tick`)."""
        count_failures_of(LOOP)
        while True:
            if not self._held:
                self._some_held.clear()
                await self._some_held.wait()
            started = time.monotonic()
            await self.tick()
            await asyncio.sleep(max(0.0, self._renew_s - (time.monotonic() - started)))

    async def tick(self) -> None:
        entries = list(self._held.values())
        if not entries:
            return
        now = time.monotonic()
        try:
            async with asyncio.timeout(self._ttl_ms / 1000):
                results = await self._store.renew_many([lease for lease, _, _ in entries], self._ttl_ms)
            for (lease, lost, _), ok in zip(entries, results, strict=True):
                if ok:
                    if self._held.get(lease.session_id, (None,))[0] == lease:
                        self._held[lease.session_id] = (lease, lost, now)
                else:
                    self._lose(lease, lost)
        except Exception as e:  # noqa: BLE001 - Redis blip: a lease is lost only once it would have lapsed
            self.late_ticks += 1
            report_failure(LOOP, e, log)
            for lease, lost, last_ok in entries:
                if now - last_ok > self._ttl_ms / 1000:
                    log.warning("lease of %s could not be renewed in time: %r", lease.session_id, e)
                    self._lose(lease, lost)

    def _lose(self, lease: Lease, lost: asyncio.Event) -> None:
        self.drop(lease)
        lost.set()
