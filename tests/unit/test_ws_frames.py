"""The WebSocket sender's batched write (gateway/ws.py text_frames) produces exactly the frames
aiohttp's own writer would, one after another."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from aiohttp import WSMsgType
from aiohttp._websocket.writer import WebSocketWriter

from gateway.ws import text_frames


class _Transport:
    def __init__(self) -> None:
        self.out = bytearray()

    def write(self, data: bytes) -> None:
        self.out += data

    def is_closing(self) -> bool:
        return False


async def _aiohttp_frames(payloads: list[bytes]) -> bytes:
    t = _Transport()
    writer = WebSocketWriter(protocol=Any, transport=t, limit=1 << 30)  # type: ignore[arg-type]
    for p in payloads:
        await writer.send_frame(p, WSMsgType.TEXT)
    return bytes(t.out)


@pytest.mark.parametrize("sizes", [[0], [5], [125, 126], [65535, 65536], [3, 300, 70_000, 1]])
def test_batched_frames_equal_aiohttp_s_frame_by_frame(sizes: list[int]) -> None:
    payloads = [b"x" * n for n in sizes]
    assert text_frames(payloads) == asyncio.run(_aiohttp_frames(payloads))
