"""An orchestrator SIGKILLed between checkpointing turn_end and committing it still ends the turn
exactly once, and pollers never see that turn_end before the history has it.

A module of its own: the fault hook lives in this test's orchestrators only, so no other stack may
be consuming turns from the same infrastructure meanwhile (a module-scoped stack of a neighbouring
test did, once, took the turn without the hook, and the kill never happened).
"""

from __future__ import annotations

import json

import aiohttp

from proto import client
from tests.integration.conftest import make_token, stack_env
from tests.integration.test_turn_visibility import KILL, _auth, _history, _pg_turns, _quiet, assert_in_history
from tests.integration.wsclient import WsTestClient
from tests.waits import within
from tidewire import invariants
from tidewire.dev.stack import Stack


async def test_orchestrator_killed_between_turn_end_checkpoint_and_commit_ends_the_turn_once(
    infra, tmp_path
) -> None:
    """The fault hook SIGKILLs the first orchestrator to reach the point between checkpointing
    turn_end and committing it; the survivor takes over and commits. Meanwhile pollers never see
    the turn_end before the history has it, and every client sees it exactly once."""
    stack = Stack(
        infra_env=stack_env(infra, TIDEWIRE_FAULT_KILL_BEFORE_COMMIT=KILL),
        log_dir=tmp_path / "logs",
        orchestrators=2,
        tool_workers=0,
    ).start()
    try:
        token = make_token("vis-crash")
        async with WsTestClient(stack.url, token) as ws, aiohttp.ClientSession() as http:
            ready = await ws.connect()
            sid = ready.session_id
            ack = await ws.ack_for(await ws.send_message(f"/sim tokens=40 rate=200\n{KILL}"))

            async def poller() -> client.TurnEnd:
                after = 0
                while True:
                    r = await http.get(
                        f"{stack.url}/v1/sessions/{sid}/poll?after={after}&wait_s=1", headers=_auth(token)
                    )
                    assert r.status == 200, await r.text()
                    body = json.loads(await r.read())
                    for raw in body["events"]:
                        ev = client.event_decoder.decode(json.dumps(raw))
                        after = ev.seq
                        if isinstance(ev, client.TurnEnd):
                            assert_in_history(
                                await _history(http, stack.url, token, sid), ev, "poll during a crash"
                            )
                            return ev

            polled = await within(poller(), timeout=45, what=f"turn_end of {ack.turn_id} over long-poll")
            end = await ws.until_turn_end(ack.turn_id, timeout=45)
            await _quiet(ws, 1.0)  # a repeated turn_end (re-published by the taker-over) would land here
    finally:
        dead = [s.name for s in stack.services if s.module == "orchestrator" and not s.alive()]
        stack.stop()
    assert dead, (
        "the fault hook never fired: no orchestrator died between checkpoint and commit "
        "(did an orchestrator of another stack on this infrastructure take the turn?)"
    )
    assert polled == end
    ends = [e for e in ws.events if isinstance(e, client.TurnEnd)]
    assert len(ends) == 1, f"turn_end delivered {len(ends)} times: {ends}"
    invariants.check_seqs(ws.events)
    assert invariants.check_turns(ws.events)[ack.turn_id].text == end.text
    hist_rows = await _pg_turns(infra, sid)
    assert hist_rows == [(ack.turn_id, end.text, end.status)], hist_rows
