"""The OpenAI-compatible provider against a local server replaying recorded streams (no other
servers needed): text, tool-call assembly, cancellation that the server sees, timeouts, and which
errors may be retried; plus the pure message mapping and the upstream gate that wraps providers."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest

pytest.importorskip("openai")

from orchestrator.providers.base import (  # noqa: E402
    ProviderError,
    ProviderEvent,
    ProviderRequest,
    TextDelta,
    ToolCallRequest,
    ToolSpec,
    Usage,
)
from orchestrator.providers.openai import (  # noqa: E402
    CONTINUE_INSTRUCTION,
    OpenAIProvider,
    OpenAISettings,
    PrefixStripper,
    SurrogateJoiner,
    ToolCallAssembler,
    to_openai_messages,
)
from proto.state import ChatMessage  # noqa: E402
from tests.fixtures.openai_streams.replay_server import ReplayServer, recorded_text  # noqa: E402
from tests.waits import within  # noqa: E402

CALC = ToolSpec(
    name="calculator",
    description="arithmetic",
    parameters={"type": "object", "properties": {"expression": {"type": "string"}}},
)


@pytest.fixture
async def server() -> AsyncIterator[ReplayServer]:
    s = await ReplayServer().start()
    try:
        yield s
    finally:
        await s.close()


def provider(url: str, **kw: Any) -> OpenAIProvider:
    settings = OpenAISettings(
        base_url=url, model="replay-model", **{"first_token_timeout_s": 5.0, "idle_timeout_s": 5.0, **kw}
    )
    return OpenAIProvider(settings)


def request(text: str = "hi", **kw: Any) -> ProviderRequest:
    messages = [ChatMessage(role="system", text="be brief"), ChatMessage(role="user", text=text)]
    return ProviderRequest(session_id="s1", turn_id="t1", messages=messages, **kw)


async def collect(p: OpenAIProvider, req: ProviderRequest) -> list[ProviderEvent]:
    async with contextlib.aclosing(p.stream(req)) as stream:
        return [ev async for ev in stream]


def text_of(events: list[ProviderEvent]) -> str:
    return "".join(e.text for e in events if isinstance(e, TextDelta))


# ---- streaming against the replay server ------------------------------------------------------


async def test_streams_text_and_usage_with_a_split_surrogate_pair_joined(server: ReplayServer) -> None:
    p = provider(server.url_for("text"))
    events = await collect(p, request(tools=[CALC]))
    assert text_of(events) == recorded_text("text") == "Hello from café 👩\u200d💻 and 東京."
    for e in events:
        if isinstance(e, TextDelta):
            assert not any("\ud800" <= ch <= "\udfff" for ch in e.text), "a delta split a code point"
    assert events[-1] == Usage(prompt_tokens=21, completion_tokens=9)
    body = server.requests[-1]
    assert body["model"] == "replay-model" and body["stream"] is True
    assert body["stream_options"] == {"include_usage": True}
    assert body["tools"][0] == {
        "type": "function",
        "function": {"name": "calculator", "description": "arithmetic", "parameters": CALC.parameters},
    }
    assert (p.started, p.finished, p.failed, p.aborted, p.orphaned) == (1, 1, 0, 0, 0)
    await p.close()


async def test_route_prefix_is_stripped_from_the_model(server: ReplayServer) -> None:
    p = provider(server.url_for("text"))
    await collect(p, request(model="openai:gpt-4o-mini"))
    assert server.requests[-1]["model"] == "gpt-4o-mini"
    await p.close()


async def test_assembles_parallel_tool_calls_from_fragments(server: ReplayServer) -> None:
    p = provider(server.url_for("tool_call"))
    events = await collect(p, request("what is 6*7 and the time", tools=[CALC]))
    calls = [e for e in events if isinstance(e, ToolCallRequest)]
    assert calls == [
        ToolCallRequest(call_id="call_calc_1", name="calculator", args={"expression": "6*7"}),
        ToolCallRequest(call_id="call_clock_2", name="clock", args={}),
    ]
    assert isinstance(events[-1], Usage) and events[-1].completion_tokens == 24
    # the follow-up step carries the results; the assistant message that asked is synthesised,
    # with the arguments this provider remembers having been sent
    follow = request("what is 6*7 and the time", tools=[CALC])
    follow = ProviderRequest(
        session_id="s1",
        turn_id="t1",
        tools=[CALC],
        messages=[
            *follow.messages,
            ChatMessage(role="tool", text="42", tool_call_id="call_calc_1", name="calculator"),
            ChatMessage(role="tool", text="12:00", tool_call_id="call_clock_2", name="clock"),
        ],
    )
    events = await collect(p, follow)
    assert text_of(events) == recorded_text("text")
    sent = server.requests[-1]["messages"]
    assert sent[2] == {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_calc_1",
                "type": "function",
                "function": {"name": "calculator", "arguments": '{"expression": "6*7"}'},
            },
            {"id": "call_clock_2", "type": "function", "function": {"name": "clock", "arguments": "{}"}},
        ],
    }
    assert sent[3:] == [
        {"role": "tool", "tool_call_id": "call_calc_1", "content": "42"},
        {"role": "tool", "tool_call_id": "call_clock_2", "content": "12:00"},
    ]
    await p.close()


async def test_cancel_closes_the_http_stream_and_the_server_sees_it(server: ReplayServer) -> None:
    p = provider(server.url_for("long"))
    got: list[str] = []
    five = asyncio.Event()

    async def consume() -> None:
        async with contextlib.aclosing(p.stream(request())) as stream:
            async for ev in stream:
                if isinstance(ev, TextDelta):
                    got.append(ev.text)
                    if len(got) == 5:
                        five.set()

    task = asyncio.create_task(consume())
    await within(
        five.wait(), timeout=10, what="five text deltas of the endless 'long' stream", seen=lambda: got
    )
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    await server.wait_for("dropped", "long", timeout=5)
    assert (p.started, p.aborted, p.orphaned) == (1, 1, 0)
    assert p.last_aborted_turns[-1] == "t1"
    await p.close()


async def test_early_aclose_also_drops_the_connection(server: ReplayServer) -> None:
    p = provider(server.url_for("long"))
    stream = p.stream(request())
    first = await anext(stream)
    assert isinstance(first, TextDelta)
    await stream.aclose()
    await server.wait_for("dropped", "long", timeout=5)
    assert (p.aborted, p.orphaned) == (1, 0)
    await p.close()


async def test_idle_stall_after_a_token_times_out_and_is_not_retryable(server: ReplayServer) -> None:
    p = provider(server.url_for("stall"), idle_timeout_s=0.3)
    got: list[ProviderEvent] = []
    with pytest.raises(ProviderError) as info:
        async with contextlib.aclosing(p.stream(request())) as stream:
            async for ev in stream:
                got.append(ev)
    assert text_of(got) == "Thinking"
    assert info.value.retryable is False
    assert getattr(info.value, "upstream_fault", False) is True
    await server.wait_for("dropped", "stall", timeout=5)
    assert (p.failed, p.orphaned) == (1, 0)
    await p.close()


async def test_no_first_token_times_out_and_is_retryable(server: ReplayServer) -> None:
    p = provider(server.url_for("stall_first"), first_token_timeout_s=0.3)
    with pytest.raises(ProviderError) as info:
        await collect(p, request())
    assert info.value.retryable is True
    await server.wait_for("dropped", "stall_first", timeout=5)
    await p.close()


async def test_http_errors_before_the_first_token_are_retryable_only_when_transient(
    server: ReplayServer,
) -> None:
    p = provider(server.url_for("text"))
    server.fail_next.extend([500, 429, 400])
    for status, retryable in ((500, True), (429, True), (400, False)):
        with pytest.raises(ProviderError) as info:
            await collect(p, request())
        assert info.value.retryable is retryable, status
        assert str(status) in str(info.value)
    # the next attempt succeeds: what the runner's tenacity policy relies on
    assert text_of(await collect(p, request())) == recorded_text("text")
    assert (p.started, p.failed, p.finished, p.orphaned) == (4, 3, 1, 0)
    await p.close()


async def test_error_event_after_tokens_is_not_retryable(server: ReplayServer) -> None:
    p = provider(server.url_for("error_midstream"))
    got: list[ProviderEvent] = []
    with pytest.raises(ProviderError) as info:
        async with contextlib.aclosing(p.stream(request())) as stream:
            async for ev in stream:
                got.append(ev)
    assert text_of(got) == "Partial answer"
    assert info.value.retryable is False
    await p.close()


async def test_unreachable_upstream_is_retryable() -> None:
    p = provider("http://127.0.0.1:9/v1", connect_timeout_s=0.5)
    with pytest.raises(ProviderError) as info:
        await collect(p, request())
    assert info.value.retryable is True
    await p.close()


async def test_continue_from_sends_the_partial_answer_and_strips_a_restart(server: ReplayServer) -> None:
    p = provider(server.url_for("text"))
    # the model "restarts" its answer: the replayed text begins with what was already delivered
    events = await collect(p, request(continue_from="Hello from"))
    assert text_of(events) == recorded_text("text")[len("Hello from") :]
    sent = server.requests[-1]["messages"]
    assert sent[-2:] == [
        {"role": "assistant", "content": "Hello from"},
        {"role": "user", "content": CONTINUE_INSTRUCTION},
    ]
    await p.close()


def test_settings_from_env() -> None:
    s = OpenAISettings.from_env(
        {
            "TIDEWIRE_OPENAI_BASE_URL": "http://127.0.0.1:11434/v1",
            "TIDEWIRE_OPENAI_MODEL": "llama3.2",
            "TIDEWIRE_OPENAI_IDLE_TIMEOUT_S": "7.5",
            "TIDEWIRE_OPENAI_INCLUDE_USAGE": "0",
        }
    )
    assert (s.base_url, s.model, s.idle_timeout_s, s.include_usage) == (
        "http://127.0.0.1:11434/v1",
        "llama3.2",
        7.5,
        False,
    )
    with pytest.raises(ValueError):
        OpenAISettings(first_token_timeout_s=0)


# ---- pure pieces ----------------------------------------------------------------------------------


def test_tool_messages_attach_to_the_preceding_assistant_text() -> None:
    msgs = [
        ChatMessage(role="user", text="q"),
        ChatMessage(role="assistant", text="Let me see."),
        ChatMessage(role="tool", text="r", tool_call_id="c1", name="clock"),
    ]
    out = to_openai_messages(msgs)
    assert out[1] == {
        "role": "assistant",
        "content": "Let me see.",
        "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "clock", "arguments": "{}"}}],
    }
    assert out[2] == {"role": "tool", "tool_call_id": "c1", "content": "r"}
    prefill = to_openai_messages(msgs[:1], continue_from="Par", continuation="prefill")
    assert prefill[-1] == {"role": "assistant", "content": "Par"}


def test_surrogate_joiner_never_emits_half_a_pair() -> None:
    j = SurrogateJoiner()
    assert j.feed("a\ud83d") == "a"
    assert j.feed("\udc4d b") == "👍 b"
    assert j.feed("\ud83d") == "" and j.flush() == "\ufffd"


def test_prefix_stripper() -> None:
    s = PrefixStripper("Hello wor")
    assert s.feed("Hel") == "" and s.feed("lo wo") == "" and s.feed("rld") == "ld"
    s = PrefixStripper("Hello")
    assert s.feed("He") == "" and s.feed("y") == "Hey"
    s = PrefixStripper("Hello")
    assert s.feed("Hel") == "" and s.flush() == "Hel"


def test_assembler_rejects_malformed_arguments_and_synthesises_ids() -> None:
    a = ToolCallAssembler()
    a.feed(0, None, "clock", "")
    ((call, raw),) = a.finish("seed")
    assert call.call_id.startswith("call_") and call.args == {} and raw == "{}"
    b = ToolCallAssembler()
    b.feed(0, "c", "calculator", '{"expression": ')
    with pytest.raises(ValueError, match="malformed"):
        b.finish("seed")


# ---- the upstream gate (orchestrator.upstream) ------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_gate_caps_concurrency_and_measures_queue_time() -> None:
    from orchestrator.upstream import GateSettings, UpstreamGate

    waits: list[float] = []
    gate = UpstreamGate("u", GateSettings(max_concurrency=2, breaker=False), on_wait=waits.append)
    running = 0
    peak = 0

    async def one() -> None:
        nonlocal running, peak
        async with gate.slot():
            running += 1
            peak = max(peak, running)
            await asyncio.sleep(0.05)
            running -= 1

    await asyncio.gather(*(one() for _ in range(6)))
    assert peak == 2
    assert len(waits) == 6 and max(waits) >= 0.08  # the last pair queued behind two rounds
    assert gate.queue_waits == 6
    assert gate.in_use == 0 and gate.waiting == 0


async def test_breaker_opens_on_consecutive_failures_then_half_opens_after_cooldown() -> None:
    from orchestrator.upstream import BreakerState, CircuitOpen, GateSettings, UpstreamGate

    clock = FakeClock()
    gate = UpstreamGate("u", GateSettings(failure_threshold=3, cooldown_s=10, min_calls=100), clock=clock)
    transient = ProviderError("boom", retryable=True)
    for _ in range(3):
        with pytest.raises(ProviderError):
            async with gate.slot():
                raise transient
    assert gate.is_open and gate.state is BreakerState.OPEN
    with pytest.raises(CircuitOpen) as info:
        async with gate.slot():
            pass
    assert info.value.retryable is False and info.value.retry_after_s == pytest.approx(10)
    clock.now += 10.5
    assert gate.state is BreakerState.HALF_OPEN and not gate.is_open
    # one probe at a time while half-open; its success closes the breaker
    async with gate.slot():
        with pytest.raises(CircuitOpen):
            async with gate.slot():
                pass
    assert gate.state is BreakerState.CLOSED


async def test_breaker_opens_on_error_ratio_and_ignores_non_upstream_errors() -> None:
    from orchestrator.upstream import GateSettings, UpstreamGate

    clock = FakeClock()
    gate = UpstreamGate(
        "u", GateSettings(failure_threshold=100, error_ratio=0.5, min_calls=4, window_s=30), clock=clock
    )
    poison = ProviderError("bad request", retryable=False)
    for _ in range(10):  # a poison turn is the request's fault, not the upstream's
        gate.record_outcome(poison)
    assert not gate.is_open
    for failed in (True, False, True, False):
        gate.record_failure() if failed else gate.record_success()
    assert gate.is_open
    clock.now += 1000
    assert not gate.is_open


async def test_router_sends_each_route_to_its_upstream_through_its_gate(server: ReplayServer) -> None:
    from orchestrator.providers.simulated import SimulatedProvider, SimulatedSettings
    from orchestrator.upstream import GateSettings, UpstreamRouter

    sim = SimulatedProvider(SimulatedSettings(rate=0, tokens=5))
    oai = provider(server.url_for("text"))
    built: list[str] = []

    def factory(name: str) -> Any:
        built.append(name)
        if name == "openai":
            return oai
        raise ValueError(f"unknown provider {name!r}")

    from shared import promtext, telemetry

    waits_before = promtext.parse(telemetry.render_prometheus()).value(
        "tidewire_upstream_queue_wait_seconds_count", upstream="openai"
    )
    router = UpstreamRouter(sim, factory=factory, settings_for=lambda n: GateSettings(max_concurrency=4))
    assert router.name == "simulated"
    assert text_of(await collect(router, request())) == sim.full_answer(request())  # type: ignore[arg-type]
    assert text_of(await collect(router, request(model="openai:gpt-4o"))) == recorded_text("text")  # type: ignore[arg-type]
    assert server.requests[-1]["model"] == "gpt-4o"
    assert built == ["openai"]
    # a colon after an unknown name is part of a model name (Ollama: "llama3.2:3b")
    await collect(router, request(model="llama3.2:3b"))  # type: ignore[arg-type]

    def no_upstream(name: str) -> Any:
        raise ValueError(f"{name}: no API key")

    unbuildable = UpstreamRouter(sim, factory=no_upstream)
    with pytest.raises(ProviderError) as info:
        await collect(unbuildable, request(model="openai:gpt-4o"))  # type: ignore[arg-type]
    assert info.value.retryable is False
    assert (router.started, router.finished, router.orphaned) == (3, 3, 0)
    assert set(router.gates) == {"simulated", "openai"}
    page = promtext.parse(telemetry.render_prometheus())
    assert page.value("tidewire_upstream_queue_wait_seconds_count", upstream="openai") - waits_before == 1
    assert page.value("tidewire_upstream_breaker_open", default=-1, upstream="openai") == 0
    assert json.loads(json.dumps(router.snapshot()))["openai"]["state"] == "closed"
    await oai.close()
