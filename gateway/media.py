"""Media by reference: files are uploaded once and messages carry only their `media_id`.

Why by reference: a WebSocket frame or a turn request stays small (images never ride the event
stream, the checkpoint store or the event log), an upload can be retried on its own, and the
bytes live in one place with one retention policy: the NATS JetStream object store bucket
`subjects.MEDIA_BUCKET` (file storage, a TTL from `TIDEWIRE_MEDIA_TTL_S`), reached through the
`shared.media_store` adapter.

- `POST /v1/media` (bearer auth; body = the raw bytes; `Content-Type` from the allowlist: PNG,
  JPEG, GIF, WebP, PDF, plain text, Markdown, CSV) → `201 {"media_id", "content_type", "size"}`.
  At most `TIDEWIRE_MEDIA_MAX_BYTES` (5 MB by default; more is `413 too_large`, checked against
  Content-Length before reading and while reading, since the body is streamed, never buffered
  beyond the limit). Binary types must start with their format's signature and text must be
  UTF-8, so a file cannot be served as something it is not (responses also say `nosniff`).
- `GET /v1/media/{media_id}` → the bytes, to their owner only (403 for anyone else, 404 when
  unknown or expired).

The owner (the token's subject) and the content type are kept in the object's description.
`check_attachments` is what `send` should call so a message can only reference its sender's media.
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

import msgspec
from aiohttp import web

from gateway.auth import authenticate, check_origin
from gateway.http_errors import http_error, json_response
from gateway.settings import GatewaySettings
from proto.client import Attachment
from shared.bus import Bus
from shared.config import from_env
from shared.errors import BadFrame, Degraded, Forbidden, NotFound, TidewireError, TooLarge
from shared.media_store import MediaObjects, MediaUnavailable

__all__ = [
    "ALLOWED_TYPES",
    "MEDIA",
    "MediaInfo",
    "MediaSettings",
    "MediaStore",
    "check_attachments",
    "download",
    "upload",
]

ALLOWED_TYPES: Final = frozenset(
    {
        "image/png",
        "image/jpeg",
        "image/gif",
        "image/webp",
        "application/pdf",
        "text/plain",
        "text/markdown",
        "text/csv",
    }
)
_SIGNATURES: Final[dict[str, tuple[bytes, ...]]] = {
    "image/png": (b"\x89PNG\r\n\x1a\n",),
    "image/jpeg": (b"\xff\xd8\xff",),
    "image/gif": (b"GIF87a", b"GIF89a"),
    "application/pdf": (b"%PDF-",),
}
_MEDIA_ID: Final = re.compile(r"m_[A-Za-z0-9_-]{16,64}")
_READ_CHUNK: Final = 64 * 1024


@dataclass(frozen=True)
class MediaSettings:
    """`TIDEWIRE_MEDIA_{MAX_BYTES,TTL_S,BUCKET_MAX_BYTES,TIMEOUT_S}`; TTL 0 keeps media forever."""

    max_bytes: int = 5 * 1024 * 1024
    ttl_s: float = 30 * 86_400.0
    bucket_max_bytes: int = -1
    timeout_s: float = 15.0

    @classmethod
    def from_env(cls) -> MediaSettings:
        return from_env(cls, prefix="TIDEWIRE_MEDIA_")


class MediaInfo(msgspec.Struct, frozen=True, kw_only=True):
    media_id: str
    content_type: str
    size: int


@dataclass(frozen=True)
class _Stored:
    owner: str
    content_type: str
    size: int


class MediaStore:
    """The bucket plus what the handlers need to authenticate (owned by the gateway app)."""

    def __init__(
        self, objects: MediaObjects, auth: GatewaySettings, settings: MediaSettings | None = None
    ) -> None:
        self._objects = objects
        self.auth = auth
        self.settings = MediaSettings.from_env() if settings is None else settings

    @classmethod
    async def open(cls, bus: Bus, auth: GatewaySettings, settings: MediaSettings | None = None) -> MediaStore:
        """Bind to the bucket, creating it on first use (idempotent across gateways)."""
        settings = MediaSettings.from_env() if settings is None else settings
        objects = await MediaObjects.open(
            bus,
            ttl_s=settings.ttl_s,
            max_bytes=settings.bucket_max_bytes,
            timeout_s=settings.timeout_s,
        )
        return cls(objects, auth, settings)

    async def put(self, owner: str, content_type: str, data: bytes) -> MediaInfo:
        media_id = "m_" + secrets.token_urlsafe(18)
        await self._objects.put(
            media_id, data, description=json.dumps({"owner": owner, "content_type": content_type})
        )
        return MediaInfo(media_id=media_id, content_type=content_type, size=len(data))

    async def stat(self, media_id: str) -> _Stored | None:
        if not _MEDIA_ID.fullmatch(media_id):
            return None
        info = await self._objects.info(media_id)
        if info is None:
            return None
        meta = json.loads(info.description or "{}")
        return _Stored(
            owner=str(meta.get("owner", "")), content_type=str(meta.get("content_type", "")), size=info.size
        )

    async def read(self, media_id: str) -> bytes | None:
        """The bytes; None when the media is gone (expired since it was looked up)."""
        return await self._objects.read(media_id)

    async def owned(self, media_id: str, subject: str) -> _Stored:
        """The media's record if `subject` owns it; NotFound / Forbidden otherwise."""
        try:
            stored = await self.stat(media_id)
        except MediaUnavailable as e:
            raise Degraded("media store unavailable", retry_after_ms=1000) from e
        if stored is None:
            raise NotFound("no such media")
        if stored.owner != subject:
            raise Forbidden("this media belongs to someone else")
        return stored


