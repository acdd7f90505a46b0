"""Typed keys for the resources a gateway app owns."""

from __future__ import annotations

import asyncio
import weakref

from aiohttp import web

from gateway.deps import Deps
from gateway.hub import SessionHub
from gateway.stream import Replayer

DEPS = web.AppKey("deps", Deps)
HUB = web.AppKey("hub", SessionHub)
REPLAYER = web.AppKey("replayer", Replayer)
SOCKETS = web.AppKey("sockets", weakref.WeakSet[web.WebSocketResponse])
SSE_STREAMS = web.AppKey("sse_streams", weakref.WeakSet[asyncio.Task[object]])  # their handler tasks
