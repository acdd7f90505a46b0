"""Pure logic of the Python client (tidewire/client.py), without a server.

Frames are fed to `TidewireClient._handle_frame` directly; writes go to a recording stand-in for
the WebSocket, so resend, dedupe and error attribution are checked exactly.
"""

from __future__ import annotations

import asyncio
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proto import client
from tests.waits import eventually, within
from tidewire.client import TidewireClient, TidewireError, TurnAssembler, backoff_delay

# ---- backoff ------------------------------------------------------------------------------------


def test_backoff_full_jitter_stays_within_the_exponential_ceiling() -> None:
    rng = random.Random(7)
    for attempt in range(0, 40):
        ceiling = min(30.0, 0.25 * 2**attempt)
        for _ in range(200):
            delay = backoff_delay(attempt, 0.25, 30.0, rng.uniform)
            assert 0.0 <= delay <= ceiling


def test_backoff_ceiling_doubles_then_caps() -> None:
    top = [backoff_delay(n, 0.25, 30.0, lambda lo, hi: hi) for n in range(10)]
    assert top == [0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0]
    assert all(backoff_delay(n, 0.25, 30.0, lambda lo, hi: lo) == 0.0 for n in range(10))


def test_backoff_uses_the_whole_window_not_a_fixed_delay() -> None:
    rng = random.Random(1)
    delays = [backoff_delay(3, 0.25, 30.0, rng.uniform) for _ in range(2000)]
    assert min(delays) < 0.1 and max(delays) > 1.9  # ceiling is 2.0 s


def test_backoff_survives_absurd_attempt_numbers() -> None:
    assert 0.0 <= backoff_delay(10_000) <= 30.0
    assert 0.0 <= backoff_delay(-3) <= 0.25


# ---- turn assembly ------------------------------------------------------------------------------


def test_turn_text_from_in_order_deltas() -> None:
    a = TurnAssembler()
    assert a.apply(0, "Hello") == "Hello"
    assert a.apply(5, ", world") == ", world"
    assert a.text == "Hello, world"


def test_turn_text_from_out_of_order_deltas_waits_for_the_hole() -> None:
    a = TurnAssembler()
    assert a.apply(6, "world") == ""
    assert a.text == ""
    assert a.apply(0, "hello ") == "hello world"
    assert a.text == "hello world"


def test_turn_text_ignores_already_covered_ranges() -> None:
    a = TurnAssembler()
    a.apply(0, "abc")
    assert a.apply(0, "abc") == ""  # replayed
    assert a.apply(1, "bcdef") == "def"  # merged delta overlapping what was seen
    assert a.apply(2, "c") == ""
    assert a.text == "abcdef"


def test_turn_text_offsets_are_code_points_with_emoji() -> None:
    family = "👨\u200d👩\u200d👧"  # 5 code points, one grapheme
    a = TurnAssembler()
    a.apply(0, "hi ")
    a.apply(3 + len(family), " 🇫🇷!")
    a.apply(3, family)
    assert a.text == f"hi {family} 🇫🇷!"
    assert len(a) == 3 + 5 + 4


def test_turn_text_keeps_the_longest_chunk_waiting_at_one_offset() -> None:
    a = TurnAssembler()
    a.apply(3, "d")
    a.apply(3, "def")
    a.apply(0, "abc")
    assert a.text == "abcdef"


@settings(max_examples=200, deadline=None)
@given(text=st.text(min_size=1, max_size=60), data=st.data())
def test_turn_text_is_exact_for_any_split_order_and_overlap(text: str, data: st.DataObject) -> None:
    cuts = sorted(set(data.draw(st.lists(st.integers(1, len(text)), max_size=12)) + [0, len(text)]))
    pieces = [(a, text[a:b]) for a, b in zip(cuts, cuts[1:], strict=False)]
    # merged deltas: a piece extended over its neighbours, as phrases/batched delivery does
    merged = [(a, text[a : data.draw(st.integers(a + len(p), len(text)))]) for a, p in pieces]
    deliveries = pieces + data.draw(st.lists(st.sampled_from(merged), max_size=6))
    deliveries = data.draw(st.permutations(deliveries))
    assembler = TurnAssembler()
    for offset, chunk in deliveries:
        assembler.apply(offset, chunk)
    assert assembler.text == text


