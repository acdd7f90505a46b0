"""The simulated model: deterministic text, exact continuation, directives, tools, failures
and the stream accounting that proves no upstream generation is leaked."""

from __future__ import annotations

import asyncio
import contextlib

import pytest
import regex

from orchestrator.providers import (
    ContinuationMismatch,
    Provider,
    ProviderError,
    ProviderEvent,
    ProviderRequest,
    SimulatedProvider,
    SimulatedSettings,
    TextDelta,
    ToolCallRequest,
    ToolSpec,
    Usage,
)
from orchestrator.providers.simulated import call_id_for, parse_directives, plan_step
from orchestrator.segmenter import GraphemeBuffer
from proto.state import ChatMessage
from tests.waits import within

FAST = SimulatedSettings(rate=0, tokens=30)


def request(text: str, *, turn: str = "t1", session: str = "s1", **kw: object) -> ProviderRequest:
    messages = [ChatMessage(role="system", text="be brief"), ChatMessage(role="user", text=text)]
    return ProviderRequest(session_id=session, turn_id=turn, messages=messages, **kw)  # type: ignore[arg-type]


async def collect(provider: SimulatedProvider, req: ProviderRequest) -> list[ProviderEvent]:
    return [event async for event in provider.stream(req)]


def text_of(events: list[ProviderEvent]) -> str:
    return "".join(e.text for e in events if isinstance(e, TextDelta))


def multi_cluster_turn(settings: SimulatedSettings, prompt: str = "hello") -> ProviderRequest:
    """A request whose answer contains a multi-code-point grapheme cluster."""
    for i in range(200):
        req = request(prompt, turn=f"turn-{i}")
        if any(len(g) > 1 for g in regex.findall(r"\X", plan_step(req, settings).text)):
            return req
    raise AssertionError("no answer with an awkward grapheme found")


async def test_same_inputs_give_the_same_text_and_other_turns_differ() -> None:
    req = request("tell me about rivers")
    first = await collect(SimulatedProvider(FAST), req)
    second = await collect(SimulatedProvider(FAST), req)
    assert text_of(first) == text_of(second) == SimulatedProvider(FAST).full_answer(req)
    assert text_of(first)
    assert text_of(first) != text_of(
        await collect(SimulatedProvider(FAST), request("tell me about rivers", turn="t2"))
    )
    assert text_of(first) != text_of(await collect(SimulatedProvider(FAST), request("tell me about seas")))


async def test_pacing_settings_do_not_change_the_text() -> None:
    req = request("/sim rate=0 ttft_ms=0 chunk=7 split=1\nhello")
    plain = request("/sim rate=0\nhello")
    assert SimulatedProvider(FAST).full_answer(req) == SimulatedProvider(FAST).full_answer(plain)


async def test_rate_zero_completes_with_the_configured_number_of_tokens() -> None:
    provider = SimulatedProvider(SimulatedSettings(rate=0, tokens=60))
    events = await collect(provider, request("hi"))
    deltas = [e for e in events if isinstance(e, TextDelta)]
    assert len(deltas) == 60
    assert isinstance(events[-1], Usage) and events[-1].completion_tokens == 60
    assert events[-1].prompt_tokens > 0
    assert provider.finished == 1 and provider.orphaned == 0

    events = await collect(provider, request("/sim tokens=7\nhi"))
    assert sum(isinstance(e, TextDelta) for e in events) == 7


async def test_continuation_from_every_prefix_gives_exactly_the_rest() -> None:
    settings = SimulatedSettings(rate=0, tokens=12)
    base = multi_cluster_turn(settings)
    provider = SimulatedProvider(settings)
    full = provider.full_answer(base)
    for k in range(len(full) + 1):  # includes mid-token and mid-grapheme prefixes
        req = ProviderRequest(
            session_id=base.session_id, turn_id=base.turn_id, messages=base.messages, continue_from=full[:k]
        )
        events = await collect(provider, req)
        assert text_of(events) == full[k:], k
        assert all(e.text for e in events if isinstance(e, TextDelta)), "no empty deltas"
        assert isinstance(events[-1], Usage)
    assert provider.orphaned == 0


async def test_continuation_from_a_non_prefix_is_refused() -> None:
    provider = SimulatedProvider(FAST)
    req = request("hello", continue_from="definitely not the answer")
    with pytest.raises(ContinuationMismatch):
        await collect(provider, req)
    assert provider.failed == 1 and provider.orphaned == 0


