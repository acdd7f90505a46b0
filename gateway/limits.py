"""Edge protection: rate limits, connection caps and load shedding, each tuned separately.

Three layers, cheapest first, so a misbehaving client costs the gateway little:

- Per connection, in process (`ConnectionLimits`): a token bucket on frames of any kind and one on
  `send`s. Over the rate a frame is answered with `error rate_limited` (+ `retry_after_ms`) and
  nothing else is done for it, so the work one connection can cause is bounded by its rate.
- Per subject, across every gateway (`SubjectLimits`, Redis): a token bucket on messages and a cap on
  concurrent connections (WebSocket, SSE, long-poll), atomic and clocked by Redis `TIME` (gateways
  with skewed clocks agree). The message bucket is spent inside the script that appends the message
  (`CheckpointStore.append_user`, via the `AdmittedSend` that `admit_send` returns): no round trip of its
  own on the way to the ack (it was one Redis call and fsync per send), and a retried send is
  answered as a duplicate, never charged or refused. Connection slots are leases
  (`shared/quotas.py`) that a live gateway renews, so the slots of a gateway that died free
  themselves; when Redis is slow or down the slot check is skipped (fail open).
- Load shedding (`LoadShedder`): a background task samples the turn queue's depth (JetStream
  consumer pending), the dependencies and the model upstreams' circuit breakers (as the
  orchestrators publish them in Redis, read through `shared/breakers.py`) at most every
  `shed_sample_ms`; a send checks the last sample only (no I/O), so a refusal (`degraded`,
  `retry_after_ms`) is immediate, never a wait. Past capacity, a fraction of new sends is refused
  in proportion to how long turns stand waiting to start (`gateway/shedding.py`, PIE).
  Breakers shed only when *every* upstream an orchestrator lists has its breaker open: the gateway
  does not know which route a session's next turn takes, so one healthy route keeps sends coming.

`edge_context` owns the background tasks (an aiohttp cleanup context) and serves the counters of
every refusal (`EdgeCounters`) on `/metrics` as `tidewire_gateway_<field>`, present from start-up
at 0; handlers reach the limits through `request.app[EDGE]`. The settings and what happens when each limit is exceeded are
tabulated in docs/security.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import itertools
import logging
import math
import random
import re
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from gateway import auth
from gateway.deps import Deps
from gateway.http_errors import http_error
from gateway.keys import DEPS
from gateway.settings import GatewaySettings
from gateway.shedding import DelayShedder, standing_delay_s
from shared import telemetry
from shared.breakers import BreakerMirror
from shared.checkpoints import CheckpointStore, MessageQuota
from shared.errors import BadFrame, Degraded, Internal, NotFound, RateLimited, TidewireError, from_dependency
from shared.quotas import SubjectQuotas
from shared.supervise import supervised

log = logging.getLogger(__name__)


# ---- per connection ----------------------------------------------------------------------------


class TokenBucket:
    """`burst` tokens, refilled at `rate` per second. `take` answers how long to wait (0 = go)."""

    def __init__(self, rate_per_s: float, burst: float, *, now: float | None = None) -> None:
        self.rate = rate_per_s
        self.burst = max(1.0, float(burst))
        self.tokens = self.burst
        self.stamp = time.monotonic() if now is None else now

    def take(self, cost: float = 1.0, *, now: float | None = None) -> float:
        if self.rate <= 0:
            return 0.0
        now = time.monotonic() if now is None else now
        self.tokens = min(self.burst, self.tokens + max(0.0, now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= cost:
            self.tokens -= cost
            return 0.0
        return (cost - self.tokens) / self.rate


def _retry_ms(wait_s: float) -> int:
    return max(1, math.ceil(wait_s * 1000))


class ConnectionLimits:
    """The buckets of one client connection. Pure and synchronous: no I/O per frame."""

    def __init__(self, settings: GatewaySettings) -> None:
        self.frames = TokenBucket(settings.frame_rate_per_s, settings.frame_burst)
        self.messages = TokenBucket(settings.msg_rate_per_s, settings.msg_burst)

    def frame(self) -> None:
        wait = self.frames.take()
        if wait:
            raise RateLimited("too many frames on this connection", retry_after_ms=_retry_ms(wait))

    def message(self) -> None:
        wait = self.messages.take()
        if wait:
            raise RateLimited("too many messages on this connection", retry_after_ms=_retry_ms(wait))


# ---- per subject, across gateways (Redis, through shared/quotas.py) -------------------------------


@dataclass(frozen=True)
class Slot:
    subject: str
    slot_id: str


def _doc(text: str) -> Any:
    return field(default=0, metadata={"doc": text})


@dataclass
class EdgeCounters:
    """Plain ints bumped where a limit refuses; served as counters `tidewire_gateway_<field>`."""

    rate_limited_frames: int = _doc("Frames answered rate_limited by the per-connection frame bucket")
    rate_limited_messages: int = _doc("Sends answered rate_limited (per connection or per subject)")
    connections_refused: int = _doc("Connections refused: the subject has too many open")
    shed_sends: int = _doc(
        "Sends answered degraded by load shedding (queue full, dependency or every upstream down)"
    )
    limit_checks_skipped: int = _doc(
        "Per-subject connection-slot checks skipped because Redis was slow or down (fail open)"
    )


def install_metrics(counters: EdgeCounters) -> None:
    """Serves `counters` on `/metrics`; read only at scrape time (an app built again replaces them)."""
    for f in dataclasses.fields(counters):
        telemetry.observe(
            f"tidewire_gateway_{f.name}",
            functools.partial(getattr, counters, f.name),
            kind="counter",
            description=f.metadata["doc"],
        )


class SubjectLimits:
    """Per-subject limits shared by every gateway through Redis: the message rate (a quota that
    `CheckpointStore.append_user` spends) and concurrent connections (`shared.quotas.SubjectQuotas`);
    this side holds the policy: which limits, and failing open on a slow slot check."""

    def __init__(
        self,
        quotas: SubjectQuotas | CheckpointStore | Any,
        settings: GatewaySettings,
        gateway_id: str,
        counters: EdgeCounters,
    ) -> None:
        # a SubjectQuotas, or what one is built from (the CheckpointStore; tests pass a client)
        self.quotas = quotas if isinstance(quotas, SubjectQuotas) else SubjectQuotas(quotas)
        self.settings = settings
        self.gateway_id = gateway_id
        self.counters = counters
        self.slots: set[Slot] = set()

    async def _bounded(self, call: Callable[[], Awaitable[Any]], timeout_s: float | None = None) -> Any:
        """A limit check never holds a request up: slow or failing Redis = no check (fail open)."""
        try:
            async with asyncio.timeout(timeout_s or self.settings.limits_timeout_s):
                return await call()
        except Exception as e:  # noqa: BLE001 - the send path reports a down Redis on its own
            self.counters.limit_checks_skipped += 1
            log.debug("limit check skipped: %r", e)
            return None

    def message_quota(self, subject: str) -> MessageQuota | None:
        """The subject's message bucket, for the store to spend with the append (None: unlimited)."""
        s = self.settings
        if s.subject_msg_rate_per_s <= 0:
            return None
        return MessageQuota(subject, s.subject_msg_rate_per_s, s.subject_msg_burst)

    async def acquire(self, subject: str) -> Slot:
        """A connection slot for `subject`, or RateLimited when it has too many open already."""
        s = self.settings
        slot = Slot(subject, f"{self.gateway_id}:{secrets.token_hex(8)}")
        if s.max_connections_per_subject > 0:
            # once per connection, not per message: it may wait as long as any Redis command
            ok = await self._bounded(
                lambda: self.quotas.acquire_slot(
                    subject, slot.slot_id, s.max_connections_per_subject, int(s.connection_lease_s * 1000)
                ),
                max(s.limits_timeout_s, s.redis_timeout_s),
            )
            if ok is False:
                self.counters.connections_refused += 1
                raise RateLimited(
                    f"too many connections for this user (at most {s.max_connections_per_subject})",
                    retry_after_ms=1000,
                )
        self.slots.add(slot)
        return slot

    async def release(self, slot: Slot) -> None:
        self.slots.discard(slot)
        if self.settings.max_connections_per_subject > 0:
            await self._bounded(lambda: self.quotas.release_slot(slot.subject, slot.slot_id))

    @contextlib.asynccontextmanager
    async def connection(self, subject: str) -> AsyncIterator[Slot]:
        slot = await self.acquire(subject)
        try:
            yield slot
        finally:
            await asyncio.shield(self.release(slot))

    async def renew_forever(self) -> None:
        """Keeps this gateway's slots alive; a gateway that dies stops renewing and they lapse. A
        failed renewal is retried at the next tick (a third of the lease), never later: a backoff
        would let a live gateway's slots lapse and admit connections past the cap."""
        every_s = self.settings.connection_lease_s / 3
        await supervised("slot-renewer", self._renew, every_s=every_s, max_backoff_s=every_s, logger=log)

    async def _renew(self) -> None:
        slots = list(self.slots)
        if not slots or self.settings.max_connections_per_subject <= 0:
            return
        lease_ms = int(self.settings.connection_lease_s * 1000)
        await self.quotas.renew_slots(((slot.subject, slot.slot_id) for slot in slots), lease_ms)


