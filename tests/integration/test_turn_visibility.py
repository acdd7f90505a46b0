"""What a client is shown is already in the history: on every transport, a turn_end read live or
replayed is in `GET /v1/sessions/{sid}` the moment it is delivered, and a text being streamed is
there as an `in_progress` message. The turn_end is checkpointed before the Postgres commit but held
from readers until it; an orchestrator SIGKILLed between the two still ends the turn exactly once.
"""

from __future__ import annotations

import asyncio
import uuid

import aiohttp
import msgspec
import pytest

from proto import client
from tests.integration.conftest import make_token
from tests.integration.wsclient import WsTestClient
from tests.waits import within

KILL = "KILL-BEFORE-COMMIT"
TURNS = 6


def _auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def _new_session(http: aiohttp.ClientSession, url: str, token: str) -> str:
    r = await http.post(f"{url}/v1/sessions", headers=_auth(token))
    assert r.status == 201, await r.text()
    return str((await r.json())["session_id"])


async def _post(http: aiohttp.ClientSession, url: str, token: str, sid: str, text: str) -> client.Ack:
    r = await http.post(
        f"{url}/v1/sessions/{sid}/messages",
        headers=_auth(token),
        json={"client_msg_id": uuid.uuid4().hex, "text": text},
    )
    assert r.status == 200, await r.text()
    ack = client.server_frame_decoder.decode(await r.read())
    assert isinstance(ack, client.Ack), ack
    return ack


async def _history(http: aiohttp.ClientSession, url: str, token: str, sid: str) -> client.SessionHistory:
    r = await http.get(f"{url}/v1/sessions/{sid}", headers=_auth(token))
    assert r.status == 200, await r.text()
    return msgspec.json.decode(await r.read(), type=client.SessionHistory)


def assert_in_history(hist: client.SessionHistory, end: client.TurnEnd, how: str) -> None:
    row = next((m for m in hist.messages if m.role == "assistant" and m.turn_id == end.turn_id), None)
    assert row is not None, (
        f"{how}: turn_end of {end.turn_id} delivered, but the history has no answer: {hist}"
    )
    assert (row.text, row.status, row.seq) == (end.text, end.status, end.seq), (
        f"{how}: the history's answer differs from the delivered turn_end: {row} vs {end}"
    )
    assert hist.last_seq >= end.seq, f"{how}: history last_seq {hist.last_seq} < delivered seq {end.seq}"


async def _poll_until_end(
    http: aiohttp.ClientSession, url: str, token: str, sid: str, after: int, turn_id: str
) -> tuple[list[client.Event], client.TurnEnd]:
    events: list[client.Event] = []
    async with asyncio.timeout(30):
        while True:
            r = await http.get(f"{url}/v1/sessions/{sid}/poll?after={after}&wait_s=5", headers=_auth(token))
            assert r.status == 200, await r.text()
            body = msgspec.json.decode(await r.read(), type=client.PollResponse)
            for ev in body.events:
                events.append(ev)
                after = ev.seq
                if isinstance(ev, client.TurnEnd) and ev.turn_id == turn_id:
                    return events, ev


async def _sse_until_end(
    http: aiohttp.ClientSession, url: str, token: str, sid: str, after: int, turn_id: str
) -> client.TurnEnd:
    async with http.get(f"{url}/v1/sessions/{sid}/events?after={after}", headers=_auth(token)) as resp:
        assert resp.status == 200
        async with asyncio.timeout(30):
            while True:
                record = (await resp.content.readuntil(b"\n\n")).decode()
                fields = dict(
                    line.split(": ", 1) for line in record.strip().splitlines() if not line.startswith(":")
                )
                if fields.get("event") != "turn_end":
                    continue
                ev = client.event_decoder.decode(fields["data"])
                if isinstance(ev, client.TurnEnd) and ev.turn_id == turn_id:
                    return ev


@pytest.mark.parametrize("transport", ["poll", "sse", "ws"])
async def test_turn_end_delivered_on_any_transport_is_already_in_the_history(stack, transport) -> None:
    token = make_token(f"vis-{transport}")
    async with aiohttp.ClientSession() as http:
        sid = await _new_session(http, stack.url, token)
        after = 0
        for i in range(TURNS):
            ack = await _post(http, stack.url, token, sid, f"/sim tokens=12 rate=0\nturn {i}")
            if transport == "poll":
                _, end = await _poll_until_end(http, stack.url, token, sid, after, ack.turn_id)
            elif transport == "sse":
                end = await within(
                    _sse_until_end(http, stack.url, token, sid, after, ack.turn_id),
                    timeout=30,
                    what=f"turn_end of {ack.turn_id} over SSE",
                )
            else:
                async with WsTestClient(stack.url, token) as ws:
                    await ws.connect(sid, last_seen_seq=after)
                    end = await ws.until_turn_end(ack.turn_id, timeout=30)
            assert_in_history(await _history(http, stack.url, token, sid), end, f"{transport}, turn {i}")
            after = end.seq


async def test_text_being_streamed_is_in_the_history_as_in_progress(stack) -> None:
    token = make_token("vis-progress")
    async with WsTestClient(stack.url, token) as ws, aiohttp.ClientSession() as http:
        ready = await ws.connect()
        ack = await ws.ack_for(await ws.send_message("/sim tokens=300 rate=100\nslowly"))
        await ws.until(lambda f: isinstance(f, client.Delta) and f.offset > 20, 30, "a few deltas")
        seen = "".join(e.text for e in ws.events if isinstance(e, client.Delta) and e.turn_id == ack.turn_id)
        hist = await _history(http, stack.url, token, ready.session_id)
        row = next((m for m in hist.messages if m.turn_id == ack.turn_id and m.role == "assistant"), None)
        assert row is not None and row.status == "in_progress", f"no in-progress answer in {hist}"
        assert row.text.startswith(seen), f"history text {row.text!r} does not cover what was shown {seen!r}"
        assert any(m.role == "user" and m.turn_id == ack.turn_id for m in hist.messages), hist
        end = await ws.until_turn_end(ack.turn_id, timeout=60)
        assert_in_history(await _history(http, stack.url, token, ready.session_id), end, "after the turn")


async def _quiet(ws: WsTestClient, for_s: float) -> None:
    """Reads whatever else arrives until the connection has been silent for `for_s` seconds."""
    assert ws.ws is not None
    while True:
        try:
            msg = await ws.ws.receive(timeout=for_s)
        except TimeoutError:
            return
        if msg.type != aiohttp.WSMsgType.TEXT:
            return
        frame = client.server_frame_decoder.decode(msg.data)
        ws.frames.append(frame)
        if isinstance(frame, client.EVENT_TYPES):
            ws.events.append(frame)  # type: ignore[arg-type]


async def _pg_turns(infra, sid: str) -> list[tuple[str, str, str]]:
    import asyncpg

    conn = await asyncpg.connect(infra.endpoints.postgres_dsn)
    try:
        rows = await conn.fetch("SELECT turn_id, text, status FROM turns WHERE session_id = $1", sid)
    finally:
        await conn.close()
    return [(r["turn_id"], r["text"], r["status"]) for r in rows]
