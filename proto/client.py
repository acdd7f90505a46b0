"""Client-facing frames of PROTOCOL.md (v1), as msgspec tagged unions.

Sequenced events (`Event`) carry `seq`; control frames do not. Unknown fields are
ignored on decode (msgspec's default), which is the protocol's forward-compatibility rule.
Encoders and decoders are built once here and reused everywhere.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec


class _Frame(msgspec.Struct, frozen=True, kw_only=True, tag_field="type", omit_defaults=True):
    pass


# ---- sequenced events ------------------------------------------------------------------------


class Attachment(msgspec.Struct, frozen=True, kw_only=True):
    media_id: str


class Message(_Frame, frozen=True, kw_only=True, tag="message"):
    seq: int
    turn_id: str
    client_msg_id: str
    role: Literal["user"]
    text: str
    attachments: list[Attachment] | None = None


class TurnStart(_Frame, frozen=True, kw_only=True, tag="turn_start"):
    seq: int
    turn_id: str


class Delta(_Frame, frozen=True, kw_only=True, tag="delta"):
    seq: int
    turn_id: str
    offset: int
    text: str


class Status(_Frame, frozen=True, kw_only=True, tag="status"):
    seq: int
    turn_id: str
    text: str


class ToolCall(_Frame, frozen=True, kw_only=True, tag="tool_call"):
    seq: int
    turn_id: str
    call_id: str
    name: str
    args: dict[str, Any]


class ToolResult(_Frame, frozen=True, kw_only=True, tag="tool_result"):
    seq: int
    turn_id: str
    call_id: str
    ok: bool
    text: str


TurnStatus = Literal["completed", "cancelled", "failed", "timed_out"]


class TurnEnd(_Frame, frozen=True, kw_only=True, tag="turn_end"):
    seq: int
    turn_id: str
    status: TurnStatus
    text: str


Event = Message | TurnStart | Delta | Status | ToolCall | ToolResult | TurnEnd
EVENT_TYPES: tuple[type[_Frame], ...] = (Message, TurnStart, Delta, Status, ToolCall, ToolResult, TurnEnd)

# ---- control frames, client -> server --------------------------------------------------------

Delivery = Literal["tokens", "phrases", "batched"]


class Hello(_Frame, frozen=True, kw_only=True, tag="hello"):
    session_id: str | None = None
    last_seen_seq: int | None = None
    delivery: Delivery = "tokens"


class Send(_Frame, frozen=True, kw_only=True, tag="send"):
    client_msg_id: str = msgspec.field()
    text: str
    attachments: list[Attachment] | None = None


class Stop(_Frame, frozen=True, kw_only=True, tag="stop"):
    turn_id: str | None = None


class Ping(_Frame, frozen=True, kw_only=True, tag="ping"):
    pass


ClientFrame = Hello | Send | Stop | Ping

# ---- control frames, server -> client --------------------------------------------------------


class Ready(_Frame, frozen=True, kw_only=True, tag="ready"):
    session_id: str
    last_seq: int
    reset: bool = False


class Ack(_Frame, frozen=True, kw_only=True, tag="ack"):
    client_msg_id: str
    seq: int
    turn_id: str
    duplicate: bool


class Pong(_Frame, frozen=True, kw_only=True, tag="pong"):
    pass


ErrorCode = Literal[
    "bad_frame",
    "too_large",
    "rate_limited",
    "unauthorized",
    "forbidden",
    "not_found",
    "conflict",
    "degraded",
    "internal",
]


class Error(_Frame, frozen=True, kw_only=True, tag="error"):
    code: ErrorCode
    message: str
    retry_after_ms: int | None = None
    ref: str | None = None


ServerFrame = Ready | Ack | Pong | Error | Event

# ---- HTTP bodies -----------------------------------------------------------------------------


class CreateSessionResponse(msgspec.Struct, frozen=True, kw_only=True):
    session_id: str


class SendRequest(msgspec.Struct, frozen=True, kw_only=True):
    client_msg_id: str
    text: str
    attachments: list[Attachment] | None = None


class StopRequest(msgspec.Struct, frozen=True, kw_only=True):
    turn_id: str | None = None


class HistoryMessage(msgspec.Struct, frozen=True, kw_only=True):
    seq: int
    role: Literal["user", "assistant"]
    text: str
    turn_id: str
    status: str


class SessionHistory(msgspec.Struct, frozen=True, kw_only=True):
    session_id: str
    last_seq: int
    messages: list[HistoryMessage]


class PollResponse(msgspec.Struct, frozen=True, kw_only=True):
    events: list[Event]
    last_seq: int
    reset: bool = False


# ---- codecs, built once ------------------------------------------------------------------------

client_frame_decoder = msgspec.json.Decoder(ClientFrame)
server_frame_decoder = msgspec.json.Decoder(ServerFrame)
event_decoder = msgspec.json.Decoder(Event)
event_msgpack_decoder = msgspec.msgpack.Decoder(Event)
send_request_decoder = msgspec.json.Decoder(SendRequest)
stop_request_decoder = msgspec.json.Decoder(StopRequest)
json_encoder = msgspec.json.Encoder()
msgpack_encoder = msgspec.msgpack.Encoder()