# ---- load shedding -----------------------------------------------------------------------------


@dataclass
class LoadSample:
    pending: int | None = None
    down: tuple[str, ...] = ()
    at: float = 0.0
    upstreams_open_ms: int | None = None  # set while every model upstream's breaker is open
    overloaded: str | None = None  # why turns are too slow to start (orchestrators' reports, own lag)
    standing_ms: int | None = None  # the median orchestrator's shortest recent pickup delay


def standing_delay_ms(reports: list[tuple[int, int, int]]) -> int | None:
    """The median, over the orchestrators that had enough pickups to tell, of their shortest pickup
    delay (gateway/shedding.py); None when none had."""
    shortest = sorted(m for _, _, m in reports if m >= 0)
    return shortest[len(shortest) // 2] if shortest else None


def overload(
    reports: list[tuple[int, int]], own_lag_ms: int, *, pickup_delay_ms: int, loop_lag_ms: int
) -> str | None:
    """Admission by measured delay, not by queue length: the median orchestrator's recent pickup
    delay (receipt to turn start) or event-loop lag, or this gateway's own loop lag, past its
    threshold (negative = never). The median, so one slow orchestrator alone sheds nothing: the
    turn queue routes work to the others."""
    if loop_lag_ms >= 0 and own_lag_ms > loop_lag_ms:
        return f"this gateway's event loop lags {own_lag_ms} ms"
    if not reports:
        return None
    delays = sorted(d for d, _ in reports)
    lags = sorted(g for _, g in reports)
    delay, lag = delays[len(delays) // 2], lags[len(lags) // 2]
    if pickup_delay_ms >= 0 and delay > pickup_delay_ms:
        return f"turns wait {delay} ms to start"
    if loop_lag_ms >= 0 and lag > loop_lag_ms:
        return f"the orchestrators' event loops lag {lag} ms"
    return None


@dataclass
class LoadShedder:
    """Decides from the last background sample whether new sends are refused; `check` does no I/O."""

    deps: Deps
    counters: EdgeCounters
    sample: LoadSample = field(default_factory=LoadSample)
    failures: dict[str, int] = field(default_factory=dict)
    # `BreakerMirror.every_upstream_open` (shared/breakers.py); None = breakers are not consulted
    breakers: Callable[[], Awaitable[int | None]] | None = None
    own_lag_ms: int = 0  # how late this gateway's sampler last woke: its own event-loop lag
    delay_shedder: DelayShedder | None = None  # from `shed_target_delay_ms` (None: off)
    draw: Callable[[], float] = random.random
    FAILURES_TO_DOWN = 2
    PG_EVERY = 4  # Postgres is probed every 4th sample (~1 s)

    def check(self) -> None:
        s = self.deps.settings
        threshold = s.turn_queue_shed_threshold
        reason = None
        if self.sample.down:
            reason = f"{', '.join(self.sample.down)} unavailable"
        elif not self.deps.bus.connected:
            reason = "nats unavailable"
        elif self.sample.upstreams_open_ms is not None:
            self.counters.shed_sends += 1
            raise Degraded(
                "shedding load: every model upstream is unavailable (circuit open); nothing was accepted",
                retry_after_ms=max(1, self.sample.upstreams_open_ms),
            )
        elif threshold >= 0 and (threshold == 0 or (self.sample.pending or 0) >= threshold):
            reason = "the turn queue is full"
        elif self.sample.overloaded is not None:
            reason = self.sample.overloaded
        elif self.delay_shedder is not None and not self.delay_shedder.admits(self.draw()):
            reason = (
                f"turns wait {self.sample.standing_ms} ms to start; "
                f"{self.delay_shedder.p:.0%} of new sends are refused"
            )
        if reason is not None:
            self.counters.shed_sends += 1
            raise Degraded(
                f"shedding load: {reason}; nothing was accepted", retry_after_ms=s.shed_retry_after_ms
            )

    async def _probe(self, name: str, probe: Callable[[], Awaitable[Any]]) -> Any:
        try:
            async with asyncio.timeout(min(1.0, self.deps.settings.nats_timeout_s)):
                result = await probe()
        except Exception:  # noqa: BLE001 - a failed probe is the answer
            self.failures[name] = self.failures.get(name, 0) + 1
            return None
        self.failures[name] = 0
        return result

    async def sample_once(self, n: int = 0) -> LoadSample:
        deps = self.deps
        probes: list[tuple[str, Callable[[], Awaitable[Any]]]] = [
            ("nats", deps.bus.turn_queue_pending),
            ("redis", deps.checkpoints.ping),
        ]
        if n % self.PG_EVERY == 0:
            probes.append(("postgres", deps.eventlog.ping))
        s = deps.settings
        results, open_ms, reports = await asyncio.gather(
            asyncio.gather(*(self._probe(name, p) for name, p in probes)),
            self._breakers(),
            self._load_reports(),
        )
        overloaded = overload(
            [(d, g) for d, g, _ in reports],
            self.own_lag_ms,
            pickup_delay_ms=s.shed_pickup_delay_ms,
            loop_lag_ms=s.shed_loop_lag_ms,
        )
        accept_s = deps.accepts.take()
        pickup_ms = standing_delay_ms(reports)
        standing_s = standing_delay_s(accept_s, None if pickup_ms is None else pickup_ms / 1000)
        standing = None if standing_s is None else int(standing_s * 1000)
        if self.delay_shedder is not None:
            was = self.delay_shedder.p
            now_p = self.delay_shedder.update(standing_s)
            if (was == 0) != (now_p == 0):
                log.warning(
                    "load shedding: %s",
                    f"turns wait {standing} ms to start: refusing {now_p:.0%} of new sends"
                    if now_p
                    else "turns start in time again: refusing none",
                )
        if (overloaded is None) != (self.sample.overloaded is None):
            log.warning("load shedding: %s", overloaded or "no longer overloaded")
        pending = results[0] if isinstance(results[0], int) else self.sample.pending
        down = tuple(name for name, count in sorted(self.failures.items()) if count >= self.FAILURES_TO_DOWN)
        if not deps.bus.connected and "nats" not in down:
            down = ("nats", *down)
        if down != self.sample.down:
            log.warning("load shedding: dependencies down: %s", ", ".join(down) or "none")
        if (open_ms is None) != (self.sample.upstreams_open_ms is None):
            log.warning(
                "load shedding: every model upstream's circuit is %s",
                "open" if open_ms is not None else "no longer open",
            )
        self.sample = LoadSample(
            pending=pending,
            down=down,
            at=time.monotonic(),
            upstreams_open_ms=open_ms,
            overloaded=overloaded,
            standing_ms=standing,
        )
        return self.sample

    async def _load_reports(self) -> list[tuple[int, int, int]]:
        """Fails open like the breakers: unreadable reports shed nothing."""
        try:
            async with asyncio.timeout(min(1.0, self.deps.settings.redis_timeout_s)):
                return await self.deps.checkpoints.read_load_reports(fresh_ms=2000)
        except Exception as e:  # noqa: BLE001 - see the docstring
            log.debug("load reports not read: %r", e)
            return []

    async def _breakers(self) -> int | None:
        """Fails open: when the breakers cannot be read, they do not shed (a down Redis is caught
        by its own probe)."""
        if self.breakers is None:
            return None
        try:
            async with asyncio.timeout(min(1.0, self.deps.settings.redis_timeout_s)):
                return await self.breakers()
        except Exception as e:  # noqa: BLE001 - see the docstring
            log.debug("breaker states not read: %r", e)
            return None

    async def run_forever(self) -> None:
        """Samples every `shed_sample_ms` (a fixed rate: a slow sample is followed at once) and notes
        how late each wake-up was (`own_lag_ms`). A failed sample keeps the last one in force and is
        retried after the supervised backoff; the wake-up after it is not measured as lag."""
        interval = max(0.05, self.deps.settings.shed_sample_ms / 1000)
        numbers = itertools.count(1)
        wake: float | None = None  # when the sampler means to wake next; None after a failure

        async def sample() -> None:
            nonlocal wake
            started = time.monotonic()
            if wake is not None:
                self.own_lag_ms = int(max(0.0, started - wake) * 1000)  # how late this loop woke
            wake = None
            await self.sample_once(next(numbers))
            wake = max(time.monotonic(), started + interval)  # what a fixed-rate sleep wakes at

        await supervised("load-sampler", sample, every_s=interval, fixed_rate=True, logger=log)


# ---- input that the edge refuses before any store sees it ---------------------------------------

_SESSION_ID = re.compile(r"[A-Za-z0-9_-]{1,128}")
_FORBIDDEN_CHARS = re.compile("[\x00\ud800-\udfff]")


def check_session_id(session_id: str) -> str:
    """Session ids are URL-safe tokens; anything else cannot name a session (404, not a store error)."""
    if not _SESSION_ID.fullmatch(session_id):
        raise NotFound("no such session")
    return session_id


def check_text(what: str, text: str) -> None:
    """NUL and lone surrogates cannot be stored (Postgres text, UTF-8): refused up front."""
    if _FORBIDDEN_CHARS.search(text):
        raise BadFrame(f"{what} contains NUL or an unpaired surrogate")


# ---- the edge, owned by the app ----------------------------------------------------------------


@dataclass
class Edge:
    subjects: SubjectLimits
    shedder: LoadShedder
    counters: EdgeCounters

    def admit_send(
        self, subject: str, conn: ConnectionLimits | None, client_msg_id: str, text: str
    ) -> AdmittedSend:
        """Everything a send must pass before it reaches the stores, cheapest check first; the
        subject's quota is spent by the append itself (`commands.send_message(admitted=...)`)."""
        check_text("client_msg_id", client_msg_id)
        check_text("text", text)
        self.shedder.check()
        if conn is not None:
            try:
                conn.message()
            except RateLimited:
                self.counters.rate_limited_messages += 1
                raise
        return AdmittedSend(self.subjects.message_quota(subject), self.counters)


@dataclass(frozen=True)
class AdmittedSend:
    """A send that passed the edge: the quota its append spends, and where a refusal is counted."""

    quota: MessageQuota | None
    counters: EdgeCounters

    def refused(self) -> None:
        self.counters.rate_limited_messages += 1


EDGE = web.AppKey("edge", Edge)


async def edge_context(app: web.Application) -> AsyncIterator[None]:
    """Cleanup context (after the one that creates DEPS): the sampler and the slot renewer."""
    deps = app[DEPS]
    auth.verifier(deps.settings)  # a bad JWKS file fails the start, not the first request
    counters = EdgeCounters()
    install_metrics(counters)
    edge = Edge(
        SubjectLimits(SubjectQuotas(deps.checkpoints), deps.settings, deps.gateway_id, counters),
        LoadShedder(
            deps,
            counters,
            breakers=BreakerMirror(deps.checkpoints).every_upstream_open,
            delay_shedder=DelayShedder(deps.settings.shed_target_delay_ms / 1000)
            if deps.settings.shed_target_delay_ms >= 0
            else None,
        ),
        counters,
    )
    await edge.shedder.sample_once()
    shedding = edge.shedder.delay_shedder
    telemetry.observe(
        "tidewire_gateway_shed_share",
        lambda: shedding.p if shedding is not None else 0.0,
        description="Share of new sends the delay-based shedding refuses now (gateway/shedding.py)",
    )
    app[EDGE] = edge
    tasks = [
        asyncio.create_task(edge.shedder.run_forever(), name="load-sampler"),
        asyncio.create_task(edge.subjects.renew_forever(), name="slot-renewer"),
    ]
    yield
    for t in tasks:
        t.cancel()
    for t in tasks:
        with contextlib.suppress(asyncio.CancelledError):
            await t


@web.middleware
async def edge_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Responses are never sniffed or cached by browsers and never leak a token in a Referer; a
    protocol error (shared.errors) is answered with its `error` object and HTTP status, an
    unexpected exception with the protocol's `internal` error, never a stack trace."""
    try:
        resp = await handler(request)
    except web.HTTPException:
        raise
    except TidewireError as e:
        resp = http_error(e)
    except Exception as e:
        degraded = from_dependency(e)
        if degraded is not None:
            log.warning("dependency failure on %s %s: %r", request.method, request.path, e)
            resp = http_error(degraded)
        else:
            log.exception("internal error on %s %s", request.method, request.path)
            resp = http_error(Internal("internal error; nothing was accepted"))
    if not resp.prepared:
        resp.headers.setdefault("X-Content-Type-Options", "nosniff")
        resp.headers.setdefault("Referrer-Policy", "no-referrer")
        if request.path.startswith("/v1/"):
            resp.headers.setdefault("Cache-Control", "no-store")
    return resp
