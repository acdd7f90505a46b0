"""OpenAI Chat Completions over tidewire turns (`POST /v1/chat/completions`, `GET /v1/models`).

Stateless for the client: each call is one turn of the session named by the `X-Tidewire-Session`
header; or of the session derived from the client's own conversation key (`X-Tidewire-Chat`, or the
`X-OpenWebUI-Chat-Id` that Open WebUI forwards), created on first use, so a chat UI that resends the
whole conversation on every call keeps one session per conversation; or of a new session. The
session's id comes back in `X-Tidewire-Session`. The session holds the history, so only the last
user message of `messages` is sent as the turn's text; earlier messages are not replayed into a new
session. `Idempotency-Key` works as on `/v1/responses`. The completion id is
`chatcmpl-<turn_id>`. Tool activity and status lines run on the server and are not carried here
(the Responses facade and the AI SDK stream carry them); stop is `POST /v1/sessions/{sid}/stop`.
"""

from __future__ import annotations

import time
from typing import Any

from aiohttp import web

from gateway import commands
from gateway.facades.common import (
    SETTINGS,
    admitted,
    caller,
    derived_session,
    idempotency_key,
    json_encode,
    new_session,
    owned_session,
    read_json,
    send_turn,
    session_for_key,
    stream_sse,
    turn_events,
)
from gateway.facades.errors import error_body, openai_error
from gateway.facades.responses import _content_text
from gateway.keys import DEPS
from proto import client
from shared.errors import BadFrame, Internal

SESSION_HEADER = "X-Tidewire-Session"
CHAT_HEADERS = ("X-Tidewire-Chat", "X-OpenWebUI-Chat-Id")

_FINISH = {"completed": "stop", "cancelled": "stop", "timed_out": "length"}


def last_user_text(messages: Any) -> str:
    if not isinstance(messages, list) or not messages:
        raise BadFrame("messages must be a non-empty list")
    for m in reversed(messages):
        if not isinstance(m, dict):
            raise BadFrame("messages must be objects")
        if m.get("role") == "user":
            text = _content_text(m.get("content"))
            if text:
                return text
    raise BadFrame("messages has no user message")


def _usage(prompt: str, answer: str) -> dict[str, int]:
    """An estimate (4 characters a token): tidewire counts usage per provider, not per call."""
    p, c = max(1, len(prompt) // 4), len(answer) // 4
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


async def chat_completions(request: web.Request) -> web.StreamResponse:
    deps = request.app[DEPS]
    principal = caller(request)
    body = await read_json(request)
    text = last_user_text(body.get("messages"))
    model = body.get("model") if isinstance(body.get("model"), str) else request.app[SETTINGS].models[0]
    key = idempotency_key(request)
    named = request.headers.get(SESSION_HEADER)
    chat = next((v for h in CHAT_HEADERS if (v := request.headers.get(h))), None)
    if named:
        sid = await owned_session(deps, named, principal.subject)
    elif chat is not None:
        sid = await derived_session(
            request, principal.subject, "chat", chat, prefix="cc_", create=True, model=model
        )
    elif key is not None:
        sid = await session_for_key(request, principal.subject, "chat", key, model)
    else:
        sid = await new_session(request, principal.subject, model)
    cmid = f"idem:{key}" if key is not None else commands.new_id("cc_")
    async with admitted(request, principal, sid):  # before the send: a refused call starts no turn
        return await _answer(request, body, model, text, sid, cmid, principal.subject)


async def _answer(
    request: web.Request, body: dict[str, Any], model: str, text: str, sid: str, cmid: str, subject: str
) -> web.StreamResponse:
    ack = await send_turn(request, subject, sid, cmid, text)
    created = int(time.time())
    cid = f"chatcmpl-{ack.turn_id}"
    headers = {SESSION_HEADER: sid}
    if body.get("stream"):
        include_usage = isinstance(body.get("stream_options"), dict) and bool(
            body["stream_options"].get("include_usage")
        )

        async def produce(write: Any) -> None:
            def chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> bytes:
                obj = {
                    "id": cid,
                    "object": "chat.completion.chunk",
                    "created": created,
                    "model": model,
                    "system_fingerprint": None,
                    "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
                    **extra,
                }
                return b"data: " + json_encode(obj) + b"\n\n"

            await write(chunk({"role": "assistant", "content": ""}))
            async for ev in turn_events(request, sid, ack.turn_id, ack.seq):
                if isinstance(ev, client.Delta):
                    await write(chunk({"content": ev.text}))
                elif isinstance(ev, client.TurnEnd):
                    if ev.status == "failed":
                        await write(
                            b"data: " + json_encode(error_body(Internal("the turn failed"))) + b"\n\n"
                        )
                    else:
                        tail = chunk({}, _FINISH[ev.status], tidewire_status=ev.status)
                        if include_usage:
                            tail += (
                                b"data: "
                                + json_encode(
                                    {
                                        "id": cid,
                                        "object": "chat.completion.chunk",
                                        "created": created,
                                        "model": model,
                                        "choices": [],
                                        "usage": _usage(text, ev.text),
                                    }
                                )
                                + b"\n\n"
                            )
                        await write(tail)
                    await write(b"data: [DONE]\n\n")

        return await stream_sse(request, headers, produce)
    end: client.TurnEnd | None = None
    async for ev in turn_events(request, sid, ack.turn_id, ack.seq):
        if isinstance(ev, client.TurnEnd):
            end = ev
    assert end is not None
    if end.status == "failed":
        return openai_error(Internal("the turn failed"))
    return web.json_response(
        {
            "id": cid,
            "object": "chat.completion",
            "created": created,
            "model": model,
            "system_fingerprint": None,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": end.text, "refusal": None},
                    "logprobs": None,
                    "finish_reason": _FINISH[end.status],
                }
            ],
            "usage": _usage(text, end.text),
            "tidewire_status": end.status,
        },
        headers=headers,
        dumps=lambda o: json_encode(o).decode(),
    )


async def list_models(request: web.Request) -> web.StreamResponse:
    caller(request)
    return web.json_response(
        {
            "object": "list",
            "data": [
                {"id": m, "object": "model", "created": 0, "owned_by": "tidewire"}
                for m in request.app[SETTINGS].models
            ],
        }
    )


ROUTES = [
    web.post("/v1/chat/completions", chat_completions),
    web.get("/v1/models", list_models),
]
