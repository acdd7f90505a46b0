"""Session state in Redis: a versioned msgspec payload with a TTL, rebuilt from the event log.

Never an opaque blob: `proto.state.SessionState` is the schema; `version` says which one wrote it,
and `migrate` lifts older payloads to the current version on read. The state is a cache of the
event log and the session's flags: whoever changes the flags drops it (`invalidate`), and the next
turn rebuilds it.
"""

from __future__ import annotations

from typing import Any

import msgspec

from proto.state import SESSION_STATE_VERSION, ChatMessage, SessionState
from shared.checkpoints import CheckpointStore
from shared.eventlog import EventLog
from shared.subjects import rkey

_decoder = msgspec.msgpack.Decoder(dict[str, Any])
_READ = object()  # SessionStore.load: read the stored state from Redis
_encoder = msgspec.msgpack.Encoder()


def migrate(raw: dict[str, Any]) -> SessionState:
    """Lifts a stored payload to the current version (v0 had `messages` instead of `window`)."""
    version = int(raw.get("version", 0))
    if version == 0:
        raw = {**raw, "window": raw.pop("messages", []), "version": 1}
    if int(raw["version"]) > SESSION_STATE_VERSION:
        raise ValueError(f"session state version {raw['version']} is newer than this build")
    return msgspec.convert(raw, SessionState)


async def invalidate(checkpoints: CheckpointStore, session_id: str) -> None:
    """Drops the session's stored state (the gateway, after changing its flags): the next turn
    rebuilds it from the event log and the new flags."""
    await checkpoints.redis.delete(rkey(session_id, "state"))


class SessionStore:
    def __init__(
        self, checkpoints: CheckpointStore | Any, eventlog: EventLog, *, ttl_s: float, window: int
    ) -> None:
        """Built from the CheckpointStore (whose Redis holds the state beside the session's other keys);
        a Redis client is still accepted."""
        self._redis = checkpoints.redis if isinstance(checkpoints, CheckpointStore) else checkpoints
        self._eventlog = eventlog
        self._ttl_ms = int(ttl_s * 1000)
        self._window = window
        self.rebuilds = 0

    async def load(
        self, session_id: str, subject: str, *, stored: bytes | None | object = _READ
    ) -> SessionState:
        """The stored state (`stored`: already read, e.g. in the turn's claim; None: known absent),
        or one rebuilt from the event log."""
        raw = await self._redis.get(rkey(session_id, "state")) if stored is _READ else stored
        if isinstance(raw, bytes):
            try:
                return migrate(_decoder.decode(raw))
            except (msgspec.ValidationError, msgspec.DecodeError, ValueError, KeyError):
                pass
        return await self.rebuild(session_id, subject)

    async def rebuild(self, session_id: str, subject: str) -> SessionState:
        self.rebuilds += 1
        rows = await self._eventlog.window(session_id, self._window)
        window = [
            ChatMessage(role="user" if role == "user" else "assistant", text=text, turn_id=turn_id, seq=seq)
            for seq, role, text, turn_id in rows
        ]
        row = await self._eventlog.get_session(session_id)
        state = SessionState(
            session_id=session_id, subject=subject, window=window, flags=dict(row.flags) if row else {}
        )
        await self.save(state)
        return state

    def encode(self, state: SessionState) -> bytes:
        """What `save` stores (the window trimmed); the turn path stores it in its finish step."""
        state.window = state.window[-self._window :]
        return _encoder.encode(state)

    async def save(self, state: SessionState) -> None:
        await self._redis.set(rkey(state.session_id, "state"), self.encode(state), px=self._ttl_ms)

    async def invalidate(self, session_id: str) -> None:
        """Drops the stored state; the next `load` rebuilds it."""
        await self._redis.delete(rkey(session_id, "state"))
