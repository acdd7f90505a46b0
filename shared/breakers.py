"""The model upstreams' circuit breakers, mirrored in Redis from the orchestrators to the gateways.

An orchestrator publishes each upstream it routes to in `BREAKERS_SEEN` (scored by a "seen until"
time, re-listed every tick, so an upstream nobody routes to any more is forgotten), and an open
breaker as `breaker_key(upstream)` whose TTL is the remaining cooldown, so a dead orchestrator leaves
nothing stuck (orchestrator/upstream.py). The gateway's load shedder asks `every_upstream_open`:
when every upstream seen has its breaker open, a new send would only queue a doomed turn
(gateway/limits.py). Both sides use this one adapter, so the key names and the record meet.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterable
from typing import Any, TypeAlias

import msgspec
import redis.asyncio as aioredis

from shared.checkpoints import CheckpointStore
from shared.subjects import BREAKERS_SEEN, breaker_key


class BreakerSnapshot(msgspec.Struct, frozen=True, kw_only=True):
    """An upstream's breaker as the gateways read it."""

    upstream: str
    state: str
    retry_after_ms: int


class BreakerMirror:
    """Redis adapter of the breaker mirror; built from a CheckpointStore (tests may pass a client)."""

    def __init__(self, checkpoints: CheckpointStore | aioredis.Redis) -> None:
        self._redis = checkpoints.redis if isinstance(checkpoints, CheckpointStore) else checkpoints

    @classmethod
    def of(cls, source: MirrorSource) -> BreakerMirror:
        """`source` itself when it is a mirror, else a mirror built from it."""
        return source if isinstance(source, BreakerMirror) else cls(source)

    # ---- the orchestrators' side -------------------------------------------------------------------
    async def list_upstreams(self, upstreams: Iterable[str], seen_for_ms: int) -> None:
        """Lists `upstreams` as routed to for the next `seen_for_ms` (the set itself lapses as long
        after the last listing)."""
        until = int(time.time() * 1000) + seen_for_ms
        mapping = {name: until for name in upstreams}
        if mapping:
            await self._redis.zadd(BREAKERS_SEEN, mapping)
        await self._redis.pexpire(BREAKERS_SEEN, seen_for_ms)

    async def publish_open(self, upstream: str, remaining_ms: int) -> None:
        """The upstream's breaker is open for `remaining_ms` more (the key lapses then)."""
        remaining_ms = max(1, remaining_ms)
        value = json.dumps(
            {"upstream": upstream, "state": "open", "until_unix": time.time() + remaining_ms / 1000}
        )
        await self._redis.set(breaker_key(upstream), value, px=remaining_ms)

    async def clear(self, upstream: str) -> None:
        """Withdraws an open breaker this caller published (it closed or went half-open)."""
        await self._redis.delete(breaker_key(upstream))

    # ---- the gateways' side -----------------------------------------------------------------------
    async def read(self, upstream: str) -> BreakerSnapshot | None:
        """None when no orchestrator reports the upstream's breaker open (or the record is unreadable)."""
        raw = await self._redis.get(breaker_key(upstream))
        if raw is None:
            return None
        try:
            data = json.loads(raw)
            remaining = float(data["until_unix"]) - time.time()
        except (ValueError, KeyError, TypeError):
            return None
        if remaining <= 0:
            return None
        return BreakerSnapshot(
            upstream=upstream,
            state=str(data.get("state", "open")),
            retry_after_ms=max(1, math.ceil(remaining * 1000)),
        )

    async def every_upstream_open(self) -> int | None:
        """Milliseconds until the first breaker half-opens, when every upstream that an orchestrator
        listed recently has its breaker open; None when one is closed, half-open or none is listed.

        Two round trips: the listed upstreams ("seen until" scores in the orchestrators' clock, kept
        10 s ahead, so a few seconds of skew are harmless), then the TTL of each one's open-breaker key.
        """
        now_ms = int(time.time() * 1000)
        names: list[Any] = await self._redis.zrangebyscore(BREAKERS_SEEN, now_ms, "+inf")
        if not names:
            return None
        async with self._redis.pipeline(transaction=False) as p:
            for name in names:
                p.pttl(breaker_key(name.decode() if isinstance(name, bytes) else str(name)))
            ttls = [int(t) for t in await p.execute()]
        if any(t <= 0 for t in ttls):  # -2: no key (closed or half-open)
            return None
        return min(ttls)


# what callers may hand where a mirror is wanted: a mirror, or what one is built from
MirrorSource: TypeAlias = "BreakerMirror | CheckpointStore | aioredis.Redis"
