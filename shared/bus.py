"""NATS adapter: JetStream work queues for turns and tool jobs, core subjects for live events.

Streams and consumers are declared idempotently at start from config objects and configured to
lose nothing: file storage, work-queue retention with `discard: new` and limits sized never to be
hit, a duplicate window longer than any client retry (turns are published with `Nats-Msg-Id` =
turn_id), durable pull consumers with explicit acks, finite max-deliver and bounded ack-pending.
Live session events go over core NATS: they are already in the checkpoint store, which is the
replay source for anyone who missed them.

Tracing: every JetStream publish made while a span is current carries the W3C `traceparent` in its
headers (`TracingJetStream`), and so do cancel requests; live event fan-out carries nothing (the
token hot path stays a bare publish).

This module (with `shared.toolbus`, `shared.call_ledger` and `shared.media_store`, which use it) is the
only door to nats-py: every stream, consumer, KeyValue bucket and object store is declared by a config
function below, beside `stream_configs()`, and named in `shared.subjects`. Code outside `shared/` gets
messages typed as `BusMessage` and never reaches the connection (`tests/unit/test_layering.py`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeAlias

import nats
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    DiscardPolicy,
    KeyValueConfig,
    ObjectStoreConfig,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.errors import BadRequestError

from proto import bus as busproto
from shared import subjects, telemetry
from shared.adapter import Adapter
from shared.cancellation import keep_cancel

log = logging.getLogger(__name__)

TURN_ACK_WAIT_S = 10.0
TURN_MAX_DELIVER = 20
DUPLICATE_WINDOW_S = 30 * 60
ANALYTICS_ACK_WAIT_S = 30.0
ANALYTICS_MAX_DELIVER = 20

# What code outside shared/ may name: a delivered message (`.data`, `.headers`, `.metadata`, `ack()`,
# `nak()`, `in_progress()`, `term()`), a core subscription and a pull subscription (`unsubscribe()`).
BusMessage: TypeAlias = Msg
BusSubscription: TypeAlias = Subscription
PullSubscription: TypeAlias = JetStreamContext.PullSubscription


def encode_events(raws: list[bytes]) -> bytes:
    """Live payload: a JSON array of the exact event bytes clients receive."""
    return b"[" + b",".join(raws) + b"]"


async def fetch_batch(sub: Any, batch: int, timeout_s: float, *, what: str) -> list[BusMessage]:
    """Up to `batch` messages of a pull subscription; [] when none came within the timeout, or when
    the broker hiccuped (logged, after a short pause so a dead broker is not spun on)."""
    try:
        # nats-py waits with asyncio.wait_for, which on 3.11 can drop a cancel (shared.cancellation)
        return list(await keep_cancel(sub.fetch(batch, timeout=timeout_s)))
    except TimeoutError:
        return []
    except Exception as e:  # noqa: BLE001 - reconnecting: the caller simply fetches again
        log.warning("fetch from %s failed: %r", what, e)
        await asyncio.sleep(0.5)
        return []


def stream_configs(replicas: int = 1) -> list[StreamConfig]:
    return [
        StreamConfig(
            name=subjects.TURNS_STREAM,
            subjects=[subjects.TURNS_SUBJECTS],
            retention=RetentionPolicy.WORK_QUEUE,
            storage=StorageType.FILE,
            discard=DiscardPolicy.NEW,
            max_msgs=10_000_000,
            max_bytes=8 * 1024**3,
            max_msg_size=1024 * 1024,
            duplicate_window=DUPLICATE_WINDOW_S,
            num_replicas=replicas,
        ),
        StreamConfig(
            name=subjects.DLQ_STREAM,
            subjects=[subjects.DLQ_SUBJECTS],
            retention=RetentionPolicy.LIMITS,
            storage=StorageType.FILE,
            discard=DiscardPolicy.OLD,
            max_age=14 * 86400,
            max_msg_size=1024 * 1024,
            num_replicas=replicas,
        ),
        StreamConfig(
            name=subjects.TOOLS_STREAM,
            subjects=[subjects.TOOLS_SUBJECTS],
            retention=RetentionPolicy.WORK_QUEUE,
            storage=StorageType.FILE,
            discard=DiscardPolicy.NEW,
            max_msgs=10_000_000,
            max_msg_size=1024 * 1024,
            duplicate_window=DUPLICATE_WINDOW_S,
            num_replicas=replicas,
        ),
        StreamConfig(
            name=subjects.ANALYTICS_STREAM,
            subjects=[subjects.ANALYTICS_SUBJECT],
            retention=RetentionPolicy.WORK_QUEUE,
            storage=StorageType.FILE,
            discard=DiscardPolicy.OLD,
            max_msgs=10_000_000,
            num_replicas=replicas,
        ),
    ]


def turn_consumer_config() -> ConsumerConfig:
    return ConsumerConfig(
        durable_name=subjects.TURNS_CONSUMER,
        ack_policy=AckPolicy.EXPLICIT,
        ack_wait=TURN_ACK_WAIT_S,
        max_deliver=TURN_MAX_DELIVER,
        max_ack_pending=4096,
        filter_subject=subjects.TURNS_SUBJECTS,
    )


def tool_consumer_config(pool: str, *, ack_wait_s: float, max_deliver: int) -> ConsumerConfig:
    """One durable pull consumer per tool pool on `TW_TOOLS`. A short `ack_wait` (the worker sends
    `in_progress` while a tool runs) hands a SIGKILLed worker's job to another within seconds."""
    return ConsumerConfig(
        durable_name=subjects.tool_consumer(pool),
        filter_subject=subjects.tool_subject(pool),
        deliver_policy=DeliverPolicy.ALL,
        ack_policy=AckPolicy.EXPLICIT,
        ack_wait=ack_wait_s,
        max_deliver=max_deliver,
        max_ack_pending=4096,
    )


