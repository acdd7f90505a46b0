"""A quiet session's turns are picked up at once (orchestrator/intake.py's pull of turn messages).

nats-py's `fetch` of a batch returns only when the batch is full or its pull request expires, so with
a batch of 64 a turn that arrived alone could wait in the orchestrator for the rest of the request's
1 s: on one session sending a turn 0.1 s after the last one ended, every other turn started
0.75–0.9 s after its ack. The intake now pulls a quiet queue one message per request (and a busy
one in batches with short requests). Checked end to end on one
orchestrator: from ack to turn_start, every turn of such a session takes well under 0.5 s (10–20 ms
measured; the old code failed this within the first turns after a quiet spell).
"""

from __future__ import annotations

import asyncio
import time

from proto import client
from tests.integration.conftest import make_token, stack_env
from tests.integration.wsclient import WsTestClient
from tidewire.dev.stack import Stack

TURNS = 8
BOUND_S = 0.5


async def test_each_turn_of_a_quiet_session_starts_at_once(infra, tmp_path) -> None:
    s = Stack(infra_env=stack_env(infra), log_dir=tmp_path, orchestrators=1, tool_workers=0)
    s.start()
    try:
        async with WsTestClient(s.url, make_token("quiet-pickup")) as c:
            await c.connect()
            waits: list[float] = []
            for n in range(TURNS):
                ack = await c.ack_for(await c.send_message(f"/sim tokens=4 rate=0 ttft_ms=0\nturn {n}"))
                acked = time.monotonic()
                if not any(isinstance(e, client.TurnStart) and e.turn_id == ack.turn_id for e in c.events):
                    await c.until(
                        lambda f, t=ack.turn_id: isinstance(f, client.TurnStart) and f.turn_id == t,
                        timeout=10,
                        what=f"turn_start of turn {n}",
                    )
                waits.append(round(time.monotonic() - acked, 3))
                await c.until_turn_end(ack.turn_id, timeout=30)
                # quiet for 10 s (many pull requests expire and are renewed), then turns 0.1 s
                # apart: how the stall showed; after a 2.5 s pause the old code did not stall
                await asyncio.sleep(10 if n == 0 else 0.1)
        assert max(waits) < BOUND_S, (
            f"seconds from each turn's ack to its turn_start: {waits} — a turn waited in the "
            f"orchestrator's pull of the turn queue"
        )
    finally:
        s.stop()
