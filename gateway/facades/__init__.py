"""Protocols people already use, spoken over tidewire's one event model (docs/compatibility.md):
the OpenAI Responses API and Chat Completions (`responses`, `chat_completions`) and the Vercel AI
SDK UI message stream (`ai_sdk`). Each request is a turn of a session; nothing here bypasses the
send path, the stop path or replay-then-live (`common`)."""

from __future__ import annotations

from aiohttp import web

from gateway.facades import ai_sdk, chat_completions, responses
from gateway.facades.common import SETTINGS, facade_settings
from gateway.facades.errors import in_openai_shape


def register(app: web.Application) -> None:
    """Adds the facade routes to a gateway app (called once by `gateway.app.create_app`)."""
    app[SETTINGS] = facade_settings()
    app.add_routes(
        [
            web.route(r.method, r.path, in_openai_shape(r.handler), **r.kwargs)
            for r in (*responses.ROUTES, *chat_completions.ROUTES, *ai_sdk.ROUTES)
        ]
    )
