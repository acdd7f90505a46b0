"""The HTTP API of sessions: create, list, history, send and stop (PROTOCOL.md, SSE commands)."""

from __future__ import annotations

import msgspec
from aiohttp import web

from gateway import commands
from gateway.auth import authenticate
from gateway.http_errors import http_error, json_response
from gateway.keys import DEPS, REPLAYER
from proto import client
from shared.errors import BadFrame, TidewireError, TooLarge
from shared.subjects import rkey


async def _body(request: web.Request) -> bytes:
    limit = request.app[DEPS].settings.max_frame_bytes
    if request.content_length is not None and request.content_length > limit:
        raise TooLarge(f"body larger than {limit} bytes")
    body = await request.content.read(limit + 1)
    if len(body) > limit:
        raise TooLarge(f"body larger than {limit} bytes")
    return body


async def create_session(request: web.Request) -> web.Response:
    deps = request.app[DEPS]
    try:
        principal = authenticate(request, deps.settings)
        body = await _body(request)
        flags = {}
        if body.strip():
            try:
                flags = commands.validate_flags(dict(msgspec.json.decode(body).get("flags") or {}))
            except (msgspec.DecodeError, AttributeError, TypeError) as e:
                raise BadFrame(f"invalid body: {e}") from e
        sid = await commands.create_session(deps, principal.subject)
        if flags:
            await deps.eventlog.set_session_flags(sid, flags)
    except TidewireError as e:
        return http_error(e)
    return json_response(client.CreateSessionResponse(session_id=sid), status=201)


async def list_sessions(request: web.Request) -> web.Response:
    deps = request.app[DEPS]
    try:
        principal = authenticate(request, deps.settings)
        rows = await deps.eventlog.list_sessions(principal.subject)
    except TidewireError as e:
        return http_error(e)
    return json_response({"sessions": [{"session_id": r.session_id, "created_at": r.created_at,
                                        "title": r.title} for r in rows]})


async def get_session(request: web.Request) -> web.Response:
    deps = request.app[DEPS]
    sid = request.match_info["sid"]
    try:
        principal = authenticate(request, deps.settings)
        await commands.authorize(deps, sid, principal.subject)
        messages = await deps.eventlog.history(sid)
        last_seq = await request.app[REPLAYER].last_seq(sid)
    except TidewireError as e:
        return http_error(e)
    return json_response(client.SessionHistory(session_id=sid, last_seq=last_seq, messages=messages))


async def post_message(request: web.Request) -> web.Response:
    deps = request.app[DEPS]
    sid = request.match_info["sid"]
    try:
        principal = authenticate(request, deps.settings)
        await commands.authorize(deps, sid, principal.subject)
        try:
            req = client.send_request_decoder.decode(await _body(request))
        except msgspec.DecodeError as e:
            raise BadFrame(f"invalid body: {e}") from e
        ack = await commands.send_message(deps, principal.subject, sid, req)
    except TidewireError as e:
        return http_error(e)
    return json_response(ack)


async def post_stop(request: web.Request) -> web.Response:
    deps = request.app[DEPS]
    sid = request.match_info["sid"]
    try:
        principal = authenticate(request, deps.settings)
        await commands.authorize(deps, sid, principal.subject)
        body = await _body(request)
        try:
            req = client.stop_request_decoder.decode(body) if body.strip() else client.StopRequest()
        except msgspec.DecodeError as e:
            raise BadFrame(f"invalid body: {e}") from e
        turn_id = await commands.stop_turn(deps, sid, req.turn_id)
    except TidewireError as e:
        return http_error(e)
    return json_response({"stopped": turn_id is not None, "turn_id": turn_id}, status=202)


async def patch_flags(request: web.Request) -> web.Response:
    """Extension: `PATCH /v1/sessions/{sid}/flags {name: value}` sets per-session policies, applied to
    new turns (double_text_policy, disconnect_policy, model, system_prompt_version)."""
    deps = request.app[DEPS]
    sid = request.match_info["sid"]
    try:
        principal = authenticate(request, deps.settings)
        await commands.authorize(deps, sid, principal.subject)
        try:
            flags = commands.validate_flags(dict(msgspec.json.decode(await _body(request))))
        except (msgspec.DecodeError, TypeError, ValueError) as e:
            raise BadFrame(f"invalid body: {e}") from e
        await deps.eventlog.set_session_flags(sid, flags)
        deps.flag_cache.pop(sid, None)
        await deps.checkpoints.redis.delete(rkey(sid, "state"))
        row = await deps.eventlog.get_session(sid)
    except TidewireError as e:
        return http_error(e)
    return json_response({"session_id": sid, "flags": row.flags if row else flags})
