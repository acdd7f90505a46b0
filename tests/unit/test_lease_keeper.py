"""The lease keeper's schedule, against a store stub (the renewal script itself is tested on a real
Redis in tests/integration/test_checkpoint_scripts.py), and its failure path: a failed tick is
reported (shared/supervise.py's `report_failure`) and loses only the leases past their TTL, and the
next tick still comes at the renewal period."""

from __future__ import annotations

import asyncio
import logging

import pytest

from orchestrator.leases import LeaseKeeper
from shared import supervise
from shared.checkpoints import Lease


class CountingStore:
    def __init__(self) -> None:
        self.calls: list[list[str]] = []
        self.three = asyncio.Event()

    async def renew_many(self, leases: list[Lease], ttl_ms: int) -> list[bool]:
        self.calls.append([lease.session_id for lease in leases])
        if len(self.calls) >= 3:
            self.three.set()
        return [True] * len(leases)


async def test_an_idle_keeper_makes_no_calls_and_a_held_lease_is_renewed_at_once() -> None:
    store = CountingStore()
    keeper = LeaseKeeper(store, ttl_ms=300, renew_ms=20)  # type: ignore[arg-type]
    ticks = 0
    tick = keeper.tick

    async def counted_tick() -> None:
        nonlocal ticks
        ticks += 1
        await tick()

    keeper.tick = counted_tick  # type: ignore[method-assign]
    task = asyncio.create_task(keeper.run())
    try:
        await asyncio.sleep(0.2)  # ten renew periods with nothing held
        assert ticks == 0 and store.calls == [], f"an idle keeper woke {ticks} times, renewed {store.calls}"
        lease = Lease("s1", "o1", 1)
        lost = keeper.hold(lease)
        try:
            await asyncio.wait_for(store.three.wait(), 2)
        except TimeoutError:
            raise AssertionError(f"a held lease was not renewed 3 times in 2 s: {store.calls}") from None
        assert all(c == ["s1"] for c in store.calls) and not lost.is_set(), store.calls
        keeper.drop(lease)
        await asyncio.sleep(0.05)
        seen = ticks
        await asyncio.sleep(0.2)
        assert ticks == seen, f"the keeper ticked {ticks - seen} times after its last lease was dropped"
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


class FailingStore:
    """Redis unreachable: every renewal fails (a partition)."""

    async def renew_many(self, leases: list[Lease], ttl_ms: int) -> list[bool]:
        raise ConnectionError("unreachable")


async def test_a_lease_not_renewed_for_a_ttl_has_lapsed_before_it_is_declared_lost() -> None:
    keeper = LeaseKeeper(FailingStore(), ttl_ms=100, renew_ms=1000)  # type: ignore[arg-type]
    lease = Lease("s1", "o1", 1)
    lost = keeper.hold(lease)
    assert not keeper.lapsed(lease), "a lease just taken has not lapsed"
    assert keeper.lapsed(Lease("s1", "o1", 2)), "a lease of another epoch is not ours"
    await asyncio.sleep(0.15)  # past the TTL with no renewal, and no tick has run yet
    assert keeper.lapsed(lease) and not lost.is_set(), "a TTL without renewal is a lapse, lost or not"
    await keeper.tick()
    assert lost.is_set() and keeper.lapsed(lease), "the failed renewal past the TTL loses the lease"


class FlakyStore:
    """Renews every lease, except that the listed calls fail (a Redis blip)."""

    def __init__(self, fail_on: set[int], until: int) -> None:
        self.fail_on, self.until, self.calls = fail_on, until, 0
        self.reached = asyncio.Event()

    async def renew_many(self, leases: list[Lease], ttl_ms: int) -> list[bool]:
        self.calls += 1
        if self.calls >= self.until:
            self.reached.set()
        if self.calls in self.fail_on:
            raise ConnectionError(f"blip on call {self.calls}")
        return [True] * len(leases)


async def test_a_failed_renewal_is_reported_and_the_next_comes_at_the_renewal_period(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    sleeps: list[float] = []
    real_sleep = asyncio.sleep

    async def recorded_sleep(delay: float) -> None:
        sleeps.append(delay)
        await real_sleep(0)

    store = FlakyStore(fail_on={2, 3}, until=5)
    keeper = LeaseKeeper(store, ttl_ms=1000, renew_ms=50)  # type: ignore[arg-type]
    lost = keeper.hold(Lease("s1", "o1", 1))
    before = supervise.failures().get("lease-keeper", 0)
    monkeypatch.setattr(supervise, "_reporters", {})  # an earlier test's report began a quiet period
    monkeypatch.setattr(asyncio, "sleep", recorded_sleep)
    with caplog.at_level(logging.WARNING, logger="orchestrator.leases"):
        task = asyncio.create_task(keeper.run())
        try:
            await asyncio.wait_for(store.reached.wait(), 5)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    assert task.cancelled(), "only cancellation ends the keeper"
    assert supervise.failures()["lease-keeper"] - before == 2, (
        "each failed renewal is counted, cancellation not"
    )
    assert any(r.exc_info is not None and "blip" in r.getMessage() for r in caplog.records), caplog.text
    assert not lost.is_set(), "a failed renewal well inside the TTL loses nothing"
    assert sleeps and max(sleeps) <= 0.05, f"the keeper backed off after a failure: {sleeps}"


class WrongShapeStore:
    """Answers with fewer results than leases asked about (a bug, not a blip)."""

    async def renew_many(self, leases: list[Lease], ttl_ms: int) -> list[bool]:
        return []


async def test_a_tick_that_fails_otherwise_takes_the_same_path_and_loses_only_lapsed_leases() -> None:
    keeper = LeaseKeeper(WrongShapeStore(), ttl_ms=100, renew_ms=1000)  # type: ignore[arg-type]
    before = supervise.failures().get("lease-keeper", 0)
    old = keeper.hold(Lease("s1", "o1", 1))
    await asyncio.sleep(0.15)
    fresh = keeper.hold(Lease("s2", "o1", 1))
    await keeper.tick()  # raised ValueError (zip strict) out of the keeper before
    assert old.is_set() and not fresh.is_set(), "a failed tick loses the leases past their TTL, no others"
    assert supervise.failures()["lease-keeper"] - before == 1
