"""Errors in OpenAI's shape, `{"error": {"message", "type", "code"}}`, with the HTTP status of the
tidewire error (shared/errors.py). `degraded` and `rate_limited` carry `retry-after-ms` (and
`Retry-After`), which the openai client honours when it retries."""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable

from aiohttp import web

from gateway.facades.common import json_encode
from shared.errors import Internal, TidewireError, from_dependency

log = logging.getLogger(__name__)

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
    return {
        "error": {
            "message": e.message,
            "type": _TYPES.get(e.code, "server_error"),
            "code": e.code,
            "param": None,
        }
    }


def openai_error(e: TidewireError) -> web.Response:
    headers = {}
    retry_ms = e.retry_after_ms
    if retry_ms is None and e.http_status in (429, 503):
        retry_ms = 1000
    if retry_ms is not None:
        headers["retry-after-ms"] = str(retry_ms)
        headers["Retry-After"] = str(max(1, round(retry_ms / 1000)))
    status = 503 if e.code == "degraded" and e.http_status != 504 else e.http_status
    return web.Response(
        status=status, body=json_encode(error_body(e)), content_type="application/json", headers=headers
    )


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def in_openai_shape(handler: Handler) -> Handler:
    """Whatever escapes a facade handler is still answered in OpenAI's shape: a dependency failure
    as `degraded` (503, retry-after-ms), anything else as `internal`, never a stack trace."""

    @functools.wraps(handler)
    async def wrapped(request: web.Request) -> web.StreamResponse:
        try:
            return await handler(request)
        except web.HTTPException:
            raise
        except TidewireError as e:
            return openai_error(e)
        except Exception as e:
            degraded = from_dependency(e)
            if degraded is None:
                log.exception("internal error on %s %s", request.method, request.path)
                return openai_error(Internal("internal error; nothing was accepted"))
            log.warning("dependency failure on %s %s: %r", request.method, request.path, e)
            return openai_error(degraded)

    return wrapped
