"""The Vercel AI SDK UI message stream (`DefaultChatTransport`) over tidewire turns.

`POST /v1/ai-sdk/chat {id, messages, trigger, messageId}`: the chat `id` names the session. A chat id
that is a session of the caller is that session; any other id maps to the session
`ai_<digest(subject, chat id)>`, created on first use — durable, needing no mapping store, and
another subject's same chat id is another session. The last user message's `id` is the send's
`client_msg_id` ("ai:<id>"), so a re-POST of the same message starts no second turn: it streams the
turn it started, from its beginning. The session id comes back in `X-Tidewire-Session`.

`GET /v1/ai-sdk/chat/{id}/stream` resumes: 204 when the session has no active turn, else the active
turn replayed from its start, then live (the SDK's default `resumeStreamIsReplay`).

Chunks: `start` (messageId = the turn id), `text-start`/`text-delta`/`text-end`, tool calls as
dynamic tool parts (`tool-input-available`, `tool-output-available` / `tool-output-error`), status
lines as `data-status`, the turn's end as `data-turn-end {status}` (and `error` for a failed turn),
then `finish` and `data: [DONE]`. A stream that does not reach `finish` is never ended cleanly, so
the SDK sees a broken stream rather than a short answer. Stop is `POST /v1/sessions/{sid}/stop`.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from gateway.facades.common import (
    active_turn,
    admitted,
    caller,
    derived_session,
    json_encode,
    load_record,
    read_json,
    send_turn,
    stream_sse,
    turn_events,
)
from gateway.keys import DEPS
from gateway.limits import check_session_id
from proto import client
from shared.errors import BadFrame, Forbidden, NotFound

SESSION_HEADER = "X-Tidewire-Session"
STREAM_HEADERS = {"x-vercel-ai-ui-message-stream": "v1"}
_FINISH = {"completed": "stop", "cancelled": "other", "timed_out": "length", "failed": "error"}


async def chat_session(request: web.Request, subject: str, chat_id: str, *, create: bool) -> str:
    deps = request.app[DEPS]
    if not isinstance(chat_id, str) or not 1 <= len(chat_id) <= 128:
        raise BadFrame("id must be a string of 1..128 characters")
    direct = None
    try:
        direct = await deps.eventlog.get_session(check_session_id(chat_id))
    except NotFound:
        pass
    if direct is not None:
        if direct.subject != subject:
            raise Forbidden("this chat belongs to someone else")
        return chat_id
    return await derived_session(request, subject, "ai-sdk", chat_id, prefix="ai_", create=create)


def _message_text(message: dict[str, Any]) -> str:
    parts = message.get("parts")
    if not isinstance(parts, list):
        raise BadFrame("a message needs parts")
    text = "".join(str(p.get("text", "")) for p in parts if isinstance(p, dict) and p.get("type") == "text")
    if not text:
        raise BadFrame("the last user message has no text part")
    return text


class UiChunks:
    """Tidewire events of one turn -> UI message stream chunks (deltas are passed as they come)."""

    def __init__(self, turn_id: str) -> None:
        self.turn_id = turn_id
        self._text: str | None = None
        self._n = 0

    def start(self) -> list[dict[str, Any]]:
        return [{"type": "start", "messageId": self.turn_id}]

    def _close(self) -> list[dict[str, Any]]:
        if self._text is None:
            return []
        out = [{"type": "text-end", "id": self._text}]
        self._text = None
        return out

    def feed(self, ev: client.Event) -> list[dict[str, Any]]:
        if isinstance(ev, client.Delta):
            out: list[dict[str, Any]] = []
            if self._text is None:
                self._n += 1
                self._text = f"{self.turn_id}-text-{self._n}"
                out.append({"type": "text-start", "id": self._text})
            out.append({"type": "text-delta", "id": self._text, "delta": ev.text})
            return out
        if isinstance(ev, client.Status):
            return [{"type": "data-status", "id": f"status-{ev.seq}", "data": {"text": ev.text}}]
        if isinstance(ev, client.ToolCall):
            return self._close() + [
                {
                    "type": "tool-input-available",
                    "toolCallId": ev.call_id,
                    "toolName": ev.name,
                    "input": ev.args,
                    "dynamic": True,
                }
            ]
        if isinstance(ev, client.ToolResult):
            if ev.ok:
                return [
                    {
                        "type": "tool-output-available",
                        "toolCallId": ev.call_id,
                        "output": ev.text,
                        "dynamic": True,
                    }
                ]
            return [
                {"type": "tool-output-error", "toolCallId": ev.call_id, "errorText": ev.text, "dynamic": True}
            ]
        if isinstance(ev, client.TurnEnd):
            out = self._close() + [
                {
                    "type": "data-turn-end",
                    "id": f"end-{ev.turn_id}",
                    "data": {"status": ev.status, "turn_id": ev.turn_id},
                }
            ]
            if ev.status == "failed":
                out.append({"type": "error", "errorText": "the turn failed"})
            out.append({"type": "finish", "finishReason": _FINISH[ev.status]})
            return out
        return []


async def _stream_turn(request: web.Request, sid: str, turn_id: str, user_seq: int) -> web.StreamResponse:
    async def produce(write: Any) -> None:
        chunks = UiChunks(turn_id)

        async def emit(items: list[dict[str, Any]]) -> None:
            if items:
                await write(b"".join(b"data: " + json_encode(c) + b"\n\n" for c in items))

        await emit(chunks.start())
        async for ev in turn_events(request, sid, turn_id, user_seq):
            await emit(chunks.feed(ev))
        await write(b"data: [DONE]\n\n")

    return await stream_sse(request, {**STREAM_HEADERS, SESSION_HEADER: sid}, produce)


async def post_chat(request: web.Request) -> web.StreamResponse:
    """Errors are answered in OpenAI's shape by the facades' wrapper (`in_openai_shape`)."""
    principal = caller(request)
    body = await read_json(request)
    trigger = body.get("trigger", "submit-message")
    if trigger != "submit-message":
        raise BadFrame(f"trigger {trigger!r} is not supported (a turn cannot be regenerated)")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages or not isinstance(messages[-1], dict):
        raise BadFrame("messages must be a non-empty list of UI messages")
    last = messages[-1]
    if last.get("role") != "user" or not isinstance(last.get("id"), str) or not last["id"]:
        raise BadFrame("the last message must be a user message with an id")
    if len(last["id"]) > 120:
        raise BadFrame("message ids must be at most 120 characters")
    text = _message_text(last)
    sid = await chat_session(request, principal.subject, body.get("id"), create=True)
    async with admitted(request, principal, sid):  # before the send: a refused call starts no turn
        ack = await send_turn(request, principal.subject, sid, f"ai:{last['id']}", text)
        return await _stream_turn(request, sid, ack.turn_id, ack.seq)


async def resume_chat(request: web.Request) -> web.StreamResponse:
    principal = caller(request)
    sid = await chat_session(request, principal.subject, request.match_info["chat_id"], create=False)
    turn_id = await active_turn(request, sid)
    if turn_id is None:
        return web.Response(status=204, headers={SESSION_HEADER: sid})
    record = await load_record(request, sid, turn_id)
    async with admitted(request, principal, sid):
        return await _stream_turn(request, sid, turn_id, record.user_seq)


ROUTES = [
    web.post("/v1/ai-sdk/chat", post_chat),
    web.get("/v1/ai-sdk/chat/{chat_id}/stream", resume_chat),
]