def analytics_consumer_config() -> ConsumerConfig:
    return ConsumerConfig(
        durable_name=subjects.ANALYTICS_CONSUMER,
        ack_policy=AckPolicy.EXPLICIT,
        ack_wait=ANALYTICS_ACK_WAIT_S,
        max_deliver=ANALYTICS_MAX_DELIVER,
        max_ack_pending=8192,
        filter_subject=subjects.ANALYTICS_SUBJECT,
    )


def call_ledger_config(ttl_s: float, replicas: int = 1) -> KeyValueConfig:
    """The tool-call ledger (`shared.call_ledger`): one value per call key, kept `ttl_s`."""
    return KeyValueConfig(
        bucket=subjects.CALLS_BUCKET,
        history=1,
        ttl=ttl_s,
        storage=StorageType.FILE,
        max_value_size=256 * 1024,
        replicas=replicas,
    )


def media_store_config(*, ttl_s: float, max_bytes: int, replicas: int = 1) -> ObjectStoreConfig:
    """The media object store (`shared.media_store`); `ttl_s` 0 keeps media forever."""
    return ObjectStoreConfig(
        description="tidewire media, by reference",
        storage=StorageType.FILE,
        ttl=ttl_s or None,
        max_bytes=max_bytes,
        replicas=replicas,
    )


class TracingJetStream(JetStreamContext):
    """A JetStream context whose publishes carry the current trace context in their headers, so a
    consumer (orchestrator, tool worker) continues the publisher's trace."""

    async def publish(
        self,
        subject: str,
        payload: bytes = b"",
        timeout: float | None = None,
        stream: str | None = None,
        headers: dict[str, Any] | None = None,
        msg_ttl: float | None = None,
    ) -> Any:
        carrier = telemetry.inject()
        if carrier:
            headers = {**carrier, **(headers or {})}
        return await super().publish(
            subject, payload, timeout=timeout, stream=stream, headers=headers, msg_ttl=msg_ttl
        )


