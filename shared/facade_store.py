"""What the protocol facades remember in Redis: Idempotency-Key -> session, and a record per turn.

Neither is needed for a turn to be correct (the turn itself is durable in the event log); they make a
retried call with the same Idempotency-Key name the same session, and let a facade answer a turn
with what its caller asked for (model, metadata, ...). Both expire after `ttl_s`. The records' schema
is the facade's (`gateway/facades/common.py: TurnRecord`); this adapter stores their bytes.
"""

from __future__ import annotations

import redis.asyncio as aioredis

from shared.checkpoints import CheckpointStore
from shared.subjects import facade_idem_key, facade_record_key


class FacadeStore:
    """Redis adapter of the facades' records; built from the gateway's CheckpointStore."""

    def __init__(self, checkpoints: CheckpointStore | aioredis.Redis, *, ttl_s: float) -> None:
        self._redis = checkpoints.redis if isinstance(checkpoints, CheckpointStore) else checkpoints
        self._ttl_ms = int(ttl_s * 1000)

    # ---- Idempotency-Key -> session ----------------------------------------------------------------
    # `key_digest` names the caller, the endpoint and the key (the facade digests them: a key is
    # the caller's own, so two callers' equal keys never meet)
    async def keyed_session(self, key_digest: str) -> str | None:
        """The session the key named first, if it is remembered."""
        known = await self._redis.get(facade_idem_key(key_digest))
        return None if known is None else bytes(known).decode()

    async def remember_keyed_session(self, key_digest: str, session_id: str) -> str:
        """Records `session_id` under the key unless a racing first call did already; returns the
        session the key names now (that call's, when it won)."""
        k = facade_idem_key(key_digest)
        if not await self._redis.set(k, session_id, nx=True, px=self._ttl_ms):
            won = await self._redis.get(k)
            if won is not None:
                return bytes(won).decode()
        return session_id

    # ---- per-turn records -------------------------------------------------------------------------
    async def save_record(
        self, session_id: str, turn_id: str, record: bytes, *, replace: bool = False
    ) -> bytes | None:
        """Stores the turn's record unless one is there (`replace`: always). None when `record` was
        stored (or the one there vanished meanwhile), else the record already stored."""
        key = facade_record_key(session_id, turn_id)
        if await self._redis.set(key, record, nx=not replace, px=self._ttl_ms):
            return None
        raw = await self._redis.get(key)
        return None if raw is None else bytes(raw)

    async def record(self, session_id: str, turn_id: str) -> bytes | None:
        raw = await self._redis.get(facade_record_key(session_id, turn_id))
        return None if raw is None else bytes(raw)
