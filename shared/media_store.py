"""The media object store: uploaded bytes by name, in the JetStream object store `subjects.MEDIA_BUCKET`.

A thin adapter: names, bytes and a free-text description in, the same out. What the description
holds (owner, content type) and who may read what is the gateway's business (`gateway.media`).
Every call is bounded by `timeout_s`; "not there" is `None`, and every other failure (the broker is
down or slow) is `MediaUnavailable`, so callers never see a nats-py exception.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import nats.errors
from nats.js.api import ObjectMeta
from nats.js.errors import BucketNotFoundError, ObjectNotFoundError

from shared import subjects
from shared.bus import Bus, media_store_config

__all__ = ["MediaObjects", "MediaUnavailable", "StoredObject"]

_TRANSIENT = (TimeoutError, OSError, nats.errors.Error)  # after the not-found cases are handled


class MediaUnavailable(Exception):
    """The object store could not be reached, or did not answer within the timeout."""


@dataclass(frozen=True)
class StoredObject:
    description: str
    size: int


class MediaObjects:
    """The media bucket, bound through a Bus (which owns the connection)."""

    def __init__(self, objects: Any, *, timeout_s: float) -> None:
        self._objects = objects
        self._timeout_s = timeout_s

    @classmethod
    async def open(cls, bus: Bus, *, ttl_s: float, max_bytes: int, timeout_s: float) -> MediaObjects:
        """Binds to the bucket, creating it on first use (idempotent across gateways)."""
        try:
            objects = await bus.js.object_store(subjects.MEDIA_BUCKET)
        except BucketNotFoundError:
            objects = await bus.js.create_object_store(
                subjects.MEDIA_BUCKET,
                config=media_store_config(ttl_s=ttl_s, max_bytes=max_bytes, replicas=bus.replicas),
            )
        return cls(objects, timeout_s=timeout_s)

    async def put(self, name: str, data: bytes, *, description: str) -> None:
        try:
            async with asyncio.timeout(self._timeout_s):
                await self._objects.put(name, data, meta=ObjectMeta(name=name, description=description))
        except _TRANSIENT as e:
            raise MediaUnavailable(f"media {name} not stored: {e!r}") from e

    async def info(self, name: str) -> StoredObject | None:
        """The object's description and size; None when there is no such object (or it expired)."""
        try:
            async with asyncio.timeout(self._timeout_s):
                info = await self._objects.get_info(name)
        except ObjectNotFoundError:
            return None
        except _TRANSIENT as e:
            raise MediaUnavailable(f"media {name} not looked up: {e!r}") from e
        return StoredObject(description=info.description or "", size=int(info.size or 0))

    async def read(self, name: str) -> bytes | None:
        """The object's bytes; None when there is no such object (or it expired)."""
        try:
            async with asyncio.timeout(self._timeout_s):
                result = await self._objects.get(name)
        except ObjectNotFoundError:
            return None
        except _TRANSIENT as e:
            raise MediaUnavailable(f"media {name} not read: {e!r}") from e
        return bytes(result.data or b"")
