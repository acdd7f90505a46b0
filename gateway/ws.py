"""The WebSocket transport (`GET /v1/ws`): a receive loop plus a sender task per connection.

The first client frame must be `hello`; the server answers `ready`, replays what the client
missed, then streams live (gateway.stream). Errors about one frame are answered with an `error`
frame and the connection stays usable. Close codes are the protocol's: 4401, 4403, 4408, 4410
(too far behind: resume), 4429, 1012 (server restarting); aiohttp itself fails a connection that
breaks the WebSocket protocol (1002), sends invalid UTF-8 (1007) or a message over
`4 * max_frame_bytes` (1009). A message over `max_frame_bytes` (and under that) gets `too_large`.

Edge protection (gateway.limits): every frame costs a token of the connection's frame bucket and
every `send` one of its message bucket and one of its subject's (shared by all gateways); over a
rate the frame is answered `rate_limited` and dropped. The receive loop yields to the event loop
every `receive_yield_every` frames, so a client flooding one socket cannot starve the others.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import msgspec
from aiohttp import WSMsgType, web

from gateway import commands
from gateway.auth import Principal, authenticate, check_origin
from gateway.delivery import OutboundBuffer
from gateway.deps import Deps
from gateway.keys import DEPS, HUB, REPLAYER, SOCKETS
from gateway.limits import EDGE, ConnectionLimits, Edge, check_session_id
from gateway.stream import Feed, run_sender
from proto import client
from shared.errors import (
    BadFrame,
    Forbidden,
    NotFound,
    RateLimited,
    TidewireError,
    TooLarge,
    Unauthorized,
    from_dependency,
)

log = logging.getLogger(__name__)

CLOSE_UNAUTHORIZED = 4401
CLOSE_FORBIDDEN = 4403
CLOSE_HEARTBEAT = 4408
CLOSE_TOO_SLOW = 4410
CLOSE_TOO_MANY = 4429
CLOSE_RESTARTING = 1012
HELLO_TIMEOUT_S = 10.0


class Connection:
    def __init__(self, request: web.Request, ws: web.WebSocketResponse, principal: Principal) -> None:
        self.request = request
        self.ws = ws
        self.principal = principal
        self.deps: Deps = request.app[DEPS]
        self.edge: Edge = request.app[EDGE]
        self.limits = ConnectionLimits(self.deps.settings)
        self.frames_received = 0
        self.feed: Feed | None = None
        self.last_rx = time.monotonic()
        self.pre_hello: list[client.ServerFrame] = []
        self.tasks: list[asyncio.Task[None]] = []  # owned by the connection, cancelled when it ends

    def reply(self, frame: client.ServerFrame) -> None:
        if self.feed is not None:
            self.feed.push(frame)
        else:
            self.pre_hello.append(frame)

    async def write(self, frames: list[client.ServerFrame]) -> None:
        async with asyncio.timeout(10):
            for f in frames:
                await self.ws.send_str(client.json_encoder.encode(f).decode())

    async def on_hello(self, hello: client.Hello, tg: asyncio.TaskGroup) -> None:
        deps = self.deps
        if hello.session_id is None:
            sid = await commands.create_session(deps, self.principal.subject)
        else:
            sid = check_session_id(hello.session_id)
            await commands.authorize(deps, sid, self.principal.subject)
        replayer = self.request.app[REPLAYER]
        last_seq = await replayer.last_seq(sid)
        after = hello.last_seen_seq if hello.last_seen_seq is not None else 0
        reset = after > last_seq or after < 0
        if reset:
            after = last_seq
            deps.counters.resets += 1
        elif hello.last_seen_seq:
            deps.counters.resumes += 1
        buffer = OutboundBuffer(hello.delivery, max_frames=deps.settings.outbound_max_frames,
                                max_chars=deps.settings.outbound_max_chars)
        self.feed = Feed(sid, after, buffer, replayer, self.request.app[HUB])
        for f in self.pre_hello:
            self.feed.push(f)
        self.pre_hello.clear()
        self.feed.push(client.Ready(session_id=sid, last_seq=last_seq, reset=reset))
        self.tasks += [tg.create_task(self.feed.run(), name=f"feed-{sid}"),
                       tg.create_task(run_sender(self.feed, self.write), name=f"sender-{sid}")]

    async def handle_text(self, data: str, tg: asyncio.TaskGroup) -> None:
        limit = self.deps.settings.max_frame_bytes
        if len(data) > limit or (len(data) * 4 > limit and len(data.encode()) > limit):
            raise TooLarge(f"frame larger than {limit} bytes")
        try:
            frame = client.client_frame_decoder.decode(data)
        except msgspec.DecodeError as e:
            self.deps.counters.bad_frames += 1
            raise BadFrame(f"invalid frame: {e}") from e
        except RecursionError as e:
            self.deps.counters.bad_frames += 1
            raise BadFrame("invalid frame: nested too deeply") from e
        if isinstance(frame, client.Ping):
            self.reply(client.Pong())
        elif isinstance(frame, client.Hello):
            if self.feed is not None:
                raise BadFrame("hello was already received on this connection")
            await self.on_hello(frame, tg)
        elif self.feed is None:
            raise BadFrame("the first frame must be hello")
        elif isinstance(frame, client.Send):
            await self.edge.admit_send(self.principal.subject, self.limits, frame.client_msg_id, frame.text)
            ack = await commands.send_message(self.deps, self.principal.subject, self.feed.session_id, frame)
            self.reply(ack)
        elif isinstance(frame, client.Stop):
            await commands.stop_turn(self.deps, self.feed.session_id, frame.turn_id)

    async def heartbeat(self) -> None:
        s = self.deps.settings
        while True:
            await asyncio.sleep(s.ws_heartbeat_s)
            if time.monotonic() - self.last_rx > s.ws_heartbeat_s + s.ws_heartbeat_timeout_s:
                await self.ws.close(code=CLOSE_HEARTBEAT, message=b"heartbeat timeout")
                return
            with contextlib.suppress(ConnectionError, RuntimeError):
                await self.ws.ping()

    async def expiry(self) -> None:
        await asyncio.sleep(max(0.0, self.principal.expires_at - time.time()))
        await self.ws.close(code=CLOSE_UNAUTHORIZED, message=b"token expired")

    async def receive_loop(self, tg: asyncio.TaskGroup) -> None:
        ws = self.ws
        async with asyncio.timeout(HELLO_TIMEOUT_S):
            while self.feed is None:
                if not await self._receive_one(tg):
                    return
        while await self._receive_one(tg):
            if self.feed is not None and self.feed.failure is not None:
                await ws.close(code=CLOSE_TOO_SLOW, message=_reason(self.feed.failure))
                self.deps.counters.slow_consumers += 1
                return

    async def _receive_one(self, tg: asyncio.TaskGroup) -> bool:
        msg = await self.ws.receive()
        self.last_rx = time.monotonic()
        self.frames_received += 1
        if self.frames_received % self.deps.settings.receive_yield_every == 0:
            await asyncio.sleep(0)  # buffered frames are returned without a suspension point
        if msg.type in (WSMsgType.TEXT, WSMsgType.BINARY):
            try:
                self.limits.frame()
            except RateLimited as e:
                self.edge.counters.rate_limited_frames += 1
                self.reply(e.frame())
                await self._flush_pre_hello()
                return True
        if msg.type == WSMsgType.TEXT:
            await self._guarded(msg.data, tg)
        elif msg.type == WSMsgType.BINARY:
            self.deps.counters.bad_frames += 1
            self.reply(client.Error(code="bad_frame", message="binary frames are not supported; send JSON text"))
            await self._flush_pre_hello()
        elif msg.type == WSMsgType.PING:
            await self.ws.pong(msg.data)
        elif msg.type == WSMsgType.PONG:
            pass
        elif msg.type == WSMsgType.ERROR:
            self.reply(client.Error(code="too_large" if "size" in str(msg.data) else "bad_frame",
                                    message=str(msg.data)[:200]))
            return not self.ws.closed
        else:
            return False
        return True

    async def _guarded(self, data: str, tg: asyncio.TaskGroup) -> None:
        try:
            await self.handle_text(data, tg)
        except (Unauthorized, Forbidden, NotFound) as e:
            if self.feed is None:
                code = CLOSE_UNAUTHORIZED if isinstance(e, Unauthorized) else CLOSE_FORBIDDEN
                await self.ws.close(code=code, message=_reason(e.message))
            else:
                self.reply(e.frame())
        except TidewireError as e:
            self.reply(e.frame())
        except Exception as e:
            degraded = from_dependency(e)
            if degraded is not None:
                log.warning("dependency failure handling a frame: %r", e)
                self.deps.counters.degraded += 1
                self.reply(degraded.frame())
            else:
                log.exception("internal error handling a frame")
                self.reply(client.Error(code="internal", message="internal error; nothing was accepted"))
        await self._flush_pre_hello()

    async def _flush_pre_hello(self) -> None:
        """Before `hello` there is no feed (and no sender task): answers are written directly."""
        if self.feed is None and self.pre_hello and not self.ws.closed:
            frames, self.pre_hello = self.pre_hello, []
            await self.write(frames)


def _reason(text: str) -> bytes:
    """A close reason: at most 123 bytes of valid UTF-8."""
    return text.encode()[:120].decode(errors="ignore").encode()


async def websocket_handler(request: web.Request) -> web.StreamResponse:
    deps = request.app[DEPS]
    edge = request.app[EDGE]
    ws = web.WebSocketResponse(autoping=False, max_msg_size=deps.settings.max_frame_bytes * 4, compress=False)
    principal: Principal | None = None
    refusal: tuple[int, str] | None = None
    slot = None
    try:
        check_origin(request, deps.settings)
        principal = authenticate(request, deps.settings)
    except Unauthorized as e:
        refusal = (CLOSE_UNAUTHORIZED, e.message)
    except Forbidden as e:
        refusal = (CLOSE_FORBIDDEN, e.message)
    if deps.draining:
        refusal = (CLOSE_RESTARTING, "server restarting")
    if refusal is None and principal is not None:
        try:
            slot = await edge.subjects.acquire(principal.subject)
        except RateLimited as e:
            refusal = (CLOSE_TOO_MANY, e.message)
    try:
        await ws.prepare(request)
        if refusal is not None or principal is None:
            code, reason = refusal or (CLOSE_UNAUTHORIZED, "unauthorized")
            await ws.close(code=code, message=_reason(reason))
            return ws
        await _serve(request, ws, principal)
    finally:
        if slot is not None:
            await asyncio.shield(edge.subjects.release(slot))
    return ws


async def _serve(request: web.Request, ws: web.WebSocketResponse, principal: Principal) -> None:
    deps = request.app[DEPS]
    conn = Connection(request, ws, principal)
    sockets = request.app[SOCKETS]
    sockets.add(ws)
    deps.counters.sockets += 1
    try:
        async with asyncio.TaskGroup() as tg:
            conn.tasks += [tg.create_task(conn.heartbeat()), tg.create_task(conn.expiry())]
            try:
                await conn.receive_loop(tg)
            except TimeoutError:
                await ws.close(code=CLOSE_HEARTBEAT, message=b"no hello")
            finally:
                for t in conn.tasks:  # heartbeat, expiry, feed and sender end with the connection
                    t.cancel()
    except* (ConnectionError, asyncio.CancelledError):
        pass
    finally:
        sockets.discard(ws)
        deps.counters.sockets -= 1
        if not ws.closed:
            await ws.close()
