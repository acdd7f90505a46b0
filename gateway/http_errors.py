"""Error responses of the HTTP API: the protocol's `error` object with the matching status."""

from __future__ import annotations

from aiohttp import web

from proto import client
from shared.errors import TidewireError


def http_error(e: TidewireError) -> web.Response:
    headers = {}
    if e.retry_after_ms is not None:
        headers["Retry-After"] = str(max(1, round(e.retry_after_ms / 1000)))
    return web.Response(
        status=e.http_status,
        body=client.json_encoder.encode(e.frame()),
        content_type="application/json",
        headers=headers,
    )


def json_response(obj: object, status: int = 200) -> web.Response:
    return web.Response(status=status, body=client.json_encoder.encode(obj), content_type="application/json")
