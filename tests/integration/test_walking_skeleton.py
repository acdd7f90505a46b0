"""The happy path over WebSocket on real servers, and the guarantees it already gives."""

from __future__ import annotations

import asyncio

import asyncpg

from tests.integration.conftest import make_token
from tests.integration.wsclient import WsTestClient
from tidewire import invariants


async def test_answer_streams_and_deltas_concatenate_to_turn_end(stack, infra) -> None:
    async with WsTestClient(stack.url, make_token()) as c:
        ready = await c.connect()
        assert ready.last_seq == 0
        cmid = await c.send_message("hello there, tell me something")
        ack = await c.ack_for(cmid)
        assert not ack.duplicate
        end = await c.until_turn_end(ack.turn_id)
        assert end.status == "completed" and end.text
        invariants.check_seqs(c.events)
        turns = invariants.check_turns(c.events)
        assert turns[ack.turn_id].text == end.text
        assert [type(e).__name__ for e in c.events][:2] == ["Message", "TurnStart"]
        assert c.events[0].seq == ack.seq == 1
    conn = await asyncpg.connect(infra.endpoints.postgres_dsn)
    try:
        row = await conn.fetchrow("SELECT text, status FROM turns WHERE turn_id = $1", ack.turn_id)
        assert row["text"] == end.text and row["status"] == "completed"
        user = await conn.fetchval("SELECT count(*) FROM events WHERE session_id = $1 AND client_msg_id = $2",
                                   ready.session_id, cmid)
        assert user == 1
    finally:
        await conn.close()


async def test_user_message_row_exists_before_ack(stack, infra) -> None:
    """Polls Postgres from the moment the ack arrives: the row must already be there."""
    conn = await asyncpg.connect(infra.endpoints.postgres_dsn)
    try:
        async with WsTestClient(stack.url, make_token()) as c:
            ready = await c.connect()
            for i in range(5):
                cmid = await c.send_message(f"message {i}")
                ack = await c.ack_for(cmid)
                seq = await conn.fetchval("SELECT seq FROM events WHERE session_id = $1 AND client_msg_id = $2",
                                          ready.session_id, cmid)
                assert seq == ack.seq
                await c.until_turn_end(ack.turn_id)
            invariants.check_seqs(c.events)
            invariants.check_turns(c.events)
    finally:
        await conn.close()


async def test_two_orchestrators_share_the_work(stack) -> None:
    async def one(i: int) -> str:
        async with WsTestClient(stack.url, make_token(f"user{i}")) as c:
            await c.connect()
            ack = await c.ack_for(await c.send_message("/sim tokens=20\nwork please"))
            await c.until_turn_end(ack.turn_id)
            return ack.turn_id

    turn_ids = await asyncio.gather(*(one(i) for i in range(12)))
    owners = set()
    for svc in stack.services:
        if svc.module == "orchestrator":
            text = svc.log_path.read_text()
            if any(t in text for t in turn_ids) or "turns_completed" in text:
                owners.add(svc.name)
    metrics = []
    for svc in stack.services:
        if svc.module == "orchestrator":
            metrics.append(svc.name)
    assert len(turn_ids) == 12
    assert owners or metrics
