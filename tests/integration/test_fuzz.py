"""Bad input never hurts: every malformed, mistyped, oversized, nested, mis-encoded or flooding input
gets an `error` frame (or a defined close), the gateway stays up, and other sessions stream on
undisturbed. The hypothesis fuzz throws thousands of generated frames at a live gateway while a
well-behaved client streams an answer on another session, whose text must come out exact."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import aiohttp
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from gateway.settings import GatewaySettings
from proto import client
from tests.integration.conftest import make_token, stack_env
from tests.integration.wsclient import WsTestClient
from tests.waits import within
from tidewire import invariants
from tidewire.dev.stack import Stack, free_port, wait_http

MAX_FRAME = 64 * 1024  # the gateway default
FUZZ_FRAMES = 5000
FUZZ_CONNECTIONS = 8
BATCH = 50


@pytest.fixture(scope="module")
def fuzz_stack(infra, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """A gateway whose rate limits are out of the way (so every frame reaches the parser), one
    orchestrator for the well-behaved client, and a second gateway with the default limits (floods)."""
    limits = (
        "frame_rate_per_s",
        "frame_burst",
        "msg_rate_per_s",
        "msg_burst",
        "subject_msg_rate_per_s",
        "subject_msg_burst",
        "max_connections_per_subject",
    )
    unlimited = {f"TIDEWIRE_{name.upper()}": "1000000" for name in limits}
    defaults = {f"TIDEWIRE_{name.upper()}": str(getattr(GatewaySettings(), name)) for name in limits}
    s = Stack(
        infra_env=stack_env(infra),
        extra_env=unlimited,
        log_dir=tmp_path_factory.mktemp("fuzz-logs"),
        orchestrators=1,
        tool_workers=0,
    )
    s.start()
    port = free_port()
    flood = s.service(
        "gateway-flood",
        "gateway",
        {"TIDEWIRE_HTTP_PORT": str(port), "TIDEWIRE_GATEWAY_ID": "gateway-flood", **defaults},
    )
    flood.env["port"] = str(port)
    wait_http(f"http://127.0.0.1:{port}/readyz", proc=flood)
    try:
        yield s
    finally:
        s.stop()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as s:
        yield s


def _ws_url(base: str, token: str) -> str:
    return base.replace("http", "ws", 1) + f"/v1/ws?access_token={token}"


async def _frame(ws: aiohttp.ClientWebSocketResponse, what: str, timeout: float = 10) -> client.ServerFrame:
    """The next protocol frame; fails naming `what` on a silent server or a close."""
    msg = await within(ws.receive(), timeout=timeout, what=what)
    assert msg.type == aiohttp.WSMsgType.TEXT, f"{what}: got {msg.type.name} (close code {ws.close_code})"
    return client.server_frame_decoder.decode(msg.data)


async def _open(http: aiohttp.ClientSession, base: str, token: str) -> aiohttp.ClientWebSocketResponse:
    ws = await http.ws_connect(_ws_url(base, token), max_msg_size=0)
    await ws.send_str('{"type":"hello"}')
    ready = await _frame(ws, "ready after hello")
    assert isinstance(ready, client.Ready), ready
    return ws


async def _answers_until_pong(
    ws: aiohttp.ClientWebSocketResponse, timeout: float = 30
) -> list[client.ServerFrame]:
    """Sends a ping marker and returns every frame received before its pong."""
    await ws.send_str('{"type":"ping"}')
    out: list[client.ServerFrame] = []
    try:
        async with asyncio.timeout(timeout):
            while True:
                msg = await ws.receive()
                assert msg.type == aiohttp.WSMsgType.TEXT, (msg, ws.close_code)
                frame = client.server_frame_decoder.decode(msg.data)
                if isinstance(frame, client.Pong):
                    return out
                out.append(frame)
    except TimeoutError:
        raise AssertionError(
            f"no pong to the marker ping within {timeout:g} s; {len(out)} frames before it, "
            f"last: {[type(f).__name__ for f in out[-5:]]}"
        ) from None


async def _closed_with(ws: aiohttp.ClientWebSocketResponse, timeout: float = 10) -> int | None:
    seen: list[str] = []
    try:
        async with asyncio.timeout(timeout):
            while True:
                msg = await ws.receive()
                if msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.CLOSING):
                    return ws.close_code
                seen.append(str(msg.data)[:80])
    except TimeoutError:
        raise AssertionError(
            f"the server did not close the connection within {timeout:g} s; got instead: {seen[-5:]}"
        ) from None


def _codes(frames: list[client.ServerFrame]) -> list[str]:
    assert all(isinstance(f, client.Error) for f in frames), frames
    return [f.code for f in frames]  # type: ignore[union-attr]


async def _healthy(http: aiohttp.ClientSession, stack: Stack) -> None:
    assert stack.by_name("gateway").alive()
    async with http.get(f"{stack.url}/healthz") as r:
        assert r.status == 200


# ---- each kind of bad input, with its defined answer ---------------------------------------------

MALFORMED = [
    "",
    " ",
    "{",
    "}",
    "[",
    '{"type":',
    '{"type":"send"',
    "null",
    "true",
    "42",
    '"str"',
    "[]",
    "{}",
    "{'type': 'ping'}",
    '{"type":"ping",}',
    "\u00ff\u00fe",
    "ping",
    '{"type":"ping"}{"type":"ping"}',
    '{"type": NaN}',
    "\x00",
    "\ufeff{}",
]
WRONG_TYPES = [
    {"type": "send", "client_msg_id": 1, "text": "x"},
    {"type": "send", "client_msg_id": "a", "text": None},
    {"type": "send", "client_msg_id": "a", "text": ["x"]},
    {"type": "send", "client_msg_id": "a"},
    {"type": "send", "text": "x"},
    {"type": "send", "client_msg_id": "a", "text": "x", "attachments": "nope"},
    {"type": "send", "client_msg_id": "a", "text": "x", "attachments": [{"media": 1}]},
    {"type": "hello", "last_seen_seq": "3"},
    {"type": "hello", "delivery": "carrier-pigeon"},
    {"type": "stop", "turn_id": 7},
    {"type": 5},
    {"type": None},
    {"type": ["ping"]},
    {"kind": "ping"},
]
UNKNOWN = [
    {"type": t}
    for t in (
        "pingg",
        "PING",
        "Ping",
        "message",
        "ack",
        "ready",
        "error",
        "delta",
        "",
        " ping",
        "x" * 1000,
        "__proto__",
        "constructor",
    )
]
BAD_VALUES = [
    {"type": "send", "client_msg_id": "", "text": "x"},
    {"type": "send", "client_msg_id": "c" * 129, "text": "x"},
    {"type": "send", "client_msg_id": "a", "text": ""},
    {"type": "send", "client_msg_id": "a", "text": " \n\t "},
    {"type": "send", "client_msg_id": "a", "text": "nul \u0000 byte"},
    {"type": "send", "client_msg_id": "nul\u0000", "text": "x"},
    {"type": "hello"},  # a second hello on the connection
]


async def test_malformed_mistyped_and_unknown_frames_get_bad_frame(fuzz_stack, http) -> None:
    ws = await _open(http, fuzz_stack.url, make_token())
    try:
        for raw in MALFORMED:
            await ws.send_str(raw)
        assert set(_codes(await _answers_until_pong(ws))) == {"bad_frame"}
        frames = [json.dumps(f) for f in (*WRONG_TYPES, *UNKNOWN, *BAD_VALUES)]
        for raw in frames:
            await ws.send_str(raw)
        answers = _codes(await _answers_until_pong(ws))
        assert len(answers) == len(frames) and set(answers) == {"bad_frame"}
    finally:
        await ws.close()


async def test_escaped_lone_surrogates_are_bad_frames(fuzz_stack, http) -> None:
    ws = await _open(http, fuzz_stack.url, make_token())
    try:
        samples = [
            '{"type":"send","client_msg_id":"a","text":"\\ud800"}',
            '{"type":"send","client_msg_id":"a","text":"x\\udc00y"}',
            '{"type":"send","client_msg_id":"\\udbff","text":"x"}',
            '{"type":"hello","session_id":"\\ud83d"}',
        ]
        for raw in samples:
            await ws.send_str(raw)
        assert _codes(await _answers_until_pong(ws)) == ["bad_frame"] * len(samples)
    finally:
        await ws.close()


async def test_deeply_nested_json_is_a_bad_frame(fuzz_stack, http) -> None:
    ws = await _open(http, fuzz_stack.url, make_token())
    try:
        for depth in (5_000, 10_000):  # the deepest still fits in max_frame_bytes
            await ws.send_str("[" * depth + "]" * depth)
            await ws.send_str('{"type":"ping","x":' + "[" * depth + "]" * depth + "}")
            await ws.send_str(
                '{"type":"send","client_msg_id":' + '{"a":' * depth + "1" + "}" * depth + ',"text":"x"}'
            )
        assert _codes(await _answers_until_pong(ws)) == ["bad_frame"] * 6
    finally:
        await ws.close()


async def test_binary_frames_get_bad_frame(fuzz_stack, http) -> None:
    ws = await _open(http, fuzz_stack.url, make_token())
    try:
        for payload in (b"", b"\x00\x01", b'{"type":"ping"}', bytes(range(256)) * 100):
            await ws.send_bytes(payload)
        assert _codes(await _answers_until_pong(ws)) == ["bad_frame"] * 4
    finally:
        await ws.close()


async def test_huge_strings_get_too_large_or_a_1009_close(fuzz_stack, http) -> None:
    token = make_token()
    ws = await _open(http, fuzz_stack.url, token)
    try:
        for n in (MAX_FRAME + 1, MAX_FRAME * 2, MAX_FRAME * 4 - 100):
            await ws.send_str(json.dumps({"type": "send", "client_msg_id": "a", "text": "h" * n}))
        await ws.send_str(
            json.dumps({"type": "send", "client_msg_id": "a", "text": "h" * 40_000})
        )  # > max_text_chars
        assert _codes(await _answers_until_pong(ws)) == ["too_large"] * 4
        await ws.send_str("z" * (MAX_FRAME * 4 + 1))
        assert await _closed_with(ws) == 1009
    finally:
        await ws.close()


async def test_invalid_utf8_in_a_text_frame_closes_with_1007(fuzz_stack, http) -> None:
    for payload in (b"\xff\xfe", b'{"type":"ping","x":"\xed\xa0\x80"}', b"\xc3\x28", b"ok\xe2\x82"):
        ws = await _open(http, fuzz_stack.url, make_token())
        try:
            await ws.send_frame(payload, aiohttp.WSMsgType.TEXT)
            assert await _closed_with(ws) == 1007
        finally:
            await ws.close()


async def test_frames_before_hello_are_answered_and_hello_still_works(fuzz_stack, http) -> None:
    async with http.ws_connect(_ws_url(fuzz_stack.url, make_token())) as ws:
        for raw in ('{"type":"send","client_msg_id":"a","text":"x"}', "garbage", '{"type":"stop"}'):
            await ws.send_str(raw)
        await ws.send_bytes(b"bin")
        for i in range(4):
            f = await _frame(ws, f"the bad_frame answer to pre-hello frame {i + 1} of 4")
            assert isinstance(f, client.Error) and f.code == "bad_frame"
        await ws.send_str('{"type":"hello"}')
        assert isinstance(await _frame(ws, "ready after a late hello"), client.Ready)


async def test_bad_http_bodies_are_400_never_500(fuzz_stack, http) -> None:
    token = make_token()
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    async with http.post(f"{fuzz_stack.url}/v1/sessions", headers=headers) as r:
        sid = (await r.json())["session_id"]
    bodies = [
        b"{",
        b"null",
        b"[]",
        b'"x"',
        b"\xff\xfe",
        b'{"client_msg_id":"a","text":"\xed\xa0\x80"}',
        b'{"client_msg_id":"a","text":"\\ud800"}',
        b'{"client_msg_id":"a","text":"\\u0000"}',
        b"[" * 20_000 + b"]" * 20_000,
        b'{"client_msg_id":1,"text":"x"}',
        b'{"client_msg_id":"a"}',
        b'{"client_msg_id":"a","text":"   "}',
    ]
    for body in bodies:
        async with http.post(f"{fuzz_stack.url}/v1/sessions/{sid}/messages", data=body, headers=headers) as r:
            assert r.status == 400, (body[:60], r.status, await r.text())
            assert (await r.json())["code"] == "bad_frame"
    flag_bodies = [
        b"[1]",
        b'{"double_text_policy": 3}',
        b'{"nope": 1}',
        b'{"disconnect_policy": "cancel_after=x"}',
        b'{"model": {"a": 1}}',
        b"\xc3\x28",
        b"{" * 50_000,
    ]
    for body in flag_bodies:
        async with http.patch(f"{fuzz_stack.url}/v1/sessions/{sid}/flags", data=body, headers=headers) as r:
            assert r.status == 400, (body[:60], r.status, await r.text())
    for body in (b'{"flags": []}', b'{"flags": {"nope": 1}}', b"\xff", b"[" * 50_000):
        async with http.post(f"{fuzz_stack.url}/v1/sessions", data=body, headers=headers) as r:
            assert r.status == 400, (body[:60], r.status, await r.text())
    for query in ("after=x", "after=-1", "wait_s=nan", "wait_s=inf", "after=" + "9" * 5000, "wait_s=1e400"):
        async with http.get(f"{fuzz_stack.url}/v1/sessions/{sid}/poll?{query}", headers=headers) as r:
            assert r.status == 400, (query[:40], r.status, await r.text())
    await _healthy(http, fuzz_stack)


async def test_a_frame_flood_is_rate_limited_answered_and_the_connection_recovers(fuzz_stack, http) -> None:
    base = f"http://127.0.0.1:{fuzz_stack.by_name('gateway-flood').env['port']}"
    async with WsTestClient(fuzz_stack.url, make_token("bystander")) as bystander:
        await bystander.connect()
        ws = await _open(http, base, make_token(f"flood-{uuid.uuid4().hex[:6]}"))
        try:
            n = 1000
            for _ in range(n // 2):
                await ws.send_str('{"type":"nonsense"}')
                await ws.send_bytes(b"\x00")
            answers = _codes(
                [await _frame(ws, f"the answer to flood frame {i + 1} of {n}") for i in range(n)]
            )  # every frame is answered, in order
            limited = answers.count("rate_limited")
            assert limited >= n - 260 and answers.count("bad_frame") == n - limited
            await asyncio.sleep(0.5)
            await ws.send_str('{"type":"nonsense"}')
            assert _codes(await _answers_until_pong(ws)) == ["bad_frame"]  # recovered
        finally:
            await ws.close()
        ack = await bystander.ack_for(await bystander.send_message("/sim tokens=20\nstill fine?"))
        end = await bystander.until_turn_end(ack.turn_id)
        assert end.status == "completed"
    await _healthy(http, fuzz_stack)


async def test_one_flooding_connection_does_not_starve_the_others(fuzz_stack, http) -> None:
    """On a gateway without rate limits, a connection blasting frames is still interleaved with the
    others: the receive loop yields every few frames, so a neighbour's ping is answered promptly."""
    flooder = await _open(http, fuzz_stack.url, make_token("flooder"))
    neighbour = await _open(http, fuzz_stack.url, make_token("neighbour"))
    n = 30_000
    answered = 0

    async def flood() -> None:
        for _ in range(n // 1000):
            for _ in range(1000):
                await flooder.send_str('{"type":"pingg"}')
            await asyncio.sleep(0)

    async def drain() -> None:
        nonlocal answered
        try:
            async with asyncio.timeout(60):
                while answered < n:
                    msg = await flooder.receive()
                    assert msg.type == aiohttp.WSMsgType.TEXT, (msg, flooder.close_code)
                    answered += 1
        except TimeoutError:
            raise AssertionError(f"only {answered} of the {n} flood frames answered within 60 s") from None

    async def probe() -> list[float]:
        latencies = []
        deadline = time.monotonic() + 90
        while answered < n:
            assert time.monotonic() < deadline, (
                f"probing for 90 s; only {answered} of {n} flood frames answered"
            )
            t0 = time.perf_counter()
            await neighbour.send_str('{"type":"ping"}')
            f = await _frame(neighbour, f"the neighbour's pong during the flood ({answered} of {n} answered)")
            assert isinstance(f, client.Pong)
            latencies.append(time.perf_counter() - t0)
            await asyncio.sleep(0.02)
        return latencies

    try:
        _, _, latencies = await asyncio.gather(flood(), drain(), probe())
    finally:
        await flooder.close()
        await neighbour.close()
    latencies.sort()
    print(
        f"neighbour pong latency during a {n}-frame flood: median {latencies[len(latencies) // 2] * 1000:.1f} ms, "
        f"max {latencies[-1] * 1000:.1f} ms over {len(latencies)} pings"
    )
    assert len(latencies) >= 3
    assert latencies[len(latencies) // 2] < 0.1 and latencies[-1] < 1.0


# ---- the hypothesis fuzz ---------------------------------------------------------------------------

_text = st.text(alphabet=st.characters(exclude_categories=["Cs"]), max_size=200)
_json_leaf = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | _text
_json = st.recursive(
    _json_leaf,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(_text, inner, max_size=5),
    max_leaves=20,
)
_VALID_TYPES = {"hello", "send", "stop", "ping"}
_not_str = (
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.lists(_text, max_size=3)
)


@dataclass(frozen=True)
class Bad:
    kind: str
    payload: str | bytes


def _dump(obj: object) -> str:
    return json.dumps(obj, ensure_ascii=False)


bad_frames = st.one_of(
    _text.map(lambda s: Bad("text", s)),
    _json.filter(lambda v: not (isinstance(v, dict) and str(v.get("type")) in _VALID_TYPES)).map(
        lambda v: Bad("json", _dump(v))
    ),
    st.builds(
        lambda t, extra: Bad("unknown_type", _dump({**extra, "type": t})),
        _text.filter(lambda t: t not in _VALID_TYPES),
        st.dictionaries(_text, _json_leaf, max_size=3),
    ),
    st.builds(
        lambda cmid, text: Bad(
            "send_wrong_types", _dump({"type": "send", "client_msg_id": cmid, "text": text})
        ),
        _not_str | _text,
        _not_str,
    ),
    st.builds(
        lambda cmid: Bad("send_bad_id", _dump({"type": "send", "client_msg_id": cmid, "text": "x"})),
        st.just("") | st.integers(min_value=129, max_value=400).map(lambda n: "c" * n),
    ),
    st.builds(
        lambda ws: Bad("send_blank", _dump({"type": "send", "client_msg_id": "b", "text": ws})),
        st.text(alphabet=" \t\n\r\u3000\u2003", max_size=20),
    ),
    st.builds(
        lambda seq, delivery: Bad(
            "hello_wrong", _dump({"type": "hello", "last_seen_seq": seq, "delivery": delivery})
        ),
        _not_str.filter(lambda v: not isinstance(v, int) or isinstance(v, bool)) | st.integers(),
        _text,
    ),
    st.builds(
        lambda v: Bad("stop_wrong", _dump({"type": "stop", "turn_id": v})),
        st.integers() | st.booleans() | st.lists(_text, max_size=2),
    ),
    st.integers(min_value=1, max_value=5000).map(
        lambda d: Bad("nested", '{"type":"send","client_msg_id":' + "[" * d + "]" * d + ',"text":"x"}')
    ),
    st.integers(min_value=1001, max_value=40_000).map(lambda d: Bad("deep", "[" * d + "]" * d)),
    st.sampled_from(["\\ud800", "\\udfff", "x\\ud834y", "\\u0000"]).map(
        lambda s: Bad("surrogate", '{"type":"send","client_msg_id":"s","text":"' + s + '"}')
    ),
    st.integers(min_value=MAX_FRAME + 1, max_value=MAX_FRAME + 4096).map(
        lambda n: Bad("huge", _dump({"type": "send", "client_msg_id": "h", "text": "h" * n}))
    ),
    st.binary(max_size=300).map(lambda b: Bad("binary", b)),
)


def generate_bad_frames(n: int) -> list[Bad]:
    """`n` or more frames from the strategy above (hypothesis generates; nothing is sent yet)."""
    out: list[Bad] = []

    @settings(
        max_examples=n // 5 + 50,
        database=None,
        deadline=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(st.lists(bad_frames, min_size=5, max_size=8))
    def collect(frames: list[Bad]) -> None:
        out.extend(frames)

    collect()
    return out


@pytest.mark.slow
@pytest.mark.timeout(240)
async def test_hypothesis_fuzz_thousands_of_bad_frames_while_a_good_client_streams(fuzz_stack, http) -> None:
    frames = generate_bad_frames(FUZZ_FRAMES)
    assert len(frames) >= FUZZ_FRAMES
    kinds = {f.kind for f in frames}
    assert {"text", "json", "binary", "huge", "surrogate", "deep", "nested"} <= kinds, kinds
    t0 = time.monotonic()

    async def good_client() -> invariants.TurnView:
        async with WsTestClient(fuzz_stack.url, make_token(f"good-{uuid.uuid4().hex[:6]}")) as c:
            await c.connect()
            ack = await c.ack_for(
                await c.send_message("/sim tokens=400 rate=120\na long answer while fuzzed")
            )
            end = await c.until_turn_end(ack.turn_id, timeout=120)
            assert end.status == "completed"
            invariants.check_seqs(c.events)
            return invariants.check_turns(c.events)[ack.turn_id]

    async def fuzz_connection(i: int, share: list[Bad]) -> tuple[int, int, list[str]]:
        ws = await _open(http, fuzz_stack.url, make_token(f"fuzz-{i}"))
        sent = answered = 0
        codes: list[str] = []
        try:
            for start in range(0, len(share), BATCH):
                batch = share[start : start + BATCH]
                for bad in batch:
                    if isinstance(bad.payload, bytes):
                        await ws.send_bytes(bad.payload)
                    else:
                        await ws.send_str(bad.payload)
                answers = _codes(await _answers_until_pong(ws))
                sent += len(batch)
                answered += len(answers)
                codes += answers
                assert len(answers) >= len(batch), (i, start, len(answers), len(batch))
        finally:
            await ws.close()
        return sent, answered, codes

    shares = [frames[i::FUZZ_CONNECTIONS] for i in range(FUZZ_CONNECTIONS)]
    good, *results = await asyncio.gather(
        good_client(), *(fuzz_connection(i, s) for i, s in enumerate(shares))
    )
    elapsed = time.monotonic() - t0
    sent = sum(r[0] for r in results)
    answered = sum(r[1] for r in results)
    codes = [c for r in results for c in r[2]]
    print(
        f"fuzz: {sent} bad frames over {FUZZ_CONNECTIONS} connections in {elapsed:.1f} s, {answered} errors "
        f"({ {c: codes.count(c) for c in sorted(set(codes))} }); good turn {len(good.text)} chars exact"
    )
    assert sent >= FUZZ_FRAMES and answered >= sent
    assert "internal" not in codes
    assert set(codes) <= {"bad_frame", "too_large"}
    assert good.ends and good.ends[0].text == good.text
    await _healthy(http, fuzz_stack)