# ---- the client driven frame by frame -----------------------------------------------------------


class RecordingSocket:
    """Stands in for the WebSocket: records every frame written."""

    closed = False

    def __init__(self) -> None:
        self.frames: list[client.ClientFrame] = []

    async def send_str(self, data: str) -> None:
        self.frames.append(client.client_frame_decoder.decode(data))

    def sends(self) -> list[client.Send]:
        return [f for f in self.frames if isinstance(f, client.Send)]


def connected_client(
    **kwargs: object,
) -> tuple[TidewireClient, RecordingSocket, list[tuple[str, float | None]]]:
    states: list[tuple[str, float | None]] = []
    c = TidewireClient(
        "http://gateway.test", "tok", session_id="s1", on_state=lambda s, r: states.append((s, r)), **kwargs
    )  # type: ignore[arg-type]
    sock = RecordingSocket()
    c._ws = sock  # type: ignore[assignment]
    c._handle_frame(client.Ready(session_id="s1", last_seq=0))
    return c, sock, states


def delta(seq: int, offset: int, text: str, turn: str = "t1") -> client.Delta:
    return client.Delta(seq=seq, turn_id=turn, offset=offset, text=text)


def queued(c: TidewireClient) -> list[client.Event]:
    out = []
    while not c._queue.empty():
        ev = c._queue.get_nowait()
        assert ev is not None
        out.append(ev)
    return out


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


def test_ws_url_is_derived_from_the_http_base() -> None:
    c = TidewireClient("https://chat.example.com/tw/", "a b")
    assert str(c._ws_url()) == "wss://chat.example.com/tw/v1/ws?access_token=a+b"
    assert str(TidewireClient("http://h:8080", "t")._ws_url()) == "ws://h:8080/v1/ws?access_token=t"


async def test_events_already_seen_are_dropped_once_each() -> None:
    c, _, _ = connected_client()
    frames = [
        client.TurnStart(seq=1, turn_id="t1"),
        delta(2, 0, "ab"),
        delta(3, 2, "cd"),
        delta(2, 0, "ab"),
        delta(3, 2, "cd"),  # replay overlap after a resume
        delta(5, 4, "ef"),  # merged delta: seq of its last member, a jump is not a gap
        delta(4, 4, "e"),
        client.TurnEnd(seq=6, turn_id="t1", status="completed", text="abcdef"),
    ]
    for f in frames:
        c._handle_frame(f)
    assert [e.seq for e in queued(c)] == [1, 2, 3, 5, 6]
    assert c.duplicates_dropped == 3
    assert c.last_seen_seq == 6
    assert c.turn_text("t1") == "abcdef"


async def test_ready_with_reset_continues_from_the_servers_last_seq() -> None:
    c, _, states = connected_client()
    c._handle_frame(delta(9, 0, "x"))
    c._handle_frame(client.Ready(session_id="s1", last_seq=4, reset=True))
    assert (c.last_seen_seq, c.resets, c.reconnects, c.resumes) == (4, 1, 1, 0)
    assert ("reset", None) in states and c.state == "connected"
    c._handle_frame(delta(5, 0, "y", turn="t2"))
    assert [e.seq for e in queued(c)] == [9, 5]


async def test_send_resolves_on_its_ack_and_resends_after_reconnect_with_the_same_id() -> None:
    c, sock, _ = connected_client()
    sending = asyncio.create_task(c.send("hi", client_msg_id="m1"))
    await settle()
    assert [f.client_msg_id for f in sock.sends()] == ["m1"]
    # the connection drops before the ack; the next `ready` resends the message
    c._connected.clear()
    c._generation += 1
    c._handle_frame(client.Ready(session_id="s1", last_seq=0))
    await c._flush_unacked()
    assert [f.client_msg_id for f in sock.sends()] == ["m1", "m1"]
    assert c.resends == 1 and c.unacked == 1
    c._handle_frame(client.Ack(client_msg_id="m1", seq=1, turn_id="t1", duplicate=True))
    ack = await within(sending, timeout=1, what="send() returning on the duplicate ack of the resent m1")
    assert ack.turn_id == "t1" and c.unacked == 0


