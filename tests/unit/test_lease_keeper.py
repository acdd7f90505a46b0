"""The lease keeper's schedule, against a store stub (the renewal script itself is tested on a real
Redis in tests/integration/test_checkpoint_scripts.py)."""

from __future__ import annotations

import asyncio

from orchestrator.leases import LeaseKeeper
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
