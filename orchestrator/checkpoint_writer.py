"""Writes a turn's events to the checkpoint store, then publishes them live, in order.

While one append is in flight, new events queue up and go in the next one, so the number of
Redis round trips per token falls as the token rate rises. The queue is bounded: a slow store
slows the model stream instead of growing memory.

Every append is a Redis round trip and a NATS message that each gateway wakes for, so a batch
waits up to `linger_s` for company, except where a reader waits on it: a step's first text (time
to first token), a status line (a tool about to run), the turn's end. The turn_start
waits the same way for the first event, so a quick model's turn starts and shows its first text in
one append (`start`). The turn's end takes whatever text is still queued with it (`finish`): a short
answer is two appends, its first text and the rest with its turn_end.

Each append's latency (one Redis round trip for a batch of events, fenced by the lease) is
recorded in `tidewire_checkpoint_append_seconds`: once per batch, never per token.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from shared import telemetry
from shared.bus import Bus
from shared.checkpoints import CheckpointStore, Lease, with_seq
from shared.eventlog import EventLog

log = logging.getLogger(__name__)
MAX_QUEUED = 1024

_append_seconds = telemetry.histogram(
    "tidewire_checkpoint_append_seconds",
    description="Checkpoint store append latency (one batch of a turn's events, fenced by the lease)",
)
_append_events = telemetry.counter(
    "tidewire_checkpoint_appended_events", description="Events appended to the checkpoint store"
)


class CheckpointWriter:
    def __init__(
        self, store: CheckpointStore, eventlog: EventLog, bus: Bus, lease: Lease, *, linger_s: float = 0.0
    ) -> None:
        self._store = store
        self._eventlog = eventlog
        self._bus = bus
        self._lease = lease
        self.linger_s = linger_s
        self._queue: list[bytes] = []
        self._start: tuple[bytes, str] | None = None  # a turn_start not yet appended, and its turn
        self.start_seq = 0  # the seq the turn_start got
        self._kick = asyncio.Event()
        self._hurry = asyncio.Event()
        self._room = asyncio.Event()
        self._room.set()
        self._idle = asyncio.Event()
        self._idle.set()
        self.last_seq = 0
        self.appends = 0
        self.events = 0
        self.error: BaseException | None = None
        self.written: list[bytes] = []  # what this writer checkpointed, seqs filled in, in order
        self._first_seq = 0
        self._parked = False  # settled: the run loop takes nothing more, `finish` takes the queue

    def start(self, turn_start: bytes, turn_id: str) -> None:
        """The turn's turn_start, appended (with the turn marked running) together with the next
        events, or alone after `linger_s`; its seq is `start_seq` once appended."""
        self._start = (turn_start, turn_id)
        self._kick.set()

    async def put(self, make: Callable[[], bytes], *, urgent: bool = False) -> None:
        """Queues the event `make()` builds once there is room: building it (which allocates its
        offset) and queueing it happen together, so a cancelled put never skips text. An `urgent`
        event (someone is waiting to see it) goes without lingering, with whatever is queued."""
        if self.error is not None:
            raise self.error
        while len(self._queue) >= MAX_QUEUED:
            self._room.clear()
            self._hurry.set()
            await self._room.wait()
        self._queue.append(make())
        self._idle.clear()
        if urgent:
            self._hurry.set()
        self._kick.set()

    def add(self, raw: bytes) -> None:
        """Queues an event after `settle` (a status line shown just before the turn's end): it goes
        with the end, in order."""
        self._queue.append(raw)

    async def settle(self) -> None:
        """Lets an append in flight finish and starts no other: what is still queued goes with the
        turn's end (`finish`), in one round trip instead of two."""
        self._parked = True
        self._hurry.set()
        self._kick.set()
        await self._idle.wait()
        if self.error is not None:
            raise self.error

    async def finish(self, held: list[bytes]) -> None:
        """The turn's last append: whatever is still queued, shown and published at once, then `held`
        (its turn_end), which readers do not see until the turn is finished in the store
        (CheckpointStore.append `hold`) and which the caller publishes after its commit."""
        await self.settle()
        raws, self._queue = [*self._queue, *held], []
        await self._append(raws, held=len(held))

    def contiguous_from(self, start_seq: int) -> bool:
        """True when this writer wrote every event from `start_seq` on, with nobody else's in between,
        so the turn can be persisted from memory instead of re-read from Redis."""
        return (
            bool(self.written)
            and self._first_seq == start_seq
            and self.last_seq - start_seq + 1 == len(self.written)
        )

    async def publish(self, events: list[bytes]) -> None:
        """Publishes events already checkpointed (their seqs filled in)."""
        try:
            await self._bus.publish_events(self._lease.session_id, events)
        except Exception as e:  # noqa: BLE001 - checkpointed: readers catch up from the store
            log.warning("live publish failed: %s", e)

    async def _linger(self) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.linger_s):
                await self._hurry.wait()

    async def run(self) -> None:
        try:
            while True:
                await self._kick.wait()
                self._kick.clear()
                if self._parked or (not self._queue and self._start is None):
                    self._idle.set()
                    continue
                if self.linger_s > 0 and not self._hurry.is_set():
                    await self._linger()
                while (self._queue or self._start is not None) and not self._parked:
                    self._idle.clear()
                    batch, self._queue = self._queue, []
                    self._hurry.clear()
                    self._room.set()
                    await self._append(batch)
                self._idle.set()
        except asyncio.CancelledError:
            self._idle.set()
            raise
        except Exception as e:
            self.error = e
            self._idle.set()
            raise

    async def _append(self, raws: list[bytes], *, held: int = 0) -> int:
        """One Redis round trip for `raws` (after a pending turn_start); the last `held` of them are
        held from readers and not published."""
        start_turn = ""
        started = self._start
        if started is not None:  # taken before the first await: no other append can take it too
            self._start = None
            raws, start_turn = [started[0], *raws], started[1]
        t0 = time.perf_counter()
        shown = len(raws) - held
        first = await self._store.append(
            self._lease, raws, start_turn=start_turn, hold=held > 0, held_from=shown, log=self._eventlog
        )
        if started is not None:
            self.start_seq = first
        _append_seconds.record(time.perf_counter() - t0)
        _append_events.add(len(raws))
        self.appends += 1
        self.events += len(raws)
        self.last_seq = first + len(raws) - 1
        if not self.written:
            self._first_seq = first
        events = [with_seq(r, first + i) for i, r in enumerate(raws)]
        self.written.extend(events)
        if shown:
            await self.publish(events[:shown])
        return first