async def test_send_while_offline_is_written_when_ready() -> None:
    c = TidewireClient("http://gateway.test", "tok", session_id="s1")
    sock = RecordingSocket()
    sending = asyncio.create_task(c.send("queued", client_msg_id="m1"))
    await settle()
    c._ws = sock  # type: ignore[assignment]
    c._handle_frame(client.Ready(session_id="s1", last_seq=0))
    await c._flush_unacked()
    assert [f.client_msg_id for f in sock.sends()] == ["m1"] and c.resends == 0
    c._handle_frame(client.Ack(client_msg_id="m1", seq=1, turn_id="t1", duplicate=False))
    assert (
        await within(sending, timeout=1, what="send() returning on the ack of m1 written once ready")
    ).seq == 1


async def test_an_error_without_ref_belongs_to_the_oldest_unanswered_request() -> None:
    c, _, _ = connected_client()
    first = asyncio.create_task(c.send("x" * 10, client_msg_id="m1"))
    await settle()
    second = asyncio.create_task(c.send("ok", client_msg_id="m2"))
    await settle()
    c._handle_frame(client.Error(code="too_large", message="text too long"))
    c._handle_frame(client.Ack(client_msg_id="m2", seq=1, turn_id="t1", duplicate=False))
    with pytest.raises(TidewireError) as refused:
        await within(first, timeout=1, what="m1's send() raising the ref-less error")
    assert refused.value.code == "too_large"
    assert (await within(second, timeout=1, what="m2's send() returning on its ack")).client_msg_id == "m2"


async def test_an_error_with_ref_names_its_message() -> None:
    c, _, _ = connected_client()
    first = asyncio.create_task(c.send("a", client_msg_id="m1"))
    second = asyncio.create_task(c.send("b", client_msg_id="m2"))
    await settle()
    c._handle_frame(client.Error(code="bad_frame", message="no", ref="m2"))
    with pytest.raises(TidewireError):
        await within(second, timeout=1, what="m2's send() raising the error that names it")
    c._handle_frame(client.Ack(client_msg_id="m1", seq=1, turn_id="t1", duplicate=False))
    assert (await within(first, timeout=1, what="m1's send() returning on its ack")).seq == 1


async def test_degraded_waits_retry_after_then_resends_the_same_id() -> None:
    c, sock, _ = connected_client()
    sending = asyncio.create_task(c.send("hi", client_msg_id="m1"))
    await settle()
    c._handle_frame(client.Error(code="degraded", message="shedding load", retry_after_ms=20))
    await settle()
    assert len(sock.sends()) == 1  # not before retry_after_ms
    await eventually(
        lambda: [f.client_msg_id for f in sock.sends()],
        timeout=2,
        interval=0.01,
        ok=lambda ids: len(ids) >= 2,
        what="the resend of m1 once retry_after_ms (20 ms) passed",
    )
    assert [f.client_msg_id for f in sock.sends()] == ["m1", "m1"] and c.resends == 1
    c._handle_frame(client.Ack(client_msg_id="m1", seq=1, turn_id="t1", duplicate=False))
    assert (
        await within(sending, timeout=1, what="send() returning on the ack after a resend")
    ).turn_id == "t1"


async def test_retryable_errors_give_up_after_a_bounded_number_of_resends() -> None:
    c, sock, _ = connected_client()
    sending = asyncio.create_task(c.send("hi", client_msg_id="m1"))
    await settle()
    for _ in range(10):
        if sending.done():
            break
        c._handle_frame(client.Error(code="rate_limited", message="slow down", retry_after_ms=1))
        await asyncio.sleep(0.01)
    with pytest.raises(TidewireError) as refused:
        await within(sending, timeout=2, what="send() giving up after its bounded resends")
    assert refused.value.code == "rate_limited" and refused.value.retry_after_ms == 1
    assert len(sock.sends()) == 6  # the first write and five resends


