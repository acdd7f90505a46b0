"""The OpenAI-compatible facades (Responses, Chat Completions, models) driven by the real `openai`
client against the live stack: a response is a turn, resumed exactly, stopped, continued and
deduplicated like any other turn."""

from __future__ import annotations

from typing import Any

import aiohttp
import openai
import pytest

from tests.integration.conftest import make_token
from tests.waits import eventually, within

LONG = "/sim tokens=200 rate=100 ttft_ms=0\n"


def _client(stack: Any, subject: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        base_url=f"{stack.url}/v1", api_key=make_token(subject), max_retries=0, timeout=60
    )


def _sid(response_id: str) -> str:
    return response_id.removeprefix("resp_").split(".", 1)[0]


async def _history(stack: Any, subject: str, sid: str) -> dict[str, Any]:
    async with (
        aiohttp.ClientSession() as http,
        http.get(
            f"{stack.url}/v1/sessions/{sid}", headers={"Authorization": f"Bearer {make_token(subject)}"}
        ) as r,
    ):
        assert r.status == 200, await r.text()
        return await r.json()


async def _answer(stack: Any, subject: str, sid: str, turn_id: str) -> str:
    """The stored answer of a turn, once the turn has ended (bounded wait)."""

    async def ended() -> str | None:
        msgs = (await _history(stack, subject, sid))["messages"]
        done = [
            m
            for m in msgs
            if m["role"] == "assistant" and m["turn_id"] == turn_id and m["status"] != "in_progress"
        ]
        return str(done[0]["text"]) if done else None

    text = await eventually(ended, timeout=20, interval=0.1, what=f"the stored answer of turn {turn_id}")
    assert text is not None
    return text


async def _collect(stream: Any, events: list[Any], *, until_deltas: int | None = None) -> None:
    """Appends the stream's events until `until_deltas` text deltas were seen, or the terminal event."""

    async def read() -> None:
        async for ev in stream:
            events.append(ev)
            if (
                until_deltas is not None
                and sum(e.type == "response.output_text.delta" for e in events) >= until_deltas
            ):
                return
            if ev.type in ("response.completed", "response.failed", "response.incomplete"):
                return

    what = f"{until_deltas} text deltas" if until_deltas else "the response's terminal event"
    await within(
        read(), timeout=60, what=what, seen=lambda: [(e.sequence_number, e.type) for e in events[-5:]]
    )


def _text(events: list[Any]) -> str:
    return "".join(e.delta for e in events if e.type == "response.output_text.delta")


def _dump(ev: Any) -> dict[str, Any]:
    return ev.model_dump(mode="json")


async def test_responses_stream_drop_then_retrieve_starting_after_gives_exact_text(stack) -> None:
    oa = _client(stack, "oa-resume")
    stream = await oa.responses.create(
        model="tidewire", input=LONG + "resume me", stream=True, background=True
    )
    first: list[Any] = []
    await _collect(stream, first, until_deltas=25)
    await stream.close()  # the client drops mid-answer
    assert [e.sequence_number for e in first] == list(range(len(first)))
    assert first[0].type == "response.created"
    rid = first[0].response.id
    n = first[-1].sequence_number

    rest: list[Any] = []
    await _collect(await oa.responses.retrieve(rid, stream=True, starting_after=n), rest)
    assert rest[0].sequence_number == n + 1
    assert [e.sequence_number for e in rest] == list(range(n + 1, n + 1 + len(rest)))
    assert rest[-1].type == "response.completed"
    final = rest[-1].response
    text = _text(first) + _text(rest)
    assert text == final.output_text
    assert text == await _answer(stack, "oa-resume", _sid(rid), rid.split(".", 1)[1])
    assert len(text) > 500

    # the whole stream again, from its first event: the same events, numbered the same
    again: list[Any] = []
    await _collect(await oa.responses.retrieve(rid, stream=True), again)
    assert [_dump(e) for e in again] == [_dump(e) for e in first + rest]
    got = await oa.responses.retrieve(rid)
    assert got.status == "completed" and got.output_text == text
    items = await oa.responses.input_items.list(rid)
    assert items.data[0].content[0].text == LONG + "resume me"