MEDIA = web.AppKey("media", MediaStore)


async def check_attachments(
    store: MediaStore, subject: str, attachments: Sequence[Attachment] | None
) -> None:
    """A message may only reference media its sender uploaded and that still exists."""
    for attachment in attachments or ():
        await store.owned(attachment.media_id, subject)


def _check_content(content_type: str, charset: str | None, data: bytes) -> None:
    if content_type.startswith("text/"):
        if charset not in (None, "utf-8", "us-ascii"):
            raise BadFrame("text media must be UTF-8")
        try:
            data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise BadFrame("text media must be valid UTF-8") from e
        return
    if content_type == "image/webp":
        ok = data[:4] == b"RIFF" and data[8:12] == b"WEBP"
    else:
        ok = data.startswith(_SIGNATURES[content_type])
    if not ok:
        raise BadFrame(f"the content is not {content_type}")


async def _read_limited(request: web.Request, limit: int) -> bytes:
    """The body, streamed, refusing as soon as it is known to exceed `limit` (the app's own
    client_max_size is for JSON frames and does not apply to media)."""
    if request.content_length is not None and request.content_length > limit:
        raise TooLarge(f"media larger than {limit} bytes")
    body = bytearray()
    async for chunk in request.content.iter_chunked(_READ_CHUNK):
        body += chunk
        if len(body) > limit:
            raise TooLarge(f"media larger than {limit} bytes")
    return bytes(body)


async def upload(request: web.Request) -> web.Response:
    """`POST /v1/media`: see the module docstring."""
    store = request.app[MEDIA]
    try:
        check_origin(request, store.auth)  # the order of every admission (gateway/admission.py)
        principal = authenticate(request, store.auth)
        content_type = request.content_type.lower()
        if content_type not in ALLOWED_TYPES:
            raise BadFrame(
                f"content type {content_type!r} is not accepted; allowed: {', '.join(sorted(ALLOWED_TYPES))}"
            )
        data = await _read_limited(request, store.settings.max_bytes)
        if not data:
            raise BadFrame("empty media")
        _check_content(content_type, (request.charset or "").lower() or None, data)
        try:
            info = await store.put(principal.subject, content_type, data)
        except MediaUnavailable as e:
            raise Degraded("media store unavailable", retry_after_ms=1000) from e
    except TidewireError as e:
        return http_error(e)
    return json_response(info, status=201)


async def download(request: web.Request) -> web.Response:
    """`GET /v1/media/{media_id}`: the bytes, to their owner only."""
    store = request.app[MEDIA]
    try:
        check_origin(request, store.auth)  # the order of every admission (gateway/admission.py)
        principal = authenticate(request, store.auth)
        stored = await store.owned(request.match_info["media_id"], principal.subject)
        try:
            data = await store.read(request.match_info["media_id"])
        except MediaUnavailable as e:
            raise Degraded("media store unavailable", retry_after_ms=1000) from e
        if data is None:
            raise NotFound("no such media")
    except TidewireError as e:
        return http_error(e)
    return web.Response(
        body=data,
        content_type=stored.content_type,
        headers={"Cache-Control": "private, max-age=3600", "X-Content-Type-Options": "nosniff"},
    )
