"""Context packer: budget never exceeded, latest user message and last turns kept, order and meta consistent."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from orchestrator.packer import (
    MESSAGE_OVERHEAD_TOKENS,
    SUMMARY_PREFIX,
    TRUNCATION_MARKER,
    estimate_tokens,
    first_sentence,
    message_tokens,
    pack,
    summarise,
    truncate_middle,
)
from proto.state import ChatMessage, PackerMeta

SYSTEM = "You are a helpful assistant. Answer briefly."


def session(
    turns: int, *, answer: str = "Sure, here is a fairly detailed answer to that. " * 3, tools_every: int = 3
) -> list[ChatMessage]:
    """A realistic history: user, optional assistant tool call + tool result, assistant answer."""
    out: list[ChatMessage] = []
    seq = 0
    for t in range(turns):
        tid = f"turn-{t}"
        seq += 1
        out.append(
            ChatMessage(
                role="user", text=f"Question number {t}. Tell me more about topic {t}.", turn_id=tid, seq=seq
            )
        )
        if tools_every and t % tools_every == 0:
            seq += 1
            out.append(ChatMessage(role="assistant", text="", turn_id=tid, seq=seq, tool_call_id=f"c{t}"))
            seq += 1
            out.append(
                ChatMessage(
                    role="tool",
                    text=f"weather: sunny {t}",
                    turn_id=tid,
                    seq=seq,
                    tool_call_id=f"c{t}",
                    name="weather",
                )
            )
        seq += 1
        out.append(ChatMessage(role="assistant", text=answer, turn_id=tid, seq=seq))
    return out


def is_middle_truncation(short: str, text: str) -> bool:
    if short in ("", "…"):
        return True
    for marker in (TRUNCATION_MARKER, "…"):  # "…" alone when the full marker does not fit
        head, sep, tail = short.partition(marker)
        if sep and text.startswith(head) and text.endswith(tail) and len(head) + len(tail) < len(text):
            return True
    return False


def check_invariants(
    out: list[ChatMessage], meta: PackerMeta, history: list[ChatMessage], budget: int, reserve: int = 0
) -> None:
    avail = budget - reserve
    used = sum(message_tokens(m) for m in out)
    assert meta.used_tokens == used <= avail
    assert meta.budget_tokens == budget
    assert out[0].role == "system"
    all_seqs = [m.seq for m in history if m.seq is not None]
    assert sorted(meta.kept_seqs + meta.dropped_seqs) == sorted(all_seqs)
    assert not set(meta.kept_seqs) & set(meta.dropped_seqs)
    # kept history in original order, and exactly the kept seqs
    body = [m for m in out[1:] if m.seq is not None]
    assert [m.seq for m in body] == meta.kept_seqs
    assert meta.kept_seqs == sorted(meta.kept_seqs)
    by_seq = {m.seq: m for m in history}
    for m in body:
        orig = by_seq[m.seq]
        assert m == orig or (m.seq in meta.summarised_seqs and is_middle_truncation(m.text, orig.text))
    # the latest user message is always there
    last_user = next((m for m in reversed(history) if m.role == "user"), None)
    if last_user is not None and last_user.seq is not None:
        assert last_user.seq in meta.kept_seqs
    # tool messages never travel without their turn's assistant messages
    kept = set(meta.kept_seqs)
    for i, m in enumerate(history):
        if m.role == "tool" and m.seq in kept:
            if m.turn_id is not None:
                same_turn = [x for x in history if x.turn_id == m.turn_id and x.role != "tool"]
            else:  # no turn_id: it belongs with the messages just before it
                same_turn = [next(x for x in reversed(history[:i]) if x.role != "tool")]
            assert all(x.seq in kept for x in same_turn if x.seq is not None)
    # the summary, when present, is the second message and covers dropped user messages
    if meta.summary is not None:
        assert out[1].role == "system" and out[1].text == meta.summary
        assert meta.summary.startswith(SUMMARY_PREFIX)
    dropped = set(meta.dropped_seqs)
    for s in meta.summarised_seqs:
        assert s in dropped or (last_user is not None and s == last_user.seq)


# ---- estimate_tokens -------------------------------------------------------------------------------


def test_estimate_tokens() -> None:
    assert estimate_tokens("") == 0
    assert estimate_tokens("a") == 1
    assert estimate_tokens("abcd") == 1
    assert estimate_tokens("abcde") == 2
    assert estimate_tokens("x" * 400) == 100
    assert estimate_tokens("你好世界") == 4
    assert estimate_tokens("こんにちは") == 5
    assert estimate_tokens("héllo") == 2
    assert estimate_tokens("ab你好") == 3


@given(st.text(), st.text())
def test_estimate_tokens_is_monotone(a: str, b: str) -> None:
    assert estimate_tokens(a + b) >= estimate_tokens(a)
    assert (estimate_tokens(a) >= 1) == bool(a)


# ---- truncation and sentences ----------------------------------------------------------------------


@given(st.text(min_size=1, max_size=2000), st.integers(0, 300))
def test_truncate_middle_fits_and_keeps_ends(text: str, max_tokens: int) -> None:
    short = truncate_middle(text, max_tokens)
    assert estimate_tokens(short) <= max_tokens
    if estimate_tokens(text) <= max_tokens:
        assert short == text
    elif TRUNCATION_MARKER in short:
        head, tail = short.split(TRUNCATION_MARKER, 1)
        assert text.startswith(head) and text.endswith(tail)


def test_truncate_middle_keeps_as_much_as_fits() -> None:
    text = "A" * 1000 + "MIDDLE" + "Z" * 1000
    short = truncate_middle(text, 100)
    assert short.startswith("A" * 150) and short.endswith("Z" * 150)
    assert "MIDDLE" not in short
    assert 95 <= estimate_tokens(short) <= 100


def test_first_sentence() -> None:
    assert first_sentence("What is the weather in Paris? Also Rome.") == "What is the weather in Paris?"
    assert first_sentence("  line one\nline two") == "line one"
    assert first_sentence("Version 3.11 is out. Great") == "Version 3.11 is out."
    assert first_sentence("你好。再见。") == "你好。"
    assert len(first_sentence("x" * 1000)) == 120


def test_summarise_bounded_and_newest_first() -> None:
    msgs = [ChatMessage(role="user", text=f"Topic {i} is interesting. More.", seq=i) for i in range(100)]
    text, seqs = summarise(msgs, 60) or ("", [])
    assert text.startswith(SUMMARY_PREFIX)
    assert estimate_tokens(text) <= 60
    assert seqs and seqs[-1] == 99 and seqs == sorted(seqs)
    assert "Topic 99 is interesting." in text and "More" not in text
    assert summarise([ChatMessage(role="assistant", text="hi", seq=1)], 100) is None
    assert summarise(msgs, 3) is None


# ---- pack ------------------------------------------------------------------------------------------


def test_everything_fits_unchanged() -> None:
    hist = session(3)
    out, meta = pack(SYSTEM, hist, 100_000)
    assert out == [ChatMessage(role="system", text=SYSTEM), *hist]
    assert meta.dropped_seqs == [] and meta.summary is None
    check_invariants(out, meta, hist, 100_000)


@pytest.mark.parametrize("turns", [50, 300, 1000])
@pytest.mark.parametrize("budget", [300, 2_000, 8_000])
def test_long_sessions_fit_the_budget(turns: int, budget: int) -> None:
    hist = session(turns)
    out, meta = pack(SYSTEM, hist, budget, reserve_tokens=100)
    check_invariants(out, meta, hist, budget, 100)
    # the last two turns are kept in full when they fit
    last_two = [m.seq for m in hist if m.turn_id in (f"turn-{turns - 1}", f"turn-{turns - 2}")]
    need = sum(message_tokens(m) for m in hist if m.seq in last_two) + message_tokens(out[0])
    if need <= budget - 100 - 50:
        assert set(last_two) <= set(meta.kept_seqs)
    if sum(message_tokens(m) for m in [out[0], *hist]) <= budget - 100:
        assert meta.dropped_seqs == [] and out[1:] == hist
        return
    assert meta.dropped_seqs, "something must have been dropped"
    assert meta.summary is not None and meta.summarised_seqs
    assert meta.used_tokens > (budget - 100) * 0.6, "the budget is used, not wasted"
    # kept history is a contiguous suffix of the history
    assert meta.kept_seqs == [m.seq for m in hist][-len(meta.kept_seqs) :]


def test_huge_last_message_is_truncated_not_dropped() -> None:
    hist = session(5)
    huge = "Please summarise this. " + "blah " * 50_000 + "What is the conclusion?"
    hist.append(ChatMessage(role="user", text=huge, turn_id="turn-big", seq=999))
    out, meta = pack(SYSTEM, hist, 1_000, reserve_tokens=200)
    check_invariants(out, meta, hist, 1_000, 200)
    last = out[-1]
    assert last.seq == 999 and last.role == "user"
    assert last.text.startswith("Please summarise this.") and last.text.endswith("What is the conclusion?")
    assert TRUNCATION_MARKER in last.text
    assert 999 in meta.kept_seqs and 999 in meta.summarised_seqs
    assert out[0].text == SYSTEM, "the system prompt fits, so it is untouched"
    assert meta.used_tokens >= 780


def test_huge_system_prompt_and_message_share_the_budget() -> None:
    hist = [ChatMessage(role="user", text="q " * 10_000, turn_id="t", seq=1)]
    out, meta = pack("rules " * 10_000, hist, 500)
    check_invariants(out, meta, hist, 500)
    assert message_tokens(out[-1]) >= 250
    assert [m.seq for m in out[1:]] == [1]


def test_tool_messages_dropped_with_their_turn() -> None:
    hist = session(30, tools_every=1)
    for budget in range(40, 1_500, 37):
        out, meta = pack(SYSTEM, hist, budget)
        check_invariants(out, meta, hist, budget)


def test_current_turn_in_progress_is_kept() -> None:
    """Mid tool loop: the latest turn has user, assistant tool call and tool result after it."""
    hist = session(40, tools_every=0)
    hist += [
        ChatMessage(role="user", text="Weather in Oslo?", turn_id="now", seq=500),
        ChatMessage(role="assistant", text="", turn_id="now", seq=501, tool_call_id="c"),
        ChatMessage(
            role="tool", text="Oslo: 3°C, rain", turn_id="now", seq=502, tool_call_id="c", name="weather"
        ),
    ]
    out, meta = pack(SYSTEM, hist, 400)
    check_invariants(out, meta, hist, 400)
    assert [m.seq for m in out[-3:]] == [500, 501, 502]


def test_keep_last_turns_zero_and_tiny_budget() -> None:
    hist = session(10)
    out, meta = pack(SYSTEM, hist, 2 * MESSAGE_OVERHEAD_TOKENS, keep_last_turns=0)
    check_invariants(out, meta, hist, 2 * MESSAGE_OVERHEAD_TOKENS)
    with pytest.raises(ValueError):
        pack(SYSTEM, hist, 2 * MESSAGE_OVERHEAD_TOKENS - 1)
    with pytest.raises(ValueError):
        pack(SYSTEM, hist, 100, reserve_tokens=200)


def test_empty_history() -> None:
    with pytest.raises(ValueError):
        pack(SYSTEM, [], MESSAGE_OVERHEAD_TOKENS - 1)
    out, meta = pack(SYSTEM, [], 100)
    assert out == [ChatMessage(role="system", text=SYSTEM)]
    assert meta.kept_seqs == [] and meta.dropped_seqs == []


def test_cjk_session() -> None:
    hist = session(200, answer="这是一个相当详细的回答。" * 5)
    out, meta = pack("你是一个有用的助手。", hist, 1_000)
    check_invariants(out, meta, hist, 1_000)
    assert meta.summary is not None


# ---- hypothesis over random histories -------------------------------------------------------------------


@st.composite
def histories(draw: st.DrawFn) -> list[ChatMessage]:
    out: list[ChatMessage] = []
    seq = 0
    texts = st.text(max_size=300) | st.sampled_from(["Hi. How are you?", "你好。", "x" * 2000, ""])
    for t in range(draw(st.integers(0, 40))):
        tid = f"t{t}" if draw(st.integers(0, 9)) else None
        seq += draw(st.integers(1, 3))
        out.append(ChatMessage(role="user", text=draw(texts), turn_id=tid, seq=seq))
        for _ in range(draw(st.integers(0, 3))):
            role = draw(st.sampled_from(["assistant", "tool", "system"]))
            seq += 1
            with_seq = draw(st.integers(0, 19)) > 0
            out.append(ChatMessage(role=role, text=draw(texts), turn_id=tid, seq=seq if with_seq else None))
    return out


@settings(max_examples=300, deadline=None)
@given(
    hist=histories(),
    system=st.text(max_size=400),
    budget=st.integers(8, 3_000),
    reserve=st.integers(0, 200),
    keep=st.integers(0, 4),
)
def test_random_histories(hist: list[ChatMessage], system: str, budget: int, reserve: int, keep: int) -> None:
    if budget - reserve < MESSAGE_OVERHEAD_TOKENS * (2 if any(m.role == "user" for m in hist) else 1):
        with pytest.raises(ValueError):
            pack(system, hist, budget, reserve_tokens=reserve, keep_last_turns=keep)
        return
    out, meta = pack(system, hist, budget, reserve_tokens=reserve, keep_last_turns=keep)
    check_invariants(out, meta, hist, budget, reserve)
    if meta.dropped_seqs and any(
        m.role == "user" and m.seq in meta.dropped_seqs and m.text.strip() for m in hist
    ):
        # a summary is present unless there was truly no room for one
        room = budget - reserve - meta.used_tokens
        assert meta.summary is not None or room < 40
