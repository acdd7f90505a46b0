"""Tool jobs, results and cancels over NATS: both sides of a tool call, as adapter methods.

- A job is a `ToolJob` published to JetStream on `tw.tools.<pool>` with `Nats-Msg-Id` = the call
  key, so a retried publish (`tool_publish_retry`) or the same turn re-run after a crash keeps one
  copy; `publish_job` says whether this publish was such a duplicate.
- Workers read a pool through its durable pull consumer (`shared.bus.tool_consumer_config`),
  declared by `declare_pool`; the messages they get are `shared.bus.BusMessage`s, acked by them.
- A result is a `ToolResultMsg` on core NATS (`tw.toolresult.<turn>`): one wildcard subscription
  per dispatcher process (`subscribe_results`) gets them all, decoded.
- A cancel is a `ToolCancel` on core NATS `tw.toolcancel`, seen by every worker (`subscribe_cancels`).

Undecodable results and cancels are logged and dropped here; callbacks only ever see typed values.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import msgspec
from nats.js.api import PubAck

from proto import bus as busproto
from shared import subjects
from shared.bus import Bus, BusMessage, BusSubscription, PullSubscription, tool_consumer_config
from shared.retry import tool_publish_retry

__all__ = ["ToolBus"]

log = logging.getLogger(__name__)

_result_decoder = msgspec.msgpack.Decoder(busproto.ToolResultMsg)
_cancel_decoder = msgspec.msgpack.Decoder(busproto.ToolCancel)


class ToolBus:
    """The tool subjects of one Bus (which owns the connection)."""

    def __init__(self, bus: Bus) -> None:
        self._bus = bus

    # ---- dispatcher side ---------------------------------------------------------------------
    async def publish_job(self, pool: str, job: busproto.ToolJob, *, key: str, timeout_s: float) -> bool:
        """Queues the job (retried with `tool_publish_retry`); True if JetStream already had it."""
        payload = busproto.bus_encoder.encode(job)
        ack: PubAck = await tool_publish_retry()(
            self._bus.js.publish,
            subjects.tool_subject(pool),
            payload,
            timeout=timeout_s,
            headers={"Nats-Msg-Id": key},
        )
        return bool(ack.duplicate)

    async def subscribe_results(
        self, on_result: Callable[[busproto.ToolResultMsg], Awaitable[None]]
    ) -> BusSubscription:
        """Every tool result addressed to any turn (`tw.toolresult.>`)."""

        async def cb(msg: BusMessage) -> None:
            try:
                res = _result_decoder.decode(msg.data)
            except msgspec.DecodeError:
                log.warning("undecodable tool result on %s dropped", msg.subject)
                return
            await on_result(res)

        return await self._bus.nc.subscribe(
            subjects.tool_result_subject(">"),
            cb=cb,
            pending_msgs_limit=65_536,
            pending_bytes_limit=64 * 1024 * 1024,
        )

    async def publish_cancel(self, cancel: busproto.ToolCancel) -> None:
        await self._bus.nc.publish(subjects.TOOL_CANCEL_SUBJECT, busproto.bus_encoder.encode(cancel))

    # ---- worker side -------------------------------------------------------------------------
    async def declare_pool(self, pool: str, *, ack_wait_s: float, max_deliver: int) -> None:
        """Creates or updates the pool's durable consumer (a change the server cannot apply in place
        is logged and the old consumer kept)."""
        await self._bus.declare_consumer(
            subjects.TOOLS_STREAM, tool_consumer_config(pool, ack_wait_s=ack_wait_s, max_deliver=max_deliver)
        )

    async def pool_subscription(self, pool: str) -> PullSubscription:
        return await self._bus.pull_subscription(subjects.TOOLS_STREAM, subjects.tool_consumer(pool))

    async def subscribe_cancels(
        self, on_cancel: Callable[[busproto.ToolCancel], Awaitable[None]]
    ) -> BusSubscription:
        async def cb(msg: BusMessage) -> None:
            try:
                cancel = _cancel_decoder.decode(msg.data)
            except msgspec.DecodeError:
                log.warning("undecodable tool cancel on %s dropped", msg.subject)
                return
            await on_cancel(cancel)

        return await self._bus.nc.subscribe(subjects.TOOL_CANCEL_SUBJECT, cb=cb)

    async def publish_result(self, reply_subject: str, result: busproto.ToolResultMsg) -> None:
        await self._bus.nc.publish(reply_subject, busproto.bus_encoder.encode(result))
