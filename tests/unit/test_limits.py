"""Edge limits as pure logic: token buckets trigger and recover, load shedding decides from the last
background sample only (no I/O per send), and input the stores cannot hold is refused up front.
The Redis side (Lua buckets and connection slots across gateways) is in tests/integration/test_edge.py."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

import pytest

from gateway.limits import (
    ConnectionLimits,
    Edge,
    EdgeCounters,
    LoadShedder,
    SubjectLimits,
    TokenBucket,
    check_session_id,
    check_text,
)
from gateway.settings import GatewaySettings
from gateway.shedding import AcceptDelays
from shared.checkpoints import MessageQuota
from shared.errors import BadFrame, Degraded, NotFound, RateLimited
from tests.waits import eventually


def test_bucket_allows_a_burst_then_paces_and_recovers() -> None:
    b = TokenBucket(2.0, 3, now=0.0)
    assert [b.take(now=0.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    wait = b.take(now=0.0)
    assert wait == pytest.approx(0.5)
    assert b.take(now=0.25) == pytest.approx(0.25)  # still refused, nothing consumed
    assert b.take(now=0.5) == 0.0  # recovered after the announced wait
    assert b.take(now=10.0) == 0.0 and b.tokens == pytest.approx(2.0)  # refills to the burst, not beyond


def test_bucket_with_rate_zero_is_disabled() -> None:
    b = TokenBucket(0.0, 1, now=0.0)
    assert all(b.take(now=0.0) == 0.0 for _ in range(100))


def test_connection_limits_answer_rate_limited_with_retry_after_and_recover() -> None:
    limits = ConnectionLimits(
        GatewaySettings(msg_rate_per_s=10, msg_burst=2, frame_rate_per_s=1000, frame_burst=5)
    )
    limits.message()
    limits.message()
    with pytest.raises(RateLimited) as e:
        limits.message()
    assert e.value.code == "rate_limited" and 1 <= e.value.retry_after_ms <= 100
    time.sleep(e.value.retry_after_ms / 1000)
    limits.message()
    for _ in range(5):
        limits.frame()
    with pytest.raises(RateLimited, match="frames"):
        limits.frame()


@dataclass
class FakeBus:
    pending: int | Exception = 0
    connected: bool = True
    calls: int = 0

    async def turn_queue_pending(self) -> int:
        self.calls += 1
        if isinstance(self.pending, Exception):
            raise self.pending
        return self.pending


@dataclass
class FakeStore:
    fail: bool = False
    calls: int = 0

    async def ping(self) -> None:
        self.calls += 1
        if self.fail:
            raise ConnectionError("down")


@dataclass
class FakeDeps:
    settings: GatewaySettings
    bus: FakeBus = field(default_factory=FakeBus)
    checkpoints: FakeStore = field(default_factory=FakeStore)
    eventlog: FakeStore = field(default_factory=FakeStore)
    accepts: AcceptDelays = field(default_factory=AcceptDelays)


def _shedder(**settings: Any) -> tuple[LoadShedder, FakeDeps]:
    deps = FakeDeps(GatewaySettings(**settings))
    return LoadShedder(deps, EdgeCounters()), deps  # type: ignore[arg-type]


async def test_shedding_follows_the_sampled_queue_depth() -> None:
    shedder, deps = _shedder(turn_queue_shed_threshold=10, shed_retry_after_ms=1500)
    deps.bus.pending = 3
    await shedder.sample_once()
    shedder.check()
    deps.bus.pending = 10
    await shedder.sample_once()
    with pytest.raises(Degraded) as e:
        shedder.check()
    assert e.value.code == "degraded" and e.value.retry_after_ms == 1500 and "turn queue" in e.value.message
    deps.bus.pending = 2
    await shedder.sample_once()
    shedder.check()  # recovered
    assert shedder.counters.shed_sends == 1


async def test_threshold_zero_always_sheds_and_negative_never() -> None:
    always, _ = _shedder(turn_queue_shed_threshold=0)
    with pytest.raises(Degraded):
        always.check()
    never, deps = _shedder(turn_queue_shed_threshold=-1)
    deps.bus.pending = 10**9
    await never.sample_once()
    never.check()


async def test_check_does_no_io_and_is_immediate() -> None:
    shedder, deps = _shedder(turn_queue_shed_threshold=0)
    calls = deps.bus.calls
    t0 = time.perf_counter()
    for _ in range(1000):
        with pytest.raises(Degraded):
            shedder.check()
    assert time.perf_counter() - t0 < 0.05
    assert deps.bus.calls == calls


async def test_a_dependency_down_for_two_samples_sheds_until_it_is_back() -> None:
    shedder, deps = _shedder()
    deps.checkpoints.fail = True
    await shedder.sample_once(1)
    shedder.check()  # one failed probe is not an outage
    await shedder.sample_once(2)
    with pytest.raises(Degraded, match="redis unavailable"):
        shedder.check()
    deps.checkpoints.fail = False
    await shedder.sample_once(3)
    shedder.check()


async def test_nats_disconnected_sheds_at_once_and_a_failed_queue_probe_keeps_the_last_depth() -> None:
    shedder, deps = _shedder(turn_queue_shed_threshold=5)
    deps.bus.pending = 7
    await shedder.sample_once()
    deps.bus.pending = RuntimeError("timeout")
    await shedder.sample_once(1)
    assert shedder.sample.pending == 7
    deps.bus.pending = 0
    deps.bus.connected = False
    await shedder.sample_once(2)
    with pytest.raises(Degraded, match="nats unavailable"):
        shedder.check()


async def test_postgres_is_probed_less_often() -> None:
    shedder, deps = _shedder()
    for n in range(8):
        await shedder.sample_once(n)
    assert deps.checkpoints.calls == 8 and deps.eventlog.calls == 2


async def test_sampler_runs_in_the_background_at_its_interval() -> None:
    shedder, deps = _shedder(shed_sample_ms=50)
    t0 = time.monotonic()
    task = asyncio.create_task(shedder.run_forever())
    try:
        await eventually(
            lambda: deps.bus.calls,
            timeout=5,
            interval=0.01,
            ok=lambda n: n >= 4,
            what="four samples of the background sampler (every 50 ms)",
        )
    finally:
        task.cancel()
    elapsed = time.monotonic() - t0
    assert deps.bus.calls <= elapsed / 0.05 + 2, (
        f"{deps.bus.calls} samples in {elapsed:.2f} s: faster than every 50 ms"
    )


class NullSubjects(SubjectLimits):
    def __init__(self) -> None:
        self.settings = GatewaySettings(subject_msg_rate_per_s=2.0, subject_msg_burst=4)
        self.asked: list[str] = []

    def message_quota(self, subject: str) -> MessageQuota | None:
        self.asked.append(subject)
        return super().message_quota(subject)


def test_admit_send_refuses_cheapest_first_and_spends_nothing_when_shedding() -> None:
    shedder, _ = _shedder(turn_queue_shed_threshold=0)
    subjects = NullSubjects()
    conn = ConnectionLimits(GatewaySettings(msg_burst=1))
    edge = Edge(subjects, shedder, shedder.counters)
    with pytest.raises(Degraded):
        edge.admit_send("alice", conn, "c1", "hi")
    assert subjects.asked == [] and conn.messages.tokens == 1
    with pytest.raises(BadFrame):
        edge.admit_send("alice", conn, "c1", "nul\x00byte")


def test_an_admitted_send_carries_the_subjects_quota_for_the_append_to_spend() -> None:
    shedder, _ = _shedder()
    edge = Edge(NullSubjects(), shedder, shedder.counters)
    admitted = edge.admit_send("alice", ConnectionLimits(GatewaySettings()), "c1", "hi")
    assert admitted.quota == MessageQuota("alice", 2.0, 4)
    admitted.refused()
    assert shedder.counters.rate_limited_messages == 1


@pytest.mark.parametrize(
    "sid,ok",
    [
        ("AbC_-09", True),
        ("x" * 128, True),
        ("", False),
        ("x" * 129, False),
        ("a/b", False),
        ("a\x00", False),
        ("é", False),
        ("a b", False),
    ],
)
def test_session_ids(sid: str, ok: bool) -> None:
    if ok:
        assert check_session_id(sid) == sid
    else:
        with pytest.raises(NotFound):
            check_session_id(sid)


@pytest.mark.parametrize(
    "text,ok",
    [
        ("hello", True),
        ("emoji 🙂 and 中文", True),
        ("a\x00b", False),
        ("lone \ud800", False),
        ("\udfff", False),
        ("tab\tnewline\n", True),
    ],
)
def test_text_the_stores_cannot_hold_is_refused(text: str, ok: bool) -> None:
    if ok:
        check_text("text", text)
    else:
        with pytest.raises(BadFrame):
            check_text("text", text)


def test_overload_is_the_median_orchestrators_delay_or_lag_or_the_gateways_own_lag() -> None:
    from gateway.limits import overload

    kw = {"pickup_delay_ms": 1000, "loop_lag_ms": 500}
    assert overload([], 0, **kw) is None
    assert overload([(200, 20), (300, 30)], 10, **kw) is None
    assert overload([(5000, 20)], 10, **kw) == "turns wait 5000 ms to start"
    assert overload([(5000, 20), (100, 10), (120, 10)], 10, **kw) is None, (
        "one slow orchestrator shed everything"
    )
    assert (
        overload([(100, 900), (100, 800), (100, 10)], 10, **kw) == "the orchestrators' event loops lag 800 ms"
    )
    assert overload([], 700, **kw) == "this gateway's event loop lags 700 ms"
    assert overload([(10**6, 10**6)], 10**6, pickup_delay_ms=-1, loop_lag_ms=-1) is None


async def test_a_shedder_refuses_sends_while_the_orchestrators_report_slow_pickups() -> None:
    shedder, deps = _shedder(shed_pickup_delay_ms=1000, shed_retry_after_ms=700)
    reports: list[tuple[int, int, int]] = [(2500, 10, -1)]

    async def read_load_reports(fresh_ms: int) -> list[tuple[int, int, int]]:
        return reports

    deps.checkpoints.read_load_reports = read_load_reports  # type: ignore[attr-defined]
    await shedder.sample_once()
    with pytest.raises(Degraded) as e:
        shedder.check()
    assert "turns wait 2500 ms" in str(e.value) and e.value.retry_after_ms == 700
    reports[:] = [(40, 5, -1)]
    await shedder.sample_once()
    shedder.check()  # back to normal at the next sample


async def test_a_standing_wait_refuses_part_of_the_sends_and_a_quiet_stack_none() -> None:
    from gateway.shedding import DelayShedder

    shedder, deps = _shedder(shed_retry_after_ms=900)
    shedder.delay_shedder = DelayShedder(0.25)
    draws = iter([0.999, 0.0] * 100)
    shedder.draw = lambda: next(draws)
    reports: list[tuple[int, int, int]] = [(3000, 10, 1500), (2500, 10, 1200), (100, 1, -1)]

    async def read_load_reports(fresh_ms: int) -> list[tuple[int, int, int]]:
        return reports

    deps.checkpoints.read_load_reports = read_load_reports  # type: ignore[attr-defined]
    for _ in range(3):
        await shedder.sample_once()
    assert 0 < shedder.delay_shedder.p < 1, shedder.delay_shedder.p
    shedder.check()  # draw 0.999: admitted
    with pytest.raises(Degraded) as e:
        shedder.check()  # draw 0.0: refused
    assert "turns wait 1500 ms" in str(e.value) and e.value.retry_after_ms == 900
    reports[:] = [(40, 5, 3), (30, 5, -1)]
    for _ in range(8):
        await shedder.sample_once()
    assert shedder.delay_shedder.p == 0.0
    for _ in range(20):
        shedder.check()  # nothing is refused once turns start in time


async def test_the_gateways_own_slow_accepts_shed_without_any_orchestrator_report() -> None:
    from gateway.shedding import DelayShedder

    shedder, deps = _shedder()
    shedder.delay_shedder = DelayShedder(0.25)
    shedder.draw = lambda: 0.0
    for _ in range(3):
        for _ in range(AcceptDelays.MIN_EVIDENCE):
            deps.accepts.note(1.5)  # the accepts of the window took 1.5 s
        await shedder.sample_once()
    with pytest.raises(Degraded) as e:
        shedder.check()
    assert "turns wait 1500 ms" in str(e.value)
    deps.accepts.note(5.0)  # one slow accept alone is no standing queue
    for _ in range(8):
        await shedder.sample_once()
    shedder.check()
