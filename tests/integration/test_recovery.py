"""Stop, disconnect, double texting, crashes and stale owners, each under real fault."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import asyncpg
import nats
import pytest

from proto import client
from tests.integration.conftest import lease_owner, make_token, scrape
from tests.integration.wsclient import WsTestClient
from tests.waits import eventually, frames_tail, wait_process, within
from tidewire import invariants

SLOW = "/sim tokens=300 rate=60\n"


async def _pg(infra, sql: str, *args):
    conn = await asyncpg.connect(infra.endpoints.postgres_dsn)
    try:
        return await conn.fetchrow(sql, *args)
    finally:
        await conn.close()


async def _deltas(c: WsTestClient, n: int, timeout: float = 30) -> None:
    """Reads until n deltas have arrived, or a turn_end (deltas may be merged for a reader that
    falls behind, so a turn may end with fewer: the caller's own assertions then say what is wrong)."""
    deadline = time.monotonic() + timeout
    while (got := sum(isinstance(e, client.Delta) for e in c.events)) < n:
        if any(isinstance(e, client.TurnEnd) for e in c.events):
            return
        f = await c.recv(timeout=max(deadline - time.monotonic(), 0.01), what=f"delta {got + 1} of {n}")
        assert f is not None, (
            f"closed ({c.close_code}) after {got} of {n} deltas; last: {frames_tail(c.frames)}"
        )


def _orchestrators(stack):
    return [s for s in stack.services if s.module == "orchestrator" and s.alive()]


def _sum_metric(stack, name: str) -> float:
    return sum(scrape(s.env["port"]).get(name, 0.0) for s in _orchestrators(stack))


async def test_stop_aborts_upstream_and_persists_partial_text(stack, infra) -> None:
    aborted_before = _sum_metric(stack, "tidewire_upstream_aborted")
    async with WsTestClient(stack.url, make_token()) as c:
        await c.connect()
        ack = await c.ack_for(await c.send_message(SLOW + "a long answer I will stop"))
        await _deltas(c, 5)
        await c.send({"type": "stop", "turn_id": ack.turn_id})
        end = await c.until_turn_end(ack.turn_id)
    assert end.status == "cancelled"
    assert 0 < len(end.text) < 1200
    invariants.check_seqs(c.events)
    assert invariants.check_turns(c.events)[ack.turn_id].text == end.text
    row = await _pg(infra, "SELECT status, text FROM turns WHERE turn_id=$1", ack.turn_id)
    assert (row["status"], row["text"]) == ("cancelled", end.text)
    assert _sum_metric(stack, "tidewire_upstream_aborted") >= aborted_before + 1
    assert _sum_metric(stack, "tidewire_orchestrator_cancel_success") >= 1


async def test_stop_over_http_without_turn_id(stack, infra) -> None:
    token = make_token()
    async with WsTestClient(stack.url, token) as c:
        ready = await c.connect()
        ack = await c.ack_for(await c.send_message(SLOW + "stop me over http"))
        await _deltas(c, 3)
        async with aiohttp.ClientSession() as http:
            r = await http.post(
                f"{stack.url}/v1/sessions/{ready.session_id}/stop",
                headers={"Authorization": f"Bearer {token}"},
                json={},
            )
            assert r.status == 202 and (await r.json())["turn_id"] == ack.turn_id
        end = await c.until_turn_end(ack.turn_id)
    assert end.status == "cancelled"


async def _set_flags(stack, token: str, sid: str, **flags: str) -> None:
    async with aiohttp.ClientSession() as http:
        r = await http.patch(
            f"{stack.url}/v1/sessions/{sid}/flags", headers={"Authorization": f"Bearer {token}"}, json=flags
        )
        assert r.status == 200, await r.text()


async def _wait_turn_row(infra, turn_id: str, timeout: float = 30):
    return await eventually(
        lambda: _pg(infra, "SELECT status, text FROM turns WHERE turn_id=$1", turn_id),
        timeout=timeout,
        interval=0.1,
        ok=lambda row: row is not None,
        what=f"the turns row of {turn_id} in Postgres",
    )


async def test_disconnect_policy_continue_finishes_the_answer(stack, infra) -> None:
    async with WsTestClient(stack.url, make_token()) as c:
        await c.connect()
        ack = await c.ack_for(await c.send_message("/sim tokens=120 rate=100\nkeep going without me"))
        await _deltas(c, 3)
    row = await _wait_turn_row(infra, ack.turn_id)
    assert row["status"] == "completed"


async def test_disconnect_policy_cancel_after_saves_cost(stack, infra) -> None:
    token = make_token()
    async with WsTestClient(stack.url, token) as c:
        ready = await c.connect()
        await _set_flags(stack, token, ready.session_id, disconnect_policy="cancel_after=0.5")
        ack = await c.ack_for(await c.send_message("/sim tokens=600 rate=60\nstop when I leave"))
        await _deltas(c, 3)
    t0 = time.monotonic()
    row = await _wait_turn_row(infra, ack.turn_id)
    assert row["status"] == "cancelled"
    assert time.monotonic() - t0 < 8
    assert len(row["text"]) < 2000


async def test_double_texting_queue_runs_turns_in_order(stack) -> None:
    async with WsTestClient(stack.url, make_token()) as c:
        await c.connect()
        a = await c.ack_for(await c.send_message("/sim tokens=60 rate=200\nfirst"))
        b = await c.ack_for(await c.send_message("/sim tokens=20\nsecond"))
        await c.until_turn_end(b.turn_id)
    ends = [e for e in c.events if isinstance(e, client.TurnEnd)]
    starts = [e for e in c.events if isinstance(e, client.TurnStart)]
    assert [e.turn_id for e in ends] == [a.turn_id, b.turn_id]
    assert all(e.status == "completed" for e in ends)
    assert starts[1].seq > ends[0].seq
    invariants.check_seqs(c.events)
    invariants.check_turns(c.events)


async def test_double_texting_interrupt_cancels_the_current_turn(stack) -> None:
    token = make_token()
    async with WsTestClient(stack.url, token) as c:
        ready = await c.connect()
        await _set_flags(stack, token, ready.session_id, double_text_policy="interrupt")
        a = await c.ack_for(await c.send_message(SLOW + "first"))
        await _deltas(c, 3)
        b = await c.ack_for(await c.send_message("/sim tokens=20\nsecond"))
        end_b = await c.until_turn_end(b.turn_id)
    end_a = next(e for e in c.events if isinstance(e, client.TurnEnd) and e.turn_id == a.turn_id)
    assert (end_a.status, end_b.status) == ("cancelled", "completed")
    invariants.check_seqs(c.events)
    invariants.check_turns(c.events)


async def test_double_texting_reject_answers_conflict(stack) -> None:
    token = make_token()
    async with WsTestClient(stack.url, token) as c:
        ready = await c.connect()
        await _set_flags(stack, token, ready.session_id, double_text_policy="reject")
        a = await c.ack_for(await c.send_message(SLOW + "first"))
        await _deltas(c, 2)
        await c.send_message("second")
        err = await c.until(lambda f: isinstance(f, client.Error), what="the conflict error of a second send")
        assert err.code == "conflict"
        await c.send({"type": "stop"})
        await c.until_turn_end(a.turn_id)


async def test_orchestrator_sigkill_mid_stream_is_taken_over_seamlessly(stack, infra) -> None:
    async with WsTestClient(stack.url, make_token()) as c:
        ready = await c.connect()
        ack = await c.ack_for(await c.send_message("/sim tokens=200 rate=80\nsurvive a crash"))
        await _deltas(c, 10)
        owner = await lease_owner(infra, ready.session_id)
        assert owner is not None
        victim = stack.by_name(owner)
        n_before = len(c.events)
        victim.kill()
        t_kill = time.monotonic()
        assert await c.recv(what=f"the first frame after {owner} was SIGKILLed (the takeover)") is not None
        pause = time.monotonic() - t_kill
        end = await c.until_turn_end(ack.turn_id)
        assert len(c.events) > n_before
    stack.add_orchestrator(owner)
    assert end.status == "completed"
    invariants.check_seqs(c.events)
    assert invariants.check_turns(c.events)[ack.turn_id].text == end.text
    row = await _pg(infra, "SELECT status, text FROM turns WHERE turn_id=$1", ack.turn_id)
    assert row["text"] == end.text
    assert pause < 5  # correctness bound only; the pause itself is measured by `make bench`


async def test_stale_owner_woken_after_takeover_injects_nothing(stack, infra) -> None:
    async with WsTestClient(stack.url, make_token()) as c:
        ready = await c.connect()
        ack = await c.ack_for(await c.send_message("/sim tokens=200 rate=60\nfreeze my owner"))
        await _deltas(c, 5)
        owner = await lease_owner(infra, ready.session_id)
        victim = stack.by_name(owner)
        victim.proc.send_signal(19)  # SIGSTOP: longer than the lease and JetStream's ack wait
        try:
            await _deltas(c, 30)  # another orchestrator goes on meanwhile
            await asyncio.sleep(11)
        finally:
            victim.proc.send_signal(18)  # SIGCONT
        end = await c.until_turn_end(ack.turn_id)
        m = await eventually(
            lambda: asyncio.to_thread(scrape, victim.env["port"]),
            timeout=10,
            interval=0.2,
            ok=lambda m: (
                m.get("tidewire_orchestrator_stale_rejections", 0)
                + m.get("tidewire_orchestrator_lease_lost", 0)
                > 0
            ),
            what=f"the woken stale owner {owner} to count a stale rejection or a lost lease",
        )
    assert end.status == "completed"
    invariants.check_seqs(c.events)
    assert invariants.check_turns(c.events)[ack.turn_id].text == end.text
    assert (
        m.get("tidewire_orchestrator_stale_rejections", 0) + m.get("tidewire_orchestrator_lease_lost", 0) > 0
    )
    row = await _pg(infra, "SELECT text FROM turns WHERE turn_id=$1", ack.turn_id)
    assert row["text"] == end.text


async def test_poison_turn_goes_to_dead_letter_and_others_are_unaffected(stack, infra) -> None:
    async with (
        WsTestClient(stack.url, make_token("victim")) as bad,
        WsTestClient(stack.url, make_token()) as good,
    ):
        await bad.connect()
        await good.connect()
        p = await bad.ack_for(await bad.send_message("POISON-PILL please"))
        g = await good.ack_for(await good.send_message("/sim tokens=40\nI am fine"))
        end_g = await good.until_turn_end(g.turn_id)
        end_p = await bad.until_turn_end(p.turn_id, timeout=60)
    assert end_g.status == "completed"
    assert end_p.status == "failed"
    assert any(isinstance(e, client.Status) and "could not be processed" in e.text for e in bad.events)
    nc = await nats.connect(infra.endpoints.nats_url)
    try:
        js = nc.jetstream()
        msg = await js.get_last_msg("TW_TURNS_DLQ", f"tw.dlq.{bad.ready.session_id}")
        assert p.turn_id.encode() in msg.data
    finally:
        await nc.close()


@pytest.mark.parametrize("server", ["redis", "nats"])
async def test_store_restart_mid_stream_keeps_text_exact(stack, infra, server) -> None:
    token = make_token()
    async with WsTestClient(stack.url, token) as c:
        ready = await c.connect()
        ack = await c.send_until_acked("/sim tokens=150 rate=60\nsurvive a broker restart")
        await _deltas(c, 5)
        infra.kill(server)
        await asyncio.sleep(0.5)
        infra.restart(server)
    await asyncio.sleep(1.0)

    async def replay() -> tuple[client.TurnEnd, list[client.Event]]:
        async with WsTestClient(stack.url, token) as c2:
            await c2.connect(ready.session_id, last_seen_seq=0)
            return await c2.until_turn_end(ack.turn_id, timeout=20), c2.events

    end, events = await eventually(
        replay,
        timeout=60,
        interval=1,
        retry_on=(ConnectionError, TimeoutError, AssertionError, aiohttp.ClientError),
        what=f"a full replay up to the turn_end of {ack.turn_id} after {server} restarted",
    )
    assert end.status in ("completed", "failed")
    invariants.check_seqs(events)
    assert invariants.check_turns(events)[ack.turn_id].text == end.text


async def test_gateway_sigterm_closes_sockets_with_1012_and_exits_within_grace(infra, tmp_path) -> None:
    from tests.integration.conftest import stack_env
    from tidewire.dev.stack import Stack

    s = Stack(
        infra_env=stack_env(infra, TIDEWIRE_DRAIN_SECONDS="5"),
        log_dir=tmp_path,
        orchestrators=1,
        tool_workers=0,
    )
    s.start()
    try:
        async with WsTestClient(s.url, make_token()) as c:
            await c.connect()
            ack = await c.ack_for(await c.send_message(SLOW + "drain me"))
            await _deltas(c, 2)
            gw = s.by_name("gateway")
            t0 = time.monotonic()
            gw.proc.terminate()
            deadline = time.monotonic() + 10
            while (
                await c.recv(
                    timeout=max(deadline - time.monotonic(), 0.01),
                    what="the 1012 close of a SIGTERMed gateway",
                )
                is not None
            ):
                pass
            assert c.close_code == 1012
            await asyncio.to_thread(
                wait_process,
                gw.proc,
                timeout=10,
                log=gw.log_path,
                what="the SIGTERMed gateway to exit (drain 5 s)",
            )
            assert time.monotonic() - t0 < 6
            other = s.add_gateway("gateway-2")
            url2 = f"http://127.0.0.1:{other.env['port']}"
            seen = list(c.events)
        async with WsTestClient(url2, make_token()) as c2:
            await c2.connect(c.ready.session_id, last_seen_seq=seen[-1].seq)
            await c2.send({"type": "stop", "turn_id": ack.turn_id})
            end = await c2.until_turn_end(ack.turn_id)
        events = seen + c2.events
        invariants.check_seqs(events)
        assert invariants.check_turns(events)[ack.turn_id].text == end.text
    finally:
        s.stop()


async def test_sends_get_degraded_not_a_hang_while_postgres_is_down(stack, infra) -> None:
    async with WsTestClient(stack.url, make_token()) as c:
        await c.connect()
        infra.kill("postgres")
        try:
            t0 = time.monotonic()
            await c.send_message("/sim tokens=5\nwhile the database is down")
            f = await c.until(
                lambda f: isinstance(f, (client.Ack, client.Error)),
                30,
                "the ack or (degraded) error of a send while Postgres is down",
            )
            assert isinstance(f, client.Error) and f.code == "degraded" and f.retry_after_ms
            assert time.monotonic() - t0 < 15
        finally:
            infra.restart("postgres")
        ack = await c.send_until_acked("/sim tokens=5\nafter the database is back")
        end = await c.until_turn_end(ack.turn_id)
        assert end.status == "completed"


async def test_gateway_sigterm_ends_sse_streams_promptly(infra, tmp_path) -> None:
    from tests.integration.conftest import stack_env
    from tidewire.dev.stack import Stack

    s = Stack(
        infra_env=stack_env(infra, TIDEWIRE_DRAIN_SECONDS="5"),
        log_dir=tmp_path,
        orchestrators=0,
        tool_workers=0,
    )
    s.start()
    try:
        token = make_token()
        async with aiohttp.ClientSession() as http:
            r = await http.post(f"{s.url}/v1/sessions", headers={"Authorization": f"Bearer {token}"})
            sid = (await r.json())["session_id"]
            resp = await http.get(f"{s.url}/v1/sessions/{sid}/events?access_token={token}")
            assert resp.status == 200
            assert b"event: ready" in await within(
                resp.content.readuntil(b"\n\n"), timeout=10, what="the first SSE record (ready)"
            )
            gw = s.by_name("gateway")
            t0 = time.monotonic()
            gw.proc.terminate()
            await asyncio.to_thread(
                wait_process,
                gw.proc,
                timeout=10,
                log=gw.log_path,
                what="the SIGTERMed gateway to exit with an SSE stream open (drain 5 s)",
            )
            assert time.monotonic() - t0 < 4
            assert gw.proc.returncode == 0
            assert "Error handling request" not in gw.log_path.read_text()
    finally:
        s.stop()
