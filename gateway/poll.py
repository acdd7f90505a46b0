"""Long-poll (`GET /v1/sessions/{sid}/poll?after=N&wait_s=25`): returns at once when events exist
after N, else when one arrives or `wait_s` passes. The answer always comes from the stores, so it
is exact; the live subscription only says when to look. Admission is gateway.admission's, as for
the WebSocket and SSE: a waiting poll holds one of its subject's connection slots, and a resume point
past `last_seq` (or below 0) is answered at once with `reset: true` and no events."""

from __future__ import annotations

import asyncio
import math

from aiohttp import web

from gateway.admission import Admitted, open_stream
from gateway.http_errors import json_response
from gateway.hub import Wake
from gateway.keys import HUB, REPLAYER
from proto import client
from shared.errors import BadFrame, Degraded, TidewireError

MAX_WAIT_S = 60.0


async def poll_handler(request: web.Request) -> web.StreamResponse:
    async with open_stream(
        request, request.match_info["sid"], request.query.get("after"), transport="poll"
    ) as stream:
        try:
            wait_s = float(request.query.get("wait_s", "25"))
        except ValueError as e:
            raise BadFrame("wait_s must be a number") from e
        if not math.isfinite(wait_s):
            raise BadFrame("wait_s must be a finite number")
        if stream.reset:
            return json_response(client.PollResponse(events=[], last_seq=stream.last_seq, reset=True))
        return await _poll(request, stream, min(MAX_WAIT_S, max(0.0, wait_s)))


async def _poll(request: web.Request, stream: Admitted, wait_s: float) -> web.Response:
    replayer = request.app[REPLAYER]
    hub = request.app[HUB]
    waiter = Wake()
    sid, after, last_seq = stream.session_id, stream.after, stream.last_seq
    try:
        await hub.join(sid, waiter)
        try:
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
