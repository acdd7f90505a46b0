"""The OpenAPI 3.1 document of the gateway's HTTP API, served at `GET /openapi.json` (no auth).

Schemas come from the wire types themselves (`msgspec.json.schema_components` on proto.client, on
proto.flags' `SessionFlags` and on the few HTTP-only bodies declared here), so the document cannot
drift from what the handlers decode and encode. The constraints the handlers enforce beyond the
types (id lengths, non-blank text, the limits of the running settings) are added where the schemas
are assembled. Every operation lists its error responses, each the protocol's `error` object. The
WebSocket endpoint is described as an upgrade; its frames are in the `ClientFrame` / `ServerFrame`
schemas.
"""

from __future__ import annotations

import functools
from typing import Any

import msgspec
from aiohttp import web

from gateway.commands import MAX_ATTACHMENTS
from gateway.keys import DEPS
from gateway.media import ALLOWED_TYPES, MediaInfo
from gateway.settings import GatewaySettings
from proto import client
from proto.flags import SessionFlags as SessionFlags  # re-exported: gateway.sessions decodes it

SESSION_ID_PATTERN = "^[A-Za-z0-9_-]{1,128}$"
MEDIA_ID_PATTERN = "^m_[A-Za-z0-9_-]{16,64}$"
NO_NUL = "^[^\\u0000]*$"
NOT_BLANK_NO_NUL = "^[^\\u0000]*[^\\s\\u0000][^\\u0000]*$"

# ---- HTTP-only bodies (the handlers decode and encode exactly these) ---------------------------
# `SessionFlags`, the body of `PATCH .../flags`, is the session-settable part of proto.flags.FLAGS.


class CreateSessionRequest(msgspec.Struct, frozen=True, kw_only=True):
    flags: SessionFlags | None = None


class SessionSummary(msgspec.Struct, frozen=True, kw_only=True):
    session_id: str
    created_at: float
    title: str | None


class SessionList(msgspec.Struct, frozen=True, kw_only=True):
    sessions: list[SessionSummary]


class StopResponse(msgspec.Struct, frozen=True, kw_only=True):
    stopped: bool
    turn_id: str | None


class FlagsResponse(msgspec.Struct, frozen=True, kw_only=True):
    session_id: str
    flags: dict[str, Any]


class Health(msgspec.Struct, frozen=True, kw_only=True):
    ok: bool


class Readiness(msgspec.Struct, frozen=True, kw_only=True):
    ok: bool
    checks: dict[str, bool]


create_session_decoder = msgspec.json.Decoder(CreateSessionRequest)
session_flags_decoder = msgspec.json.Decoder(SessionFlags)

# ---- the document -------------------------------------------------------------------------------

_SCHEMA_TYPES: list[Any] = [
    CreateSessionRequest,
    client.CreateSessionResponse,
    SessionList,
    client.SessionHistory,
    client.SendRequest,
    client.Ack,
    client.StopRequest,
    StopResponse,
    SessionFlags,
    FlagsResponse,
    client.PollResponse,
    client.Error,
    Health,
    Readiness,
    MediaInfo,
    client.ClientFrame,
    client.ServerFrame,
]
_NAMES = [
    "CreateSessionRequest",
    "CreateSessionResponse",
    "SessionList",
    "SessionHistory",
    "SendRequest",
    "Ack",
    "StopRequest",
    "StopResponse",
    "SessionFlags",
    "FlagsResponse",
    "PollResponse",
    "Error",
    "Health",
    "Readiness",
    "MediaInfo",
    "ClientFrame",
    "ServerFrame",
]

_ERRORS = {
    "400": "bad_frame: the request is malformed (body, parameters or types)",
    "401": "unauthorized: missing, invalid or expired bearer token",
    "403": "forbidden: the session belongs to another subject, or the browser Origin is not allowed",
    "404": "not_found: no such session",
    "409": "conflict: a turn is running and the session rejects double texting",
    "413": "too_large: the body, the text, or the subject's number of sessions is over its limit",
    "429": "rate_limited: too many messages or connections; retry after `retry_after_ms`",
    "503": "degraded: load is being shed or a dependency is down; nothing was accepted, retry later",
}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(name: str) -> dict[str, Any]:
    return {"application/json": {"schema": _ref(name)}}


def _errors(*codes: str) -> dict[str, Any]:
    return {code: {"$ref": f"#/components/responses/E{code}"} for code in codes}


def _sid() -> dict[str, Any]:
    return {
        "name": "sid",
        "in": "path",
        "required": True,
        "description": "The session id",
        "schema": {"type": "string", "pattern": SESSION_ID_PATTERN},
    }


