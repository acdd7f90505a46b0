"""Who is calling: the bearer token of an HTTP request or WebSocket upgrade, and its origin.

Every `/v1/` request is authenticated (header `Authorization: Bearer`, or `?access_token=` where a
browser cannot set headers); ownership of a session is checked afterwards, on every path, by
`commands.authorize`. The verifier (keys, issuer, audience, skew) is built once per settings object.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from urllib.parse import urlsplit

from aiohttp import web

from gateway.settings import DEV_JWT_SECRET, GatewaySettings
from shared import tokens
from shared.errors import Forbidden, Unauthorized

log = logging.getLogger(__name__)

MAX_TOKEN_CHARS = 8192


@dataclass(frozen=True)
class Principal:
    subject: str
    expires_at: float


def bearer_token(request: web.Request) -> str | None:
    header = request.headers.get("Authorization", "")
    if header[:7].lower() == "bearer ":
        return header[7:].strip()
    return request.query.get("access_token")


@functools.lru_cache(maxsize=8)
def verifier(settings: GatewaySettings) -> tokens.Verifier:
    """The dev secret never verifies anything once real keys (a JWKS file) are configured."""
    secret: str | None = settings.jwt_secret or None
    if settings.jwks_file and secret == DEV_JWT_SECRET:
        secret = None
    elif secret == DEV_JWT_SECRET and not settings.dev_mode:
        log.warning(
            "the gateway accepts tokens signed with the public dev secret: set TIDEWIRE_JWT_SECRET "
            "or TIDEWIRE_JWKS_FILE"
        )
    return tokens.Verifier(
        secret,
        issuer=settings.jwt_issuer,
        audience=settings.jwt_audience,
        jwks_file=settings.jwks_file,
        leeway_s=settings.jwt_leeway_s,
    )


def authenticate(request: web.Request, settings: GatewaySettings) -> Principal:
    token = bearer_token(request)
    if not token:
        raise Unauthorized("missing bearer token")
    if len(token) > MAX_TOKEN_CHARS:
        raise Unauthorized("token too long")
    claims = verifier(settings).verify(token)
    return Principal(claims.subject, claims.expires_at)


def check_origin(request: web.Request, settings: GatewaySettings) -> None:
    """Cross-site WebSocket hijacking / CSRF guard: a browser Origin must be ours or allowlisted.

    Requests without an Origin header (non-browser clients) pass: they carry their token
    explicitly, which a cross-site page cannot make a browser do.
    """
    origin = request.headers.get("Origin")
    if origin is None:
        return
    if "*" in settings.allowed_origins or origin in settings.allowed_origins:
        return
    try:
        parts = urlsplit(origin)
    except ValueError:
        parts = None
    host = request.headers.get("Host", "")
    if parts is not None and parts.scheme in ("http", "https") and parts.netloc == host and not parts.path:
        return
    raise Forbidden(f"origin {origin[:100]} is not allowed")
