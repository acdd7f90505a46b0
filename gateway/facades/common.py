"""What the protocol facades share: the caller, a turn started through the ordinary send path, the
turn's events read replay-then-live, the small records a facade keeps, and SSE output.

A facade never has a path of its own into the stores: a turn is started by `commands.send_message`
(persist before ack, deduplicated by `client_msg_id`), stopped by `commands.stop_turn`, and read
through the gateway's `Replayer` with the `SessionHub` as the wake-up — like the long-poll transport,
every event a facade translates comes from the stores, in seq order, one stored event per seq
(never a delta merged by a connection's outbound buffer), so a translation that is a pure function
of the turn's events gives the same output on every delivery and across a crash.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import msgspec
from aiohttp import web

from gateway import commands, sessions
from gateway.admission import admit_caller, open_stream
from gateway.auth import Principal
from gateway.deps import Deps
from gateway.hub import Wake
from gateway.keys import DEPS, HUB, REPLAYER, SSE_STREAMS, StreamStop
from gateway.limits import EDGE, check_session_id
from proto import client
from proto.client import Event
from shared import sessionstate
from shared.config import from_env
from shared.errors import BadFrame, Degraded, Forbidden, NotFound, TidewireError, TooLarge
from shared.facade_store import FacadeStore

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FacadeSettings:
    """`TIDEWIRE_FACADE_*`: what the OpenAI-compatible and AI SDK endpoints offer and how long they wait."""

    # `GET /v1/models`: the model routes this deployment offers. "tidewire" is the deployment's default
    # route (no session flag); any other listed name is set as the session's `model` flag
    # (docs/providers.md). An unlisted model name in a request is answered by the default route.
    models: tuple[str, ...] = ("tidewire", "simulated")
    wait_s: float = 600.0  # a non-streaming call, or a stream, waits at most this long for the turn's end
    reread_s: float = 2.0  # a waiting reader re-reads the store this often even without a live wake-up
    record_ttl_s: float = 7 * 86_400.0  # response records and idempotency keys


def facade_settings() -> FacadeSettings:
    return from_env(FacadeSettings, prefix="TIDEWIRE_FACADE_")


SETTINGS = web.AppKey("facade_settings", FacadeSettings)

# ---- the caller ------------------------------------------------------------------------------------


def caller(request: web.Request) -> Principal:
    """Admitted as on every other route (gateway/admission.py: the Origin, then the token)."""
    return admit_caller(request)


async def owned_session(deps: Deps, sid: str, subject: str) -> str:
    """The session, if it exists and belongs to the caller: 404 / 403 otherwise (never data)."""
    check_session_id(sid)
    await commands.authorize(deps, sid, subject)
    return sid


async def read_json(request: web.Request) -> Any:
    """The body as JSON, at most `max_frame_bytes` of it (413 beyond, 400 when it is not JSON)."""
    body = await sessions.read_body(request)
    try:
        value = msgspec.json.decode(body) if body.strip() else {}
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError) as e:
        raise BadFrame(f"invalid JSON body: {str(e)[:200]}") from e
    if not isinstance(value, dict):
        raise BadFrame("the body must be a JSON object")
    return value


def idempotency_key(request: web.Request) -> str | None:
    key = request.headers.get("Idempotency-Key")
    if key is None or key == "":
        return None
    if len(key) > 100:
        raise BadFrame("Idempotency-Key must be at most 100 characters")
    return key


# ---- turns -----------------------------------------------------------------------------------------


async def send_turn(
    request: web.Request, subject: str, sid: str, client_msg_id: str, text: str
) -> client.Ack:
    """One facade call = one turn, through the ordinary send path and the same edge checks as
    `POST /v1/sessions/{sid}/messages`: shedding (`degraded`) and the subject's message rate."""
    deps = request.app[DEPS]
    send = request.app[EDGE].admit_send(subject, None, client_msg_id, text)
    return await commands.send_message(
        deps, subject, sid, client.SendRequest(client_msg_id=client_msg_id, text=text), admitted=send
    )


async def new_session(request: web.Request, subject: str, model: str | None = None) -> str:
    deps = request.app[DEPS]
    sid = await commands.create_session(deps, subject)
    await apply_model(request, sid, model)
    return sid


async def apply_model(request: web.Request, sid: str, model: str | None) -> None:
    """A listed model other than the default route becomes the session's `model` flag."""
    settings = request.app[SETTINGS]
    if model is None or model == settings.models[0] or model not in settings.models:
        return
    deps = request.app[DEPS]
    flags = await commands.session_flags(deps, sid)
    if flags.get("model") != model:
        await deps.eventlog.set_session_flags(sid, {"model": model})
        deps.flag_cache.pop(sid, None)
        await sessionstate.invalidate(deps.checkpoints, sid)


def _digest(*parts: str) -> str:
    h = hashlib.sha256("\0".join(parts).encode()).digest()
    return base64.urlsafe_b64encode(h).decode().rstrip("=")[:32]


