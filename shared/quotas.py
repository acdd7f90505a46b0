"""Per-subject connection slots in Redis, shared by every gateway (the per-subject message bucket is
spent inside `CheckpointStore.append_user`, with the message it admits).

Why Lua: each check is one atomic script clocked by Redis `TIME`, so gateways with skewed clocks
agree and many connections opening at once never exceed the cap. Connection slots are leases
(a sorted set scored by deadline) that a live gateway renews; the slots of a gateway that died
lapse by themselves. The policy (which rates, failing open when Redis is slow) is the caller's:
`gateway/limits.py`'s `SubjectLimits`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import redis.asyncio as aioredis

from shared.checkpoints import CheckpointStore
from shared.subjects import subject_key

_NOW_MS = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

# KEYS: slots ; ARGV: slot limit lease_ms -> 1 taken, 0 refused
_ACQUIRE = (
    _NOW_MS
    + """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if not redis.call('ZSCORE', KEYS[1], ARGV[1]) and redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then
  return 0
end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[1])
redis.call('PEXPIRE', KEYS[1], 2 * tonumber(ARGV[3]))
return 1
"""
)

# KEYS: slots ; ARGV: slot lease_ms
_RENEW = (
    _NOW_MS
    + """
redis.call('ZADD', KEYS[1], 'XX', now + tonumber(ARGV[2]), ARGV[1])
redis.call('PEXPIRE', KEYS[1], 2 * tonumber(ARGV[2]))
return 1
"""
)


class SubjectQuotas:
    """Redis adapter of the per-subject limits; built from the gateway's CheckpointStore (tests may
    pass a client)."""

    def __init__(self, checkpoints: CheckpointStore | aioredis.Redis) -> None:
        redis = checkpoints.redis if isinstance(checkpoints, CheckpointStore) else checkpoints
        self._redis = redis
        self._acquire = redis.register_script(_ACQUIRE)
        self._renew = redis.register_script(_RENEW)

    async def acquire_slot(self, subject: str, slot_id: str, limit: int, lease_ms: int) -> bool:
        """Takes (or renews) connection slot `slot_id` unless the subject already holds `limit` live ones."""
        ok: Any = await self._acquire(keys=[subject_key(subject, "conns")], args=[slot_id, limit, lease_ms])
        return int(ok) == 1

    async def release_slot(self, subject: str, slot_id: str) -> None:
        await self._redis.zrem(subject_key(subject, "conns"), slot_id)

    async def renew_slots(self, slots: Iterable[tuple[str, str]], lease_ms: int) -> None:
        """Extends every given (subject, slot_id) lease by `lease_ms`, in one pipelined round trip;
        a slot that already lapsed is not re-created."""
        async with self._redis.pipeline(transaction=False) as p:
            for subject, slot_id in slots:
                await self._renew(keys=[subject_key(subject, "conns")], args=[slot_id, lease_ms], client=p)
            await p.execute()
