"""Per-turn analytics as an asynchronous side effect: never on the path of a turn.

A turn must not wait for, or fail because of, bookkeeping. So the orchestrator only `offer`s a
`proto.bus.TurnAnalytics` record to an `AnalyticsPublisher`: a bounded in-memory queue (full: the
record is dropped and counted, the turn goes on) drained by a background task that publishes to
JetStream in batches (`Bus.publish_analytics`: the records that arrive within `linger_s` of the
first, up to `publish_batch`, in one deduplicated message; one message per turn cost a publish, a
PubAck and a JetStream fsync each) with a timeout and a short named retry policy. An `AnalyticsWriter` (a durable pull consumer on `ANALYTICS_STREAM`, run by
`python -m orchestrator.analytics` or as a task of any process) writes batches to Postgres
(`turn_analytics`) and acks only after the commit, so a crash between the two redelivers and the
insert (ON CONFLICT DO NOTHING) makes the retry harmless. A slow or absent writer only lets the
stream grow; turns never notice.

`TIDEWIRE_ANALYTICS_WRITE_DELAY_S` slows every batch on purpose (tests prove the isolation).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from proto import bus as busproto
from proto import client
from shared.bus import Bus, BusMessage, fetch_batch
from shared.config import from_env
from shared.retry import analytics_publish_retry

__all__ = [
    "AnalyticsPublisher",
    "AnalyticsSettings",
    "AnalyticsWriter",
    "main",
    "tool_calls_in",
    "turn_analytics",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AnalyticsSettings:
    """`TIDEWIRE_ANALYTICS_{QUEUE_MAX,PUBLISH_TIMEOUT_S,PUBLISH_BATCH,LINGER_S,BATCH,FETCH_TIMEOUT_S,
    WRITE_DELAY_S}`."""

    queue_max: int = 10_000
    publish_timeout_s: float = 2.0
    publish_batch: int = 128  # records per published message at most
    linger_s: float = 0.05  # how long the first record waits for others to share its message
    batch: int = 256
    fetch_timeout_s: float = 1.0
    write_delay_s: float = 0.0

    @classmethod
    def from_env(cls) -> AnalyticsSettings:
        return from_env(cls, prefix="TIDEWIRE_ANALYTICS_")


class _AnalyticsSink(Protocol):
    async def record_analytics(self, rows: Sequence[tuple[Any, ...]]) -> None: ...


def turn_analytics(
    req: busproto.TurnRequest,
    ended: client.TurnEnd,
    *,
    first_token_ns: int | None = None,
    tool_calls: int = 0,
    now_ns: int | None = None,
) -> busproto.TurnAnalytics:
    """The record of a finished turn, timed from the gateway's `received_at_ns` (wall clock)."""
    now_ns = time.time_ns() if now_ns is None else now_ns
    start = req.received_at_ns or now_ns
    ttft = None if first_token_ns is None or not req.received_at_ns else (first_token_ns - start) / 1e6
    return busproto.TurnAnalytics(
        session_id=req.session_id,
        turn_id=req.turn_id,
        status=ended.status,
        ttft_ms=ttft,
        duration_ms=max(0.0, (now_ns - start) / 1e6),
        completion_chars=len(ended.text),
        tool_calls=tool_calls,
    )


def tool_calls_in(raws: Sequence[bytes]) -> int:
    """How many tool calls a turn's events (the exact client JSON) contain."""
    n = 0
    for raw in raws:
        if b'"tool_call"' in raw and isinstance(client.event_decoder.decode(raw), client.ToolCall):
            n += 1
    return n


