"""Per-subject quotas in Redis, shared by every gateway: a message token bucket and connection slots.

Why Lua: each check is one atomic script clocked by Redis `TIME`, so gateways with skewed clocks
agree and many tasks spending one bucket at once never overspend it. Connection slots are leases
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

# KEYS: bucket ; ARGV: rate_per_s burst cost -> ms to wait (0 = taken)
_TAKE = (
    _NOW_MS
    + """
local rate, burst, cost = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local b = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens = tonumber(b[1]) or burst
local ts = tonumber(b[2]) or now
tokens = math.min(burst, tokens + math.max(0, now - ts) * rate / 1000)
local wait = 0
if tokens >= cost then tokens = tokens - cost else wait = math.ceil((cost - tokens) * 1000 / rate) end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'ts', tostring(now))
redis.call('PEXPIRE', KEYS[1], math.ceil(burst * 1000 / rate) + 1000)
return wait
"""
)

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
        self._take = redis.register_script(_TAKE)
        self._acquire = redis.register_script(_ACQUIRE)
        self._renew = redis.register_script(_RENEW)

    async def take_message(self, subject: str, rate_per_s: float, burst: float, cost: float = 1) -> int:
        """Spends `cost` from the subject's message bucket: 0 when taken, else the ms to wait
        (nothing is spent then)."""
        wait: Any = await self._take(keys=[subject_key(subject, "msgs")], args=[rate_per_s, burst, cost])
        return int(wait)

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
