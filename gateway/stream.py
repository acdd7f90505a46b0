"""Replay-then-live for every transport: subscribe first, replay from the stores, then go live,
deduplicating by seq, so the switch has no duplicate and no gap.

Replay reads come from the checkpoint store (Redis) while the session is hot and from the event
log (Postgres) for what Redis no longer holds; they are paged, and a feed waits for its
connection to drain before reading the next page, so a replay of any length needs bounded memory.
A live event that does not follow the last delivered seq (core NATS may drop or reorder across
publishers) is held back, and when the gap is still open `GAP_GRACE_S` later, a catch-up read from
the stores fills it: nothing is delivered out of order. The grace is there because most gaps fill
themselves: under load a session's next events often reach the gateway before the echo of its user
message (a different publisher), or before a `turn_end` held for its commit; reading at once cost a
third of the turns two store round trips each for nothing (measured at 200 msg/s: 922 reads for
2,893 sends).

`run_sender` is where every transport writes, so it is also where the gateway measures time to
first byte (gateway.metrics.TurnTraces) and counts merged deltas: both cost an int compare per
write while nothing is awaited.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

import msgspec

from gateway.delivery import OutboundBuffer, SlowConsumer
from gateway.deps import Deps
from gateway.hub import SessionHub
from proto import client
from proto.client import Event

log = logging.getLogger(__name__)

PAGE = 256
STORE_RETRY_FIRST_S = 0.25  # a replay read that failed (store down) is retried with backoff up to
STORE_RETRY_MAX_S = 2.0  # this pause, and the connection stays open meanwhile
HELD_LIMIT = 2048
AHEAD_LIMIT = 256
REPLAY_CHUNK = 16
GAP_GRACE_S = 0.2  # how long a live gap may fill itself before the stores are read


class _SeqOnly(msgspec.Struct):
    seq: int


_seq_decoder = msgspec.json.Decoder(_SeqOnly)


def seq_of(raw: bytes) -> int:
    return _seq_decoder.decode(raw).seq


class Replayer:
    """Reads pages of events after a seq; concurrent identical reads share one round trip."""

    def __init__(self, deps: Deps) -> None:
        self._deps = deps
        self.deps = deps
        self._inflight: dict[tuple[str, int, int], asyncio.Future[tuple[list[bytes], bool]]] = {}

    async def page(self, session_id: str, after: int, limit: int = PAGE) -> list[bytes]:
        return (await self.page_ended(session_id, after, limit))[0]

    async def page_ended(self, session_id: str, after: int, limit: int = PAGE) -> tuple[list[bytes], bool]:
        """A page, and whether it reached the end of what the stores show (a short page from the
        newest store): a feed then needs no further read that would only come back empty."""
        key = (session_id, after, limit)
        fut = self._inflight.get(key)
        if fut is not None:
            return await asyncio.shield(fut)
        fut = asyncio.get_running_loop().create_future()
        self._inflight[key] = fut
        try:
            result = await self._read(session_id, after, limit)
            fut.set_result(result)
            return result
        except BaseException as e:
            fut.set_exception(e)
            fut.exception()  # mark retrieved
            raise
        finally:
            self._inflight.pop(key, None)

    async def _read(self, session_id: str, after: int, limit: int) -> tuple[list[bytes], bool]:
        cp, elog = self._deps.checkpoints, self._deps.eventlog
        first = await cp.first_logged_seq(session_id)
        if first is None or after + 1 < first:
            raws = await elog.read_events(session_id, after, limit)
            if first is None:
                return raws, len(raws) < limit
            raws = [r for r in raws if seq_of(r) < first]
            if raws:
                return raws, False
        raws, _held = await cp.read_visible(session_id, after, limit)
        return raws, len(raws) < limit

    async def last_seq(self, session_id: str) -> int:
        v = await self._deps.checkpoints.last_seq(session_id)
        return v if v is not None else await self._deps.eventlog.last_seq(session_id)


class Feed:
    """One connection's ordered, gap-free, bounded view of one session."""

    def __init__(
        self, session_id: str, after: int, buffer: OutboundBuffer, replayer: Replayer, hub: SessionHub
    ) -> None:
        self.session_id = session_id
        self.last_seq = after
        self.buffer = buffer
        self._replayer = replayer
        self._hub = hub
        self._replaying = True
        self._held: list[Event] = []
        self._overflow = False
        self._ahead: dict[int, Event] = {}  # live events past a gap, kept until the gap is filled
        self.wake = asyncio.Event()
        self.drained = asyncio.Event()
        self._resync = asyncio.Event()
        self._gap_timer: asyncio.TimerHandle | None = None
        self.failure: str | None = None
        deps: Deps | None = getattr(replayer, "deps", None)
        self.counters = deps.counters if deps is not None else None
        self.turn_traces = deps.turn_traces if deps is not None else None
        if after > 0 and self.counters is not None:
            self.counters.reconnects += 1

    # ---- producer side -----------------------------------------------------------------------
    def push(self, frame: client.ServerFrame) -> None:
        try:
            self.buffer.push(frame, time.monotonic())
        except SlowConsumer:
            self.failure = "too far behind: reconnect and resume"
        self.wake.set()

    def on_live(self, events: list[Event]) -> None:
        if self._replaying:
            if len(self._held) + len(events) > HELD_LIMIT:
                self._held.clear()
                self._overflow = True
            elif not self._overflow:
                self._held.extend(events)
            return
        self._accept(events)

    def resync(self) -> None:
        self._resync.set()

    def _accept(self, events: list[Event], *, resync_on_gap: bool = True) -> None:
        """Delivers what follows the last seq sent. An event past a gap waits (bounded) while the gap
        is read from the store: e.g. a user message that arrives while the turn_end before it is
        still held for its Postgres commit, and comes live once committed."""
        gap = False
        for ev in events:
            if ev.seq <= self.last_seq:
                continue
            if ev.seq != self.last_seq + 1:
                if len(self._ahead) < AHEAD_LIMIT:
                    self._ahead[ev.seq] = ev
                gap = True
                continue
            self._deliver(ev)
        if self._ahead:
            for seq in [s for s in self._ahead if s <= self.last_seq]:
                del self._ahead[seq]
            if gap and resync_on_gap and self._gap_timer is None:
                self._gap_timer = asyncio.get_running_loop().call_later(GAP_GRACE_S, self._gap_check)

    def _gap_check(self) -> None:
        """A gap that did not fill itself within the grace: read it from the stores."""
        self._gap_timer = None
        if self._ahead and not self._replaying and not self._resync.is_set():
            if self.counters is not None:
                self.counters.gap_reads += 1
            self._resync.set()

    def _deliver(self, ev: Event) -> None:
        self.last_seq = ev.seq
        self.push(ev)
        while self._ahead:
            nxt = self._ahead.pop(self.last_seq + 1, None)
            if nxt is None:
                return
            self.last_seq = nxt.seq
            self.push(nxt)

    # ---- the pump: replay, then live ----------------------------------------------------------
    async def run(self) -> None:
        """Owned by the connection's task group; ends only by cancellation or failure."""
        await self._hub.join(self.session_id, self)
        try:
            delay = STORE_RETRY_FIRST_S
            while self.failure is None:
                try:
                    await self._catch_up()
                except Exception as e:  # noqa: BLE001 - a store is down: keep the connection, read again
                    log.warning(
                        "replay of session %s failed (%s); retrying in %g s", self.session_id, e, delay
                    )
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, STORE_RETRY_MAX_S)
                    continue
                delay = STORE_RETRY_FIRST_S
                await self._resync.wait()
                self._resync.clear()
                self._replaying = True
        finally:
            if self._gap_timer is not None:
                self._gap_timer.cancel()
                self._gap_timer = None
            await self._hub.leave(self.session_id, self)

    async def _catch_up(self) -> None:
        while True:
            raws, ended = await self._replayer.page_ended(self.session_id, self.last_seq)
            for i, raw in enumerate(raws):
                ev = client.event_decoder.decode(raw)
                if ev.seq <= self.last_seq:
                    continue
                self.last_seq = ev.seq
                self.push(ev)
                if i % REPLAY_CHUNK == REPLAY_CHUNK - 1:
                    await self._wait_drained()  # a reader that keeps up gets replay unmerged
            if self.failure is not None:
                return
            if raws:
                await self._wait_drained()
                if not ended:
                    continue
            held, overflow = self._held, self._overflow
            self._held, self._overflow = [], False
            if overflow:
                continue
            self._replaying = False
            # the store had nothing more to show: a gap left here is held back, and fills live
            self._accept([*held, *(self._ahead.pop(k) for k in sorted(self._ahead))], resync_on_gap=False)
            return

    async def _wait_drained(self) -> None:
        while len(self.buffer) > REPLAY_CHUNK // 2 and self.failure is None:
            self.drained.clear()
            await self.drained.wait()


async def run_sender(feed: Feed, write: Callable[[list[client.ServerFrame]], Awaitable[None]]) -> None:
    """Pops what the delivery mode releases and writes it; sleeps until woken or a held frame is due."""
    traces, counters = feed.turn_traces, feed.counters
    merged = feed.buffer.merged_count
    while feed.failure is None:
        feed.wake.clear()
        frames = feed.buffer.pop_ready(time.monotonic())
        if frames:
            if traces:  # a turn received here awaits its first byte
                started = time.time_ns()
                await write(frames)
                traces.written(frames, started)
            else:
                await write(frames)
            if counters is not None and feed.buffer.merged_count != merged:
                counters.merged_deltas += feed.buffer.merged_count - merged
                merged = feed.buffer.merged_count
            feed.drained.set()
            continue
        feed.drained.set()
        deadline = feed.buffer.next_deadline()
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        try:
            async with asyncio.timeout(timeout):
                await feed.wake.wait()
        except TimeoutError:
            pass
