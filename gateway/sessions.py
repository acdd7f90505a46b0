"""The HTTP API of sessions: create, list, history, send and stop (PROTOCOL.md, SSE commands).

Every handler admits its caller as every transport does (gateway/admission.py `admit_caller`: the
Origin of a browser request, 403, then the token, 401), then checks the session id's form (404) and
its ownership (403). A body is read up to
`max_frame_bytes` (413 beyond); an undecodable one (bad JSON, invalid UTF-8, nesting too deep, wrong
types) is a 400. Sends pass the same edge checks as on a WebSocket (gateway.limits): shedding
(`degraded`) and the subject's message rate (`rate_limited`).
"""

from __future__ import annotations

from typing import TypeVar

import msgspec
from aiohttp import web

from gateway import commands
from gateway.admission import admit_caller
from gateway.auth import Principal
from gateway.history import session_history
from gateway.http_errors import json_response
from gateway.keys import DEPS
from gateway.limits import EDGE, check_session_id, check_text
from gateway.openapi import (
    FlagsResponse,
    SessionFlags,
    SessionList,
    SessionSummary,
    create_session_decoder,
    session_flags_decoder,
)
from proto import client
from shared import sessionstate
from shared.errors import BadFrame, TooLarge


async def read_body(request: web.Request) -> bytes:
    """The whole body, at most `max_frame_bytes` (the app's client_max_size) of it."""
    limit = request.app[DEPS].settings.max_frame_bytes
    if request.content_length is not None and request.content_length > limit:
        raise TooLarge(f"body larger than {limit} bytes")
    try:
        body = await request.read()
    except web.HTTPRequestEntityTooLarge as e:
        raise TooLarge(f"body larger than {limit} bytes") from e
    if len(body) > limit:
        raise TooLarge(f"body larger than {limit} bytes")
    return body


T = TypeVar("T")

# what a malformed body can raise while it is decoded: JSON errors, invalid UTF-8, nesting too deep
_UNDECODABLE = (msgspec.DecodeError, UnicodeDecodeError, RecursionError)


async def _owner(request: web.Request) -> tuple[Principal, str]:
    """The caller, if it owns the session of the path."""
    principal = admit_caller(request)
    sid = check_session_id(request.match_info["sid"])
    await commands.authorize(request.app[DEPS], sid, principal.subject)
    return principal, sid


def _decode(decoder: msgspec.json.Decoder[T], body: bytes) -> T:
    try:
        return decoder.decode(body)
    except _UNDECODABLE as e:
        raise BadFrame(f"invalid body: {str(e)[:200]}") from e


def _flags(flags: SessionFlags | None) -> dict[str, object]:
    if flags is None:
        return {}
    values = {k: v for k, v in msgspec.structs.asdict(flags).items() if v is not None}
    for name, value in values.items():
        check_text(name, str(value))  # Postgres jsonb cannot hold NUL
    return commands.validate_flags(values)


async def create_session(request: web.Request) -> web.Response:
    deps = request.app[DEPS]
    principal = admit_caller(request)
    body = await read_body(request)
    flags = _flags(_decode(create_session_decoder, body).flags) if body.strip() else {}
    sid = await commands.create_session(deps, principal.subject)
    if flags:
        await deps.eventlog.set_session_flags(sid, flags)
    return json_response(client.CreateSessionResponse(session_id=sid), status=201)


async def list_sessions(request: web.Request) -> web.Response:
    deps = request.app[DEPS]
    principal = admit_caller(request)
    rows = await deps.eventlog.list_sessions(principal.subject)
    return json_response(
        SessionList(
            sessions=[
                SessionSummary(session_id=r.session_id, created_at=r.created_at, title=r.title) for r in rows
            ]
        )
    )


async def get_session(request: web.Request) -> web.Response:
    deps = request.app[DEPS]
    _, sid = await _owner(request)
    return json_response(await session_history(deps, sid))


async def post_message(request: web.Request) -> web.Response:
    deps = request.app[DEPS]
    principal, sid = await _owner(request)
    req = _decode(client.send_request_decoder, await read_body(request))
    admitted = request.app[EDGE].admit_send(principal.subject, None, req.client_msg_id, req.text)
    ack = await commands.send_message(deps, principal.subject, sid, req, admitted=admitted)
    return json_response(ack)


async def post_stop(request: web.Request) -> web.Response:
    deps = request.app[DEPS]
    _, sid = await _owner(request)
    body = await read_body(request)
    req = _decode(client.stop_request_decoder, body) if body.strip() else client.StopRequest()
    turn_id = await commands.stop_turn(deps, sid, req.turn_id)
    return json_response({"stopped": turn_id is not None, "turn_id": turn_id}, status=202)


async def patch_flags(request: web.Request) -> web.Response:
    """Extension: `PATCH /v1/sessions/{sid}/flags {name: value}` sets per-session policies, applied to
    new turns (double_text_policy, disconnect_policy, model, system_prompt_version)."""
    deps = request.app[DEPS]
    _, sid = await _owner(request)
    flags = _flags(_decode(session_flags_decoder, await read_body(request)))
    await deps.eventlog.set_session_flags(sid, flags)
    deps.flag_cache.pop(sid, None)
    await sessionstate.invalidate(deps.checkpoints, sid)
    row = await deps.eventlog.get_session(sid)
    return json_response(FlagsResponse(session_id=sid, flags=row.flags if row else flags))
