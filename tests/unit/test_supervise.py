"""The one failure policy for background loops (shared/supervise.py), and the loops that use it.

A failing step is logged at WARNING with its traceback (rate-limited), counted in
`tidewire_background_failures{loop}` and retried after a backoff; cancellation ends a loop and is
never counted. Sleeps are recorded by replacing `asyncio.sleep` (a recorded sleep only yields), so
intervals and backoffs are checked exactly rather than timed; collaborators are in-memory fakes.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
import types
import uuid
from collections.abc import Awaitable, Callable, Iterable, Iterator

import pytest

from gateway import hub
from gateway.limits import EdgeCounters, LoadShedder, Slot, SubjectLimits
from gateway.settings import GatewaySettings
from gateway.shedding import AcceptDelays
from orchestrator.upstream import SEEN_FOR_MS, UpstreamRouter
from shared import promtext, supervise, telemetry
from shared.breakers import BreakerMirror
from shared.quotas import SubjectQuotas
from shared.supervise import report_failure, supervised

_real_sleep = asyncio.sleep


@pytest.fixture
def sleeps(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[float]]:
    """Every `asyncio.sleep(d)` of the test records `d` and only yields."""
    recorded: list[float] = []

    async def sleep(delay: float, result: object = None) -> object:
        recorded.append(delay)
        await _real_sleep(0)
        return result

    monkeypatch.setattr(asyncio, "sleep", sleep)
    yield recorded


def failures_of(name: str) -> int:
    return supervise.failures().get(name, 0)


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


class Script:
    """A step that fails on the listed calls and sets `reached` once it has been called `until` times."""

    def __init__(self, fail_on: Iterable[int] = (), until: int = 1_000_000) -> None:
        self.fail_on, self.until = set(fail_on), until
        self.calls = 0
        self.reached = asyncio.Event()

    async def __call__(self, *args: object) -> None:
        self.calls += 1
        if self.calls >= self.until:
            self.reached.set()
        if self.calls in self.fail_on:
            raise ConnectionError(f"boom on call {self.calls}")


async def run_until(
    loop: Callable[[], Awaitable[None]], reached: asyncio.Event, timeout: float = 5.0
) -> asyncio.Task[None]:
    """Starts `loop`, waits until `reached`, cancels it and checks that the cancellation ended it."""
    task = asyncio.create_task(loop())
    try:
        await asyncio.wait_for(reached.wait(), timeout)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert task.cancelled(), f"the loop did not end by cancellation: {task!r}"
    return task


def warnings_with_traceback(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.levelno == logging.WARNING and r.exc_info is not None]


# ---- the helper --------------------------------------------------------------------------------


async def test_a_failing_step_is_logged_with_traceback_counted_and_the_loop_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    name, step = unique("test-loop"), Script(fail_on={2}, until=4)
    with caplog.at_level(logging.INFO, logger="shared.supervise"):
        await run_until(lambda: supervised(name, step, every_s=0.001), step.reached)
    assert step.calls >= 4, "the loop did not go on after a failed step"
    assert failures_of(name) == 1
    [warning] = warnings_with_traceback(caplog)
    assert name in warning.getMessage() and "boom on call 2" in warning.getMessage()
    assert any("recovered" in r.getMessage() and r.levelno == logging.INFO for r in caplog.records)


async def test_cancellation_ends_a_loop_and_is_never_counted_while_the_counter_is_served_at_0() -> None:
    name, started = unique("test-idle"), asyncio.Event()

    async def step() -> None:
        started.set()
        await asyncio.Event().wait()  # cancelled while inside its step

    await run_until(lambda: supervised(name, step, every_s=0.01), started)
    assert failures_of(name) == 0
    page = promtext.parse(telemetry.render_prometheus())
    assert page.value("tidewire_background_failures", default=-1, loop=name) == 0


async def test_the_backoff_doubles_up_to_its_cap_and_resets_on_success(sleeps: list[float]) -> None:
    step = Script(fail_on={1, 2, 3, 4, 5, 7}, until=8)
    await run_until(
        lambda: supervised(unique("test-backoff"), step, every_s=0.5, max_backoff_s=3), step.reached
    )
    assert sleeps[:7] == [1.0, 2.0, 3.0, 3.0, 3.0, 0.5, 1.0]


async def test_a_backoff_capped_at_the_interval_keeps_the_interval(sleeps: list[float]) -> None:
    step = Script(fail_on={1, 2, 3}, until=5)
    await run_until(
        lambda: supervised(unique("test-flat"), step, every_s=0.5, max_backoff_s=0.5), step.reached
    )
    assert set(sleeps) == {0.5}


async def test_a_fixed_rate_counts_the_interval_from_the_start_of_the_step(sleeps: list[float]) -> None:
    first_sleep: dict[bool, float] = {}
    for fixed_rate in (False, True):
        step = Script(until=2)

        async def slow_step(step: Script = step) -> None:
            await _real_sleep(0.05)  # not recorded: the step's own work takes 50 ms
            await step()

        sleeps.clear()
        await run_until(
            functools.partial(supervised, unique("test-rate"), slow_step, every_s=0.2, fixed_rate=fixed_rate),
            step.reached,
        )
        first_sleep[fixed_rate] = sleeps[0]
    assert first_sleep[False] == 0.2
    assert 0.0 < first_sleep[True] <= 0.2 - 0.04, first_sleep


async def test_reports_are_rate_limited_per_loop_yet_every_failure_is_counted(
    caplog: pytest.LogCaptureFixture, sleeps: list[float]
) -> None:
    name, step = unique("test-quiet"), Script(fail_on=range(1, 6), until=6)
    with caplog.at_level(logging.WARNING, logger="shared.supervise"):
        await run_until(lambda: supervised(name, step, every_s=0.01, quiet_s=60), step.reached)
        assert failures_of(name) == 5 and len(warnings_with_traceback(caplog)) == 1
        caplog.clear()
        other = unique("test-report")
        for _ in range(3):
            report_failure(other, ValueError("bad"), quiet_s=60)
        assert failures_of(other) == 3 and len(warnings_with_traceback(caplog)) == 1
        caplog.clear()
        noisy = unique("test-noisy")
        for _ in range(2):
            report_failure(noisy, ValueError("bad"), quiet_s=0)
        assert len(warnings_with_traceback(caplog)) == 2


# ---- the loops that use it -------------------------------------------------------------------------


class FakePresenceStore:
    def __init__(self) -> None:
        self.alive = Script(fail_on={2}, until=4)
        self.gone: list[str] = []

    async def gateway_alive(self, instance: str, ttl_ms: int) -> None:
        assert ttl_ms == hub.PRESENCE_TTL_MS
        await self.alive()

    async def gateway_gone(self, instance: str) -> None:
        self.gone.append(instance)


async def test_presence_refresh_reports_a_failed_write_and_retries_at_the_next_tick(
    caplog: pytest.LogCaptureFixture, sleeps: list[float]
) -> None:
    store = FakePresenceStore()
    session_hub = hub.SessionHub(None, store, "gw-test")  # type: ignore[arg-type]
    before = failures_of("presence")
    with caplog.at_level(logging.WARNING, logger="gateway.hub"):
        await run_until(session_hub.refresh_presence, store.alive.reached)
    assert failures_of("presence") - before == 1 and warnings_with_traceback(caplog)
    assert set(sleeps) == {hub.PRESENCE_EVERY_S}, "a backoff would let the gateway's liveness lapse"
    assert store.gone == [session_hub.instance], "a stopped gateway withdraws its liveness"


class FakeQuotas(SubjectQuotas):
    def __init__(self) -> None:
        self.renewed: list[tuple[list[tuple[str, str]], int]] = []
        self.script = Script(fail_on={1}, until=3)

    async def renew_slots(self, slots: Iterable[tuple[str, str]], lease_ms: int) -> None:
        self.renewed.append((list(slots), lease_ms))
        await self.script()


async def test_slot_renewal_reports_a_failure_and_renews_at_the_next_tick(
    caplog: pytest.LogCaptureFixture, sleeps: list[float]
) -> None:
    quotas = FakeQuotas()
    settings = GatewaySettings(connection_lease_s=0.3, max_connections_per_subject=2)
    limits = SubjectLimits(quotas, settings, "gw-test", EdgeCounters())
    limits.slots.add(Slot("user-1", "gw-test:1"))  # as `acquire` adds it (which asks Redis first)
    before = failures_of("slot-renewer")
    with caplog.at_level(logging.WARNING, logger="gateway.limits"):
        await run_until(limits.renew_forever, quotas.script.reached)
    assert failures_of("slot-renewer") - before == 1 and warnings_with_traceback(caplog)
    assert quotas.renewed[0] == ([("user-1", "gw-test:1")], 300)
    assert sleeps and all(d == pytest.approx(0.1) for d in sleeps), "a backoff would let live slots lapse"


async def test_the_load_sampler_survives_a_failing_sample_without_counting_the_backoff_as_lag(
    caplog: pytest.LogCaptureFixture,
) -> None:
    deps = types.SimpleNamespace(settings=GatewaySettings(shed_sample_ms=50), accepts=AcceptDelays())
    shedder = LoadShedder(deps, EdgeCounters())  # type: ignore[arg-type]
    seen: list[tuple[int, int]] = []  # (sample number, own_lag_ms when it was taken)
    script = Script(fail_on={2, 3, 4}, until=6)

    async def sample_once(n: int = 0) -> None:
        seen.append((n, shedder.own_lag_ms))
        await script()

    shedder.sample_once = sample_once  # type: ignore[method-assign, assignment]
    before = failures_of("load-sampler")
    t0 = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="gateway.limits"):
        await run_until(shedder.run_forever, script.reached)
    assert failures_of("load-sampler") - before == 3 and warnings_with_traceback(caplog)
    assert [n for n, _ in seen][:6] == [1, 2, 3, 4, 5, 6]
    assert time.monotonic() - t0 >= 0.1 + 0.2 + 0.4, "the failures were not backed off"
    lag_after_failures = seen[4][1]
    assert lag_after_failures < 300, f"the backoff (0.7 s) was measured as event-loop lag: {seen}"


class FakeMirror(BreakerMirror):
    def __init__(self, fail_on: Iterable[int], until: int) -> None:
        self.script = Script(fail_on=fail_on, until=until)
        self.listed: list[list[str]] = []

    async def list_upstreams(self, upstreams: Iterable[str], seen_for_ms: int) -> None:
        self.listed.append(list(upstreams))
        await self.script()

    async def publish_open(self, upstream: str, remaining_ms: int) -> None:
        raise AssertionError("no breaker is open")

    async def clear(self, upstream: str) -> None:
        raise AssertionError("no breaker was published")


def _router() -> UpstreamRouter:
    from orchestrator.providers.simulated import SimulatedProvider, SimulatedSettings

    def no_factory(name: str) -> SimulatedProvider:
        raise ValueError(name)

    return UpstreamRouter(SimulatedProvider(SimulatedSettings(rate=0, tokens=5)), factory=no_factory)


async def test_breaker_publishing_reports_failures_backs_off_within_the_listing_and_recovers(
    caplog: pytest.LogCaptureFixture, sleeps: list[float]
) -> None:
    mirror = FakeMirror(fail_on=range(1, 7), until=8)
    before = failures_of("breaker-publish")
    with caplog.at_level(logging.INFO, logger="orchestrator.upstream"):
        await run_until(lambda: _router().publish_loop(mirror, interval_s=0.5), mirror.script.reached)
    assert failures_of("breaker-publish") - before == 6 and len(warnings_with_traceback(caplog)) == 1
    cap = SEEN_FOR_MS / 4000
    assert sleeps[:7] == [1.0, 2.0, cap, cap, cap, cap, 0.5], sleeps
    assert any("recovered" in r.getMessage() for r in caplog.records)
    assert mirror.listed[-1] == ["simulated"]
