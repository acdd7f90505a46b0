"""The tool-call ledger: what was started and what finished, per call key, in one KeyValue bucket.

Both sides of a tool call use this one adapter over `subjects.CALLS_BUCKET` (config:
`shared.bus.call_ledger_config`), with `proto.tools.CallRecord` as the value:

- a worker writes "started" BEFORE running a non-idempotent tool (`mark_started`, a create that
  fails if any record exists, so at most one worker ever starts the call) and "done" with the
  result after any run (`mark_done`);
- a dispatcher whose call was cancelled or timed out before a worker started it writes "done"
  first (`forestall`, the same create): the call then never starts later;
- a dispatcher whose job publish was deduplicated (the same turn re-run after a crash), and a
  worker given a redelivered job, answer from a "done" record (`get`) instead of running again.

Workers create the bucket (`open`); a dispatcher only binds to it once some worker has (`existing`),
since until then there is nothing to read or guard.
"""

from __future__ import annotations

import msgspec
from nats.js.errors import BadRequestError, BucketNotFoundError, KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from proto.tools import CallRecord
from shared import subjects
from shared.bus import Bus, call_ledger_config

__all__ = ["CallLedger"]

_decoder = msgspec.msgpack.Decoder(CallRecord)
_encoder = msgspec.msgpack.Encoder()


class CallLedger:
    """The `tw_tool_calls` bucket. Bound to a Bus, whose connection it does not own."""

    def __init__(self, kv: KeyValue) -> None:
        self._kv = kv

    @classmethod
    async def open(cls, bus: Bus, *, ttl_s: float) -> CallLedger:
        """Binds to the bucket, creating it if it does not exist yet (two workers racing is fine)."""
        try:
            return cls(await bus.js.key_value(subjects.CALLS_BUCKET))
        except BucketNotFoundError:
            pass
        try:
            return cls(await bus.js.create_key_value(call_ledger_config(ttl_s, bus.replicas)))
        except BadRequestError:
            return cls(await bus.js.key_value(subjects.CALLS_BUCKET))

    @classmethod
    async def existing(cls, bus: Bus) -> CallLedger | None:
        """The bucket if a worker has created it, else None (other NATS failures raise)."""
        try:
            return cls(await bus.js.key_value(subjects.CALLS_BUCKET))
        except BucketNotFoundError:
            return None

    async def get(self, key: str) -> CallRecord | None:
        try:
            entry = await self._kv.get(key)
        except KeyNotFoundError:
            return None
        return _decoder.decode(entry.value) if entry.value else None

    async def mark_started(self, key: str, *, name: str, attempt: int) -> bool:
        """False if the call already has a record: someone started (or forestalled) it before."""
        return await self._create(key, CallRecord(state="started", name=name, attempt=attempt))

    async def forestall(self, key: str, record: CallRecord) -> bool:
        """Writes a "done" record only if the call has none yet, so no worker will ever start it;
        False when it was already started or done (then a cancel is what stops it)."""
        return await self._create(key, record)

    async def mark_done(self, key: str, record: CallRecord) -> None:
        await self._kv.put(key, _encoder.encode(record))

    async def _create(self, key: str, record: CallRecord) -> bool:
        try:
            await self._kv.create(key, _encoder.encode(record))
        except KeyWrongLastSequenceError:
            return False
        return True
