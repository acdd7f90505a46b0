"""Server-Sent Events (`GET /v1/sessions/{sid}/events`): the same feed as the WebSocket, written as
`id: <seq>` / `event: <type>` / `data: <json>` records, with a comment line as heartbeat.

Resume point: `?after=N`, or the `Last-Event-ID` header a browser's EventSource sends on its own.
Admission (Origin, token, session, the subject's connection slot held while the stream is open,
resume point and reset) is gateway.admission's, as for the WebSocket and long-poll; a refusal is
an HTTP error, since nothing has been streamed yet.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

from aiohttp import web

from gateway.admission import Admitted, open_stream
from gateway.delivery import OutboundBuffer
from gateway.keys import DEPS, HUB, REPLAYER, SSE_STREAMS, StreamStop
from gateway.stream import Feed, run_sender
from proto import client
from shared.errors import BadFrame


def _record(frame: client.ServerFrame) -> bytes:
    data = client.json_encoder.encode(frame)
    tag = type(frame).__struct_config__.tag
    seq = getattr(frame, "seq", None)
    head = b"id: %d\n" % seq if isinstance(seq, int) else b""
    return head + b"event: " + str(tag).encode() + b"\ndata: " + data + b"\n\n"


async def sse_handler(request: web.Request) -> web.StreamResponse:
    after = request.headers.get("Last-Event-ID") or request.query.get("after")
    async with open_stream(request, request.match_info["sid"], after, transport="sse") as stream:
        mode = request.query.get("delivery", "tokens")
        if mode not in ("tokens", "phrases", "batched"):
            raise BadFrame("delivery must be tokens, phrases or batched")
        return await _stream(request, stream, mode)


async def _stream(request: web.Request, stream: Admitted, mode: str) -> web.StreamResponse:
    deps = request.app[DEPS]
    sid = stream.session_id
    resp = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    )
    await resp.prepare(request)
    stopper = StreamStop()
    request.app[SSE_STREAMS].add(stopper)  # a drain sets stopper.stop; the stream then ends cleanly
    deps.counters.sse_streams += 1
    buffer = OutboundBuffer(
        mode,  # type: ignore[arg-type]
        max_frames=deps.settings.outbound_max_frames,
        max_chars=deps.settings.outbound_max_chars,
    )
    feed = Feed(sid, stream.after, buffer, request.app[REPLAYER], request.app[HUB])
    feed.push(client.Ready(session_id=sid, last_seq=stream.last_seq, reset=stream.reset))
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
            tasks = [
                tg.create_task(feed.run()),
                tg.create_task(run_sender(feed, write)),
                tg.create_task(heartbeat()),
                tg.create_task(stopper.stop.wait()),
            ]
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
