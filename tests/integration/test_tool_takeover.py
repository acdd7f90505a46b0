"""An orchestrator that goes while a tool runs — told to stop (SIGTERM) or frozen past its lease
(SIGSTOP, then woken) — hands the call over: the next owner joins the run in flight and the model
gets the tool's real result. Only a stop, a timeout or the disconnect policy abandons a call."""

from __future__ import annotations

import json

import pytest

from proto import client
from tests.integration.conftest import lease_owner, make_token, stack_env
from tests.integration.wsclient import WsTestClient
from tests.waits import eventually
from tidewire import invariants
from tidewire.dev.stack import Stack

TOOL_TURN = '/sim tool=slow_lookup args={"query":"handover","seconds":3} tokens=5\nlook it up'


@pytest.mark.parametrize("how", ["sigterm", "sigstop"])
async def test_an_owner_that_goes_mid_tool_hands_the_call_over(infra, tmp_path, how) -> None:
    stack = Stack(
        infra_env=stack_env(infra), log_dir=tmp_path / "logs", orchestrators=2, tool_workers=1
    ).start()
    try:
        async with WsTestClient(stack.url, make_token(f"tool-handover-{how}")) as c:
            ready = await c.connect()
            ack = await c.ack_for(await c.send_message(TOOL_TURN))
            call = await c.until(lambda f: isinstance(f, client.ToolCall), 20, "the turn's tool_call")
            assert isinstance(call, client.ToolCall)
            owner = await lease_owner(infra, ready.session_id)
            assert owner is not None, "nobody owns the session while its tool runs"
            victim = stack.by_name(owner)
            assert victim.proc is not None
            if how == "sigterm":
                victim.proc.terminate()
                await eventually(
                    lambda: not victim.alive(), timeout=10, what=f"the SIGTERMed {owner} to exit"
                )
            else:
                victim.proc.send_signal(19)  # SIGSTOP: longer than the lease
                try:
                    await eventually(
                        lambda: lease_owner(infra, ready.session_id),
                        timeout=10,
                        interval=0.05,
                        ok=lambda o: o is not None and o != owner,
                        what=f"another orchestrator to take the session over from the frozen {owner}",
                    )
                finally:
                    victim.proc.send_signal(18)  # SIGCONT: the stale owner wakes while the tool runs
            end = await c.until_turn_end(ack.turn_id, timeout=30)
        results = [e for e in c.events if isinstance(e, client.ToolResult) and e.call_id == call.call_id]
        assert results, f"no tool_result for {call.call_id}; frames: {c.events}"
        assert all(r.ok for r in results), f"the handed-over call did not deliver its result: {results}"
        assert json.loads(results[0].text)["query"] == "handover"
        assert end.status == "completed", end
        # the test stops reading while it finds and kills the owner, so the gateway may merge the deltas
        # of a client 32 frames behind (PROTOCOL.md: the seq of the last member); check_turns still
        # checks that every offset is covered exactly
        invariants.check_seqs(c.events)
        assert invariants.check_turns(c.events)[ack.turn_id].text == end.text
        worker = next(s for s in stack.services if s.module == "tool_workers")
        log = worker.log_path.read_text()
        assert f"cancelled call {call.call_id}" not in log, "the going owner cancelled the call on the worker"
    finally:
        stack.stop()
