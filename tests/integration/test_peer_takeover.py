"""An orchestrator that dies is noticed by its peers at once (its peer socket closes), not when its
leases lapse; one that is told to stop (SIGTERM) hands its sessions over instead of finishing
them. Either way the answer goes on exactly; the pause is measured by `make bench`, not here."""

from __future__ import annotations

import pytest

from tests.integration.conftest import lease_owner, make_token, scrape, stack_env
from tests.integration.wsclient import WsTestClient
from tests.waits import eventually, wait_process
from tidewire import invariants
from tidewire.dev.stack import Stack

LONG = "/sim tokens=300 rate=100\n"


@pytest.mark.parametrize("how", ["sigkill", "sigterm"])
async def test_a_gone_orchestrators_sessions_are_claimed_through_the_peer_link(infra, tmp_path, how) -> None:
    # a long lease, so that only the peer link can explain a takeover within the answer
    env = stack_env(infra, TIDEWIRE_LEASE_TTL_MS="20000", TIDEWIRE_LEASE_RENEW_MS="2000")
    stack = Stack(infra_env=env, log_dir=tmp_path / "logs", orchestrators=2, tool_workers=0).start()
    try:
        async with WsTestClient(stack.url, make_token(f"peer-{how}")) as c:
            ready = await c.connect()
            ack = await c.ack_for(await c.send_message(LONG + how))
            await c.until(lambda f: getattr(f, "offset", 0) > 20, 30, "some text before the owner goes")
            owner = await lease_owner(infra, ready.session_id)
            assert owner is not None, "nobody owns the session mid-answer"
            victim = stack.by_name(owner)
            survivor = next(s for s in stack.services if s.module == "orchestrator" and s.name != owner)
            if how == "sigkill":
                victim.kill()
            else:
                assert victim.proc is not None
                victim.proc.terminate()
                await eventually(
                    lambda: not victim.alive(), timeout=10, what=f"the SIGTERMed {owner} to exit"
                )
            end = await c.until_turn_end(ack.turn_id, timeout=15)  # well inside the 20 s lease
        assert end.status == "completed", end
        # the test stops reading while it finds and kills the owner, so the gateway may merge the deltas
        # of a client 32 frames behind (PROTOCOL.md: the seq of the last member); check_turns still
        # checks that every offset is covered exactly
        invariants.check_seqs(c.events)
        assert invariants.check_turns(c.events)[ack.turn_id].text == end.text
        deaths = scrape(survivor.env["port"]).get("tidewire_orchestrator_peer_deaths", 0)
        assert deaths >= 1, f"{survivor.name} never saw {owner} go through its peer link"
        if how == "sigterm":
            assert victim.proc is not None
            wait_process(victim.proc, timeout=1, what=f"{owner} (already exited)")
            assert victim.proc.returncode == 0, f"{owner} exited with {victim.proc.returncode}"
    finally:
        stack.stop()