async def test_unacked_messages_are_bounded() -> None:
    c, _, _ = connected_client(max_unacked=2)
    waiting = [asyncio.create_task(c.send(str(i))) for i in range(2)]
    await settle()
    with pytest.raises(TidewireError) as refused:
        await c.send("one too many")
    assert refused.value.code == "rate_limited"
    for t in waiting:
        t.cancel()
    await asyncio.gather(*waiting, return_exceptions=True)
    assert c.unacked == 0


async def test_send_timeout_forgets_the_message() -> None:
    c, _, _ = connected_client()
    with pytest.raises(TimeoutError):
        await c.send("hi", timeout=0.01)
    assert c.unacked == 0


async def test_stop_is_accepted_when_the_following_pong_arrives() -> None:
    c, sock, _ = connected_client()
    stopping = asyncio.create_task(c.stop("t1"))
    await settle()
    assert [type(f) for f in sock.frames] == [client.Stop, client.Ping]
    c._handle_frame(client.Pong())
    await within(stopping, timeout=1, what="stop() returning on the pong that follows its stop")


async def test_stop_refused_raises() -> None:
    c, _, _ = connected_client()
    stopping = asyncio.create_task(c.stop("nope"))
    await settle()
    c._handle_frame(client.Error(code="not_found", message="no such turn"))
    c._handle_frame(client.Pong())
    with pytest.raises(TidewireError) as refused:
        await within(stopping, timeout=1, what="stop() raising the error answered before the pong")
    assert refused.value.code == "not_found"


async def test_ask_returns_the_turn_end_of_the_acked_turn() -> None:
    c, _, _ = connected_client()
    asking = asyncio.create_task(c.ask("hi", timeout=2))
    await settle()
    (cmid,) = c._unacked
    c._handle_frame(client.Message(seq=1, turn_id="t1", client_msg_id=cmid, role="user", text="hi"))
    # the turn may end before the ack is read: ask still finds it
    c._handle_frame(client.TurnStart(seq=2, turn_id="t1"))
    c._handle_frame(delta(3, 0, "hello 👋"))
    c._handle_frame(client.TurnEnd(seq=4, turn_id="t1", status="completed", text="hello 👋"))
    c._handle_frame(client.Ack(client_msg_id=cmid, seq=1, turn_id="t1", duplicate=False))
    end = await within(asking, timeout=1, what="ask() returning the turn_end that came before the ack")
    assert end.text == c.turn_text("t1") == "hello 👋"
    assert c.current_turn is None


async def test_events_iterator_yields_in_order_then_ends_after_close() -> None:
    c, _, _ = connected_client()
    for seq in (1, 2, 2, 3):
        c._handle_frame(delta(seq, seq - 1, "x"))
    await c.close()
    assert [e.seq async for e in c.events()] == [1, 2, 3]
    assert c.state == "offline"


async def test_full_queue_without_a_reader_drops_the_oldest() -> None:
    c, _, _ = connected_client(max_queued_events=3)
    for seq in range(1, 6):
        c._handle_frame(delta(seq, seq - 1, "x"))
    assert [e.seq for e in queued(c)] == [3, 4, 5]
    assert c.events_dropped == 2
    assert c.turn_text("t1") == "xxxxx"  # assembly does not depend on the queue


async def test_a_frame_type_added_later_is_skipped_without_losing_its_seq() -> None:
    c, _, _ = connected_client()
    assert c._decode('{"type":"reaction","seq":4,"emoji":"👍"}') is None
    assert c._decode('{"type":"notice","text":"hi"}') is None
    assert c.last_seen_seq == 4 and c.unknown_frames == 2
    assert isinstance(c._decode('{"type":"pong","extra":1}'), client.Pong)
