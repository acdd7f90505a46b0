"""The floor: a bare aiohttp WebSocket relay that streams the simulated model straight to the client.

No broker, no persistence, no checkpoints, no leases: on `send` it answers `ack` at once and streams
`turn_start`, the `delta`s of `orchestrator.providers.simulated` (the very same text and pacing as the
orchestrator gets, `/sim` lines included) and `turn_end`, encoded with the same `proto.client` codecs,
one WebSocket frame per delta. Every tidewire figure in the benchmarks is also quoted as a ratio to
this relay measured in the same run, so the cost of durability and fan-out is visible on a noisy box.

    python -m bench.baseline --port 8099      (or BENCH_BASELINE_PORT=8099 python -m bench.baseline)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import secrets
import sys

import msgspec
from aiohttp import WSMsgType, web

from orchestrator.providers.base import ProviderRequest, TextDelta
from orchestrator.providers.simulated import SimulatedProvider
from proto import client
from proto.state import ChatMessage

log = logging.getLogger("bench.baseline")


class _Conn:
    def __init__(self, ws: web.WebSocketResponse, provider: SimulatedProvider) -> None:
        self.ws = ws
        self.provider = provider
        self.session_id = ""
        self.seq = 0
        self.turn: asyncio.Task[None] | None = None

    async def emit(self, frame: client.ServerFrame) -> None:
        await self.ws.send_str(client.json_encoder.encode(frame).decode())

    def next_seq(self) -> int:
        self.seq += 1
        return self.seq

    async def run_turn(self, turn_id: str, text: str) -> None:
        await self.emit(client.TurnStart(seq=self.next_seq(), turn_id=turn_id))
        request = ProviderRequest(
            session_id=self.session_id,
            turn_id=turn_id,
            messages=[ChatMessage(role="user", text=text, turn_id=turn_id)],
        )
        parts: list[str] = []
        offset = 0
        status = "completed"
        try:
            async with contextlib.aclosing(self.provider.stream(request)) as stream:
                async for ev in stream:
                    if isinstance(ev, TextDelta) and ev.text:
                        await self.emit(
                            client.Delta(seq=self.next_seq(), turn_id=turn_id, offset=offset, text=ev.text)
                        )
                        offset += len(ev.text)
                        parts.append(ev.text)
        except asyncio.CancelledError:
            status = "cancelled"
        except Exception as e:  # noqa: BLE001 - the floor reports it like the real thing would
            log.warning("turn failed: %s", e)
            status = "failed"
        if not self.ws.closed:
            await self.emit(
                client.TurnEnd(
                    seq=self.next_seq(),
                    turn_id=turn_id,
                    status=status,  # type: ignore[arg-type]
                    text="".join(parts),
                )
            )

    async def on_frame(self, frame: client.ClientFrame) -> None:
        if isinstance(frame, client.Ping):
            await self.emit(client.Pong())
        elif isinstance(frame, client.Hello):
            self.session_id = frame.session_id or secrets.token_urlsafe(18)
            after = frame.last_seen_seq or 0
            await self.emit(client.Ready(session_id=self.session_id, last_seq=max(self.seq, after)))
        elif isinstance(frame, client.Send):
            seq = self.next_seq()
            turn_id = "t_" + secrets.token_urlsafe(12)
            await self.emit(
                client.Ack(client_msg_id=frame.client_msg_id, seq=seq, turn_id=turn_id, duplicate=False)
            )
            await self.emit(
                client.Message(
                    seq=seq, turn_id=turn_id, client_msg_id=frame.client_msg_id, role="user", text=frame.text
                )
            )
            if self.turn is not None and not self.turn.done():
                await self.turn  # one turn at a time, like a session
            self.turn = asyncio.create_task(self.run_turn(turn_id, frame.text))
        elif isinstance(frame, client.Stop):
            if self.turn is not None:
                self.turn.cancel()


async def ws_handler(request: web.Request) -> web.WebSocketResponse:
    ws = web.WebSocketResponse(compress=False, max_msg_size=256 * 1024)
    await ws.prepare(request)
    conn = _Conn(ws, request.app["provider"])
    try:
        async for msg in ws:
            if msg.type != WSMsgType.TEXT:
                continue
            try:
                frame = client.client_frame_decoder.decode(msg.data)
            except msgspec.DecodeError as e:
                await conn.emit(client.Error(code="bad_frame", message=str(e)[:200]))
                continue
            await conn.on_frame(frame)
    finally:
        if conn.turn is not None:
            conn.turn.cancel()
    return ws


async def healthz(_: web.Request) -> web.Response:
    return web.json_response({"ok": True})


async def stats(request: web.Request) -> web.Response:
    prov: SimulatedProvider = request.app["provider"]
    return web.Response(
        text=json.dumps({"started": prov.started, "finished": prov.finished}), content_type="application/json"
    )


def create_app() -> web.Application:
    app = web.Application()
    app["provider"] = SimulatedProvider()
    app.add_routes(
        [
            web.get("/v1/ws", ws_handler),
            web.get("/healthz", healthz),
            web.get("/readyz", healthz),
            web.get("/stats", stats),
        ]
    )
    return app


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.baseline", description=__doc__.split("\n\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=int(os.environ.get("BENCH_BASELINE_PORT", "8099")))
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    web.run_app(create_app(), host=args.host, port=args.port, print=None, access_log=None)


if __name__ == "__main__":
    main()