def test_directives_are_parsed_and_the_directive_line_is_not_prompt() -> None:
    d = parse_directives(
        '/sim tokens=5 rate=0 ttft_ms=20 stall_ms=300 chunk=3 split=1 tool=a,b args={"q": "x y"}\nhi'
    )
    assert d.prompt == "hi"
    assert d.overrides == {
        "tokens": 5, "rate": 0.0, "ttft_ms": 20.0, "stall_ms": 300.0, "chunk": 3, "split_graphemes": True,
    }  # fmt: skip
    assert d.tools == ("a", "b")
    assert d.tool_args == ({"q": "x y"}, {"q": "x y"})
    assert not d.fail

    per_tool = parse_directives('/sim tool=a,b args=[{"n": 1}, {"n": 2}] fail=1')
    assert per_tool.tool_args == ({"n": 1}, {"n": 2}) and per_tool.fail and per_tool.prompt == ""
    assert parse_directives("/simulate this\nok").prompt == "/simulate this\nok"
    assert parse_directives("hello /sim tokens=1").overrides == {}


@pytest.mark.parametrize(
    "line", ["/sim token=5", "/sim tokens=many", "/sim rate=-1", "/sim args={bad", "/sim oops"]
)
async def test_a_malformed_directive_is_a_poison_turn(line: str) -> None:
    provider = SimulatedProvider(FAST)
    with pytest.raises(ProviderError) as info:
        await collect(provider, request(line + "\nhi"))
    assert info.value.retryable is False


async def test_what_time_is_it_calls_the_clock_and_the_follow_up_quotes_it() -> None:
    provider = SimulatedProvider(FAST)
    req = request("Hey, what time is it?")
    events = await collect(provider, req)
    calls = [e for e in events if isinstance(e, ToolCallRequest)]
    assert calls == [ToolCallRequest(call_id=call_id_for("t1", 0), name="clock", args={})]
    assert text_of(events) == "" and isinstance(events[-1], Usage)
    assert [e for e in await collect(provider, req) if isinstance(e, ToolCallRequest)] == calls, (
        "stable call_id"
    )

    tool_msg = ChatMessage(role="tool", text="12:00 UTC", tool_call_id=calls[0].call_id, name="clock")
    follow = ProviderRequest(session_id="s1", turn_id="t1", messages=[*req.messages, tool_msg])
    answer = text_of(await collect(provider, follow))
    assert answer.startswith("The clock says: 12:00 UTC. ")
    assert answer == provider.full_answer(follow)
    other = ChatMessage(role="tool", text="13:00 UTC", tool_call_id=calls[0].call_id, name="clock")
    assert (
        provider.full_answer(ProviderRequest(session_id="s1", turn_id="t1", messages=[*req.messages, other]))
        != answer
    )
    assert provider.orphaned == 0


async def test_calculate_calls_the_calculator_with_the_expression() -> None:
    events = await collect(SimulatedProvider(FAST), request("Please calculate (2 + 3) * 4? thanks"))
    assert [e for e in events if isinstance(e, ToolCallRequest)][0].args == {"expression": "(2 + 3) * 4"}


async def test_triggers_respect_the_offered_tools_but_the_directive_always_calls() -> None:
    offered = [ToolSpec(name="weather", description="", parameters={})]
    events = await collect(SimulatedProvider(FAST), request("what time is it", tools=offered))
    assert not any(isinstance(e, ToolCallRequest) for e in events) and text_of(events)

    events = await collect(
        SimulatedProvider(FAST), request('/sim tool=slow_lookup,clock args={"k": 1}\nhi', tools=offered)
    )
    calls = [e for e in events if isinstance(e, ToolCallRequest)]
    assert [(c.name, c.args) for c in calls] == [("slow_lookup", {"k": 1}), ("clock", {"k": 1})]
    assert len({c.call_id for c in calls}) == 2


async def test_cancelling_the_consumer_mid_stream_is_recorded_as_an_abort() -> None:
    provider = SimulatedProvider(SimulatedSettings(rate=0, tokens=40, stall_ms=60_000))
    got_first = asyncio.Event()

    async def consume() -> None:
        async for event in provider.stream(request("hi", turn="cancel-me")):
            if isinstance(event, TextDelta):
                got_first.set()

    task = asyncio.create_task(consume())
    await within(got_first.wait(), timeout=5, what="the first text delta of a stalling simulated stream")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert (provider.started, provider.aborted, provider.finished, provider.orphaned) == (1, 1, 0, 0)
    assert list(provider.last_aborted_turns) == ["cancel-me"]


