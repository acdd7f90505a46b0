"""The WebSocket transport (`GET /v1/ws`): a receive loop plus a sender task per connection.

The first client frame must be `hello`; the server answers `ready`, replays what the client
missed, then streams live (gateway.stream). Errors about one frame are answered with an `error`
frame and the connection stays usable. Close codes are the protocol's (shared.errors.CloseCode:
4401, 4403, 4408, 4410 too far behind: resume, 4429, 1012 server restarting) and the choice between
a close and an error frame is `shared.errors.outcome`'s. Admission is gateway.admission's, as for
SSE and long-poll: Origin and token at the upgrade; session id, ownership, the subject's connection
slot (held until the socket ends) and the resume point at `hello`. aiohttp itself fails a connection that
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
from aiohttp import WSCloseCode, WSMsgType, web

from gateway import commands
from gateway.admission import admit_caller, open_stream
from gateway.auth import Principal
from gateway.delivery import OutboundBuffer
from gateway.deps import Deps
from gateway.keys import DEPS, HUB, REPLAYER, SOCKETS
from gateway.limits import EDGE, ConnectionLimits, Edge
from gateway.stream import Feed, run_sender
from proto import client
from shared import errors
from shared.errors import BadFrame, CloseCode, Disconnect, RateLimited, TidewireError, TooLarge, outcome

log = logging.getLogger(__name__)

CLOSE_RESTARTING = CloseCode.RESTARTING  # read by gateway.app's drain
HELLO_TIMEOUT_S = 10.0


encode_frame = client.json_encoder.encode


def text_frames(payloads: list[bytes]) -> bytes:
    """Whole, unmasked text frames (RFC 6455 §5.2, server to client; compression is off), ready to
    be written to the socket at once."""
    out = bytearray()
    for p in payloads:
        n = len(p)
        if n < 126:
            out += bytes((0x81, n))
        elif n < 1 << 16:
            out += b"\x81\x7e" + n.to_bytes(2, "big")
        else:
            out += b"\x81\x7f" + n.to_bytes(8, "big")
        out += p
    return bytes(out)


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
        self.admission = contextlib.AsyncExitStack()  # the admitted stream's slot, released when it ends

    def reply(self, frame: client.ServerFrame) -> None:
        if self.feed is not None:
            self.feed.push(frame)
        else:
            self.pre_hello.append(frame)

    async def write(self, frames: list[client.ServerFrame]) -> None:
        """Frames the sender released together go in one socket write while the socket keeps up
        (its transport holds nothing unsent): one syscall for a batch of deltas instead of one each.
        Once it falls behind, each frame goes through aiohttp, whose writes wait for the socket to
        drain, so a slow reader still backs up into the outbound buffer (which merges) and nowhere else."""
        payloads = [encode_frame(f) for f in frames]
        transport = self.request.transport
        if (
            transport is not None
            and not self.ws.closed
            and not transport.is_closing()
            and transport.get_write_buffer_size() == 0
        ):
            transport.write(text_frames(payloads))
            return
        async with asyncio.timeout(10):
            for p in payloads:
                await self.ws.send_frame(p, WSMsgType.TEXT)

    async def on_hello(self, hello: client.Hello, tg: asyncio.TaskGroup) -> None:
        deps = self.deps
        stream = await self.admission.enter_async_context(
            open_stream(
                self.request, hello.session_id, hello.last_seen_seq, transport="ws", principal=self.principal
            )
        )
        sid = stream.session_id
        buffer = OutboundBuffer(
            hello.delivery,
            max_frames=deps.settings.outbound_max_frames,
            max_chars=deps.settings.outbound_max_chars,
        )
        self.feed = Feed(sid, stream.after, buffer, self.request.app[REPLAYER], self.request.app[HUB])
        for f in self.pre_hello:
            self.feed.push(f)
        self.pre_hello.clear()
        self.feed.push(client.Ready(session_id=sid, last_seq=stream.last_seq, reset=stream.reset))
        self.tasks += [
            tg.create_task(self.feed.run(), name=f"feed-{sid}"),
            tg.create_task(run_sender(self.feed, self.write), name=f"sender-{sid}"),
        ]

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
            admitted = self.edge.admit_send(
                self.principal.subject, self.limits, frame.client_msg_id, frame.text
            )
            ack = await commands.send_message(
                self.deps, self.principal.subject, self.feed.session_id, frame, admitted=admitted
            )
            self.reply(ack)
        elif isinstance(frame, client.Stop):
            await commands.stop_turn(self.deps, self.feed.session_id, frame.turn_id)

    async def heartbeat(self) -> None:
        s = self.deps.settings
        while True:
            await asyncio.sleep(s.ws_heartbeat_s)
            if time.monotonic() - self.last_rx > s.ws_heartbeat_s + s.ws_heartbeat_timeout_s:
                await self.close(errors.HEARTBEAT_TIMEOUT)
                return
            with contextlib.suppress(ConnectionError, RuntimeError):
                await self.ws.ping()

    async def expiry(self) -> None:
        await asyncio.sleep(max(0.0, self.principal.expires_at - time.time()))
        await self.close(errors.TOKEN_EXPIRED)

    async def close(self, why: Disconnect) -> None:
        await self.ws.close(code=why.code, message=why.reason_bytes)

    async def receive_loop(self, tg: asyncio.TaskGroup) -> None:
        async with asyncio.timeout(HELLO_TIMEOUT_S):
            while self.feed is None:
                if not await self._receive_one(tg):
                    return
        while await self._receive_one(tg):
            if self.feed is not None and self.feed.failure is not None:
                await self.close(errors.TOO_SLOW)
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
            self.reply(BadFrame("binary frames are not supported; send JSON text").frame())
            await self._flush_pre_hello()
        elif msg.type == WSMsgType.PING:
            await self.ws.pong(msg.data)
        elif msg.type == WSMsgType.PONG:
            pass
        elif msg.type == WSMsgType.ERROR:
            too_big = getattr(msg.data, "code", None) == WSCloseCode.MESSAGE_TOO_BIG
            self.reply((TooLarge if too_big else BadFrame)(str(msg.data)[:200]).frame())
            return not self.ws.closed
        else:
            return False
        return True

    async def _guarded(self, data: str, tg: asyncio.TaskGroup) -> None:
        try:
            await self.handle_text(data, tg)
        except Exception as e:
            said = outcome(e, admitted=self.feed is not None)
            if isinstance(said, Disconnect):
                await self.close(said)
                return
            if not isinstance(e, TidewireError):
                if said.code == "degraded":
                    log.warning("dependency failure handling a frame: %r", e)
                    self.deps.counters.degraded += 1
                else:
                    log.exception("internal error handling a frame")
            self.reply(said)
        await self._flush_pre_hello()

    async def _flush_pre_hello(self) -> None:
        """Before `hello` there is no feed (and no sender task): answers are written directly."""
        if self.feed is None and self.pre_hello and not self.ws.closed:
            frames, self.pre_hello = self.pre_hello, []
            await self.write(frames)


async def websocket_handler(request: web.Request) -> web.StreamResponse:
    """Origin and token are refused right after the upgrade (a close code needs an open socket)."""
    deps = request.app[DEPS]
    ws = web.WebSocketResponse(autoping=False, max_msg_size=deps.settings.max_frame_bytes * 4, compress=False)
    principal: Principal | None = None
    refusal: client.Error | Disconnect | None = None
    try:
        principal = admit_caller(request)
    except TidewireError as e:
        refusal = outcome(e, admitted=False)
    if deps.draining:
        refusal = errors.RESTARTING
    await ws.prepare(request)
    if refusal is not None or principal is None:
        why = (
            refusal if isinstance(refusal, Disconnect) else Disconnect(CloseCode.UNAUTHORIZED, "unauthorized")
        )
        await ws.close(code=why.code, message=why.reason_bytes)
        return ws
    await _serve(request, ws, principal)
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
                await conn.close(errors.NO_HELLO)
            finally:
                for t in conn.tasks:  # heartbeat, expiry, feed and sender end with the connection
                    t.cancel()
    except* (ConnectionError, asyncio.CancelledError):
        pass
    finally:
        sockets.discard(ws)
        deps.counters.sockets -= 1
        try:
            if not ws.closed:
                await ws.close()
        finally:
            await asyncio.shield(conn.admission.aclose())  # the connection slot, if hello took one
