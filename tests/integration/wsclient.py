"""A deliberately small WebSocket test client: it records every frame and lets tests drop the
connection at any point, so the guarantees are checked on the wire, not through our own client."""

from __future__ import annotations

import asyncio
import json
import socket
import uuid
from typing import Any

import aiohttp

from proto import client


class WsTestClient:
    def __init__(self, base_url: str, token: str, *, rcvbuf: int | None = None) -> None:
        """`rcvbuf`: the socket's receive buffer, set before it connects (so the kernel neither
        autotunes it nor advertises a larger window): how a test makes a reader that is slow on the
        wire, not only in its own code."""
        self.base_url = base_url
        self.token = token
        self.rcvbuf = rcvbuf
        self.session: aiohttp.ClientSession | None = None
        self.ws: aiohttp.ClientWebSocketResponse | None = None
        self.frames: list[client.ServerFrame] = []
        self.events: list[client.Event] = []
        self.ready: client.Ready | None = None
        self.close_code: int | None = None

    async def __aenter__(self) -> WsTestClient:
        connector = None
        if self.rcvbuf is not None:
            size = self.rcvbuf

            def small_socket(addr: Any) -> socket.socket:
                family, type_, proto, _, _ = addr
                sock = socket.socket(family=family, type=type_, proto=proto)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size)
                return sock

            connector = aiohttp.TCPConnector(socket_factory=small_socket)
        self.session = aiohttp.ClientSession(connector=connector)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.drop()
        if self.session:
            await self.session.close()

    @property
    def last_seen_seq(self) -> int:
        return (
            self.events[-1].seq
            if self.events
            else (self.ready.last_seq if self.ready and self.ready.reset else 0)
        )

    async def connect(
        self,
        session_id: str | None = None,
        last_seen_seq: int | None = None,
        delivery: str = "tokens",
        headers: dict[str, str] | None = None,
    ) -> client.Ready:
        assert self.session is not None
        url = self.base_url.replace("http", "ws", 1) + f"/v1/ws?access_token={self.token}"
        self.ws = await self.session.ws_connect(
            url, headers=headers or {}, timeout=aiohttp.ClientWSTimeout(ws_close=5)
        )
        await self.send(
            {"type": "hello", "session_id": session_id, "last_seen_seq": last_seen_seq, "delivery": delivery}
        )
        frame = await self.recv(timeout=10, what="ready")
        assert isinstance(frame, client.Ready), frame
        self.ready = frame
        return frame

    async def drop(self) -> None:
        if self.ws is not None and not self.ws.closed:
            await self.ws.close()
        self.ws = None

    async def send(self, obj: dict[str, Any]) -> None:
        assert self.ws is not None
        await self.ws.send_str(json.dumps(obj))

    async def send_message(self, text: str, client_msg_id: str | None = None) -> str:
        cmid = client_msg_id or uuid.uuid4().hex
        await self.send({"type": "send", "client_msg_id": cmid, "text": text})
        return cmid

    def _tail(self) -> str:
        return (
            ", ".join(
                f"{type(f).__name__}{'#' + str(getattr(f, 'seq', '')) if hasattr(f, 'seq') else ''}"
                for f in self.frames[-8:]
            )
            or "nothing"
        )

    async def recv(self, timeout: float = 30, what: str = "a frame") -> client.ServerFrame | None:
        """The next frame, or None when the server closed; a silent server fails the test after
        `timeout` seconds with a message naming what was awaited and the last frames seen."""
        assert self.ws is not None
        try:
            msg = await self.ws.receive(timeout=timeout)
        except TimeoutError:
            raise AssertionError(
                f"no frame within {timeout:g} s while awaiting {what}; last frames: {self._tail()}"
            ) from None
        if msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.CLOSING):
            self.close_code = self.ws.close_code
            return None
        assert msg.type == aiohttp.WSMsgType.TEXT, msg
        frame = client.server_frame_decoder.decode(msg.data)
        self.frames.append(frame)
        if isinstance(frame, client.EVENT_TYPES):
            self.events.append(frame)  # type: ignore[arg-type]
        return frame

    async def until(
        self, pred: Any, timeout: float = 30, what: str = "a matching frame"
    ) -> client.ServerFrame:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            left = deadline - loop.time()
            if left <= 0:
                raise AssertionError(f"{what} not received within {timeout:g} s; last frames: {self._tail()}")
            frame = await self.recv(timeout=left, what=what)
            if frame is None:
                raise ConnectionError(f"closed with {self.close_code} while awaiting {what}")
            if pred(frame):
                return frame

    async def until_turn_end(self, turn_id: str | None = None, timeout: float = 60) -> client.TurnEnd:
        for e in self.events:
            if isinstance(e, client.TurnEnd) and (turn_id is None or e.turn_id == turn_id):
                return e
        f = await self.until(
            lambda f: isinstance(f, client.TurnEnd) and (turn_id is None or f.turn_id == turn_id),
            timeout,
            f"turn_end of {turn_id or 'any turn'}",
        )
        assert isinstance(f, client.TurnEnd)
        return f

    async def ack_for(self, cmid: str, timeout: float = 15) -> client.Ack:
        f = await self.until(
            lambda f: (isinstance(f, client.Ack) and f.client_msg_id == cmid) or isinstance(f, client.Error),
            timeout,
            f"the ack of {cmid}",
        )
        assert isinstance(f, client.Ack), f
        return f

    async def send_until_acked(self, text: str, attempts: int = 20) -> client.Ack:
        """What a real client does: resend with the same client_msg_id while the server says degraded."""
        cmid = uuid.uuid4().hex
        for _ in range(attempts):
            await self.send_message(text, cmid)
            f = await self.until(
                lambda f: (
                    (isinstance(f, client.Ack) and f.client_msg_id == cmid) or isinstance(f, client.Error)
                ),
                15,
                f"the ack of {cmid}",
            )
            if isinstance(f, client.Ack):
                return f
            assert isinstance(f, client.Error) and f.code == "degraded", f
            await asyncio.sleep((f.retry_after_ms or 500) / 1000)
        raise AssertionError("never acknowledged")
