"""The chaos drill, locally: 50 sessions × 3 turns while orchestrators are SIGKILLed every ~2 s and
a gateway is SIGKILLed once. Every guarantee is checked on what the clients saw and what Postgres
holds, with the same invariant checker the Kubernetes drill uses (tidewire.invariants)."""

from __future__ import annotations

import asyncio
import random
import uuid

import aiohttp
import asyncpg
import pytest

from proto import client
from tests.integration.conftest import make_token, stack_env
from tests.integration.wsclient import WsTestClient
from tidewire import invariants
from tidewire.stack import Stack

SESSIONS = 50
TURNS = 3


class ChaosClient:
    """Reconnects with jittered backoff and last_seen_seq; resends unacked messages (same id)."""

    def __init__(self, url: str, subject: str) -> None:
        self.url = url
        self.token = make_token(subject)
        self.session_id: str | None = None
        self.events: list[client.Event] = []
        self.acks: list[client.Ack] = []
        self.reconnects = 0

    async def run(self, i: int) -> None:
        for turn in range(TURNS):
            cmid = uuid.uuid4().hex
            text = f"/sim tokens=100 rate=40\nchaos session {i} turn {turn}"
            ack: client.Ack | None = None
            attempt = 0
            while True:
                c = WsTestClient(self.url, self.token)
                try:
                    async with c:
                        ready = await c.connect(self.session_id,
                                                last_seen_seq=self.events[-1].seq if self.events else None)
                        self.session_id = ready.session_id
                        if ack is None:
                            await c.send_message(text, cmid)
                            f = await c.until(lambda f, cmid=cmid: (isinstance(f, client.Ack) and f.client_msg_id == cmid)
                                              or isinstance(f, client.Error), 20)
                            if isinstance(f, client.Error):
                                raise ConnectionError(f"send refused: {f.code}")
                            ack = f  # type: ignore[assignment]
                            self.acks.append(f)  # type: ignore[arg-type]
                        await c.until_turn_end(ack.turn_id, timeout=60)
                        return_now = True
                except (ConnectionError, TimeoutError, aiohttp.ClientError, AssertionError):
                    return_now = False
                finally:
                    self.events += c.events
                if return_now:
                    break
                self.reconnects += 1
                attempt += 1
                await asyncio.sleep(random.uniform(0, min(2.0, 0.1 * 2**attempt)))


@pytest.mark.slow
@pytest.mark.timeout(300)
async def test_orchestrators_and_a_gateway_sigkilled_mid_stream_lose_nothing(infra, tmp_path) -> None:
    stack = Stack(infra_env=stack_env(infra, TIDEWIRE_SIM_RATE="40"), log_dir=tmp_path, orchestrators=3,
                  tool_workers=0)
    stack.start()
    kills = 0
    try:
        clients = [ChaosClient(stack.url, f"chaos-{i}") for i in range(SESSIONS)]
        work = asyncio.gather(*(c.run(i) for i, c in enumerate(clients)))
        rng = random.Random(7)
        gateway_killed = False
        elapsed = 0.0
        while not work.done():
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
                gw = stack.by_name("gateway")
                gw.kill()
                gateway_killed = True
                await asyncio.sleep(0.5)
                await asyncio.to_thread(stack.add_gateway, "gateway", stack.http_port)
            if elapsed > 240:
                break
        await asyncio.wait_for(work, 60)
    finally:
        stack.stop()

    assert kills >= 3
    conn = await asyncpg.connect(infra.endpoints.postgres_dsn)
    try:
        for c in clients:
            assert len(c.acks) == TURNS
            invariants.check_seqs(c.events)
            turns = invariants.check_turns(c.events)
            for ack in c.acks:
                row = await conn.fetchrow("SELECT seq FROM events WHERE session_id=$1 AND client_msg_id=$2",
                                          c.session_id, ack.client_msg_id)
                assert row is not None and row["seq"] == ack.seq, "an acknowledged message is not durable"
                view = turns[ack.turn_id]
                assert view.ends and view.ends[0].status == "completed"
                t = await conn.fetchrow("SELECT text, status FROM turns WHERE turn_id=$1", ack.turn_id)
                assert t is not None and t["text"] == view.text == view.ends[0].text
                stored = await conn.fetch("SELECT payload FROM events WHERE session_id=$1 AND turn_id=$2"
                                          " AND type='delta' ORDER BY seq", c.session_id, ack.turn_id)
                assert "".join(client.event_decoder.decode(r["payload"]).text for r in stored) == t["text"]
        n_turns = await conn.fetchval("SELECT count(*) FROM turns WHERE session_id = ANY($1)",
                                      [c.session_id for c in clients])
        assert n_turns == SESSIONS * TURNS
    finally:
        await conn.close()
