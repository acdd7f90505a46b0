"""FlagResolver's single-flight cache (pure logic: the flag source is a plain object here; the
Postgres-backed source is proven in tests/integration/test_flags_analytics_media.py)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from orchestrator.flags import FlagResolver


class GatedSource:
    """A flag source whose queries wait until the test opens the gate."""

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.calls: list[list[str]] = []
        self.fail = False

    async def flags_for(self, scopes: Sequence[str]) -> dict[str, Any]:
        self.calls.append(list(scopes))
        await self.gate.wait()
        if self.fail:
            raise ConnectionError("postgres down")
        return {"model": f"m-{scopes[0]}"}

    async def flag_scopes(self) -> list[str]:
        if self.fail:
            raise ConnectionError("postgres down")
        return self.scopes

    scopes = ["deployment", "tenant:u1", "session:s1", "session:s2"]


async def test_a_caller_cancelled_mid_query_does_not_wedge_later_callers() -> None:
    src = GatedSource()
    r = FlagResolver(src, ttl_s=60)  # type: ignore[arg-type]
    first = asyncio.create_task(r.resolve("s1", "u1"))
    await asyncio.sleep(0.01)
    first.cancel()  # what losing the lease does to a runner inside session.fetch
    await asyncio.gather(first, return_exceptions=True)
    second = asyncio.create_task(r.resolve("s2", "u1"))
    await asyncio.sleep(0.01)
    src.gate.set()
    async with asyncio.timeout(2):
        flags = await second
    assert flags["model"] == "m-session:s2"
    assert not r._inflight, f"queries left in flight after they finished: {list(r._inflight)}"


async def test_concurrent_misses_share_one_query_and_the_result_is_cached() -> None:
    src = GatedSource()
    r = FlagResolver(src, ttl_s=60)  # type: ignore[arg-type]
    tasks = [asyncio.create_task(r.resolve("s1", None)) for _ in range(5)]
    await asyncio.sleep(0.01)
    src.gate.set()
    async with asyncio.timeout(2):
        results = await asyncio.gather(*tasks)
    assert all(x == results[0] for x in results)
    assert r.queries == 3, src.calls  # the scope list, deployment and session:s1, once each
    async with asyncio.timeout(2):
        await r.resolve("s1", None)
    assert r.queries == 3, "a fresh cache entry was queried again"


async def test_a_failed_query_is_served_stale_when_cached_and_raised_otherwise() -> None:
    src = GatedSource()
    src.gate.set()
    now = [0.0]
    r = FlagResolver(src, ttl_s=1, clock=lambda: now[0])  # type: ignore[arg-type]
    async with asyncio.timeout(2):
        assert (await r.resolve("s1", None))["model"] == "m-session:s1"
    now[0] = 5.0
    src.fail = True
    async with asyncio.timeout(2):
        assert (await r.resolve("s1", None))["model"] == "m-session:s1"
    assert r.stale_served == 3  # the scope list, deployment and session:s1
    src.scopes = [*src.scopes, "session:s9"]
    r.invalidate()
    src.fail = False
    async with asyncio.timeout(2):
        await r.resolve("s1", None)  # the scope list now names s9
    src.fail = True
    try:
        async with asyncio.timeout(2):
            await r.resolve("s9", None)
    except ConnectionError:
        pass
    else:
        raise AssertionError("an uncached scope whose query failed must raise")


async def test_a_scope_without_rows_costs_no_query() -> None:
    src = GatedSource()
    src.gate.set()
    src.scopes = ["deployment"]
    r = FlagResolver(src, ttl_s=60)  # type: ignore[arg-type]
    async with asyncio.timeout(2):
        for i in range(50):
            await r.resolve(f"s{i}", f"u{i}")
    assert src.calls == [["deployment"]], f"queried scopes that have no rows: {src.calls}"