def facade_store(request: web.Request) -> FacadeStore:
    """The facades' records (shared/facade_store.py) on the gateway's checkpoint store; holds no
    connection of its own, so one per call costs nothing."""
    return FacadeStore(request.app[DEPS].checkpoints, ttl_s=request.app[SETTINGS].record_ttl_s)


async def session_for_key(
    request: web.Request, subject: str, scope: str, key: str, model: str | None = None
) -> str:
    """The session an Idempotency-Key first created (so a retried call starts no second turn), or a
    new one recorded under the key. Two racing first calls may leave one empty session behind."""
    store = facade_store(request)
    digest = _digest(subject, scope, key)
    try:
        known = await store.keyed_session(digest)
    except Exception as e:
        raise Degraded("idempotency store unavailable", retry_after_ms=1000) from e
    if known is not None:
        return known
    sid = await new_session(request, subject, model)
    return await store.remember_keyed_session(digest, sid)


async def derived_session(
    request: web.Request,
    subject: str,
    scope: str,
    key: str,
    *,
    prefix: str,
    create: bool,
    model: str | None = None,
) -> str:
    """The session a client's own conversation key names (an AI SDK chat id, an Open WebUI chat id):
    `<prefix><digest(subject, scope, key)>`, created on first use. Derived, not looked up, so it
    needs no mapping store, and two subjects' equal keys never meet."""
    deps = request.app[DEPS]
    if not 1 <= len(key) <= 128:
        raise BadFrame("a conversation key must be 1..128 characters")
    sid = prefix + _digest(subject, scope, key)
    row = await deps.eventlog.get_session(sid)
    if row is None:
        if not create:
            raise NotFound("no such chat")
        if await deps.eventlog.count_sessions(subject) >= deps.settings.max_sessions_per_subject:
            raise TooLarge("too many sessions for this user")
        await deps.eventlog.create_session(sid, subject, None)
        await apply_model(request, sid, model)
    elif row.subject != subject:  # the digest includes the subject: only a collision gets here
        raise Forbidden("this chat belongs to someone else")
    return sid


# ---- records: what a facade remembers about a turn it started --------------------------------------


class TurnRecord(msgspec.Struct, kw_only=True, omit_defaults=True):
    """Kept in Redis beside the session's keys (`shared.facade_store`, record_ttl_s); when it
    is gone the turn is still readable, with defaults and the input from the event log."""

    session_id: str
    turn_id: str
    user_seq: int
    created_at: int
    text: str
    model: str = "tidewire"
    instructions: str | None = None
    metadata: dict[str, str] | None = None
    background: bool = False
    store: bool = True
    previous_response_id: str | None = None
    conversation: bool = False  # the caller named the session as a conversation


_record_decoder = msgspec.json.Decoder(TurnRecord)


async def save_record(request: web.Request, record: TurnRecord, *, replace: bool = False) -> TurnRecord:
    """Stores the record unless one is there (a duplicate send keeps the first call's record)."""
    try:
        raw = await facade_store(request).save_record(
            record.session_id, record.turn_id, msgspec.json.encode(record), replace=replace
        )
    except Exception as e:  # noqa: BLE001 - the turn is durable; the record only adds metadata
        log.warning("facade record not stored: %s", e)
        return record
    return _record_decoder.decode(raw) if raw is not None else record


async def load_record(request: web.Request, sid: str, turn_id: str) -> TurnRecord:
    """The record of a turn of the (already authorized) session; 404 when the session has no such turn."""
    deps = request.app[DEPS]
    raw = None
    with contextlib.suppress(Exception):
        raw = await facade_store(request).record(sid, turn_id)
    if raw is not None:
        return _record_decoder.decode(raw)
    user = next(
        (m for m in await deps.eventlog.history(sid) if m.role == "user" and m.turn_id == turn_id), None
    )
    if user is None:
        raise NotFound("no such response")
    row = await deps.eventlog.get_session(sid)
    return TurnRecord(
        session_id=sid,
        turn_id=turn_id,
        user_seq=user.seq,
        text=user.text,
        created_at=int(row.created_at) if row else 0,
    )


async def active_turn(request: web.Request, sid: str) -> str | None:
    """The turn the session is answering (or about to answer) now, if any."""
    pending = await request.app[DEPS].checkpoints.pending(sid)
    return pending[0] if pending else None


# ---- the turn's events, replay then live ----------------------------------------------------------

STORE_RETRY_FIRST_S = 0.25
STORE_RETRY_MAX_S = 2.0


class TurnNotEnded(TidewireError):
    """A reader waited `wait_s` and the turn still had not ended."""

    code = "degraded"
    http_status = 504