def _components(settings: GatewaySettings, attachments: bool) -> dict[str, Any]:
    _, schemas = msgspec.json.schema_components(_SCHEMA_TYPES, ref_template="#/components/schemas/{name}")
    for name in _NAMES:
        assert name in schemas or name in ("ClientFrame", "ServerFrame"), name
    out: dict[str, Any] = dict(schemas)
    # the unions get names of their own (msgspec inlines a union as `anyOf` at the use site)
    out["ClientFrame"] = msgspec.json.schema_components(
        [client.ClientFrame], ref_template="#/components/schemas/{name}"
    )[0][0]
    out["ServerFrame"] = msgspec.json.schema_components(
        [client.ServerFrame], ref_template="#/components/schemas/{name}"
    )[0][0]
    # what the handlers enforce beyond the types
    send = out["SendRequest"]["properties"]
    send["client_msg_id"] = {
        "type": "string",
        "minLength": 1,
        "maxLength": 128,
        "pattern": NO_NUL,
        "description": "Chosen by the client; a repeat is acknowledged again, never re-run",
    }
    send["text"] = {
        "type": "string",
        "minLength": 1,
        "maxLength": settings.max_text_chars,
        "pattern": NOT_BLANK_NO_NUL,
        "description": "Not blank; no NUL",
    }
    if attachments:
        send["attachments"] = {
            "anyOf": [
                {"type": "array", "maxItems": MAX_ATTACHMENTS, "items": _ref("Attachment")},
                {"type": "null"},
            ],
            "description": "Media the sender uploaded (`POST /v1/media`)",
        }
    else:  # this gateway has no media store: a message cannot carry attachments
        send.pop("attachments", None)
    return out


