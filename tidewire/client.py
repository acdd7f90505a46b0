"""`TidewireClient`: an asyncio Python client for one Tidewire session (PROTOCOL.md, v1, WebSocket).

The client owns one background connection task. On every (re)connect it says `hello` with its
`last_seen_seq`, so the server replays exactly what was missed; it reconnects with exponential
backoff and full jitter; it keeps every unacknowledged message and resends it (same
`client_msg_id`, which the server deduplicates) after each reconnect until it is acked; it drops
events it has already seen (`seq <= last_seen_seq`), so `events()` yields each event exactly once;
and it rebuilds each assistant turn's text from deltas by code-point offset, so the text is exact
across drops, replays and merged deltas. Every network operation has a timeout and every buffer is
bounded.

Errors about one frame carry no id of that frame unless the server sets `error.ref`; the server
answers one connection's frames strictly in order, so an error without `ref` is matched to the
oldest request still waiting for an answer on that connection (`send` → ack|error, `ping` →
pong|error; a `stop` is followed by a `ping`, whose pong proves the stop was accepted).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import urllib.parse
import uuid
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Literal

import aiohttp
import msgspec
from yarl import URL

from proto import client

__all__ = [
    "EVENT_QUEUE_MAX",
    "UNACKED_MAX",
    "State",
    "TidewireClient",
    "TidewireError",
    "TurnAssembler",
    "backoff_delay",
]

log = logging.getLogger(__name__)

State = Literal["connecting", "connected", "reconnecting", "offline"]
OnState = Callable[[str, float | None], None]

#: Close codes after which reconnecting cannot help: the token or the session is refused.
FATAL_CLOSE_CODES: dict[int, str] = {4401: "unauthorized", 4403: "forbidden"}
#: Error codes meaning "nothing was accepted, try again later"; resending is safe (dedupe by id).
RETRYABLE_ERRORS = frozenset({"degraded", "rate_limited", "internal"})

EVENT_QUEUE_MAX = 10_000  # events buffered between the connection and `events()`
UNACKED_MAX = 1_000  # messages sent but not yet acked; `send` refuses more
TURNS_KEPT = 256  # turns whose assembled text / turn_end is remembered
SEND_ERROR_RETRIES = 5  # resends of one message after degraded / rate_limited / internal
INFLIGHT_MAX = 4_096
WRITE_TIMEOUT_S = 10.0
WS_CLOSE_TIMEOUT_S = 3.0

_created_decoder = msgspec.json.Decoder(client.CreateSessionResponse)
_history_decoder = msgspec.json.Decoder(client.SessionHistory)


class TidewireError(Exception):
    """A refusal from the server: an `error` frame, an HTTP error body, or a fatal close (4401/4403).

    `code` is PROTOCOL.md's `error.code`; `retry_after_ms` is set when waiting helps (degraded,
    rate_limited).
    """

    def __init__(self, code: str, message: str, retry_after_ms: int | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.retry_after_ms = retry_after_ms

    @classmethod
    def from_frame(cls, error: client.Error) -> TidewireError:
        return cls(error.code, error.message, error.retry_after_ms)


class _ConnectionLost(Exception):
    """The connection ended before a request on it was answered (retried on the next one)."""


def backoff_delay(
    attempt: int,
    base_s: float = 0.25,
    cap_s: float = 30.0,
    uniform: Callable[[float, float], float] = random.uniform,
) -> float:
    """Reconnect delay with full jitter: uniform in [0, min(cap, base * 2**attempt)].

    Full jitter spreads a crowd of clients dropped at the same moment (a gateway restart) over the
    whole window instead of letting them return in synchronized waves.
    """
    ceiling = min(cap_s, base_s * 2.0 ** min(max(attempt, 0), 64))
    return uniform(0.0, ceiling)


class TurnAssembler:
    """One turn's text rebuilt from deltas addressed by code-point offset.

    A delta covers `[offset, offset + len(text))` in code points (a Python `str` indexes code
    points, so offsets apply directly). Ranges already covered (replays, merged deltas overlapping
    what was seen) are ignored, so text is never doubled; deltas that arrive ahead of a hole wait
    until the hole is filled, so `text` is always the gap-free prefix.
    """

    __slots__ = ("_ahead", "_cache", "_len", "_parts")

    def __init__(self) -> None:
        self._parts: list[str] = []
        self._len = 0
        self._cache: str | None = ""
        self._ahead: dict[int, str] = {}

    @property
    def text(self) -> str:
        if self._cache is None:
            self._cache = "".join(self._parts)
            self._parts = [self._cache]
        return self._cache

    def __len__(self) -> int:
        return self._len

    def apply(self, offset: int, text: str) -> str:
        """Applies one delta; returns the text it added to the end of the gap-free prefix."""
        before = self._len
        if offset > self._len:
            held = self._ahead.get(offset)
            if held is None or len(held) < len(text):
                self._ahead[offset] = text
            return ""
        self._extend(offset, text)
        while self._ahead:
            nearest = min(self._ahead)
            if nearest > self._len:
                break
            self._extend(nearest, self._ahead.pop(nearest))
        if self._len == before:
            return ""
        return self.text[before:]

    def _extend(self, offset: int, text: str) -> None:
        end = offset + len(text)
        if end > self._len:
            self._parts.append(text[self._len - offset :])
            self._len = end
            self._cache = None


@dataclass(eq=False)
class _Pending:
    """A message sent (or waiting to be sent) and not yet acked."""

    frame: client.Send
    future: asyncio.Future[client.Ack]
    writes: int = 0
    sent_on: int = -1  # connection generation it was last written on
    error_retries: int = 0
    retry_timer: asyncio.Task[None] | None = None


@dataclass(eq=False)
class _Inflight:
    """A request written on the current connection that the server will answer (or refuse) in order."""

    kind: Literal["send", "ping", "stop"]
    key: str = ""
    future: asyncio.Future[None] | None = field(default=None)


class TidewireClient:
    """One session over WebSocket, resumed exactly across reconnects.

    Use as `async with TidewireClient(url, token) as c:`; `send`/`ask` talk, `events()` listens.
    `on_state(state, retry_in_s)` is told every state change ("connecting", "connected",
    "reconnecting" with the delay before the next attempt, "offline") and, once per `ready` with
    `reset: true`, `("reset", None)`: the server could not resume, so the app should reload
    `history()`.
    """

    def __init__(
        self,
        base_url: str,
        token: str,
        *,
        session_id: str | None = None,
        delivery: str = "tokens",
        connect_timeout_s: float = 10,
        backoff_base_s: float = 0.25,
        backoff_cap_s: float = 30.0,
        heartbeat_s: float = 15.0,
        on_state: OnState | None = None,
        max_queued_events: int = EVENT_QUEUE_MAX,
        max_unacked: int = UNACKED_MAX,
    ) -> None:
        if delivery not in ("tokens", "phrases", "batched"):
            raise ValueError(f"delivery must be tokens, phrases or batched, not {delivery!r}")
        self._base = base_url.rstrip("/")
        self._token = token
        self._session_id = session_id
        self._delivery: client.Delivery = delivery  # type: ignore[assignment]
        self._connect_timeout_s = connect_timeout_s
        self._backoff_base_s = backoff_base_s
        self._backoff_cap_s = backoff_cap_s
        self._heartbeat_s = heartbeat_s
        self._on_state = on_state
        self._max_unacked = max_unacked

        self._state: State = "offline"
        self._last_seen_seq = 0
        self._http: aiohttp.ClientSession | None = None
        self._runner: asyncio.Task[None] | None = None
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._generation = 0
        self._write_lock = asyncio.Lock()
        self._connected = asyncio.Event()
        self._halted = asyncio.Event()  # closed or fatal: waiters give up
        self._got_ready = False
        self._ever_ready = False
        self._attempt = 0
        self._fatal: TidewireError | None = None
        self._closed = False

        self._inflight: deque[_Inflight] = deque()
        self._unacked: OrderedDict[str, _Pending] = OrderedDict()
        self._timers: set[asyncio.Task[None]] = set()
        self._queue: asyncio.Queue[client.Event | None] = asyncio.Queue(maxsize=max_queued_events)
        self._room = asyncio.Event()
        self._consumers = 0
        self._turns: OrderedDict[str, TurnAssembler] = OrderedDict()
        self._ended: OrderedDict[str, client.TurnEnd] = OrderedDict()
        self._turn_waiters: dict[str, list[asyncio.Future[client.TurnEnd]]] = {}
        self._current_turn: str | None = None

        #: Successful `ready`s after the first one.
        self.reconnects = 0
        #: Reconnects that resumed from `last_seen_seq` (ready without reset).
        self.resumes = 0
        #: `ready`s with `reset: true` (history must be reloaded).
        self.resets = 0
        #: Messages written again with the same client_msg_id (after a reconnect or a retryable error).
        self.resends = 0
        #: Events dropped because their seq was already seen (replay overlap).
        self.duplicates_dropped = 0
        #: Events dropped from a full queue nobody was reading from (see `events()`).
        self.events_dropped = 0
        #: Frames the client could not decode (frame types added by a newer server).
        self.unknown_frames = 0

    # ---- lifecycle --------------------------------------------------------------------------

    async def __aenter__(self) -> TidewireClient:
        await self.connect()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def connect(self, *, wait: bool = True) -> None:
        """Creates the session if none was given, then starts the connection task.

        With `wait` (the default) it returns once the first `ready` arrived, or raises (and closes
        the client) on a fatal refusal or after `connect_timeout_s`. Without it, `send` may be
        called at once: messages are queued and written when the connection is ready.
        """
        if self._closed:
            raise ConnectionError("client is closed")
        if self._runner is not None:
            return
        try:
            if self._session_id is None:
                self._session_id = await self._create_session()
            self._set_state("connecting", None)
            self._runner = asyncio.create_task(self._run(), name=f"tidewire-client-{self._session_id}")
            if wait:
                await self._wait_connected(self._connect_timeout_s)
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        """Stops the connection task and fails what still waits; `events()` ends after what is queued."""
        if self._closed:
            return
        self._closed = True
        self._halted.set()
        if self._runner is not None:
            self._runner.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._runner
        for timer in list(self._timers):
            timer.cancel()
        self._fail_waiters(ConnectionError("client closed"))
        if self._http is not None:
            await self._http.close()
        self._end_stream()
        self._set_state("offline", None)

    # ---- properties -------------------------------------------------------------------------

    @property
    def session_id(self) -> str | None:
        return self._session_id

    @property
    def last_seen_seq(self) -> int:
        return self._last_seen_seq

    @property
    def state(self) -> State:
        return self._state

    @property
    def current_turn(self) -> str | None:
        """The latest turn that started and has not ended, as far as this client has seen."""
        return self._current_turn

    @property
    def unacked(self) -> int:
        return len(self._unacked)

    # ---- commands ---------------------------------------------------------------------------

    async def send(
        self, text: str, *, client_msg_id: str | None = None, timeout: float = 120.0
    ) -> client.Ack:
        """Sends a user message and returns its ack (written only once it is durable on the server).

        Until acked, the message is resent with the same `client_msg_id` after every reconnect, and
        after `retry_after_ms` on degraded / rate_limited / internal (at most SEND_ERROR_RETRIES
        times), which is safe because the server deduplicates by id. Raises TidewireError on a
        final refusal, TimeoutError after `timeout` (resend the same id to find out what happened).
        """
        self._check_usable()
        cmid = client_msg_id or str(uuid.uuid4())
        existing = self._unacked.get(cmid)
        if existing is not None:
            async with asyncio.timeout(timeout):
                return await asyncio.shield(existing.future)
        if len(self._unacked) >= self._max_unacked:
            raise TidewireError(
                "rate_limited", f"{self._max_unacked} messages are already waiting for an ack"
            )
        pending = _Pending(
            client.Send(client_msg_id=cmid, text=text), asyncio.get_running_loop().create_future()
        )
        self._unacked[cmid] = pending
        try:
            async with asyncio.timeout(timeout):
                if self._connected.is_set():
                    await self._write_pending(pending)
                return await pending.future
        finally:
            if not pending.future.done():
                pending.future.cancel()
            if self._unacked.get(cmid) is pending:
                del self._unacked[cmid]
            if pending.retry_timer is not None:
                pending.retry_timer.cancel()

    async def stop(self, turn_id: str | None = None, *, timeout: float = 10.0) -> None:
        """Asks the server to cancel `turn_id` (or the current turn); returns once it was accepted.

        The turn then ends with `turn_end {status: "cancelled"}` in the event stream.
        """
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(timeout):
            while True:
                await self._wait_connected(None)
                accepted: asyncio.Future[None] = loop.create_future()
                if not await self._write(
                    client.Stop(turn_id=turn_id), _Inflight("stop", turn_id or "", accepted)
                ):
                    await asyncio.sleep(0.05)
                    continue
                await self._write(client.Ping(), _Inflight("ping"))  # its pong proves the stop was handled
                try:
                    await accepted
                    return
                except _ConnectionLost:
                    continue
                except TidewireError as e:
                    if e.code not in RETRYABLE_ERRORS:
                        raise
                    await asyncio.sleep((e.retry_after_ms or 500) / 1000)

    async def ask(self, text: str, *, timeout: float = 120) -> client.TurnEnd:
        """Sends `text` and returns the `turn_end` of the turn it started (whatever its status)."""
        async with asyncio.timeout(timeout):
            ack = await self.send(text, timeout=timeout)
            return await self.wait_turn(ack.turn_id, timeout=timeout)

    async def wait_turn(self, turn_id: str, *, timeout: float = 120) -> client.TurnEnd:
        """Waits for the `turn_end` of `turn_id` (returns at once if it was already seen)."""
        ended = self._ended.get(turn_id)
        if ended is not None:
            return ended
        self._check_usable()
        waiter: asyncio.Future[client.TurnEnd] = asyncio.get_running_loop().create_future()
        waiters = self._turn_waiters.setdefault(turn_id, [])
        waiters.append(waiter)
        try:
            async with asyncio.timeout(timeout):
                return await waiter
        finally:
            if waiter in waiters:
                waiters.remove(waiter)
            if not waiters:
                self._turn_waiters.pop(turn_id, None)

    def turn_text(self, turn_id: str) -> str:
        """The turn's text assembled from its deltas alone (gap-free prefix; "" for an unknown turn).

        It never consults `turn_end.text`, so comparing the two checks the stream was exact.
        """
        assembler = self._turns.get(turn_id)
        return assembler.text if assembler is not None else ""

    def turn_end(self, turn_id: str) -> client.TurnEnd | None:
        """The `turn_end` of a recently seen turn, or None."""
        return self._ended.get(turn_id)

    async def history(self) -> client.SessionHistory:
        """The durable history (`GET /v1/sessions/{sid}`); reload it after a `reset`."""
        if self._session_id is None:
            raise ConnectionError("no session yet: call connect() first")
        status, body = await self._request(
            "GET", f"/v1/sessions/{urllib.parse.quote(self._session_id, safe='')}"
        )
        if status != 200:
            raise _http_error(status, body)
        return _history_decoder.decode(body)

    async def events(self) -> AsyncIterator[client.Event]:
        """Yields sequenced events in seq order, each exactly once, from a bounded queue.

        Events are buffered from `connect()` on. While an iterator is open, a full queue makes the
        connection wait (nothing is lost: if the server gives up on us, we resume from
        `last_seen_seq`); with no iterator open the oldest events are dropped instead, so an app
        that only uses `ask()` keeps bounded memory. Use one iterator at a time. Ends after
        `close()` once the queue is drained; raises TidewireError after a fatal refusal.
        """
        self._consumers += 1
        try:
            while True:
                event = await self._queue.get()
                self._room.set()
                if event is None:
                    self._queue.put_nowait(None)  # the end marker stays for any later iterator
                    if self._fatal is not None:
                        raise self._fatal
                    return
                yield event
        finally:
            self._consumers -= 1
            self._room.set()

    # ---- frame handling (no I/O: drive it directly in tests) ---------------------------------

    def _handle_frame(self, frame: client.ServerFrame) -> None:
        """Applies one server frame to the client's state."""
        if isinstance(frame, client.Ready):
            self._on_ready(frame)
        elif isinstance(frame, client.Ack):
            self._on_ack(frame)
        elif isinstance(frame, client.Pong):
            self._answered(lambda e: e.kind == "ping")
        elif isinstance(frame, client.Error):
            self._on_error(frame)
        else:
            self._on_event(frame)

    def _on_ready(self, ready: client.Ready) -> None:
        self._session_id = ready.session_id
        if ready.reset:
            # The server cannot replay from our seq: continue from its last_seq; the app reloads history.
            self._last_seen_seq = ready.last_seq
            self.resets += 1
            self._notify("reset", None)
        if self._ever_ready:
            self.reconnects += 1
            if not ready.reset:
                self.resumes += 1
        self._ever_ready = True
        self._got_ready = True
        self._attempt = 0
        self._connected.set()
        self._set_state("connected", None)

    def _on_event(self, event: client.Event) -> None:
        if event.seq <= self._last_seen_seq:
            self.duplicates_dropped += 1
            return
        # A merged delta carries the seq of its last member, so seq may jump forward: not a gap.
        self._last_seen_seq = event.seq
        if isinstance(event, client.Delta):
            self._assembler(event.turn_id).apply(event.offset, event.text)
        elif isinstance(event, client.TurnStart):
            self._assembler(event.turn_id)
            self._current_turn = event.turn_id
        elif isinstance(event, client.TurnEnd):
            self._remember_end(event)
        self._enqueue(event)

    def _on_ack(self, ack: client.Ack) -> None:
        self._answered(lambda e: e.kind == "send" and e.key == ack.client_msg_id)
        pending = self._unacked.pop(ack.client_msg_id, None)
        if pending is None:
            return  # a duplicate ack for a resend already answered
        if pending.retry_timer is not None:
            pending.retry_timer.cancel()
        if not pending.future.done():
            pending.future.set_result(ack)

    def _on_error(self, error: client.Error) -> None:
        entry: _Inflight | None = None
        if error.ref is not None and error.ref in self._unacked:
            entry = next((e for e in self._inflight if e.kind == "send" and e.key == error.ref), None)
            if entry is not None:
                self._inflight.remove(entry)
            else:
                entry = _Inflight("send", error.ref)
        elif self._inflight:
            entry = self._inflight.popleft()  # answers come in request order
        if entry is None:
            log.warning("tidewire error not tied to a request: %s: %s", error.code, error.message)
        elif entry.kind == "send":
            pending = self._unacked.get(entry.key)
            if pending is not None:
                self._on_send_error(pending, error)
        elif entry.kind == "stop" and entry.future is not None and not entry.future.done():
            entry.future.set_exception(TidewireError.from_frame(error))

    def _on_send_error(self, pending: _Pending, error: client.Error) -> None:
        if error.code in RETRYABLE_ERRORS and pending.error_retries < SEND_ERROR_RETRIES:
            pending.error_retries += 1
            delay = (
                error.retry_after_ms / 1000
                if error.retry_after_ms is not None
                else backoff_delay(pending.error_retries, self._backoff_base_s, self._backoff_cap_s)
            )
            if pending.retry_timer is not None:
                pending.retry_timer.cancel()
            pending.retry_timer = self._spawn(self._resend_later(pending, delay))
            return
        self._unacked.pop(pending.frame.client_msg_id, None)
        if not pending.future.done():
            pending.future.set_exception(TidewireError.from_frame(error))

    def _answered(self, matches: Callable[[_Inflight], bool]) -> None:
        """Retires in-flight requests up to the answered one; stops before it were accepted."""
        if not any(matches(e) for e in self._inflight):
            return
        while self._inflight:
            entry = self._inflight.popleft()
            if entry.kind == "stop" and entry.future is not None and not entry.future.done():
                entry.future.set_result(None)
            if matches(entry):
                return

    def _assembler(self, turn_id: str) -> TurnAssembler:
        assembler = self._turns.get(turn_id)
        if assembler is None:
            assembler = self._turns[turn_id] = TurnAssembler()
            while len(self._turns) > TURNS_KEPT:
                self._turns.popitem(last=False)
        return assembler

    def _remember_end(self, end: client.TurnEnd) -> None:
        self._ended[end.turn_id] = end
        while len(self._ended) > TURNS_KEPT:
            self._ended.popitem(last=False)
        if self._current_turn == end.turn_id:
            self._current_turn = None
        for waiter in self._turn_waiters.pop(end.turn_id, []):
            if not waiter.done():
                waiter.set_result(end)

    def _enqueue(self, event: client.Event) -> None:
        if self._queue.full():
            self._queue.get_nowait()
            self.events_dropped += 1
        self._queue.put_nowait(event)

    def _end_stream(self) -> None:
        if self._queue.full():
            self._queue.get_nowait()
            self.events_dropped += 1
        self._queue.put_nowait(None)

    # ---- connection -------------------------------------------------------------------------

    def _ws_url(self) -> URL:
        base = self._base
        if base.startswith("https://"):
            base = "wss://" + base[len("https://") :]
        elif base.startswith("http://"):
            base = "ws://" + base[len("http://") :]
        return URL(base + "/v1/ws").with_query(access_token=self._token)

    async def _run(self) -> None:
        """The connection task: connect, read until the connection ends, back off, repeat."""
        while True:
            floor = 0.0
            code: int | None = None
            self._got_ready = False
            try:
                code, floor = await self._connection()
            except aiohttp.WSServerHandshakeError as e:
                if e.status in (401, 403):
                    code = 4401 if e.status == 401 else 4403
                log.info("tidewire: websocket handshake failed: %s", e)
            except (aiohttp.ClientError, OSError, TimeoutError) as e:
                log.info("tidewire: connection lost: %r", e)
            except Exception:  # noqa: BLE001 - a bug must not leave the client silently disconnected
                log.exception("tidewire: unexpected error in the connection; reconnecting")
            if code in FATAL_CLOSE_CODES:
                self._halt(
                    TidewireError(FATAL_CLOSE_CODES[code], f"connection closed by the server ({code})")
                )
                return
            # `_attempt` counts connections that did not reach `ready`, so a drop after a good
            # connection (1012 restart, 4408, 4410) comes back promptly: attempt 0, jittered.
            delay = max(floor, backoff_delay(self._attempt, self._backoff_base_s, self._backoff_cap_s))
            self._attempt += 1
            self._set_state("reconnecting", delay)
            await asyncio.sleep(delay)

    async def _connection(self) -> tuple[int | None, float]:
        """One connection's life; returns its close code and a minimum delay before the next one."""
        http = self._http_session()
        async with asyncio.timeout(self._connect_timeout_s):
            ws = await http.ws_connect(
                self._ws_url(),
                heartbeat=None,
                autoping=True,
                timeout=aiohttp.ClientWSTimeout(ws_close=WS_CLOSE_TIMEOUT_S),
            )
        self._generation += 1
        self._ws = ws
        self._inflight.clear()
        pinger: asyncio.Task[None] | None = None
        try:
            hello = client.Hello(
                session_id=self._session_id, last_seen_seq=self._last_seen_seq, delivery=self._delivery
            )
            async with asyncio.timeout(WRITE_TIMEOUT_S):
                await ws.send_str(client.json_encoder.encode(hello).decode())
            pinger = asyncio.create_task(self._ping_loop())
            silence_s = 2 * self._heartbeat_s + 5  # half-open detection: a pong is due every heartbeat
            while True:
                msg = await ws.receive(timeout=silence_s if self._got_ready else self._connect_timeout_s)
                if msg.type == aiohttp.WSMsgType.TEXT:
                    frame = self._decode(msg.data)
                    if frame is None:
                        continue
                    await self._wait_for_room()
                    self._handle_frame(frame)
                    if isinstance(frame, client.Ready):
                        await self._flush_unacked()
                    elif isinstance(frame, client.Error) and not self._got_ready:
                        log.info("tidewire: hello refused: %s: %s", frame.code, frame.message)
                        return None, (frame.retry_after_ms or 0) / 1000
                elif msg.type in (
                    aiohttp.WSMsgType.CLOSE,
                    aiohttp.WSMsgType.CLOSING,
                    aiohttp.WSMsgType.CLOSED,
                ):
                    return ws.close_code, 0.0
                elif msg.type == aiohttp.WSMsgType.ERROR:
                    log.info("tidewire: websocket error: %r", msg.data)
                    return None, 0.0
        finally:
            self._connected.clear()
            self._ws = None
            if pinger is not None:
                pinger.cancel()
            self._drop_inflight()
            with contextlib.suppress(Exception):
                async with asyncio.timeout(WS_CLOSE_TIMEOUT_S):
                    await ws.close()

    def _decode(self, data: str) -> client.ServerFrame | None:
        try:
            frame: client.ServerFrame = client.server_frame_decoder.decode(data)
            return frame
        except msgspec.DecodeError:
            self.unknown_frames += 1
            with contextlib.suppress(msgspec.DecodeError):
                raw = msgspec.json.decode(data)
                seq = raw.get("seq") if isinstance(raw, dict) else None
                if isinstance(seq, int) and seq > self._last_seen_seq:
                    # A sequenced event of a type added later: skip it, but do not resume from before it.
                    self._last_seen_seq = seq
            log.debug("tidewire: ignored a frame it cannot decode: %.200s", data)
            return None

    async def _wait_for_room(self) -> None:
        """Backpressure: while an `events()` iterator is open, never drop; wait for it instead."""
        while self._consumers and self._queue.full():
            self._room.clear()
            await self._room.wait()

    async def _ping_loop(self) -> None:
        while True:
            await asyncio.sleep(self._heartbeat_s)
            await self._write(client.Ping(), _Inflight("ping"))

    async def _write(self, frame: client.ClientFrame, entry: _Inflight | None) -> bool:
        """Writes one frame on the ready connection; False if there is none (the caller retries later)."""
        ws = self._ws
        if ws is None or ws.closed or not self._connected.is_set():
            return False
        data = client.json_encoder.encode(frame).decode()
        try:
            async with self._write_lock:
                if self._ws is not ws or ws.closed:
                    return False
                if entry is not None:
                    if len(self._inflight) >= INFLIGHT_MAX:
                        return False
                    self._inflight.append(entry)
                async with asyncio.timeout(WRITE_TIMEOUT_S):
                    await ws.send_str(data)
        except (ConnectionError, TimeoutError, aiohttp.ClientError, RuntimeError) as e:
            log.info("tidewire: write failed, will resume: %r", e)
            return False
        return True

    async def _write_pending(self, pending: _Pending) -> None:
        generation = self._generation
        if not await self._write(pending.frame, _Inflight("send", pending.frame.client_msg_id)):
            return
        if pending.writes:
            self.resends += 1
        pending.writes += 1
        pending.sent_on = generation

    async def _flush_unacked(self) -> None:
        """After `ready`: resends every unacked message not yet written on this connection."""
        for pending in list(self._unacked.values()):
            waiting = pending.retry_timer is not None and not pending.retry_timer.done()
            if not waiting and pending.sent_on != self._generation and not pending.future.done():
                await self._write_pending(pending)

    async def _resend_later(self, pending: _Pending, delay: float) -> None:
        await asyncio.sleep(delay)
        pending.retry_timer = None
        if self._unacked.get(pending.frame.client_msg_id) is pending:
            await self._write_pending(pending)  # if offline, the next `ready` resends it

    def _drop_inflight(self) -> None:
        for entry in self._inflight:
            if entry.future is not None and not entry.future.done():
                entry.future.set_exception(_ConnectionLost())
        self._inflight.clear()

    # ---- small things -----------------------------------------------------------------------

    def _spawn(self, coro: Any) -> asyncio.Task[None]:
        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(coro)
        self._timers.add(task)
        task.add_done_callback(self._timers.discard)
        return task

    def _check_usable(self) -> None:
        if self._fatal is not None:
            raise self._fatal
        if self._closed:
            raise ConnectionError("client is closed")

    async def _wait_connected(self, timeout: float | None) -> None:
        async with asyncio.timeout(timeout):
            while not self._connected.is_set():
                self._check_usable()
                ready = asyncio.ensure_future(self._connected.wait())
                halted = asyncio.ensure_future(self._halted.wait())
                try:
                    await asyncio.wait({ready, halted}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    ready.cancel()
                    halted.cancel()
            self._check_usable()

    def _halt(self, error: TidewireError) -> None:
        """A fatal refusal: nothing will succeed with this token/session, so everything fails now."""
        self._fatal = error
        self._halted.set()
        self._fail_waiters(error)
        self._end_stream()
        self._set_state("offline", None)

    def _fail_waiters(self, error: BaseException) -> None:
        for pending in self._unacked.values():
            if pending.retry_timer is not None:
                pending.retry_timer.cancel()
            if not pending.future.done():
                pending.future.set_exception(error)
        self._unacked.clear()
        for waiters in self._turn_waiters.values():
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_exception(error)
        self._drop_inflight()

    def _set_state(self, state: State, retry_in_s: float | None) -> None:
        changed = state != self._state or retry_in_s is not None
        self._state = state
        if changed:
            self._notify(state, retry_in_s)

    def _notify(self, what: str, retry_in_s: float | None) -> None:
        if self._on_state is None:
            return
        try:
            self._on_state(what, retry_in_s)
        except Exception:  # noqa: BLE001 - an app callback must not break the connection
            log.exception("tidewire: on_state callback failed")

    def _http_session(self) -> aiohttp.ClientSession:
        if self._http is None or self._http.closed:
            self._http = aiohttp.ClientSession()
        return self._http

    async def _request(self, method: str, path: str) -> tuple[int, bytes]:
        headers = {"Authorization": f"Bearer {self._token}", "Accept": "application/json"}
        timeout = aiohttp.ClientTimeout(total=self._connect_timeout_s)
        async with self._http_session().request(
            method, self._base + path, headers=headers, timeout=timeout
        ) as resp:
            return resp.status, await resp.read()

    async def _create_session(self) -> str:
        """POST /v1/sessions, retried a few times while nothing was created (refused or unreachable)."""
        for attempt in range(3):
            last = attempt == 2
            try:
                status, body = await self._request("POST", "/v1/sessions")
            except aiohttp.ClientConnectionError:
                if last:
                    raise
                await asyncio.sleep(backoff_delay(attempt + 1, self._backoff_base_s, self._backoff_cap_s))
                continue
            if status in (200, 201):
                return _created_decoder.decode(body).session_id
            error = _http_error(status, body)
            if last or error.code not in ("degraded", "rate_limited"):
                raise error
            await asyncio.sleep((error.retry_after_ms or 500) / 1000)
        raise AssertionError("unreachable")


_STATUS_CODES = {
    400: "bad_frame",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    409: "conflict",
    413: "too_large",
    429: "rate_limited",
    503: "degraded",
}


def _http_error(status: int, body: bytes) -> TidewireError:
    """The protocol error object in an HTTP error body, or one made up from the status."""
    data: Any = None
    with contextlib.suppress(msgspec.DecodeError):
        data = msgspec.json.decode(body)
    if isinstance(data, dict) and isinstance(data.get("error"), dict):
        data = data["error"]
    if isinstance(data, dict) and isinstance(data.get("code"), str):
        retry = data.get("retry_after_ms")
        return TidewireError(
            data["code"], str(data.get("message", "")), retry if isinstance(retry, int) else None
        )
    return TidewireError(_STATUS_CODES.get(status, "internal"), f"HTTP {status}: {body[:200]!r}")
