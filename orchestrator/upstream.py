"""Upstream protection: a concurrency cap per model upstream, queue-time measurement, a circuit
breaker, and the router that sends each step to the upstream its model route names.

Why: a model upstream has its own capacity (rate limits, GPU slots) and its own failures. Letting
every session hit it at once turns a slow upstream into timeouts for all; hammering one that is
down wastes every turn's first-token timeout. So each upstream gets an `UpstreamGate`:

- `async with gate.slot():` waits for one of `max_concurrency` slots (at most `max_wait_s`) and
  records how long it waited (`tidewire_upstream_queue_wait_seconds{upstream}`, plus an optional
  callback);
- a circuit breaker opens after `failure_threshold` consecutive upstream failures, or when the
  failure ratio over `window_s` reaches `error_ratio` (with at least `min_calls` outcomes); while
  open, `slot()` refuses at once with `CircuitOpen` (a non-retryable ProviderError); after
  `cooldown_s` it is half-open and lets one probe through, whose success closes it and whose
  failure opens it again. Only upstream failures count (`is_upstream_failure`): timeouts, 5xx,
  429, broken connections; a request the model rejects (a poison turn) does not.
- `publish_state(mirror)` mirrors an open breaker to the Redis key `tw:breaker:<upstream>` (with a
  TTL, so a dead orchestrator leaves nothing stuck), and the router's publish loop lists every
  upstream it has a gate for in `tw:breakers` (a sorted set scored by a "seen until"
  time), both through `shared.breakers.BreakerMirror`. The gateway's load shedder
  (`gateway/limits.py`) reads both through the same adapter: when every upstream seen has its
  breaker open, new sends are answered `degraded` instead of queueing doomed turns.

Metrics are OpenTelemetry instruments (shared/telemetry.py), served on the orchestrator's
`/metrics`: the queue-wait histogram is recorded per admitted call; the gauges and counters of the
gates (`tidewire_upstream_in_use`, `_waiting`, `_breaker_open`, `_breaker_opened`,
`_breaker_rejections`, `_breaker_failures`, `_queue_timeouts`, each `{upstream}`) are read from the
gates of every live router when `/metrics` is scraped (summed per upstream; a process has one
router, tests may build several).

`UpstreamRouter` is itself a `Provider`: it parses the step's model route (`orchestrator.flags.
parse_route`: "simulated", "openai:gpt-4o-mini", ...), builds that upstream's provider on first use
and streams it through that upstream's gate, so the runner needs no change to route per turn.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import enum
import functools
import logging
import math
import os
import time
import weakref
from collections.abc import AsyncGenerator, Callable, Iterable, Mapping
from dataclasses import dataclass, fields
from types import TracebackType
from typing import Any, Final

import msgspec

from orchestrator.flags import parse_route
from orchestrator.providers.base import Provider, ProviderError, ProviderEvent, ProviderRequest, Usage
from shared import telemetry
from shared.breakers import BreakerMirror, BreakerSnapshot, MirrorSource
from shared.subjects import BREAKERS_SEEN, breaker_key
from shared.supervise import supervised

__all__ = [
    "BreakerSnapshot",
    "BreakerState",
    "CircuitOpen",
    "GateSettings",
    "UpstreamGate",
    "UpstreamRouter",
    "BREAKERS_SEEN",
    "breaker_key",
    "is_upstream_failure",
    "read_state",
]

log = logging.getLogger(__name__)

_queue_wait = telemetry.histogram(
    "tidewire_upstream_queue_wait_seconds",
    description="Wait for a concurrency slot of the model upstream, per admitted call",
)

# The Redis names (`breaker_key`, `BREAKERS_SEEN`) are in shared/subjects.py, re-exported here.
SEEN_FOR_MS: Final = 10_000  # an upstream no orchestrator re-lists for this long is forgotten


@dataclass(frozen=True)
class GateSettings:
    """Per upstream; `from_env(name)` reads `TIDEWIRE_UPSTREAM_<NAME>_<FIELD>`, falling back to
    `TIDEWIRE_UPSTREAM_<FIELD>`. The simulated model gets a large cap and no breaker by default (its
    injected errors exist to test retries, not to trip breakers)."""

    max_concurrency: int = 64
    max_wait_s: float = 60.0
    breaker: bool = True
    failure_threshold: int = 5
    error_ratio: float = 0.5
    min_calls: int = 20
    window_s: float = 30.0
    cooldown_s: float = 15.0

    def __post_init__(self) -> None:
        if self.max_concurrency < 1 or self.failure_threshold < 1 or self.min_calls < 1:
            raise ValueError("max_concurrency, failure_threshold and min_calls must be >= 1")
        if not 0 < self.error_ratio <= 1:
            raise ValueError("error_ratio must be within (0, 1]")
        for name in ("max_wait_s", "window_s", "cooldown_s"):
            value = getattr(self, name)
            if not math.isfinite(value) or value <= 0:
                raise ValueError(f"{name} must be a finite number > 0")

    @classmethod
    def from_env(cls, upstream: str, env: Mapping[str, str] | None = None) -> GateSettings:
        env = os.environ if env is None else env
        base = cls(max_concurrency=1024, breaker=False) if upstream == "simulated" else cls()
        kwargs: dict[str, Any] = {}
        for f in fields(cls):
            for key in (
                f"TIDEWIRE_UPSTREAM_{upstream.upper()}_{f.name.upper()}",
                f"TIDEWIRE_UPSTREAM_{f.name.upper()}",
            ):
                raw = env.get(key, "").strip()
                if raw:
                    kwargs[f.name] = _parse(raw, getattr(base, f.name))
                    break
        return cls(**{**{f.name: getattr(base, f.name) for f in fields(cls)}, **kwargs})


def _parse(raw: str, like: Any) -> Any:
    if isinstance(like, bool):
        return raw.lower() in ("1", "true", "yes", "on")
    return type(like)(raw)


class BreakerState(enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class CircuitOpen(ProviderError):
    """The upstream's breaker is open: the step fails at once instead of waiting for a timeout."""

    def __init__(self, upstream: str, retry_after_s: float) -> None:
        super().__init__(
            f"upstream {upstream} is unavailable (circuit open); retry in {retry_after_s:.0f} s",
            retryable=False,
        )
        self.upstream = upstream
        self.retry_after_s = retry_after_s


