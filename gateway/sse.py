"""Server-Sent Events (`GET /v1/sessions/{sid}/events`): the same feed as the WebSocket, written as
`id: <seq>` / `event: <type>` / `data: <json>` records, with a comment line as heartbeat.

Resume point: `?after=N`, or the `Last-Event-ID` header a browser's EventSource sends on its own.
A stream holds one of its subject's connection slots (gateway.limits) for as long as it is open.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

from aiohttp import web

from gateway import commands
from gateway.auth import authenticate, check_origin
from gateway.delivery import OutboundBuffer
from gateway.http_errors import http_error
from gateway.keys import DEPS, HUB, REPLAYER, SSE_STREAMS, StreamStop
from gateway.limits import EDGE, check_session_id
from gateway.stream import Feed, run_sender
from proto import client
from shared.errors import BadFrame, TidewireError


def _after(request: web.Request) -> int | None:
    raw = request.headers.get("Last-Event-ID") or request.query.get("after")
    if raw is None or raw == "":
        return None
    try:
        return int(raw)
    except ValueError as e:
        raise BadFrame("after / Last-Event-ID must be an integer") from e


def _record(frame: client.ServerFrame) -> bytes:
    data = client.json_encoder.encode(frame)
    tag = type(frame).__struct_config__.tag
    seq = getattr(frame, "seq", None)
    head = b"id: %d\n" % seq if isinstance(seq, int) else b""
    return head + b"event: " + str(tag).encode() + b"\ndata: " + data + b"\n\n"


async def sse_handler(request: web.Request) -> web.StreamResponse:
    deps = request.app[DEPS]
    sid = request.match_info["sid"]
    edge = request.app[EDGE]
    try:
        check_origin(request, deps.settings)
        principal = authenticate(request, deps.settings)
        check_session_id(sid)
        await commands.authorize(deps, sid, principal.subject)
        after = _after(request)
        mode = request.query.get("delivery", "tokens")
        if mode not in ("tokens", "phrases", "batched"):
            raise BadFrame("delivery must be tokens, phrases or batched")
        replayer = request.app[REPLAYER]
        last_seq = await replayer.last_seq(sid)
        slot = await edge.subjects.acquire(principal.subject)
    except TidewireError as e:
        return http_error(e)
    try:
        return await _stream(request, sid, after, mode, last_seq)
    finally:
        await asyncio.shield(edge.subjects.release(slot))


async def _stream(request: web.Request, sid: str, after: int | None, mode: str, last_seq: int) -> web.StreamResponse:
    deps = request.app[DEPS]
    replayer = request.app[REPLAYER]
    start = after if after is not None else 0
    reset = start > last_seq or start < 0
    if reset:
        start = last_seq
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                       "X-Accel-Buffering": "no"})
    await resp.prepare(request)
    stopper = StreamStop()
    request.app[SSE_STREAMS].add(stopper)  # a drain sets stopper.stop; the stream then ends cleanly
    deps.counters.sse_streams += 1
    if after:
        deps.counters.resumes += 1
    buffer = OutboundBuffer(mode, max_frames=deps.settings.outbound_max_frames,  # type: ignore[arg-type]
                            max_chars=deps.settings.outbound_max_chars)
    feed = Feed(sid, start, buffer, replayer, request.app[HUB])
    feed.push(client.Ready(session_id=sid, last_seq=last_seq, reset=reset))
    last_write = time.monotonic()

    async def write(frames: list[client.ServerFrame]) -> None:
        nonlocal last_write
        async with asyncio.timeout(10):
            await resp.write(b"".join(_record(f) for f in frames))
        last_write = time.monotonic()

    async def heartbeat() -> None:
        while True:
            await asyncio.sleep(deps.settings.sse_heartbeat_s / 3)
            if time.monotonic() - last_write >= deps.settings.sse_heartbeat_s * 0.66:
                async with asyncio.timeout(10):
                    await resp.write(b": hb\n\n")

    try:
        async with asyncio.TaskGroup() as tg:
            tasks = [tg.create_task(feed.run()), tg.create_task(run_sender(feed, write)),
                     tg.create_task(heartbeat()), tg.create_task(stopper.stop.wait())]
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for t in tasks:
                t.cancel()
    except* (ConnectionError, TimeoutError, RuntimeError, asyncio.CancelledError):
        pass
    finally:
        deps.counters.sse_streams -= 1
        if stopper.stop.is_set():
            resp.force_close()  # draining: no keep-alive wait for a next request
        with contextlib.suppress(Exception):
            await resp.write_eof()
        stopper.done.set()
    return resp
