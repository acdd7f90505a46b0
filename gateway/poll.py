"""Long-poll (`GET /v1/sessions/{sid}/poll?after=N&wait_s=25`): returns at once when events exist
after N, else when one arrives or `wait_s` passes. The answer always comes from the stores, so it
is exact; the live subscription only says when to look. A waiting poll holds one of its subject's
connection slots (gateway.limits), like a WebSocket or an SSE stream."""

from __future__ import annotations

import asyncio
import math

from aiohttp import web

from gateway import commands
from gateway.auth import authenticate, check_origin
from gateway.http_errors import http_error, json_response
from gateway.keys import DEPS, HUB, REPLAYER
from gateway.limits import EDGE, check_session_id
from proto import client
from proto.client import Event
from shared.errors import BadFrame, Degraded, TidewireError

MAX_WAIT_S = 60.0


class _Waiter:
    def __init__(self) -> None:
        self.arrived = asyncio.Event()

    def on_live(self, events: list[Event]) -> None:
        self.arrived.set()

    def resync(self) -> None:
        self.arrived.set()


async def poll_handler(request: web.Request) -> web.StreamResponse:
    deps = request.app[DEPS]
    sid = request.match_info["sid"]
    try:
        check_origin(request, deps.settings)
        principal = authenticate(request, deps.settings)
        check_session_id(sid)
        await commands.authorize(deps, sid, principal.subject)
        try:
            after = int(request.query.get("after", "0"))
            wait_s = float(request.query.get("wait_s", "25"))
        except ValueError as e:
            raise BadFrame("after and wait_s must be numbers") from e
        if after < 0 or not math.isfinite(wait_s):
            raise BadFrame("after must be >= 0 and wait_s a finite number")
        wait_s = min(MAX_WAIT_S, max(0.0, wait_s))
        async with request.app[EDGE].subjects.connection(principal.subject):
            return await _poll(request, sid, after, wait_s)
    except TidewireError as e:
        return http_error(e)


async def _poll(request: web.Request, sid: str, after: int, wait_s: float) -> web.Response:
    replayer = request.app[REPLAYER]
    hub = request.app[HUB]
    waiter = _Waiter()
    try:
        await hub.join(sid, waiter)
        try:
            last_seq = await replayer.last_seq(sid)
            if after > last_seq:
                return json_response(client.PollResponse(events=[], last_seq=last_seq, reset=True))
            raws = await replayer.page(sid, after)
            if not raws and wait_s > 0:
                try:
                    async with asyncio.timeout(wait_s):
                        await waiter.arrived.wait()
                except TimeoutError:
                    pass
                raws = await replayer.page(sid, after)
        finally:
            await hub.leave(sid, waiter)
    except TidewireError:
        raise
    except Exception as e:
        raise Degraded("event store unavailable", retry_after_ms=1000) from e
    events = [client.event_decoder.decode(r) for r in raws]
    last = max([last_seq, *(e.seq for e in events)])
    return json_response(client.PollResponse(events=events, last_seq=last))