def is_upstream_failure(exc: BaseException | None) -> bool:
    """Does this outcome say the upstream is unhealthy? Providers mark it with `upstream_fault`;
    without the mark, a retryable ProviderError is taken as one. Cancellation, bugs and
    non-retryable errors (a request the model will never answer) are not."""
    if not isinstance(exc, ProviderError) or isinstance(exc, CircuitOpen):
        return False
    fault = getattr(exc, "upstream_fault", None)
    return bool(exc.retryable if fault is None else fault)


class _Slot:
    """One admitted call. Outcome: success when the stream completed (or delivered its Usage),
    failure when it raised an upstream failure, neither when it was cancelled or closed early."""

    def __init__(self, gate: UpstreamGate) -> None:
        self._gate = gate
        self._probe = False
        self._acquired = False
        self._succeeded = False

    def succeeded(self) -> None:
        self._succeeded = True

    async def __aenter__(self) -> _Slot:
        gate = self._gate
        self._probe = gate._admit()
        started = time.perf_counter()
        gate.waiting += 1
        try:
            async with asyncio.timeout(gate.settings.max_wait_s):
                await gate._sem.acquire()
        except TimeoutError as exc:
            gate.queue_timeouts += 1
            gate._probe_done(self._probe)
            raise ProviderError(
                f"upstream {gate.name} is saturated: no slot within {gate.settings.max_wait_s:g} s",
                retryable=False,
            ) from exc
        except BaseException:
            gate._probe_done(self._probe)
            raise
        finally:
            gate.waiting -= 1
        self._acquired = True
        gate.in_use += 1
        gate._observe_wait(time.perf_counter() - started)
        return self

    async def __aexit__(
        self, typ: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        gate = self._gate
        if self._acquired:
            gate.in_use -= 1
            gate._sem.release()
        gate._probe_done(self._probe)
        if self._succeeded or exc is None:
            gate.record_success()
        else:
            gate.record_outcome(exc)


class UpstreamGate:
    """Concurrency cap, queue-time histogram and circuit breaker of one upstream."""

    def __init__(
        self,
        name: str,
        settings: GateSettings | None = None,
        *,
        on_wait: Callable[[float], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.name = name
        self.settings = GateSettings() if settings is None else settings
        self._wait_attrs = {"upstream": name}
        self.queue_waits = 0
        self.queue_wait_max_s = 0.0
        self._on_wait = on_wait
        self._clock = clock
        self._sem = asyncio.Semaphore(self.settings.max_concurrency)
        self.in_use = 0
        self.waiting = 0
        self.successes = 0
        self.failures = 0
        self.rejected = 0
        self.queue_timeouts = 0
        self.opened = 0
        self._consecutive = 0
        self._window: collections.deque[tuple[float, bool]] = collections.deque()
        self._open_until: float | None = None
        self._probing = False
        self._published = False

    # ---- state -------------------------------------------------------------------------------
    @property
    def state(self) -> BreakerState:
        if self._open_until is None:
            return BreakerState.CLOSED
        return BreakerState.OPEN if self._clock() < self._open_until else BreakerState.HALF_OPEN

    @property
    def is_open(self) -> bool:
        """True while calls are refused outright (half-open is not open: it lets a probe through)."""
        return self.state is BreakerState.OPEN

    def retry_after_s(self) -> float:
        return 0.0 if self._open_until is None else max(0.0, self._open_until - self._clock())

    def slot(self) -> _Slot:
        """`async with gate.slot():` around one upstream call; raises CircuitOpen when open."""
        return _Slot(self)

    def _admit(self) -> bool:
        state = self.state
        if state is BreakerState.OPEN:
            self.rejected += 1
            raise CircuitOpen(self.name, self.retry_after_s())
        if state is BreakerState.HALF_OPEN:
            if self._probing:
                self.rejected += 1
                raise CircuitOpen(self.name, 1.0)
            self._probing = True
            return True
        return False

    def _probe_done(self, probe: bool) -> None:
        if probe:
            self._probing = False

    def _observe_wait(self, seconds: float) -> None:
        self.queue_waits += 1
        self.queue_wait_max_s = max(self.queue_wait_max_s, seconds)
        _queue_wait.record(seconds, self._wait_attrs)
        if self._on_wait is not None:
            self._on_wait(seconds)

    # ---- outcomes ----------------------------------------------------------------------------
    def record_outcome(self, exc: BaseException | None) -> None:
        """Success for None, failure for an upstream failure, nothing for anything else."""
        if exc is None:
            self.record_success()
        elif is_upstream_failure(exc):
            self.record_failure()

    def record_success(self) -> None:
        self.successes += 1
        self._consecutive = 0
        if self._open_until is not None and self.state is BreakerState.HALF_OPEN:
            self._close()
            return
        self._note(False)

    def record_failure(self) -> None:
        self.failures += 1
        self._consecutive += 1
        state = self.state
        if state is BreakerState.OPEN:
            return
        if state is BreakerState.HALF_OPEN:
            self._open()
            return
        self._note(True)
        if self._consecutive >= self.settings.failure_threshold:
            self._open()

    def _note(self, failed: bool) -> None:
        now = self._clock()
        self._window.append((now, failed))
        while self._window and self._window[0][0] < now - self.settings.window_s:
            self._window.popleft()
        n = len(self._window)
        if n >= self.settings.min_calls and self._open_until is None:
            bad = sum(1 for _, f in self._window if f)
            if bad / n >= self.settings.error_ratio:
                self._open()

    def _open(self) -> None:
        if not self.settings.breaker:
            return
        self.opened += 1
        self._open_until = self._clock() + self.settings.cooldown_s
        self._window.clear()
        self._consecutive = 0
        log.warning("upstream %s: circuit open for %g s", self.name, self.settings.cooldown_s)

    def _close(self) -> None:
        self._open_until = None
        self._window.clear()
        self._consecutive = 0
        log.info("upstream %s: circuit closed", self.name)

    # ---- sharing the state -------------------------------------------------------------------
    async def publish_state(self, mirror: MirrorSource) -> None:
        """Mirror an open breaker to `tw:breaker:<name>` (TTL = the remaining cooldown); delete the
        key when this gate, having published it, is no longer open. Never deletes another
        orchestrator's key. `mirror`: a BreakerMirror or what one is built from (the CheckpointStore)."""
        if self.is_open:
            await BreakerMirror.of(mirror).publish_open(self.name, math.ceil(self.retry_after_s() * 1000))
            self._published = True
        elif self._published:
            await BreakerMirror.of(mirror).clear(self.name)
            self._published = False

    def snapshot(self) -> dict[str, Any]:
        return {
            "state": self.state.value,
            "in_use": self.in_use,
            "waiting": self.waiting,
            "successes": self.successes,
            "failures": self.failures,
            "rejected": self.rejected,
            "queue_timeouts": self.queue_timeouts,
            "opened": self.opened,
            "retry_after_s": round(self.retry_after_s(), 3),
            "queue_waits": self.queue_waits,
            "queue_wait_max_s": round(self.queue_wait_max_s, 6),
        }


async def read_state(mirror: MirrorSource, upstream: str) -> BreakerSnapshot | None:
    """The gateway's view: None when no orchestrator reports the upstream's breaker open."""
    return await BreakerMirror.of(mirror).read(upstream)


class UpstreamRouter:
    """A `Provider` that routes each step by its model route and gates it per upstream.

    `default` serves steps without a route (and gives this router its `name`, which is what
    `flags_in_force` records as the provider). Other upstreams are built on first use by `factory`
    (the orchestrator's `make_provider`); a route naming an unknown upstream fails the step with a
    non-retryable ProviderError. Stream counters are summed over the upstreams built.
    """

    def __init__(
        self,
        default: Provider,
        *,
        factory: Callable[[str], Provider],
        settings_for: Callable[[str], GateSettings] = GateSettings.from_env,
        on_wait: Callable[[str, float], None] | None = None,
    ) -> None:
        self.name = default.name
        self.default = default
        self._factory = factory
        self._settings_for = settings_for
        self._on_wait = on_wait
        self.providers: dict[str, Provider] = {default.name: default}
        self.gates: dict[str, UpstreamGate] = {}
        self.gate(default.name)
        _routers.add(self)
        _install_metrics()

    def gate(self, upstream: str) -> UpstreamGate:
        gate = self.gates.get(upstream)
        if gate is None:
            gate = UpstreamGate(
                upstream,
                self._settings_for(upstream),
                on_wait=None if self._on_wait is None else functools.partial(self._on_wait, upstream),
            )
            self.gates[upstream] = gate
        return gate

    def provider(self, upstream: str) -> Provider:
        prov = self.providers.get(upstream)
        if prov is None:
            try:
                prov = self._factory(upstream)
            except (ValueError, ImportError) as exc:
                raise ProviderError(f"unknown model upstream {upstream!r}: {exc}", retryable=False) from exc
            self.providers[upstream] = prov
        return prov

    async def stream(self, request: ProviderRequest) -> AsyncGenerator[ProviderEvent, None]:
        """One model call through its upstream's gate, the only gate a model call passes. The two
        stages before its first event are timed here, where they are told apart: `model.queue` (the
        wait for a slot) and `upstream.first_token` (from the slot to the upstream's first event)."""
        route = parse_route(request.model, default_provider=self.default.name)
        provider = self.provider(route.provider)
        inner = msgspec.structs.replace(request, model=route.model)
        queued_ns, t0 = time.time_ns(), time.perf_counter()
        async with self.gate(route.provider).slot() as slot:
            telemetry.observe_stage("model_queue", time.perf_counter() - t0)
            telemetry.record_span("model.queue", queued_ns, time.time_ns())
            waiting: Any = telemetry.tracer.start_span("upstream.first_token")
            asked = time.perf_counter()
            try:
                async with contextlib.aclosing(provider.stream(inner)) as stream:
                    async for event in stream:
                        if waiting is not None:  # once per model call, not per event
                            telemetry.observe_stage("upstream_first_token", time.perf_counter() - asked)
                            waiting.set_attribute("event", type(event).__name__)
                            waiting.end()
                            waiting = None
                        if isinstance(event, Usage):
                            slot.succeeded()
                        yield event
            finally:
                if waiting is not None:
                    waiting.set_attribute("event", "none")
                    waiting.end()

    # ---- observability -----------------------------------------------------------------------
    def _sum(self, attr: str) -> int:
        return sum(int(getattr(p, attr, 0)) for p in {id(p): p for p in self.providers.values()}.values())

    @property
    def started(self) -> int:
        return self._sum("started")

    @property
    def finished(self) -> int:
        return self._sum("finished")

    @property
    def failed(self) -> int:
        return self._sum("failed")

    @property
    def aborted(self) -> int:
        return self._sum("aborted")

    @property
    def orphaned(self) -> int:
        return self._sum("orphaned")

    def snapshot(self) -> dict[str, dict[str, Any]]:
        return {name: gate.snapshot() for name, gate in self.gates.items()}

    async def publish_once(self, mirror: MirrorSource) -> None:
        """Lists this router's upstreams for the gateways, then mirrors each open breaker."""
        mirror = BreakerMirror.of(mirror)
        gates = list(self.gates.values())
        await mirror.list_upstreams((gate.name for gate in gates), SEEN_FOR_MS)
        for gate in gates:
            await gate.publish_state(mirror)

    async def publish_loop(self, mirror: MirrorSource, interval_s: float = 0.5) -> None:
        """`publish_once` forever (owned by the service's TaskGroup), supervised: a failing Redis is
        logged with its traceback at most every 30 s, counted, and retried after a backoff of at
        most a quarter of the listing's life (`SEEN_FOR_MS`), so a blip of a few seconds does not
        make the gateways forget an upstream. `mirror`: a BreakerMirror or what one is built from (the
        CheckpointStore)."""
        await supervised(
            "breaker-publish",
            functools.partial(self.publish_once, BreakerMirror.of(mirror)),
            every_s=interval_s,
            max_backoff_s=SEEN_FOR_MS / 4000,
            logger=log,
        )

    async def close(self) -> None:
        for prov in self.providers.values():
            closer = getattr(prov, "close", None)
            if closer is not None:
                with contextlib.suppress(Exception):
                    await closer()


# ---- metrics -------------------------------------------------------------------------------------
_routers: weakref.WeakSet[UpstreamRouter] = weakref.WeakSet()

_GATE_GAUGES: Final[dict[str, tuple[Callable[[UpstreamGate], int], str]]] = {
    "in_use": (lambda g: g.in_use, "Upstream streams holding a concurrency slot"),
    "waiting": (lambda g: g.waiting, "Calls waiting for a concurrency slot"),
    "breaker_open": (lambda g: int(g.is_open), "1 while the upstream's circuit breaker refuses calls"),
}
_GATE_COUNTERS: Final[dict[str, tuple[Callable[[UpstreamGate], int], str]]] = {
    "breaker_opened": (lambda g: g.opened, "Times the circuit breaker opened"),
    "breaker_rejections": (lambda g: g.rejected, "Calls refused at once because the breaker was open"),
    "breaker_failures": (lambda g: g.failures, "Upstream failures counted by the breaker"),
    "queue_timeouts": (lambda g: g.queue_timeouts, "Calls that found no slot within max_wait_s"),
}


def _per_upstream(
    read: Callable[[UpstreamGate], int], combine: Callable[[Iterable[int]], int]
) -> Callable[[], list[tuple[dict[str, str], int]]]:
    def collect() -> list[tuple[dict[str, str], int]]:
        values: dict[str, list[int]] = {}
        for router in list(_routers):
            for gate in list(router.gates.values()):
                values.setdefault(gate.name, []).append(read(gate))
        return [({"upstream": name}, combine(v)) for name, v in sorted(values.items())]

    return collect


def _install_metrics() -> None:
    """Gate gauges and counters, read when `/metrics` is scraped (registering again is a no-op)."""
    for name, (read, description) in _GATE_GAUGES.items():
        combine = max if name == "breaker_open" else sum
        telemetry.observe(f"tidewire_upstream_{name}", _per_upstream(read, combine), description=description)
    for name, (read, description) in _GATE_COUNTERS.items():
        telemetry.observe(
            f"tidewire_upstream_{name}", _per_upstream(read, sum), kind="counter", description=description
        )
