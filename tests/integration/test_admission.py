"""The three transports admit streams through one pipeline (gateway.admission), so they refuse the
same bad input the same way and in the same order: Origin, token, session id form, ownership, the
subject's connection slot, then the resume point, where a point past `last_seq` is a reset.

A WebSocket says it with a close code, SSE and long-poll with an HTTP error (PROTOCOL.md). The stack
here runs gateways only: admission needs no orchestrator.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import pytest

from proto import client
from tests.integration.conftest import make_token, stack_env
from tests.integration.wsclient import WsTestClient
from tests.waits import within
from tidewire.dev.stack import Stack

ALLOWED_ORIGIN = "https://app.example"
MAX_CONNECTIONS = 2

# HTTP status of SSE and long-poll -> the WebSocket's close code, for every refusal
CLOSE_FOR = {401: 4401, 403: 4403, 404: 4403, 429: 4429}
CODE_FOR = {401: "unauthorized", 403: "forbidden", 404: "not_found", 429: "rate_limited"}


@pytest.fixture(scope="module")
def gateway(infra, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    folder = tmp_path_factory.mktemp("admission")
    env = stack_env(
        infra,
        TIDEWIRE_ALLOWED_ORIGINS=ALLOWED_ORIGIN,
        TIDEWIRE_MAX_CONNECTIONS_PER_SUBJECT=str(MAX_CONNECTIONS),
        TIDEWIRE_TURN_QUEUE_SHED_THRESHOLD="-1",
    )
    s = Stack(infra_env=env, log_dir=folder / "logs", orchestrators=0, tool_workers=0)
    s.start()
    try:
        yield s
    finally:
        s.stop()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as s:
        yield s


def _subject(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def _headers(token: str | None, origin: str | None) -> dict[str, str]:
    return {
        **({"Authorization": f"Bearer {token}"} if token else {}),
        **({"Origin": origin} if origin else {}),
    }


async def _new_session(http: aiohttp.ClientSession, base: str, token: str) -> str:
    async with http.post(f"{base}/v1/sessions", headers=_headers(token, None)) as r:
        assert r.status == 201, await r.text()
        return str((await r.json())["session_id"])


async def _ws(
    http: aiohttp.ClientSession,
    base: str,
    token: str | None,
    hello: dict[str, Any],
    origin: str | None = None,
) -> client.ServerFrame | int:
    """The first answer to `hello`: a frame, or the close code."""
    url = base.replace("http", "ws", 1) + "/v1/ws" + (f"?access_token={token}" if token else "")
    async with http.ws_connect(url, headers=_headers(None, origin)) as ws:
        try:
            await ws.send_str(json.dumps({"type": "hello", **hello}))
        except (ConnectionError, RuntimeError):
            pass  # closed already: the close code says why
        msg = await within(ws.receive(), timeout=10, what=f"the answer to hello {hello}")
        if msg.type == aiohttp.WSMsgType.TEXT:
            return client.server_frame_decoder.decode(msg.data)
        assert ws.close_code is not None, msg
        return ws.close_code


async def _sse(
    http: aiohttp.ClientSession,
    base: str,
    token: str | None,
    sid: str,
    after: int | None = None,
    origin: str | None = None,
) -> client.Ready | tuple[int, str]:
    """The `ready` record of an SSE stream, or the refusal's (status, error.code)."""
    q = "" if after is None else f"?after={after}"
    async with http.get(f"{base}/v1/sessions/{sid}/events{q}", headers=_headers(token, origin)) as r:
        if r.status != 200:
            return r.status, (await r.json())["code"]
        record = await within(r.content.readuntil(b"\n\n"), timeout=10, what="the first SSE record (ready)")
    head, data = record.split(b"\ndata: ", 1)
    assert head == b"event: ready", record
    ready = client.server_frame_decoder.decode(data.strip())
    assert isinstance(ready, client.Ready)
    return ready


async def _poll(
    http: aiohttp.ClientSession,
    base: str,
    token: str | None,
    sid: str,
    after: int | None = None,
    origin: str | None = None,
) -> dict[str, Any] | tuple[int, str]:
    q = "?wait_s=0" + ("" if after is None else f"&after={after}")
    async with http.get(f"{base}/v1/sessions/{sid}/poll{q}", headers=_headers(token, origin)) as r:
        body = await r.json()
        return body if r.status == 200 else (r.status, body["code"])


async def _responses(
    http: aiohttp.ClientSession, base: str, token: str | None, sid: str, origin: str | None = None
) -> tuple[int, str]:
    """A streamed OpenAI response continuing session `sid` (the facades admit like the transports):
    (status, error.code), refused or not. A refused call must have started no turn."""
    body = {"input": "/sim tokens=3 rate=0\nhello", "conversation": sid, "stream": True}
    async with http.post(f"{base}/v1/responses", json=body, headers=_headers(token, origin)) as r:
        if r.status != 200:
            return r.status, (await r.json())["error"]["code"]
        await r.read()
        return r.status, "streamed"