class AnalyticsPublisher:
    """Bounded queue + background publisher. `offer` never blocks and never raises."""

    def __init__(self, bus: Bus, settings: AnalyticsSettings | None = None) -> None:
        self.settings = AnalyticsSettings() if settings is None else settings
        self._bus = bus
        self._queue: asyncio.Queue[busproto.TurnAnalytics] = asyncio.Queue(self.settings.queue_max)
        self.offered = 0
        self.published = 0
        self.dropped = 0
        self.failed = 0

    @property
    def queued(self) -> int:
        return self._queue.qsize()

    def offer(self, record: busproto.TurnAnalytics) -> bool:
        """Queue a record for publishing; False (and counted in `dropped`) when the queue is full."""
        self.offered += 1
        try:
            self._queue.put_nowait(record)
        except asyncio.QueueFull:
            self.dropped += 1
            return False
        return True

    async def run(self) -> None:
        """Publish forever, one batch at a time (owned by a TaskGroup)."""
        while True:
            batch = await self._next_batch()
            try:
                await self._publish(batch)
            finally:
                for _ in batch:
                    self._queue.task_done()

    async def _next_batch(self) -> list[busproto.TurnAnalytics]:
        batch = [await self._queue.get()]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.linger_s
        while len(batch) < self.settings.publish_batch:
            if not self._queue.empty():
                batch.append(self._queue.get_nowait())
                continue
            if loop.time() >= deadline:
                break
            try:
                async with asyncio.timeout_at(deadline):
                    batch.append(await self._queue.get())
            except TimeoutError:
                break
        return batch

    async def flush(self, timeout_s: float = 2.0) -> bool:
        """Wait (bounded) until everything queued was published or given up; for shutdown."""
        try:
            async with asyncio.timeout(timeout_s):
                await self._queue.join()
        except TimeoutError:
            return False
        return True

    async def _publish(self, batch: list[busproto.TurnAnalytics]) -> None:
        try:
            async for attempt in analytics_publish_retry():
                with attempt:
                    await self._bus.publish_analytics(batch, timeout_s=self.settings.publish_timeout_s)
        except Exception as exc:  # noqa: BLE001 - best effort by design: counted, logged, dropped
            self.failed += len(batch)
            log.warning(
                "analytics of %d turns (from %s) not published: %r", len(batch), batch[0].turn_id, exc
            )
            return
        self.published += len(batch)


class AnalyticsWriter:
    """Durable pull consumer → Postgres in batches; ack after commit, nak (with delay) on failure."""

    def __init__(self, bus: Bus, sink: _AnalyticsSink, settings: AnalyticsSettings | None = None) -> None:
        self.settings = AnalyticsSettings() if settings is None else settings
        self._bus = bus
        self._sink = sink
        self.written = 0
        self.batches = 0
        self.failed_batches = 0
        self.rejected = 0

    async def run(self) -> None:
        sub = await self._bus.analytics_subscription()
        while True:
            msgs = await fetch_batch(
                sub, self.settings.batch, self.settings.fetch_timeout_s, what="analytics"
            )
            if not msgs:
                continue
            await self.write_batch(msgs)

    async def write_batch(self, msgs: Sequence[BusMessage]) -> None:
        rows: list[tuple[Any, ...]] = []
        keep: list[BusMessage] = []
        for msg in msgs:
            try:
                rec = busproto.bus_decoder.decode(msg.data)
            except Exception:  # noqa: BLE001 - undecodable: never retried
                rec = None
            if isinstance(rec, busproto.TurnAnalytics):
                records = [rec]
            elif isinstance(rec, busproto.TurnAnalyticsBatch):
                records = rec.records
            else:
                self.rejected += 1
                with contextlib.suppress(Exception):
                    await msg.term()
                continue
            rows.extend(
                (
                    r.turn_id,
                    r.session_id,
                    r.status,
                    r.ttft_ms,
                    r.duration_ms,
                    r.completion_chars,
                    r.tool_calls,
                )
                for r in records
            )
            keep.append(msg)
        if not rows:
            return
        try:
            if self.settings.write_delay_s > 0:
                await asyncio.sleep(self.settings.write_delay_s)
            await self._sink.record_analytics(rows)
        except Exception as exc:  # noqa: BLE001 - Postgres down: redelivered after the delay
            self.failed_batches += 1
            log.warning("analytics batch of %d not written: %s", len(rows), exc)
            for msg in keep:
                with contextlib.suppress(Exception):
                    await msg.nak(delay=1.0)
            return
        self.batches += 1
        self.written += len(rows)
        for msg in keep:
            with contextlib.suppress(Exception):  # unacked: redelivered, and the insert is idempotent
                await msg.ack()


async def _serve() -> None:
    from orchestrator.settings import load
    from shared.eventlog import EventLog

    s = load()
    settings = AnalyticsSettings.from_env()
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    eventlog = await EventLog.connect(s.postgres_dsn, timeout_s=s.postgres_timeout_s, max_size=2)
    try:
        async with await Bus.connect(s.nats_url, name="analytics-writer", timeout_s=s.nats_timeout_s) as bus:
            await bus.ensure_streams()
            writer = AnalyticsWriter(bus, eventlog, settings)
            async with asyncio.TaskGroup() as tg:
                task = tg.create_task(writer.run(), name="analytics-writer")
                log.info(
                    "analytics writer ready (batch %d, write delay %g s)",
                    settings.batch,
                    settings.write_delay_s,
                )
                await stopping.wait()
                task.cancel()
            log.info("analytics writer stopped after %d rows", writer.written)
    finally:
        await eventlog.close()


def main() -> None:
    """`python -m orchestrator.analytics`: the analytics writer as its own process."""
    from orchestrator.settings import load
    from shared import logs

    logs.setup("analytics", load().log_level)
    asyncio.run(_serve())


if __name__ == "__main__":
    main()
