"""How a turn's events are grouped into checkpoint appends (orchestrator/checkpoint_writer.py).

Each append is a Redis round trip and a NATS message that every watching gateway wakes for, so the
writer lets a batch wait `TIDEWIRE_CHECKPOINT_LINGER_MS` for company, except where a reader waits on
it. These tests pin both sides: a quick model's turn_start and first text share one append and the
rest of a short answer one more; a slow model's turn_start is not held back until its first token,
and the first text is not held back by the linger.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from proto import client
from tests.integration.conftest import make_token, scrape, stack_env
from tests.integration.wsclient import WsTestClient
from tidewire import invariants
from tidewire.dev.stack import Stack

TURNS = 20
APPENDS = "tidewire_checkpoint_append_seconds_count"


def _appends(s: Stack) -> float:
    return sum(scrape(o.env["port"]).get(APPENDS, 0.0) for o in s.services if o.module == "orchestrator")


async def test_a_quick_models_short_turn_takes_two_appends_and_keeps_its_seqs(infra, tmp_path) -> None:
    s = Stack(
        infra_env=stack_env(infra, TIDEWIRE_CHECKPOINT_LINGER_MS="25"),
        log_dir=tmp_path,
        orchestrators=1,
        tool_workers=0,
    )
    s.start()
    try:
        async with WsTestClient(s.url, make_token("batching")) as c:
            await c.connect()
            warm = await c.ack_for(await c.send_message("/sim tokens=8 rate=0 ttft_ms=0\nwarm up"))
            await c.until_turn_end(warm.turn_id, timeout=30)
            before = _appends(s)
            acks = []
            for n in range(TURNS):
                ack = await c.ack_for(await c.send_message(f"/sim tokens=8 rate=0 ttft_ms=0\nshort {n}"))
                await c.until_turn_end(ack.turn_id, timeout=30)
                acks.append(ack)
            per_turn = (_appends(s) - before) / TURNS
        # turn_start + first text, then the rest of the text with the held turn_end: 2 (3 when the
        # turn_end went alone, 4 before the linger). A loaded machine may split the rest once more
        # now and then, never the first pair.
        print(f"{per_turn:.2f} checkpoint appends per 8-token turn")
        assert per_turn <= 2.5, f"{per_turn:.2f} checkpoint appends per 8-token turn (expected ~2)"
        invariants.check_seqs(c.events)
        turns = invariants.check_turns(c.events)
        for ack in acks:
            events = [e for e in c.events if getattr(e, "turn_id", None) == ack.turn_id]
            start = next(e for e in events if isinstance(e, client.TurnStart))
            first = next(e for e in events if isinstance(e, client.Delta))
            assert first.seq == start.seq + 1, (
                f"turn {ack.turn_id}: turn_start {start.seq}, first {first.seq}"
            )
            end = next(e for e in events if isinstance(e, client.TurnEnd))
            assert turns[ack.turn_id].text == end.text
    finally:
        s.stop()


async def test_a_slow_models_turn_start_comes_at_once_and_its_first_text_is_not_held(stack) -> None:
    async with WsTestClient(stack.url, make_token("batching-slow")) as c:
        await c.connect()
        ack = await c.ack_for(await c.send_message("/sim tokens=30 rate=20 ttft_ms=1500\nthink first"))

        def mine(kind: type) -> Callable[[object], bool]:
            return lambda f: isinstance(f, kind) and getattr(f, "turn_id", None) == ack.turn_id

        if not any(mine(client.TurnStart)(e) for e in c.events):
            await c.until(mine(client.TurnStart), timeout=30, what=f"turn_start of {ack.turn_id}")
        started = time.monotonic()
        await c.until(mine(client.Delta), timeout=30, what=f"the first delta of {ack.turn_id}")
        waited = time.monotonic() - started
        end = await c.until_turn_end(ack.turn_id, timeout=30)
    # the model takes 1.5 s to its first token: the turn_start was shown long before that
    assert waited > 1.0, f"turn_start only {waited:.2f} s before the first text of a 1.5 s model"
    assert invariants.check_turns(c.events)[ack.turn_id].text == end.text
