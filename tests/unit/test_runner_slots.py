"""A full orchestrator hands a freed session slot to one parked turn at once (RunnerPool)."""

from __future__ import annotations

import asyncio
from typing import Any

from orchestrator.runners import RunnerPool


async def _pool(max_sessions: int) -> RunnerPool:
    return RunnerPool(ports=Any, tg=asyncio.TaskGroup(), max_sessions=max_sessions)  # type: ignore[arg-type]


def test_a_freed_slot_wakes_the_longest_waiter_only() -> None:
    async def main() -> list[int]:
        pool = await _pool(1)
        woken: list[int] = []

        async def wait(n: int) -> None:
            await pool.wait_for_slot(5.0)
            woken.append(n)

        tasks = [asyncio.create_task(wait(n)) for n in range(3)]
        await asyncio.sleep(0.01)  # all three parked
        pool.offer_slot()
        await asyncio.sleep(0.01)
        assert woken == [0], f"one slot woke {woken}"
        pool.offer_slot()
        await asyncio.sleep(0.01)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        return woken

    assert asyncio.run(main()) == [0, 1]


def test_a_full_pool_wakes_nobody_and_a_waiter_that_gave_up_is_skipped() -> None:
    async def main() -> None:
        full = await _pool(0)
        t = asyncio.create_task(full.wait_for_slot(5.0))
        await asyncio.sleep(0.01)
        full.offer_slot()
        await asyncio.sleep(0.01)
        assert not t.done(), "a full pool woke a waiter"
        t.cancel()

        pool = await _pool(1)
        await pool.wait_for_slot(0.01)  # times out: its future is cancelled, not left queued
        later = asyncio.create_task(pool.wait_for_slot(5.0))
        await asyncio.sleep(0.01)
        pool.offer_slot()
        await asyncio.wait_for(later, 1.0)  # the one still waiting gets the slot

        for _ in range(100):  # waiters that keep giving up do not pile up
            await pool.wait_for_slot(0.001)
        assert len(pool._slot_waiters) <= 1

    asyncio.run(main())


def test_parked_turns_waiting_for_a_slot_are_counted_until_they_give_up() -> None:
    async def main() -> None:
        pool = await _pool(0)
        waiter = asyncio.create_task(pool.wait_for_slot(5.0))
        short = asyncio.create_task(pool.wait_for_slot(0.01))
        await asyncio.sleep(0)
        assert pool.slot_waiters == 2
        await short
        assert pool.slot_waiters == 1, "a waiter that timed out still counted"
        waiter.cancel()
        await asyncio.gather(waiter, return_exceptions=True)
        assert pool.slot_waiters == 0

    asyncio.run(main())
