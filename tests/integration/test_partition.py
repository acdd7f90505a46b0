"""An orchestrator cut off from Redis, NATS and Postgres mid-answer — its namespace's link set down,
no process killed, no socket closed — for longer than its lease: another orchestrator takes the
session over and finishes the answer, and when the link comes back the stale owner's queued writes
are refused. The client's text is exact, gap-free, equal to `turn_end.text`, to a replay from the
stores and to Postgres; no seq ever carries two different events.

The servers here are the test's own (embedded, bound to the bridge's address so the namespace can
reach them); skipped, with the reason, where network namespaces are unavailable.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest

from proto import client
from tests.integration.conftest import lease_owner, make_token, scrape, stack_env
from tests.integration.wsclient import WsTestClient
from tests.waits import eventually
from tidewire import invariants
from tidewire.dev import netns
from tidewire.dev.infra import EmbeddedInfra
from tidewire.dev.stack import Stack

WHY_NOT = netns.unavailable()
pytestmark = pytest.mark.skipif(WHY_NOT is not None, reason=f"no network namespaces: {WHY_NOT}")

LEASE_TTL_S = 2.0  # the default (orchestrator/settings.py); the partition outlasts it twice over
PARTITION_S = 2.5 * LEASE_TTL_S
LONG = "/sim tokens=600 rate=60\nkeep going while your orchestrator is cut off"


@pytest.fixture
def network() -> Iterator[netns.Network]:
    with netns.Network(net=78) as net:
        yield net


@pytest.fixture
def servers(network: netns.Network, tmp_path: Path) -> Iterator[EmbeddedInfra]:
    infra = EmbeddedInfra(tmp_path / "infra", use_env=False, host=network.gateway_address)
    try:
        infra.start()
        yield infra
    finally:
        infra.stop()


async def test_an_orchestrator_partitioned_past_its_lease_is_replaced_and_its_late_writes_refused(
    network: netns.Network, servers: EmbeddedInfra, tmp_path: Path
) -> None:
    bridge = network.gateway_address
    island = network.add_host("orch")
    stack = Stack(infra_env=stack_env(servers), log_dir=tmp_path / "logs", orchestrators=0, tool_workers=0)
    stack.start()  # the gateway alone, on the machine itself
    try:
        victim = stack.add_orchestrator("orchestrator-island", address=island.address, wrap=island.wrap)
        async with WsTestClient(stack.url, make_token("partition")) as c:
            ready = await c.connect()
            ack = await c.ack_for(await c.send_message(LONG))
            await c.until(
                lambda f: getattr(f, "offset", 0) > 40, 30, "some text from the island's orchestrator"
            )
            assert await lease_owner(servers, ready.session_id) == victim.name
            survivor = stack.add_orchestrator("orchestrator-main", address=bridge)

            island.partition()
            cut = time.monotonic()
            try:
                await eventually(
                    lambda: lease_owner(servers, ready.session_id),
                    timeout=PARTITION_S,
                    ok=lambda o: o == survivor.name,
                    what=f"{survivor.name} to take the lease of the cut-off {victim.name}",
                )
                takeover_s = time.monotonic() - cut
                seen = c.events[-1].seq
                await c.until(
                    lambda f: isinstance(f, client.Delta) and f.seq > seen,
                    10,
                    f"a delta from {survivor.name}, the new owner",
                )
                resumed_s = time.monotonic() - cut
                await asyncio.sleep(max(0.0, PARTITION_S - (time.monotonic() - cut)))
            finally:
                island.heal()
            end = await c.until_turn_end(ack.turn_id, timeout=60)

        assert end.status == "completed", end
        invariants.check_seqs(c.events)
        assert invariants.check_turns(c.events)[ack.turn_id].text == end.text

        m = await eventually(
            lambda: asyncio.to_thread(scrape, victim.env["port"], island.address),
            timeout=20,
            interval=0.2,
            ok=lambda m: (
                m.get("tidewire_orchestrator_lease_lost", 0)
                + m.get("tidewire_orchestrator_stale_rejections", 0)
                > 0
            ),
            what="the healed stale owner to count its lost lease or a refused write",
            retry_on=(OSError,),
        )
        assert m.get("tidewire_orchestrator_lease_lost", 0) + m.get(
            "tidewire_orchestrator_stale_rejections", 0
        )

        async with WsTestClient(stack.url, make_token("partition")) as replay:  # from the stores
            await replay.connect(ready.session_id, last_seen_seq=0)
            await replay.until_turn_end(ack.turn_id, timeout=30)
        live = {e.seq: e for e in c.events}
        stored = {e.seq: e for e in replay.events}
        differ = [seq for seq in live if seq in stored and live[seq] != stored[seq]]
        assert not differ, f"seqs carrying two different events: {[(live[s], stored[s]) for s in differ[:3]]}"
        assert set(live) <= set(stored), f"seen live but not stored: {sorted(set(live) - set(stored))[:10]}"

        conn = await asyncpg.connect(servers.endpoints.postgres_dsn)
        try:
            row = await conn.fetchrow("SELECT status, text FROM turns WHERE turn_id=$1", ack.turn_id)
        finally:
            await conn.close()
        assert row is not None and row["status"] == "completed" and row["text"] == end.text
        print(
            f"partition: lease taken over {takeover_s:.2f} s after the cut, text resumed after "
            f"{resumed_s:.2f} s (lease {LEASE_TTL_S:g} s)"
        )
    finally:
        stack.stop()
