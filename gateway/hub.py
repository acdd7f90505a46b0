"""Per-process fan-out: one NATS subscription per watched session, shared by all its connections.

A session watched by a thousand connections on one gateway costs one subscription; each event is
decoded once and handed to every connection's feed in memory. The hub also publishes presence
(how many connections watch a session here) for the orchestrators' disconnect policy.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import secrets
from collections.abc import Callable
from typing import Any, Protocol

import msgspec

from proto.client import Event
from shared.bus import Bus, BusMessage
from shared.checkpoints import CheckpointStore
from shared.supervise import supervised

log = logging.getLogger(__name__)
_events_decoder = msgspec.json.Decoder(list[Event])
PRESENCE_TTL_MS = 6000
PRESENCE_EVERY_S = PRESENCE_TTL_MS / 3000  # three liveness writes per TTL


class Listener(Protocol):
    def on_live(self, events: list[Event]) -> None: ...

    def resync(self) -> None:
        """Live events may have been lost (the NATS connection was re-established): re-read the stores."""
        ...


class Wake:
    """A listener that only notes that something arrived (or that the stores must be re-read):
    readers that answer from the stores (long-poll, the facades) wait on it."""

    __slots__ = ("arrived",)

    def __init__(self) -> None:
        self.arrived = asyncio.Event()

    def on_live(self, events: list[Event]) -> None:
        self.arrived.set()

    def resync(self) -> None:
        self.arrived.set()


class _Entry:
    __slots__ = ("listeners", "sub", "ready")

    def __init__(self) -> None:
        self.listeners: set[Listener] = set()
        self.sub: Any = None
        self.ready = asyncio.Event()


class SessionHub:
    def __init__(self, bus: Bus, checkpoints: CheckpointStore, gateway_id: str) -> None:
        self._bus = bus
        self._cp = checkpoints
        # per process: a restarted gateway with the same name must not inherit its predecessor's watches
        self.instance = f"{gateway_id}/{secrets.token_hex(4)}"
        self._entries: dict[str, _Entry] = {}

    def resync_all(self) -> None:
        for entry in list(self._entries.values()):
            for listener in list(entry.listeners):
                listener.resync()

    def watched_sessions(self) -> dict[str, int]:
        return {sid: len(e.listeners) for sid, e in self._entries.items()}

    async def join(self, session_id: str, listener: Listener) -> None:
        """Returns once live events of the session reach the listener."""
        entry = self._entries.get(session_id)
        if entry is None:
            entry = self._entries[session_id] = _Entry()
            entry.listeners.add(listener)
            try:
                entry.sub = await self._bus.subscribe_session(session_id, self._callback(session_id))
            except BaseException:
                self._entries.pop(session_id, None)
                entry.ready.set()
                raise
            entry.ready.set()
            await self._presence(session_id, 1)
        else:
            entry.listeners.add(listener)
            await entry.ready.wait()
            if entry.sub is None:
                raise ConnectionError("session subscription failed")

    async def leave(self, session_id: str, listener: Listener) -> None:
        entry = self._entries.get(session_id)
        if entry is None:
            return
        entry.listeners.discard(listener)
        if not entry.listeners and entry.ready.is_set():
            self._entries.pop(session_id, None)
            if entry.sub is not None:
                try:
                    await self._bus.unsubscribe(entry.sub)
                except Exception:  # noqa: BLE001 - connection may be gone; the server forgets it anyway
                    pass
            await self._presence(session_id, 0)

    def _callback(self, session_id: str) -> Callable[[BusMessage], Any]:
        async def cb(msg: BusMessage) -> None:
            entry = self._entries.get(session_id)
            if entry is None:
                return
            try:
                events = _events_decoder.decode(msg.data)
            except msgspec.DecodeError as e:  # malformed JSON as well as a wrong shape
                log.error("undecodable live payload on session %s: %s", session_id, e)
                return
            for listener in list(entry.listeners):
                listener.on_live(events)

        return cb

    async def _presence(self, session_id: str, count: int) -> None:
        try:
            await self._cp.set_watchers(session_id, self.instance, count)
        except Exception as e:  # noqa: BLE001 - presence is advisory; never fail a connection on it
            log.warning("presence update of session %s failed: %s", session_id, e)

    async def refresh_presence(self) -> None:
        """Runs for the life of the process: one liveness write per tick, however many sessions are
        watched here (a dead gateway's watches lapse with its key). A failed write is retried at the
        next tick, never later: a backoff would let a live gateway's key lapse (TTL = 3 ticks)."""
        try:
            await supervised(
                "presence",
                functools.partial(self._cp.gateway_alive, self.instance, PRESENCE_TTL_MS),
                every_s=PRESENCE_EVERY_S,
                max_backoff_s=PRESENCE_EVERY_S,
                logger=log,
            )
        finally:
            with contextlib.suppress(Exception):
                await asyncio.shield(self._cp.gateway_gone(self.instance))