async def test_stream_helper_on_a_response_id_gives_the_final_response(stack) -> None:
    """`responses.stream(response_id=...)`: the SDK's helper attached to a background response, from
    its first event and from the middle (`starting_after`), accumulates the stored answer."""
    oa = _client(stack, "oa-helper")
    created = await oa.responses.create(model="tidewire", input=LONG + "attach to me", background=True)
    assert created.status in ("queued", "in_progress"), created.status
    whole: list[Any] = []

    async def attach(into: list[Any], **kw: Any) -> Any:
        async with oa.responses.stream(response_id=created.id, **kw) as stream:
            async for ev in stream:
                into.append(ev)
            return await stream.get_final_response()

    final = await within(attach(whole), timeout=60, what="the helper's final response from the first event")
    stored = await _answer(stack, "oa-helper", _sid(created.id), created.id.split(".", 1)[1])
    assert final.id == created.id and final.status == "completed"
    assert final.output_text == stored == _text(whole) and len(stored) > 500
    n = whole[len(whole) // 2].sequence_number
    rest: list[Any] = []
    later = await within(
        attach(rest, starting_after=n), timeout=60, what=f"the helper's final response after event {n}"
    )
    assert later.output_text == stored
    assert rest and rest[0].sequence_number == n + 1


async def test_responses_cancel_mid_answer_keeps_partial_text_and_ends_open_stream(stack) -> None:
    oa = _client(stack, "oa-cancel")
    created = await oa.responses.create(
        model="tidewire", input="/sim tokens=2000 rate=50\nstop me", background=True
    )
    assert created.status == "in_progress"
    watching = await oa.responses.retrieve(created.id, stream=True)
    seen: list[Any] = []
    await _collect(watching, seen, until_deltas=10)
    cancelled = await oa.responses.cancel(created.id)
    assert cancelled.status == "cancelled"
    rest: list[Any] = []
    await _collect(watching, rest)
    assert rest[-1].type == "response.incomplete" and rest[-1].response.status == "cancelled"
    partial = _text(seen) + _text(rest)
    assert partial and partial == cancelled.output_text
    assert partial == await _answer(stack, "oa-cancel", _sid(created.id), created.id.split(".", 1)[1])
    again = await oa.responses.cancel(created.id)  # idempotent
    assert again.status == "cancelled" and again.output_text == partial


async def test_previous_response_id_continues_the_session(stack) -> None:
    oa = _client(stack, "oa-chain")
    r1 = await oa.responses.create(model="tidewire", input="/sim tokens=10 rate=0\nfirst")
    assert r1.status == "completed" and r1.output_text
    r2 = await oa.responses.create(
        model="tidewire",
        input=[{"role": "user", "content": "/sim tokens=10 rate=0\nsecond"}],
        previous_response_id=r1.id,
    )
    assert r2.status == "completed" and r2.previous_response_id == r1.id
    assert _sid(r1.id) == _sid(r2.id)
    r3 = await oa.responses.create(
        model="tidewire", input="/sim tokens=5 rate=0\nthird", conversation=_sid(r1.id)
    )
    assert _sid(r3.id) == _sid(r1.id)
    msgs = (await _history(stack, "oa-chain", _sid(r1.id)))["messages"]
    assert [m["role"] for m in msgs] == ["user", "assistant"] * 3
    fresh = await oa.responses.create(model="tidewire", input="/sim tokens=5 rate=0\nelsewhere")
    assert _sid(fresh.id) != _sid(r1.id)


async def test_same_idempotency_key_twice_gives_one_turn(stack) -> None:
    oa = _client(stack, "oa-idem")
    hdr = {"Idempotency-Key": "key-123"}
    a = await oa.responses.create(model="tidewire", input="/sim tokens=30 rate=0\nonce", extra_headers=hdr)
    b = await oa.responses.create(model="tidewire", input="/sim tokens=30 rate=0\nonce", extra_headers=hdr)
    assert a.id == b.id and a.output_text == b.output_text
    msgs = (await _history(stack, "oa-idem", _sid(a.id)))["messages"]
    assert [m["role"] for m in msgs] == ["user", "assistant"]
    # streamed, twice with one key: one turn, and the second call streams the same events
    hdr = {"Idempotency-Key": "key-456"}
    first: list[Any] = []
    second: list[Any] = []
    await _collect(
        await oa.responses.create(
            model="tidewire", input=LONG + "stream once", stream=True, extra_headers=hdr
        ),
        first,
    )
    await _collect(
        await oa.responses.create(
            model="tidewire", input=LONG + "stream once", stream=True, extra_headers=hdr
        ),
        second,
    )
    assert [_dump(e) for e in first] == [_dump(e) for e in second]
    sid = _sid(first[0].response.id)
    msgs = (await _history(stack, "oa-idem", sid))["messages"]
    assert [m["role"] for m in msgs] == ["user", "assistant"]


async def test_another_subjects_response_is_refused_and_errors_have_openai_shape(stack) -> None:
    mine = await _client(stack, "oa-owner").responses.create(
        model="tidewire", input="/sim tokens=5 rate=0\nmine"
    )
    thief = _client(stack, "oa-thief")
    with pytest.raises(openai.PermissionDeniedError) as denied:
        await thief.responses.retrieve(mine.id)
    assert denied.value.status_code == 403 and denied.value.body["type"] == "permission_error"
    with pytest.raises(openai.PermissionDeniedError):
        await thief.responses.cancel(mine.id)
    with pytest.raises(openai.NotFoundError):
        await thief.responses.retrieve("resp_nosuchsession.t_nothing")
    with pytest.raises(openai.AuthenticationError):
        await openai.AsyncOpenAI(
            base_url=f"{stack.url}/v1", api_key="not-a-token", max_retries=0
        ).models.list()
    with pytest.raises(openai.BadRequestError) as bad:
        await thief.responses.create(model="tidewire", input=[])
    assert bad.value.body["type"] == "invalid_request_error"


async def test_chat_completions_stream_and_non_stream(stack) -> None:
    oa = _client(stack, "oa-chat")
    raw = await oa.chat.completions.with_raw_response.create(
        model="tidewire", messages=[{"role": "user", "content": "/sim tokens=40 rate=0\nno stream"}]
    )
    sid = raw.headers["x-tidewire-session"]
    done = raw.parse()
    assert done.choices[0].finish_reason == "stop" and done.choices[0].message.content
    turn_id = done.id.removeprefix("chatcmpl-")
    assert done.choices[0].message.content == await _answer(stack, "oa-chat", sid, turn_id)

    stream = await oa.chat.completions.create(
        model="tidewire",
        stream=True,
        extra_headers={"X-Tidewire-Session": sid},
        messages=[{"role": "user", "content": "/sim tokens=150 rate=200\nstream please"}],
    )
    parts: list[str] = []
    finish = None

    async def read() -> Any:
        nonlocal finish
        last = None
        async for chunk in stream:
            last = chunk
            if chunk.choices:
                parts.append(chunk.choices[0].delta.content or "")
                finish = chunk.choices[0].finish_reason or finish
        return last

    chunk = await within(read(), timeout=60, what="the chat completion chunks up to [DONE]")
    assert finish == "stop"
    turn_id = chunk.id.removeprefix("chatcmpl-")
    assert "".join(parts) == await _answer(stack, "oa-chat", sid, turn_id)
    msgs = (await _history(stack, "oa-chat", sid))["messages"]
    assert [m["role"] for m in msgs] == ["user", "assistant"] * 2  # the same session, two turns
    with pytest.raises(openai.PermissionDeniedError):
        await _client(stack, "oa-chat-thief").chat.completions.create(
            model="tidewire",
            extra_headers={"X-Tidewire-Session": sid},
            messages=[{"role": "user", "content": "let me in"}],
        )
    models = await oa.models.list()
    assert "tidewire" in [m.id for m in models.data]


@pytest.mark.parametrize("header", ["X-OpenWebUI-Chat-Id", "X-Tidewire-Chat"])
async def test_a_chat_uis_conversation_key_keeps_one_session_per_conversation(stack, header) -> None:
    """Open WebUI (and LibreChat with a header template) resend the whole conversation on every call
    and name it by their own chat id: each conversation is one session, its turns in order."""
    oa = _client(stack, f"oa-ui-{header}")
    history: list[dict[str, str]] = []
    sids = []
    for n in range(2):
        history.append({"role": "user", "content": f"/sim tokens=12 rate=0\nmessage {n}"})
        raw = await oa.chat.completions.with_raw_response.create(
            model="tidewire", messages=history, extra_headers={header: "chat-A"}
        )
        sids.append(raw.headers["x-tidewire-session"])
        history.append({"role": "assistant", "content": raw.parse().choices[0].message.content or ""})
    assert sids[0] == sids[1], "two calls of one conversation went to two sessions"
    msgs = (await _history(stack, f"oa-ui-{header}", sids[0]))["messages"]
    assert [(m["role"], m["text"]) for m in msgs] == [(h["role"], h["content"]) for h in history]
    other = await oa.chat.completions.with_raw_response.create(
        model="tidewire", messages=history[:1], extra_headers={header: "chat-B"}
    )
    assert other.headers["x-tidewire-session"] != sids[0]
    theirs = await _client(stack, f"oa-ui-other-{header}").chat.completions.with_raw_response.create(
        model="tidewire", messages=history[:1], extra_headers={header: "chat-A"}
    )
    assert theirs.headers["x-tidewire-session"] not in sids, "two subjects' equal chat ids met"


async def test_tool_activity_is_an_mcp_call_item_and_status_lines_pass_through_the_stream_helper(
    stack,
) -> None:
    oa = _client(stack, "oa-tools")
    kinds: list[str] = []

    async def run() -> Any:
        async with oa.responses.stream(model="tidewire", input="what time is it") as stream:
            async for ev in stream:
                kinds.append(ev.type)
            return await stream.get_final_response()

    final = await within(
        run(), timeout=60, what="the helper stream of a tool-using response", seen=lambda: kinds[-5:]
    )
    calls = [item for item in final.output if item.type == "mcp_call"]
    assert calls and calls[0].name == "clock" and calls[0].status == "completed" and calls[0].output
    assert "tidewire.status" in kinds and "response.mcp_call.completed" in kinds
    assert final.status == "completed" and final.output_text
    assert final.output_text == (await oa.responses.retrieve(final.id)).output_text
