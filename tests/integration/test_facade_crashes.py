"""The Responses facade across crashes, with the real `openai` client: an orchestrator SIGKILLed
mid-answer (the open stream goes on: the turn is taken over), the gateway SIGKILLed mid-stream
(retrieve with starting_after on the restarted gateway continues at N+1, numbered the same), and
shedding (503 with retry-after-ms, in OpenAI's error shape)."""

from __future__ import annotations

from typing import Any

import aiohttp
import openai

from tests.integration.conftest import lease_owner, make_token, stack_env
from tests.integration.test_facade_openai import _answer, _client, _collect, _dump, _sid, _text
from tests.waits import within
from tidewire.dev.stack import Stack


async def test_orchestrator_killed_mid_response_the_stream_goes_on_exactly(stack, infra) -> None:
    oa = _client(stack, "oa-crash-orch")
    stream = await oa.responses.create(
        model="tidewire", input="/sim tokens=400 rate=80\nsurvive", stream=True
    )
    events: list[Any] = []
    await _collect(stream, events, until_deltas=15)
    rid = events[0].response.id
    owner = await lease_owner(infra, _sid(rid))
    assert owner is not None
    stack.by_name(owner).kill()
    await _collect(stream, events)
    stack.add_orchestrator(owner)
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert events[-1].type == "response.completed"
    text = _text(events)
    assert text == events[-1].response.output_text
    assert text == await _answer(stack, "oa-crash-orch", _sid(rid), rid.split(".", 1)[1])
    again: list[Any] = []
    await _collect(await oa.responses.retrieve(rid, stream=True), again)
    assert [_dump(e) for e in again] == [_dump(e) for e in events]


async def test_gateway_killed_mid_stream_retrieve_starting_after_continues_at_n_plus_1(stack) -> None:
    oa = _client(stack, "oa-crash-gw")
    stream = await oa.responses.create(
        model="tidewire", input="/sim tokens=600 rate=100\nkill my gateway", stream=True, background=True
    )
    first: list[Any] = []
    await _collect(stream, first, until_deltas=20)
    rid = first[0].response.id
    gateway = stack.by_name("gateway")
    gateway.kill()
    try:
        await _collect(stream, first)
    except (openai.APIError, Exception):  # noqa: B014 - the connection breaks: httpx or openai errors
        pass
    assert first[-1].type not in ("response.completed", "response.incomplete", "response.failed")
    await within(stream.close(), timeout=5, what="closing the broken stream")
    stack.add_gateway("gateway", stack.http_port)
    n = first[-1].sequence_number
    rest: list[Any] = []
    await _collect(await oa.responses.retrieve(rid, stream=True, starting_after=n), rest)
    assert [e.sequence_number for e in first + rest] == list(range(len(first) + len(rest)))
    assert rest[-1].type == "response.completed"
    text = _text(first) + _text(rest)
    assert text == rest[-1].response.output_text
    assert text == await _answer(stack, "oa-crash-gw", _sid(rid), rid.split(".", 1)[1])
    again: list[Any] = []
    await _collect(await oa.responses.retrieve(rid, stream=True), again)
    assert [_dump(e) for e in again] == [_dump(e) for e in first + rest]


async def test_shedding_answers_503_with_retry_after_ms_in_openai_shape(infra, tmp_path) -> None:
    s = Stack(
        infra_env=stack_env(infra, TIDEWIRE_TURN_QUEUE_SHED_THRESHOLD="0"),
        log_dir=tmp_path,
        orchestrators=1,
        tool_workers=0,
    )
    s.start()
    try:
        oa = _client(s, "oa-shed")
        try:
            await oa.responses.create(model="tidewire", input="shed me")
            raise AssertionError("a shedding gateway accepted a response")
        except openai.InternalServerError as e:
            assert e.status_code == 503
            assert int(e.response.headers["retry-after-ms"]) > 0
            assert e.body["type"] == "server_error" and e.body["code"] == "degraded"
        async with (
            aiohttp.ClientSession() as http,
            http.post(
                f"{s.url}/v1/chat/completions",
                headers={"Authorization": f"Bearer {make_token('oa-shed')}"},
                json={"model": "tidewire", "messages": [{"role": "user", "content": "shed"}]},
            ) as r,
        ):
            assert r.status == 503 and "retry-after-ms" in r.headers
            assert (await r.json())["error"]["code"] == "degraded"
    finally:
        s.stop()
