"""OutboundBuffer: merging never loses/reorders anything, modes hold and release as documented, bounds hold."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.delivery import (
    SLOW_CONSUMER_CLOSE_CODE,
    DeliveryMode,
    OutboundBuffer,
    SlowConsumer,
    ends_at_clause_boundary,
)
from proto.client import Ack, Delta, Pong, ServerFrame, Status, ToolCall, TurnEnd, TurnStart

MODES: list[DeliveryMode] = ["tokens", "phrases", "batched"]
FAR_FUTURE = 1e12


# ---- helpers -------------------------------------------------------------------------------------


@dataclass
class Script:
    frames: list[ServerFrame]
    texts: dict[str, str]  # turn_id -> full text


def check_output(pushed: list[ServerFrame], popped: list[ServerFrame]) -> None:
    """Every popped frame is either a pushed non-delta frame (same order) or a merge of consecutive pushed deltas."""
    i = 0
    for out in popped:
        assert i < len(pushed), f"extra frame {out!r}"
        if not isinstance(out, Delta):
            assert pushed[i] is out, f"expected {pushed[i]!r}, got {out!r}"
            i += 1
            continue
        first = pushed[i]
        assert isinstance(first, Delta)
        assert out.offset == first.offset, "merged offset is the first member's"
        assert out.turn_id == first.turn_id
        text = []
        while True:
            member = pushed[i]
            assert isinstance(member, Delta) and member.turn_id == out.turn_id, "merge crossed a non-delta"
            text.append(member.text)
            i += 1
            if member.seq == out.seq:
                break
            assert member.seq < out.seq, "merged seq is the last member's"
        assert "".join(text) == out.text
    assert i == len(pushed), f"{len(pushed) - i} frames never popped"
    seqs = [f.seq for f in popped if hasattr(f, "seq") and not isinstance(f, Ack)]
    assert seqs == sorted(set(seqs)), "seqs strictly increasing"


def turn_texts(popped: list[ServerFrame]) -> dict[str, str]:
    by_turn: dict[str, list[Delta]] = {}
    for f in popped:
        if isinstance(f, Delta):
            by_turn.setdefault(f.turn_id, []).append(f)
    out = {}
    for turn, ds in by_turn.items():
        ds.sort(key=lambda d: d.offset)
        pos = 0
        for d in ds:
            assert d.offset == pos, "gap or overlap in offsets"
            pos += len(d.text)
        out[turn] = "".join(d.text for d in ds)
    return out


@st.composite
def scripts(draw: st.DrawFn) -> Script:
    """Several turns of randomly chunked random Unicode text, with other events and control frames between."""
    seq = 0
    frames: list[ServerFrame] = []
    texts: dict[str, str] = {}

    def nxt() -> int:
        nonlocal seq
        seq += 1
        return seq

    for t in range(draw(st.integers(1, 3))):
        turn = f"t{t}"
        text = draw(
            st.text(alphabet=st.characters(codec="utf-8"), max_size=80)
            | st.sampled_from(
                ["Hello, world. How are you?\nFine!", "你好。我很好，谢谢！", "no boundary here at all"]
            )
        )
        texts[turn] = text
        frames.append(TurnStart(seq=nxt(), turn_id=turn))
        cuts = sorted(draw(st.lists(st.integers(0, len(text)), max_size=12)))
        bounds = [0, *cuts, len(text)]
        for a, b in zip(bounds, bounds[1:], strict=False):
            frames.append(Delta(seq=nxt(), turn_id=turn, offset=a, text=text[a:b]))
            extra = draw(st.integers(0, 9))
            if extra == 0:
                frames.append(Status(seq=nxt(), turn_id=turn, text="checking…"))
            elif extra == 1:
                frames.append(ToolCall(seq=nxt(), turn_id=turn, call_id="c", name="w", args={"q": 1}))
            elif extra == 2:
                frames.append(Pong())
        frames.append(TurnEnd(seq=nxt(), turn_id=turn, status="completed", text=text))
    return Script(frames, texts)


# ---- properties ------------------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(
    script=scripts(),
    mode=st.sampled_from(MODES),
    schedule=st.data(),
)
def test_random_push_pop_schedules_lose_nothing(
    script: Script, mode: DeliveryMode, schedule: st.DataObject
) -> None:
    buf = OutboundBuffer(mode, max_frames=10_000, max_chars=10_000_000, phrase_max_chars=20)
    now = 0.0
    popped: list[ServerFrame] = []
    for frame in script.frames:
        now += schedule.draw(st.sampled_from([0.0, 0.01, 0.1, 0.3, 0.6]))
        buf.push(frame, now)
        if schedule.draw(st.booleans()):
            d = buf.next_deadline()
            ready = buf.pop_ready(now)
            if ready:
                assert d is not None and d <= now
            popped += ready
    while len(buf):
        d = buf.next_deadline()
        assert d is not None
        popped += buf.pop_ready(max(d, now))
    assert buf.next_deadline() is None
    assert buf.held_chars == 0
    check_output(script.frames, popped)
    assert turn_texts(popped) == script.texts
    n_in = sum(isinstance(f, Delta) for f in script.frames)
    n_out = sum(isinstance(f, Delta) for f in popped)
    assert buf.merged_count == n_in - n_out


@settings(max_examples=100, deadline=None)
@given(script=scripts(), mode=st.sampled_from(MODES))
def test_pop_all_flushes_everything(script: Script, mode: DeliveryMode) -> None:
    buf = OutboundBuffer(mode, max_frames=10_000)
    for i, f in enumerate(script.frames):
        buf.push(f, i * 0.001)
    out = buf.pop_all(1.0)
    check_output(script.frames, out)
    assert len(buf) == 0


def test_clause_boundary() -> None:
    assert ends_at_clause_boundary("Hello, ")
    assert ends_at_clause_boundary("Hello.")
    assert ends_at_clause_boundary("Really?!  ")
    assert ends_at_clause_boundary('He said "hi." ')
    assert ends_at_clause_boundary("line\n")
    assert ends_at_clause_boundary("line\n  ")
    assert ends_at_clause_boundary("你好。")
    assert ends_at_clause_boundary("是的，")
    assert not ends_at_clause_boundary("e.g")
    assert not ends_at_clause_boundary("Hello")
    assert not ends_at_clause_boundary("Hello ")
    assert not ends_at_clause_boundary("")
    assert not ends_at_clause_boundary("   ")


# ---- tokens ------------------------------------------------------------------------------------------


def deltas(turn: str, chunks: list[str], seq0: int = 1) -> list[Delta]:
    out, off = [], 0
    for i, c in enumerate(chunks):
        out.append(Delta(seq=seq0 + i, turn_id=turn, offset=off, text=c))
        off += len(c)
    return out


def test_tokens_fast_reader_gets_every_delta_unchanged() -> None:
    buf = OutboundBuffer("tokens", tokens_merge_after=1)
    for i, d in enumerate(deltas("t", ["a", "b", "c"])):
        buf.push(d, float(i))
        assert buf.next_deadline() == float(i)
        assert buf.pop_ready(float(i)) == [d]
        assert buf.pop_ready(float(i)) == []
    assert buf.merged_count == 0


def test_tokens_slow_reader_gets_merged_frames_and_memory_stays_bounded() -> None:
    buf = OutboundBuffer("tokens", max_frames=4, tokens_merge_after=1)
    ds = deltas("t", ["x"] * 10_000)
    for d in ds:
        buf.push(d, 0.0)
    assert len(buf) == 1
    [out] = buf.pop_ready(0.0)
    assert out == Delta(seq=10_000, turn_id="t", offset=0, text="x" * 10_000)
    assert buf.merged_count == 9_999


def test_tokens_never_merges_across_other_events() -> None:
    buf = OutboundBuffer("tokens", tokens_merge_after=1)
    d1, d2 = deltas("t", ["ab", "cd"], seq0=1)
    st_ = Status(seq=3, turn_id="t", text="…")
    d3 = Delta(seq=4, turn_id="t", offset=4, text="ef")
    for f in (d1, d2, st_, d3):
        buf.push(f, 0.0)
    assert buf.pop_ready(0.0) == [Delta(seq=2, turn_id="t", offset=0, text="abcd"), st_, d3]


def test_non_contiguous_or_other_turn_deltas_are_not_merged() -> None:
    buf = OutboundBuffer("tokens", tokens_merge_after=1)
    a = Delta(seq=1, turn_id="t", offset=0, text="ab")
    gap = Delta(seq=2, turn_id="t", offset=5, text="zz")
    other = Delta(seq=3, turn_id="u", offset=7, text="q")
    for f in (a, gap, other):
        buf.push(f, 0.0)
    assert buf.pop_ready(0.0) == [a, gap, other]


# ---- phrases -----------------------------------------------------------------------------------------


def test_phrases_release_at_boundary_and_hold_otherwise() -> None:
    buf = OutboundBuffer("phrases", phrase_max_wait_s=0.4)
    d1, d2, d3 = deltas("t", ["Hello", ", wor", "ld. "])
    buf.push(d1, 0.0)
    assert buf.pop_ready(0.0) == []
    assert buf.next_deadline() == pytest.approx(0.4)
    buf.push(d2, 0.1)
    assert buf.pop_ready(0.1) == []  # "Hello, wor" does not end at a boundary
    buf.push(d3, 0.2)
    assert buf.next_deadline() == 0.2
    assert buf.pop_ready(0.2) == [Delta(seq=3, turn_id="t", offset=0, text="Hello, world. ")]
    assert buf.next_deadline() is None


def test_phrases_release_after_max_wait() -> None:
    buf = OutboundBuffer("phrases", phrase_max_wait_s=0.4)
    (d,) = deltas("t", ["no boundary"])
    buf.push(d, 1.0)
    assert buf.pop_ready(1.39) == []
    assert buf.next_deadline() == pytest.approx(1.4)
    assert buf.pop_ready(1.4) == [d]


def test_phrases_release_when_too_long() -> None:
    buf = OutboundBuffer("phrases", phrase_max_chars=10)
    ds = deltas("t", ["abcd", "efgh", "ijkl", "m"])
    for d in ds[:2]:
        buf.push(d, 0.0)
    assert buf.pop_ready(0.0) == []
    buf.push(ds[2], 0.0)
    assert buf.pop_ready(0.0) == [Delta(seq=3, turn_id="t", offset=0, text="abcdefghijkl")]
    buf.push(ds[3], 0.0)
    assert buf.pop_ready(0.0) == []


def test_phrases_non_delta_flushes_in_order() -> None:
    buf = OutboundBuffer("phrases")
    d1, d2 = deltas("t", ["The weather", " is"])
    end = TurnEnd(seq=3, turn_id="t", status="completed", text="The weather is")
    buf.push(d1, 0.0)
    buf.push(d2, 0.0)
    buf.push(end, 0.0)
    assert buf.pop_ready(0.0) == [Delta(seq=2, turn_id="t", offset=0, text="The weather is"), end]


def test_phrases_slow_reader_phrases_coalesce() -> None:
    buf = OutboundBuffer("phrases")
    ds = deltas("t", ["One. ", "Two. ", "Three"])
    for d in ds:
        buf.push(d, 0.0)
    assert len(buf) == 2  # "One. Two. " ready (merged), "Three" held
    assert buf.pop_ready(0.0) == [Delta(seq=2, turn_id="t", offset=0, text="One. Two. ")]


# ---- batched -----------------------------------------------------------------------------------------


def test_batched_releases_nothing_before_interval_and_everything_after() -> None:
    buf = OutboundBuffer("batched", batch_interval_s=0.5)
    ds = deltas("t", ["a", "b", "c", "d"])
    buf.push(ds[0], 0.0)
    assert buf.pop_ready(0.0) == [ds[0]]  # first delta after a quiet period goes at once
    buf.push(ds[1], 0.1)
    buf.push(ds[2], 0.2)
    assert buf.next_deadline() == pytest.approx(0.5)
    assert buf.pop_ready(0.2) == []
    assert buf.pop_ready(0.49) == []
    buf.push(ds[3], 0.45)
    assert buf.pop_ready(0.5) == [Delta(seq=4, turn_id="t", offset=1, text="bcd")]
    assert len(buf) == 0


def test_batched_rate_is_bounded_under_a_steady_stream() -> None:
    buf = OutboundBuffer("batched", batch_interval_s=0.5)
    ds = deltas("t", ["x"] * 1000)
    released: list[float] = []
    for i, d in enumerate(ds):
        now = i * 0.01  # 100 deltas/s for 10 s, reader polls after every push
        buf.push(d, now)
        if buf.pop_ready(now):
            released.append(now)
    gaps = [b - a for a, b in zip(released, released[1:], strict=False)]
    assert all(g >= 0.5 - 1e-9 for g in gaps)
    assert 18 <= len(released) <= 21


def test_batched_non_delta_flushes_immediately() -> None:
    buf = OutboundBuffer("batched")
    d0, d1 = deltas("t", ["a", "b"])
    buf.push(d0, 0.0)
    buf.pop_ready(0.0)
    buf.push(d1, 0.1)
    end = TurnEnd(seq=3, turn_id="t", status="completed", text="ab")
    buf.push(end, 0.2)
    assert buf.next_deadline() == 0.2
    assert buf.pop_ready(0.2) == [d1, end]


# ---- bounds --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_too_many_frames_raises_slow_consumer(mode: DeliveryMode) -> None:
    buf = OutboundBuffer(mode, max_frames=3)
    for i in range(3):
        buf.push(Status(seq=i + 1, turn_id="t", text="s"), 0.0)
    with pytest.raises(SlowConsumer) as exc:
        buf.push(Pong(), 0.0)
    assert exc.value.close_code == SLOW_CONSUMER_CLOSE_CODE == 4410
    assert buf.overflowed
    with pytest.raises(SlowConsumer):  # refuses everything after, so no gap can be created
        buf.push(Status(seq=9, turn_id="t", text="s"), 0.0)


@pytest.mark.parametrize("mode", MODES)
def test_too_many_chars_raises_slow_consumer(mode: DeliveryMode) -> None:
    buf = OutboundBuffer(mode, max_chars=100)
    buf.push(Delta(seq=1, turn_id="t", offset=0, text="x" * 60), 0.0)
    with pytest.raises(SlowConsumer):
        buf.push(Delta(seq=2, turn_id="t", offset=60, text="y" * 60), 0.0)


@pytest.mark.parametrize("mode", MODES)
def test_merging_keeps_contiguous_stream_within_frame_bound(mode: DeliveryMode) -> None:
    buf = OutboundBuffer(mode, max_frames=2, phrase_max_chars=10**9, phrase_max_wait_s=10**9)
    for d in deltas("t", ["word. "] * 5_000):
        buf.push(d, 0.0)
    assert len(buf) <= 2
    out = buf.pop_all(0.0)
    assert "".join(d.text for d in out if isinstance(d, Delta)) == "word. " * 5_000


def test_oversized_single_frame_into_empty_buffer_is_accepted() -> None:
    buf = OutboundBuffer("tokens", max_chars=10)
    big = TurnEnd(seq=1, turn_id="t", status="completed", text="z" * 100)
    buf.push(big, 0.0)
    assert buf.pop_ready(0.0) == [big]
    buf.push(big, 1.0)
    with pytest.raises(SlowConsumer):
        buf.push(Pong(), 1.0)


def test_popping_frees_room() -> None:
    buf = OutboundBuffer("tokens", max_frames=2)
    for i in range(100):
        buf.push(Status(seq=2 * i + 1, turn_id="t", text="s"), float(i))
        buf.push(Ack(client_msg_id="m", seq=2 * i + 2, turn_id="t", duplicate=False), float(i))
        assert len(buf.pop_ready(float(i))) == 2
    assert buf.held_chars == 0


def test_invalid_arguments() -> None:
    with pytest.raises(ValueError):
        OutboundBuffer("loud")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        OutboundBuffer(max_frames=0)
