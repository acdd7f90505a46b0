"""Internal messages carried over NATS between gateway, orchestrators and tool workers.

Payloads are msgpack-encoded msgspec Structs. Live session events reuse `proto.client.Event`
(the exact bytes a client will see are produced once, by the orchestrator or gateway that
checkpointed them).
"""

from __future__ import annotations

from typing import Any

import msgspec

from proto.client import Attachment, Event


class _Bus(msgspec.Struct, frozen=True, kw_only=True, tag_field="kind", omit_defaults=True):
    pass


class TurnRequest(_Bus, frozen=True, kw_only=True, tag="turn"):
    """Published to JetStream (Nats-Msg-Id = turn_id) after the user message is durable."""

    session_id: str
    turn_id: str
    user_seq: int
    client_msg_id: str
    subject: str
    text: str
    attachments: list[Attachment] | None = None
    received_at_ns: int = 0
    trace_context: dict[str, str] | None = None


class SessionEvents(_Bus, frozen=True, kw_only=True, tag="events"):
    """Live fan-out on the session subject: events already checkpointed, in seq order."""

    session_id: str
    events: list[Event]


class CancelTurn(_Bus, frozen=True, kw_only=True, tag="cancel"):
    """Stop request for a session's named or current turn; every orchestrator listens."""

    session_id: str
    turn_id: str | None = None
    reason: str = "stop"


class ToolJob(_Bus, frozen=True, kw_only=True, tag="tool_job"):
    """A tool call handed to a tool worker; `call_id` is the idempotency key."""

    session_id: str
    turn_id: str
    call_id: str
    name: str
    args: dict[str, Any]
    deadline_ms: int
    schema_version: int = 1
    reply_subject: str = ""


class ToolResultMsg(_Bus, frozen=True, kw_only=True, tag="tool_result"):
    """A tool worker's answer on core NATS `reply_subject`; `timed_out` marks the worker's own
    time-limit failure so the dispatcher can report it as a timeout."""

    session_id: str
    turn_id: str
    call_id: str
    ok: bool
    text: str
    attempt: int = 1
    timed_out: bool = False


class ToolCancel(_Bus, frozen=True, kw_only=True, tag="tool_cancel"):
    """Broadcast to every tool worker; `turn_id` scopes `call_id` (ids are unique per turn)."""

    call_id: str
    turn_id: str = ""


class TurnAnalytics(_Bus, frozen=True, kw_only=True, tag="analytics"):
    session_id: str
    turn_id: str
    status: str
    ttft_ms: float | None
    duration_ms: float
    completion_chars: int
    tool_calls: int = 0


class TurnAnalyticsBatch(_Bus, frozen=True, kw_only=True, tag="analytics_batch"):
    """Several turns' records in one JetStream message: one publish, one PubAck and one stored
    message for many turns instead of one each (writers still accept single `TurnAnalytics`)."""

    records: list[TurnAnalytics]


BusMessage = (
    TurnRequest
    | SessionEvents
    | CancelTurn
    | ToolJob
    | ToolResultMsg
    | ToolCancel
    | TurnAnalytics
    | TurnAnalyticsBatch
)

bus_decoder = msgspec.msgpack.Decoder(BusMessage)
bus_encoder = msgspec.msgpack.Encoder()