class Bus(Adapter):
    """Owns one NATS connection. Business code calls these methods, never nats-py directly.

    `async with await Bus.connect(...) as bus:` closes the connection however the block ends."""

    def __init__(self, nc: NATS, js: JetStreamContext, *, timeout_s: float, replicas: int = 1) -> None:
        self.nc = nc
        self.js = js
        self.timeout_s = timeout_s
        self.replicas = replicas

    @classmethod
    async def connect(
        cls,
        url: str,
        *,
        name: str,
        timeout_s: float = 3.0,
        on_state: Callable[[bool], None] | None = None,
        replicas: int = 1,
    ) -> Bus:
        """`url` may list several servers, comma-separated (a cluster's nodes): the client connects to
        one and fails over to the others. `replicas` is used when streams and buckets are declared."""

        async def disconnected() -> None:
            log.warning("nats disconnected")
            if on_state:
                on_state(False)

        async def reconnected() -> None:
            log.info("nats reconnected")
            if on_state:
                on_state(True)

        async def error_cb(e: Exception) -> None:
            log.debug("nats error: %s", e)

        servers = [u.strip() for u in url.split(",") if u.strip()]
        nc = await nats.connect(
            servers,
            name=name,
            connect_timeout=timeout_s,
            max_reconnect_attempts=-1,
            reconnect_time_wait=0.25,
            ping_interval=5,
            max_outstanding_pings=3,
            disconnected_cb=disconnected,
            reconnected_cb=reconnected,
            error_cb=error_cb,
            pending_size=64 * 1024 * 1024,
        )
        return cls(nc, TracingJetStream(nc, timeout=timeout_s), timeout_s=timeout_s, replicas=replicas)

    async def close(self) -> None:
        """Flushes what was published, then closes (consumers were already stopped by the owner)."""
        if self.nc is not None and not self.nc.is_closed:
            try:
                await self.nc.flush(timeout=max(1, int(self.timeout_s)))
            except Exception:  # noqa: BLE001 - closing anyway
                pass
            await self.nc.close()

    @property
    def connected(self) -> bool:
        return self.nc is not None and bool(self.nc.is_connected)

    async def ensure_streams(self) -> None:
        for cfg in stream_configs(self.replicas):
            try:
                await self.js.add_stream(cfg)
            except BadRequestError:
                await self.js.update_stream(cfg)
        await self.js.add_consumer(subjects.TURNS_STREAM, turn_consumer_config())

    async def declare_consumer(self, stream: str, config: ConsumerConfig) -> None:
        """Creates or updates a durable consumer; a change the server cannot apply in place is logged
        and the existing consumer kept (binding to it still works)."""
        try:
            await self.js.add_consumer(stream, config)
        except BadRequestError as exc:
            log.warning("consumer %s on %s not (re)declared: %s", config.durable_name, stream, exc)

    async def pull_subscription(self, stream: str, durable: str) -> PullSubscription:
        """Binds to a declared durable pull consumer; read it with `fetch_batch`."""
        return await self.js.pull_subscribe_bind(durable=durable, stream=stream)

    # ---- turns -------------------------------------------------------------------------------
    async def publish_turn(self, req: busproto.TurnRequest, headers: dict[str, str] | None = None) -> None:
        """Awaits the JetStream ack; `Nats-Msg-Id` = turn_id makes a retried publish a no-op."""
        await self.js.publish(
            subjects.turn_subject(req.session_id),
            busproto.bus_encoder.encode(req),
            timeout=self.timeout_s,
            headers={"Nats-Msg-Id": req.turn_id, **(headers or {})},
        )

    async def dead_letter(self, req: busproto.TurnRequest, reason: str) -> None:
        await self.js.publish(
            subjects.dlq_subject(req.session_id),
            busproto.bus_encoder.encode(req),
            timeout=self.timeout_s,
            headers={"Nats-Msg-Id": "dlq-" + req.turn_id, "Tidewire-Reason": reason[:500]},
        )

    async def turn_subscription(self) -> JetStreamContext.PullSubscription:
        return await self.js.pull_subscribe_bind(
            durable=subjects.TURNS_CONSUMER, stream=subjects.TURNS_STREAM
        )

    async def turn_queue_pending(self) -> int:
        waiting, unacked = await self.turn_queue_depth()
        return waiting + unacked

    async def turn_queue_depth(self) -> tuple[int, int]:
        """(turns not yet delivered to any orchestrator, turns delivered and not yet acked)."""
        info = await self.js.consumer_info(
            subjects.TURNS_STREAM, subjects.TURNS_CONSUMER, timeout=self.timeout_s
        )
        return int(info.num_pending or 0), int(info.num_ack_pending or 0)

    async def dead_lettered(self) -> int:
        """Messages kept in the dead-letter stream (14 days): anything above zero needs a look."""
        info = await self.js.stream_info(subjects.DLQ_STREAM)
        return int(info.state.messages or 0)

    # ---- live events -------------------------------------------------------------------------
    async def publish_events(self, session_id: str, raws: list[bytes]) -> None:
        await keep_cancel(self.nc.publish(subjects.session_subject(session_id), encode_events(raws)))

    async def subscribe_session(self, session_id: str, cb: Callable[[Msg], Awaitable[None]]) -> Any:
        return await keep_cancel(
            self.nc.subscribe(
                subjects.session_subject(session_id),
                cb=cb,
                pending_msgs_limit=65536,
                pending_bytes_limit=64 * 1024 * 1024,
            )
        )

    async def unsubscribe(self, sub: BusSubscription) -> None:
        await keep_cancel(sub.unsubscribe())

    # ---- cancellation ------------------------------------------------------------------------
    async def publish_cancel(self, msg: busproto.CancelTurn) -> None:
        await keep_cancel(
            self.nc.publish(
                subjects.CANCEL_SUBJECT, busproto.bus_encoder.encode(msg), headers=telemetry.inject() or None
            )
        )

    async def subscribe_turn_cancels(self, cb: Callable[[BusMessage], Awaitable[None]]) -> BusSubscription:
        """Every `CancelTurn` published by any gateway (core NATS: a cancel for a turn this process
        does not run is simply ignored by the callback)."""
        return await keep_cancel(self.nc.subscribe(subjects.CANCEL_SUBJECT, cb=cb))

    # ---- analytics ---------------------------------------------------------------------------
    async def publish_analytics(self, records: list[busproto.TurnAnalytics], *, timeout_s: float) -> None:
        """One message for the batch; awaits the JetStream ack. Deduplicated by its first turn id and
        size (a record is in one batch only), so a retried publish is a no-op."""
        await self.js.publish(
            subjects.ANALYTICS_SUBJECT,
            busproto.bus_encoder.encode(busproto.TurnAnalyticsBatch(records=records)),
            timeout=timeout_s,
            headers={"Nats-Msg-Id": f"analytics-{records[0].turn_id}+{len(records)}"},
        )

    async def analytics_subscription(self) -> PullSubscription:
        """The analytics writers' durable pull consumer, declared (idempotently) then bound."""
        try:
            await self.declare_consumer(subjects.ANALYTICS_STREAM, analytics_consumer_config())
        except Exception as exc:  # noqa: BLE001 - e.g. a reconnect in progress: bind to what exists
            log.warning("analytics consumer not (re)declared: %s", exc)
        return await self.pull_subscription(subjects.ANALYTICS_STREAM, subjects.ANALYTICS_CONSUMER)
