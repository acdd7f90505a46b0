"""Long-poll (`GET /v1/sessions/{sid}/poll?after=N&wait_s=25`): returns at once when events exist
after N, else when one arrives or `wait_s` passes. The answer always comes from the stores, so it
is exact; the live subscription only says when to look."""

from __future__ import annotations

import asyncio

from aiohttp import web

from gateway import commands
from gateway.auth import authenticate
from gateway.http_errors import http_error, json_response
from gateway.keys import DEPS, HUB, REPLAYER
from proto import client
from proto.client import Event
from shared.errors import BadFrame, TidewireError

MAX_WAIT_S = 60.0


class _Waiter:
    def __init__(self) -> None:
        self.arrived = asyncio.Event()

    def on_live(self, events: list[Event]) -> None:
        self.arrived.set()


async def poll_handler(request: web.Request) -> web.StreamResponse:
    deps = request.app[DEPS]
    sid = request.match_info["sid"]
    try:
        principal = authenticate(request, deps.settings)
        await commands.authorize(deps, sid, principal.subject)
        try:
            after = int(request.query.get("after", "0"))
            wait_s = min(MAX_WAIT_S, max(0.0, float(request.query.get("wait_s", "25"))))
        except ValueError as e:
            raise BadFrame("after and wait_s must be numbers") from e
        replayer = request.app[REPLAYER]
        hub = request.app[HUB]
        waiter = _Waiter()
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
        events = [client.event_decoder.decode(r) for r in raws]
        last = max([last_seq, *(e.seq for e in events)])
        return json_response(client.PollResponse(events=events, last_seq=last))
    except TidewireError as e:
        return http_error(e)