async def turn_events(
    request: web.Request, sid: str, turn_id: str, user_seq: int, *, live: bool = True
) -> AsyncIterator[Event]:
    """The turn's events after its user message, in seq order, each exactly once, ending with its
    `turn_end`. Subscribes first, then reads pages from the stores; with nothing new it waits for a
    live wake-up (or `reread_s`), clearing the flag before each read so no arrival is missed.
    `live=False` returns what is stored now. A store outage is retried with backoff until `wait_s`."""
    replayer, hub = request.app[REPLAYER], request.app[HUB]
    settings = request.app[SETTINGS]
    wake = Wake()
    deadline = time.monotonic() + settings.wait_s
    if live:
        await hub.join(sid, wake)
    try:
        last = user_seq
        delay = STORE_RETRY_FIRST_S
        while True:
            wake.arrived.clear()
            try:
                raws = await replayer.page(sid, last)
            except Exception as e:  # noqa: BLE001 - a store is down: keep the caller, read again
                if time.monotonic() + delay > deadline:
                    raise Degraded("event store unavailable", retry_after_ms=1000) from e
                log.warning("facade read of session %s failed (%s); retrying in %g s", sid, e, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, STORE_RETRY_MAX_S)
                continue
            delay = STORE_RETRY_FIRST_S
            if raws:
                for raw in raws:
                    ev = client.event_decoder.decode(raw)
                    if ev.seq <= last:
                        continue
                    last = ev.seq
                    if ev.turn_id != turn_id or isinstance(ev, client.Message):
                        continue
                    yield ev
                    if isinstance(ev, client.TurnEnd):
                        return
                continue
            if not live:
                return
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TurnNotEnded(f"turn {turn_id} did not end within {settings.wait_s:g} s")
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(settings.reread_s, remaining)):
                    await wake.arrived.wait()
    finally:
        if live:
            await hub.leave(sid, wake)


async def stored_events(request: web.Request, sid: str, turn_id: str, user_seq: int) -> list[Event]:
    return [ev async for ev in turn_events(request, sid, turn_id, user_seq, live=False)]


# ---- SSE output ------------------------------------------------------------------------------------


def admitted(
    request: web.Request, principal: Principal, sid: str, *, holds: bool = True
) -> contextlib.AbstractAsyncContextManager[Any]:
    """A facade call that streams or waits is admitted like every other stream (gateway/admission.py
    `open_stream`: the session's ownership, then one of the subject's connection slots, held until
    the call ends), before it sends anything, so a refused call starts no turn. The facade replays
    by turn, so the resume point is not used. `holds=False` (a background response): no slot."""
    if not holds:
        return contextlib.nullcontext()
    return open_stream(request, sid, None, transport="facade", principal=principal)


async def stream_sse(
    request: web.Request,
    headers: dict[str, str],
    produce: Callable[[Callable[[bytes], Awaitable[None]]], Awaitable[None]],
) -> web.StreamResponse:
    """Writes what `produce` gives to an SSE response, with a comment line as heartbeat; the caller
    holds the stream's admission (`admitted`). A stream that `produce` finished ends cleanly; any
    other end (drain, timeout, store outage, a write that failed) closes the connection without a
    clean end, so a client can tell a complete answer from a broken stream and resume."""
    deps = request.app[DEPS]
    resp = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no",
            **headers,
        }
    )
    await resp.prepare(request)
    stopper = StreamStop()
    request.app[SSE_STREAMS].add(stopper)  # a drain sets stopper.stop: the stream ends, not cleanly
    deps.counters.sse_streams += 1
    lock = asyncio.Lock()
    last_write = time.monotonic()
    clean = False

    async def write(chunk: bytes) -> None:
        nonlocal last_write
        async with lock, asyncio.timeout(10):
            await resp.write(chunk)
        last_write = time.monotonic()

    async def heartbeat() -> None:
        every = deps.settings.sse_heartbeat_s
        while True:
            await asyncio.sleep(every / 3)
            if time.monotonic() - last_write >= every * 0.66:
                await write(b": hb\n\n")

    try:
        async with asyncio.TaskGroup() as tg:
            beat = tg.create_task(heartbeat())

            async def producer() -> None:
                await produce(write)

            producing = tg.create_task(producer())
            stopping = tg.create_task(stopper.stop.wait())
            await asyncio.wait([producing, stopping], return_when=asyncio.FIRST_COMPLETED)
            beat.cancel()
            stopping.cancel()
            if not producing.done():  # draining: the client resumes elsewhere
                producing.cancel()
        clean = producing.done() and not producing.cancelled()
    except* TidewireError as eg:
        log.warning("facade stream of %s ended early: %s", request.path, eg.exceptions[0])
    except* (ConnectionError, TimeoutError, RuntimeError, asyncio.CancelledError):
        pass
    except* Exception:
        log.exception("facade stream of %s failed", request.path)
    finally:
        deps.counters.sse_streams -= 1
        stopper.done.set()
        if clean:
            with contextlib.suppress(Exception):
                await resp.write_eof()
        elif request.transport is not None:
            request.transport.close()
    return resp


json_encode = msgspec.json.Encoder().encode