def document(settings: GatewaySettings, *, attachments: bool = False) -> dict[str, Any]:
    """The document for a gateway with these settings (`attachments`: it has a media store)."""
    bearer: list[dict[str, list[str]]] = [{"bearer": []}, {"access_token": []}]
    session_ops_errors = ("400", "401", "403", "404")
    paths: dict[str, Any] = {
        "/v1/sessions": {
            "post": {
                "operationId": "createSession",
                "summary": "Create a session owned by the caller",
                "security": bearer,
                "requestBody": {"required": False, "content": _json("CreateSessionRequest")},
                "responses": {
                    "201": {"description": "Created", "content": _json("CreateSessionResponse")},
                    **_errors("400", "401", "403", "413", "503"),
                },
            },
            "get": {
                "operationId": "listSessions",
                "summary": "The caller's most recent sessions",
                "security": bearer,
                "responses": {
                    "200": {"description": "Sessions", "content": _json("SessionList")},
                    **_errors("401", "403", "503"),
                },
            },
        },
        "/v1/sessions/{sid}": {
            "parameters": [_sid()],
            "get": {
                "operationId": "getSession",
                "summary": "The durable history of a session",
                "security": bearer,
                "responses": {
                    "200": {"description": "History", "content": _json("SessionHistory")},
                    **_errors(*session_ops_errors, "503"),
                },
            },
        },
        "/v1/sessions/{sid}/messages": {
            "parameters": [_sid()],
            "post": {
                "operationId": "sendMessage",
                "summary": "Send a user message; answered only once it is durable",
                "security": bearer,
                "requestBody": {"required": True, "content": _json("SendRequest")},
                "responses": {
                    "200": {"description": "Acknowledged", "content": _json("Ack")},
                    **_errors(*session_ops_errors, "409", "413", "429", "503"),
                },
            },
        },
        "/v1/sessions/{sid}/stop": {
            "parameters": [_sid()],
            "post": {
                "operationId": "stopTurn",
                "summary": "Cancel the named (or current) turn",
                "security": bearer,
                "requestBody": {"required": False, "content": _json("StopRequest")},
                "responses": {
                    "202": {"description": "Stop requested", "content": _json("StopResponse")},
                    **_errors(*session_ops_errors, "413", "503"),
                },
            },
        },
        "/v1/sessions/{sid}/flags": {
            "parameters": [_sid()],
            "patch": {
                "operationId": "setFlags",
                "summary": "Set per-session policies (applied to new turns)",
                "security": bearer,
                "requestBody": {"required": True, "content": _json("SessionFlags")},
                "responses": {
                    "200": {"description": "The session's flags", "content": _json("FlagsResponse")},
                    **_errors(*session_ops_errors, "413", "503"),
                },
            },
        },
        "/v1/sessions/{sid}/events": {
            "parameters": [_sid()],
            "get": {
                "operationId": "streamEvents",
                "summary": "Server-Sent Events: `ready`, then every event after `after`, then live",
                "security": bearer,
                "parameters": [
                    {
                        "name": "after",
                        "in": "query",
                        "required": False,
                        "schema": {"type": "integer", "minimum": 0},
                    },
                    {
                        "name": "Last-Event-ID",
                        "in": "header",
                        "required": False,
                        "schema": {"type": "integer", "minimum": 0},
                    },
                    {
                        "name": "delivery",
                        "in": "query",
                        "required": False,
                        "schema": {"type": "string", "enum": ["tokens", "phrases", "batched"]},
                    },
                ],
                "responses": {
                    "200": {
                        "description": "`id: <seq>` / `event: <type>` / `data: <json>` records",
                        "content": {"text/event-stream": {"schema": {"type": "string"}}},
                    },
                    **_errors(*session_ops_errors, "429", "503"),
                },
            },
        },
        "/v1/sessions/{sid}/poll": {
            "parameters": [_sid()],
            "get": {
                "operationId": "pollEvents",
                "summary": "Long-poll: events after `after`, at once or when one arrives or `wait_s` passes",
                "security": bearer,
                "parameters": [
                    {
                        "name": "after",
                        "in": "query",
                        "required": False,
                        "schema": {"type": "integer", "minimum": 0},
                    },
                    {
                        "name": "wait_s",
                        "in": "query",
                        "required": False,
                        "schema": {"type": "number", "minimum": 0, "maximum": 60},
                    },
                ],
                "responses": {
                    "200": {"description": "Events", "content": _json("PollResponse")},
                    **_errors(*session_ops_errors, "429", "503"),
                },
            },
        },
        "/v1/media": {
            "post": {
                "operationId": "uploadMedia",
                "summary": "Upload a file once; messages then reference it by `media_id`",
                "description": "The body is the raw bytes. Binary types must start with their format's "
                "signature; text must be UTF-8.",
                "security": bearer,
                "requestBody": {"required": True, "content": {t: {} for t in sorted(ALLOWED_TYPES)}},
                "responses": {
                    "201": {"description": "Stored", "content": _json("MediaInfo")},
                    **_errors("400", "401", "403", "413", "503"),
                },
            },
        },
        "/v1/media/{media_id}": {
            "parameters": [
                {
                    "name": "media_id",
                    "in": "path",
                    "required": True,
                    "schema": {"type": "string", "pattern": MEDIA_ID_PATTERN},
                }
            ],
            "get": {
                "operationId": "downloadMedia",
                "summary": "The bytes of a file, to its owner only",
                "security": bearer,
                "responses": {
                    "200": {
                        "description": "The file, with its content type",
                        "content": {
                            t: {"schema": {"type": "string", "contentMediaType": t}}
                            for t in sorted(ALLOWED_TYPES)
                        },
                    },
                    **_errors("401", "403", "404", "503"),
                },
            },
        },
        "/v1/ws": {
            "get": {
                "operationId": "websocket",
                "summary": "WebSocket (`hello` first; frames are ClientFrame / ServerFrame)",
                "description": "Close codes: 4401 unauthorized, 4403 forbidden, 4408 heartbeat timeout, "
                "4410 too far behind (resume), 4429 too many connections, 1012 restarting; "
                "1007 invalid UTF-8, 1009 message too big.",
                "security": bearer,
                "responses": {"101": {"description": "Switching protocols"}, **_errors("400", "401", "403")},
            },
        },
        "/healthz": {
            "get": {
                "operationId": "healthz",
                "summary": "Liveness",
                "security": [],
                "responses": {"200": {"description": "Alive", "content": _json("Health")}},
            }
        },
        "/readyz": {
            "get": {
                "operationId": "readyz",
                "summary": "Readiness (dependencies reachable, not draining)",
                "security": [],
                "responses": {
                    "200": {"description": "Ready", "content": _json("Readiness")},
                    "503": {"description": "Not ready", "content": _json("Readiness")},
                },
            }
        },
        "/metrics": {
            "get": {
                "operationId": "metrics",
                "summary": "Prometheus metrics",
                "security": [],
                "responses": {
                    "200": {
                        "description": "Prometheus text format",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    }
                },
            }
        },
        "/openapi.json": {
            "get": {
                "operationId": "openapi",
                "summary": "This document",
                "security": [],
                "responses": {
                    "200": {"description": "OpenAPI 3.1", "content": {"application/json": {"schema": {}}}}
                },
            }
        },
    }
    return {
        "openapi": "3.1.0",
        "jsonSchemaDialect": "https://json-schema.org/draft/2020-12/schema",
        "info": {
            "title": "tidewire gateway",
            "version": "1",
            "description": "The HTTP side of the tidewire client protocol (PROTOCOL.md, v1). Errors are "
            "the protocol's `error` object; a 429 / 503 carries `retry_after_ms` and a "
            "`Retry-After` header.",
        },
        "security": bearer,
        "paths": paths,
        "components": {
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"},
                "access_token": {
                    "type": "apiKey",
                    "in": "query",
                    "name": "access_token",
                    "description": "For browsers that cannot set headers (WebSocket, EventSource)",
                },
            },
            "schemas": _components(settings, attachments),
            "responses": {
                f"E{code}": {"description": text, "content": _json("Error")} for code, text in _ERRORS.items()
            },
        },
    }


@functools.lru_cache(maxsize=4)
def document_bytes(settings: GatewaySettings, attachments: bool = False) -> bytes:
    return msgspec.json.encode(document(settings, attachments=attachments))


async def openapi_handler(request: web.Request) -> web.Response:
    deps = request.app[DEPS]
    body = document_bytes(deps.settings, getattr(deps, "media", None) is not None)
    return web.Response(
        body=body, content_type="application/json", headers={"Cache-Control": "public, max-age=300"}
    )