async def test_aclose_mid_stream_is_an_abort_but_closing_after_usage_is_not() -> None:
    provider = SimulatedProvider(FAST)
    async with contextlib.aclosing(provider.stream(request("hi", turn="early"))) as events:
        async for event in events:
            assert isinstance(event, TextDelta)
            break
    assert provider.aborted == 1 and provider.orphaned == 0

    async with contextlib.aclosing(provider.stream(request("hi", turn="late"))) as events:
        async for event in events:
            if isinstance(event, Usage):
                break
    assert provider.finished == 1 and provider.aborted == 1 and provider.orphaned == 0
    assert list(provider.last_aborted_turns) == ["early"]


async def test_injected_errors_are_retryable_and_raised_before_the_first_token() -> None:
    provider = SimulatedProvider(SimulatedSettings(rate=0, error_rate=1.0))
    stream = provider.stream(request("hi"))
    with pytest.raises(ProviderError) as info:
        await anext(stream)
    assert info.value.retryable is True
    assert provider.failed == 1 and provider.orphaned == 0


async def test_error_injection_is_deterministic_given_a_seed_and_retries_can_succeed() -> None:
    async def outcomes(provider: SimulatedProvider) -> list[bool]:
        result = []
        for _ in range(12):
            try:
                await collect(provider, request("hi"))
                result.append(True)
            except ProviderError as exc:
                assert exc.retryable
                result.append(False)
        return result

    settings = SimulatedSettings(rate=0, tokens=3, error_rate=0.5, seed=7)
    first = await outcomes(SimulatedProvider(settings))
    assert first == await outcomes(SimulatedProvider(settings))
    assert True in first and False in first


async def test_fail_directive_is_a_non_retryable_poison_turn() -> None:
    provider = SimulatedProvider(FAST)
    with pytest.raises(ProviderError) as info:
        await collect(provider, request("/sim fail=1\nhi"))
    assert info.value.retryable is False
    assert provider.failed == 1 and provider.orphaned == 0


async def test_split_directive_cuts_grapheme_clusters_and_the_buffer_repairs_them() -> None:
    settings = SimulatedSettings(rate=0, tokens=40)
    base = multi_cluster_turn(settings)
    req = ProviderRequest(
        session_id=base.session_id,
        turn_id=base.turn_id,
        messages=[ChatMessage(role="user", text="/sim split=1\n" + base.messages[-1].text)],
    )
    full = SimulatedProvider(settings).full_answer(req)
    deltas = [e.text for e in await collect(SimulatedProvider(settings), req) if isinstance(e, TextDelta)]
    assert "".join(deltas) == full
    boundaries = {m.end() for m in regex.finditer(r"\X", full)}
    ends = [sum(map(len, deltas[: i + 1])) for i in range(len(deltas))]
    assert any(end not in boundaries for end in ends), "split=1 must cut inside a cluster"

    buffer, offset = GraphemeBuffer(), 0
    for delta in deltas:
        offset += len(buffer.feed(delta))
        assert offset in boundaries | {0}
    assert offset + len(buffer.flush()) == len(full)


async def test_chunk_directive_sets_delta_size_in_code_points() -> None:
    req = request("/sim chunk=3\nhi")
    deltas = [e.text for e in await collect(SimulatedProvider(FAST), req) if isinstance(e, TextDelta)]
    assert all(len(d) == 3 for d in deltas[:-1]) and 1 <= len(deltas[-1]) <= 3


def test_settings_come_from_env() -> None:
    env = {"TIDEWIRE_SIM_TOKENS": "12", "TIDEWIRE_SIM_RATE": "0", "TIDEWIRE_SIM_ERROR_RATE": "0.25",
           "TIDEWIRE_SIM_STALL_MS": "100", "TIDEWIRE_SIM_SPLIT": "1"}  # fmt: skip
    s = SimulatedSettings.from_env(env)
    assert (s.tokens, s.rate, s.error_rate, s.stall_ms, s.split_graphemes) == (12, 0.0, 0.25, 100.0, True)
    assert SimulatedSettings.from_env({}) == SimulatedSettings()
    with pytest.raises(ValueError):
        SimulatedSettings.from_env({"TIDEWIRE_SIM_JITTER": "2"})


def test_simulated_provider_satisfies_the_provider_protocol() -> None:
    provider: Provider = SimulatedProvider(FAST)  # checked statically by mypy
    assert provider.name == "simulated"
