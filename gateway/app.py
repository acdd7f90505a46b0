"""Assembles the gateway: adapters owned by cleanup contexts, routes, and an orderly drain.

On shutdown (SIGTERM) the gateway stops accepting, closes every WebSocket with 1012 so clients
reconnect to another gateway and resume, ends SSE streams, then releases its connections.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import weakref
from collections.abc import AsyncIterator
from pathlib import Path

from aiohttp import web

from gateway import facades, limits, media, openapi, poll, sessions, sse, ws
from gateway.deps import Deps
from gateway.hub import SessionHub
from gateway.keys import DEPS, HUB, REPLAYER, SOCKETS, SSE_STREAMS, StreamStop
from gateway.metrics import install as install_metrics
from gateway.settings import GatewaySettings
from gateway.stream import Replayer
from shared import health, telemetry
from shared.bus import Bus
from shared.checkpoints import CheckpointStore
from shared.eventlog import EventLog

log = logging.getLogger(__name__)
STATIC = Path(__file__).parent / "static"


async def _cancelled(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def create_app(settings: GatewaySettings) -> web.Application:
    app = web.Application(client_max_size=settings.max_frame_bytes)
    app[SOCKETS] = weakref.WeakSet()
    app[SSE_STREAMS] = weakref.WeakSet()

    async def resources(app: web.Application) -> AsyncIterator[None]:
        """The adapters, opened under one exit stack: a start-up that fails half way closes what it
        had opened; shutdown closes in the reverse order (presence, bus, Redis, Postgres, traces)."""
        gateway_id = settings.gateway_id or "gw-" + secrets.token_hex(4)
        telemetry.setup("gateway", gateway_id)
        async with contextlib.AsyncExitStack() as stack:
            stack.callback(telemetry.flush)
            eventlog = await stack.enter_async_context(
                await EventLog.connect(
                    settings.postgres_dsn, timeout_s=settings.postgres_timeout_s, max_size=20
                )
            )
            checkpoints = await stack.enter_async_context(
                CheckpointStore.connect(
                    settings.redis_url,
                    timeout_s=settings.redis_timeout_s,
                    min_replicas=settings.redis_min_replicas,
                    ttl_s=settings.session_ttl_s,
                )
            )
            hubs: list[SessionHub] = []

            def on_nats_state(up: bool) -> None:
                if up:  # live events published while this process was away are lost: re-read the stores
                    for h in hubs:
                        h.resync_all()

            bus = await stack.enter_async_context(
                await Bus.connect(
                    settings.nats_url,
                    name=gateway_id,
                    timeout_s=settings.nats_timeout_s,
                    replicas=settings.nats_replicas,
                    on_state=on_nats_state,
                )
            )
            await bus.ensure_streams()
            deps = Deps(
                settings=settings, eventlog=eventlog, checkpoints=checkpoints, bus=bus, gateway_id=gateway_id
            )
            deps.media = app[media.MEDIA] = await media.MediaStore.open(bus, settings)
            hub = SessionHub(bus, checkpoints, gateway_id)
            hubs.append(hub)
            app[DEPS] = deps
            install_metrics(deps)
            app[HUB] = hub
            app[REPLAYER] = Replayer(deps)
            presence = asyncio.create_task(hub.refresh_presence(), name="presence")
            stack.push_async_callback(_cancelled, presence)
            log.info("gateway %s ready on %s:%s", gateway_id, settings.host, settings.http_port)
            yield

    async def drain(app: web.Application) -> None:
        if DEPS not in app:
            return
        app[DEPS].draining = True
        sockets: weakref.WeakSet[web.WebSocketResponse] = app[SOCKETS]
        for sock in list(sockets):
            with contextlib.suppress(Exception):
                await asyncio.wait_for(sock.close(code=ws.CLOSE_RESTARTING, message=b"server restarting"), 2)
        stoppers: weakref.WeakSet[StreamStop] = app[SSE_STREAMS]
        streams = list(stoppers)
        for stream in streams:
            stream.stop.set()
        if streams:
            await asyncio.wait([asyncio.ensure_future(s.done.wait()) for s in streams], timeout=2)

    app.cleanup_ctx.append(resources)
    app.cleanup_ctx.append(limits.edge_context)
    app.middlewares.append(limits.edge_middleware)
    app.on_shutdown.append(drain)
    app.add_routes(
        [
            web.get("/v1/ws", ws.websocket_handler),
            web.post("/v1/sessions", sessions.create_session),
            web.get("/v1/sessions", sessions.list_sessions),
            web.get("/v1/sessions/{sid}", sessions.get_session),
            web.post("/v1/sessions/{sid}/messages", sessions.post_message),
            web.post("/v1/sessions/{sid}/stop", sessions.post_stop),
            web.post("/v1/media", media.upload),
            web.get("/v1/media/{media_id}", media.download),
            web.patch("/v1/sessions/{sid}/flags", sessions.patch_flags),
            web.get("/v1/sessions/{sid}/events", sse.sse_handler),
            web.get("/v1/sessions/{sid}/poll", poll.poll_handler),
            web.get("/openapi.json", openapi.openapi_handler),
            web.get("/", index),
        ]
    )
    health.add_routes(app, checks=lambda: ready_checks(app))
    facades.register(app)
    if STATIC.is_dir():
        app.router.add_static("/static/", STATIC)
    return app


async def index(request: web.Request) -> web.StreamResponse:
    page = STATIC / "index.html"
    if not page.exists():
        return web.Response(text="tidewire gateway", content_type="text/plain")
    return web.FileResponse(page, headers={"Cache-Control": "no-cache"})


def ready_checks(app: web.Application) -> dict[str, health.Check]:
    """In rotation while NATS, Redis and Postgres answer and the gateway is not draining."""
    if DEPS not in app:
        return {"started": lambda: False}
    deps = app[DEPS]
    return {
        "nats": lambda: deps.bus.connected,
        "draining": lambda: not deps.draining,
        "redis": deps.checkpoints.ping,
        "postgres": deps.eventlog.ping,
    }
