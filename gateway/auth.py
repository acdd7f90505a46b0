"""Who is calling: the bearer token of an HTTP request or WebSocket upgrade, and its origin."""

from __future__ import annotations

from dataclasses import dataclass

from aiohttp import web

from gateway.settings import GatewaySettings
from shared import tokens
from shared.errors import Forbidden, Unauthorized


@dataclass(frozen=True)
class Principal:
    subject: str
    expires_at: float


def bearer_token(request: web.Request) -> str | None:
    header = request.headers.get("Authorization", "")
    if header.lower().startswith("bearer "):
        return header[7:].strip()
    return request.query.get("access_token")


def authenticate(request: web.Request, settings: GatewaySettings) -> Principal:
    token = bearer_token(request)
    if not token:
        raise Unauthorized("missing bearer token")
    subject, exp = tokens.verify(token, settings.jwt_secret, issuer=settings.jwt_issuer,
                                 audience=settings.jwt_audience)
    return Principal(subject, exp)


def check_origin(request: web.Request, settings: GatewaySettings) -> None:
    """Cross-site WebSocket hijacking guard: a browser Origin must be ours or allowlisted."""
    origin = request.headers.get("Origin")
    if origin is None:
        return
    host = request.headers.get("Host", "")
    same = origin.split("://", 1)[-1] == host
    if not same and origin not in settings.allowed_origins and "*" not in settings.allowed_origins:
        raise Forbidden(f"origin {origin} is not allowed")
