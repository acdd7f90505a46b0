"""Errors in OpenAI's shape, `{"error": {"message", "type", "code"}}`, with the HTTP status of the
tidewire error (shared/errors.py). `degraded` and `rate_limited` carry `retry-after-ms` (and
`Retry-After`), which the openai client honours when it retries."""

from __future__ import annotations

from aiohttp import web

from gateway.facades.common import json_encode
from shared.errors import TidewireError

# tidewire error code -> OpenAI error type
_TYPES = {
    "bad_frame": "invalid_request_error",
    "too_large": "invalid_request_error",
    "rate_limited": "rate_limit_error",
    "unauthorized": "authentication_error",
    "forbidden": "permission_error",
    "not_found": "not_found_error",
    "conflict": "invalid_request_error",
    "degraded": "server_error",
    "internal": "server_error",
}


def error_body(e: TidewireError) -> dict[str, object]:
    return {"error": {"message": e.message, "type": _TYPES.get(e.code, "server_error"), "code": e.code,
                      "param": None}}


def openai_error(e: TidewireError) -> web.Response:
    headers = {}
    retry_ms = e.retry_after_ms
    if retry_ms is None and e.http_status in (429, 503):
        retry_ms = 1000
    if retry_ms is not None:
        headers["retry-after-ms"] = str(retry_ms)
        headers["Retry-After"] = str(max(1, round(retry_ms / 1000)))
    status = 503 if e.code == "degraded" and e.http_status != 504 else e.http_status
    return web.Response(status=status, body=json_encode(error_body(e)), content_type="application/json",
                        headers=headers)
