"""The chaos drill, locally: 50 sessions × 3 turns while orchestrators are SIGKILLed every ~2 s and
the gateway is SIGKILLed once. The load client and its checks are the Kubernetes drill's
(tidewire.drill); here Postgres is also read directly."""

from __future__ import annotations

import asyncio
import random

import aiohttp
import asyncpg
import pytest

from proto import client
from tests.integration.conftest import make_token, stack_env
from tests.waits import within
from tidewire.dev.stack import Stack
from tidewire.drill import DrillClient, check

SESSIONS = 50
TURNS = 3


@pytest.mark.slow
@pytest.mark.timeout(300)
async def test_orchestrators_and_a_gateway_sigkilled_mid_stream_lose_nothing(infra, tmp_path) -> None:
    stack = Stack(
        infra_env=stack_env(infra, TIDEWIRE_SIM_RATE="40"), log_dir=tmp_path, orchestrators=3, tool_workers=0
    )
    stack.start()
    kills = 0
    try:
        clients = [DrillClient(stack.url, make_token(f"chaos-{i}"), turns=TURNS) for i in range(SESSIONS)]
        work = asyncio.gather(*(c.run() for c in clients))
        rng = random.Random(7)
        gateway_killed = False
        elapsed = 0.0
        while not work.done() and elapsed < 240:
            await asyncio.sleep(0.5)
            elapsed += 0.5
            if elapsed % 2 == 0:
                alive = [s for s in stack.services if s.module == "orchestrator" and s.alive()]
                if len(alive) >= 2:
                    victim = rng.choice(alive)
                    victim.kill()
                    kills += 1
                    await asyncio.to_thread(stack.add_orchestrator, victim.name)
            if not gateway_killed and elapsed >= 3:
                stack.by_name("gateway").kill()
                gateway_killed = True
                await asyncio.sleep(0.5)
                await asyncio.to_thread(stack.add_gateway, "gateway", stack.http_port)
        await within(
            work,
            timeout=60,
            what=f"all {SESSIONS} drill clients finishing their {TURNS} turns",
            seen=lambda: {
                "acked turns": sum(len(c.acks) for c in clients),
                "of": SESSIONS * TURNS,
                "reconnects": sum(c.reconnects for c in clients),
            },
        )
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
            for c in clients:
                await check(c, http)  # acked => durable; exact text == history; seqs gap-free
    finally:
        stack.stop()

    assert kills >= 3 and gateway_killed
    assert sum(c.reconnects for c in clients) > 0, "the faults never reached a client"
    conn = await asyncpg.connect(infra.endpoints.postgres_dsn)
    try:
        for c in clients:
            for ack in c.acks:
                t = await conn.fetchrow("SELECT text FROM turns WHERE turn_id=$1", ack.turn_id)
                stored = await conn.fetch(
                    "SELECT payload FROM events WHERE session_id=$1 AND turn_id=$2"
                    " AND type='delta' ORDER BY seq",
                    c.session_id,
                    ack.turn_id,
                )
                assert "".join(client.event_decoder.decode(r["payload"]).text for r in stored) == t["text"]
        n_turns = await conn.fetchval(
            "SELECT count(*) FROM turns WHERE session_id = ANY($1)", [c.session_id for c in clients]
        )
        assert n_turns == SESSIONS * TURNS, "a turn ran twice or not at all"
    finally:
        await conn.close()