async def _refused_alike(
    http: aiohttp.ClientSession,
    base: str,
    token: str | None,
    sid: str,
    status: int,
    origin: str | None = None,
) -> None:
    """All three transports refuse the same input with the same outcome."""
    outcomes = {
        "ws": await _ws(http, base, token, {"session_id": sid}, origin),
        "sse": await _sse(http, base, token, sid, origin=origin),
        "poll": await _poll(http, base, token, sid, origin=origin),
        "responses": await _responses(http, base, token, sid, origin=origin),
    }
    assert outcomes == {
        "ws": CLOSE_FOR[status],
        "sse": (status, CODE_FOR[status]),
        "poll": (status, CODE_FOR[status]),
        "responses": (status, CODE_FOR[status]),
    }


async def test_no_token_is_refused_alike_on_every_transport(gateway, http) -> None:
    sid = await _new_session(http, gateway.url, make_token(_subject("owner")))
    await _refused_alike(http, gateway.url, None, sid, 401)
    await _refused_alike(http, gateway.url, "not.a.token", sid, 401)


async def test_a_foreign_session_is_refused_alike_on_every_transport(gateway, http) -> None:
    sid = await _new_session(http, gateway.url, make_token(_subject("owner")))
    await _refused_alike(http, gateway.url, make_token(_subject("intruder")), sid, 403)


@pytest.mark.parametrize("sid", ["a" * 129, "bad.id", "doesnotexist"])
async def test_malformed_or_unknown_session_ids_are_refused_alike(gateway, http, sid: str) -> None:
    await _refused_alike(http, gateway.url, make_token(_subject("nf")), sid, 404)


async def test_a_bad_origin_is_refused_alike_and_before_the_token_is_looked_at(gateway, http) -> None:
    token = make_token(_subject("origin"))
    sid = await _new_session(http, gateway.url, token)
    await _refused_alike(http, gateway.url, token, sid, 403, origin="https://evil.example")
    await _refused_alike(http, gateway.url, None, sid, 403, origin="https://evil.example")
    assert isinstance(await _ws(http, gateway.url, token, {"session_id": sid}, ALLOWED_ORIGIN), client.Ready)


async def test_the_token_is_checked_before_the_session(gateway, http) -> None:
    sid = await _new_session(http, gateway.url, make_token(_subject("owner")))
    await _refused_alike(http, gateway.url, None, "a" * 129, 401)
    await _refused_alike(http, gateway.url, None, sid, 401)


async def test_a_resume_point_past_last_seq_is_a_reset_on_every_transport_and_a_negative_one_on_the_websocket(
    gateway, http
) -> None:
    token = make_token(_subject("reset"))
    sid = await _new_session(http, gateway.url, token)
    for after in (5, -1):  # a WebSocket's last_seen_seq below 0 resets too (HTTP answers 400: test_fuzz)
        ws = await _ws(http, gateway.url, token, {"session_id": sid, "last_seen_seq": after})
        assert ws == client.Ready(session_id=sid, last_seq=0, reset=True), (after, ws)
    after = 5
    assert await _sse(http, gateway.url, token, sid, after=after) == client.Ready(
        session_id=sid, last_seq=0, reset=True
    )
    assert await _poll(http, gateway.url, token, sid, after=after) == {
        "events": [],
        "last_seq": 0,
        "reset": True,
    }
    # and a point within the history is honoured exactly, with no reset (an SSE stream the client
    # left holds its slot until the server's next write fails, hence the poll first)
    assert await _poll(http, gateway.url, token, sid, after=0) == {
        "events": [],
        "last_seq": 0,
        "reset": False,
    }
    assert await _sse(http, gateway.url, token, sid, after=0) == client.Ready(
        session_id=sid, last_seq=0, reset=False
    )


async def test_ownership_is_checked_before_the_slot_and_a_refused_socket_creates_no_session(
    gateway, http
) -> None:
    token = make_token(_subject("slots"))
    sid = await _new_session(http, gateway.url, token)
    foreign = await _new_session(http, gateway.url, make_token(_subject("other")))
    holders = [WsTestClient(gateway.url, token) for _ in range(MAX_CONNECTIONS)]
    for c in holders:
        await c.__aenter__()
        await c.connect(sid)
    try:
        await _refused_alike(http, gateway.url, token, sid, 429)
        await _refused_alike(http, gateway.url, token, foreign, 403)
        await _refused_alike(http, gateway.url, token, "a" * 129, 404)
        assert await _ws(http, gateway.url, token, {}) == 4429  # a new session would have been created
        async with http.get(f"{gateway.url}/v1/sessions", headers=_headers(token, None)) as r:
            assert [s["session_id"] for s in (await r.json())["sessions"]] == [sid]
        async with http.get(f"{gateway.url}/v1/sessions/{sid}", headers=_headers(token, None)) as r:
            assert (await r.json())["messages"] == [], "a call refused for want of a slot started a turn"
    finally:
        for c in holders:
            await c.__aexit__(None, None, None)
