"""The Responses facade's translation is a pure function of the turn's events (no servers needed):
sequence numbers are 0, 1, 2… and the same whichever way tidewire chunked or coalesced the text."""

from __future__ import annotations

import random

from gateway.facades.ai_sdk import UiChunks
from gateway.facades.common import TurnRecord
from gateway.facades.responses import CHUNK_MAX, ResponsesMapper, parse_response_id, response_id
from proto import client

TEXT_A = "Hello there, 👩‍👩‍👧 family! " + "x" * 40 + " 日本語のテキスト。 done.\n"
TEXT_B = "The clock says noon. Bye"


def _turn(
    chunks_a: list[str], chunks_b: list[str], end: client.TurnStatus = "completed"
) -> list[client.Event]:
    events: list[client.Event] = []
    seq = 2
    offset = 0

    def nxt() -> int:
        nonlocal seq
        seq += 1
        return seq

    events.append(client.TurnStart(seq=nxt(), turn_id="t_1"))
    for c in chunks_a:
        events.append(client.Delta(seq=nxt(), turn_id="t_1", offset=offset, text=c))
        offset += len(c)
    events.append(client.Status(seq=nxt(), turn_id="t_1", text="Let me check the clock…"))
    events.append(client.ToolCall(seq=nxt(), turn_id="t_1", call_id="c1", name="clock", args={"tz": "UTC"}))
    events.append(client.ToolResult(seq=nxt(), turn_id="t_1", call_id="c1", ok=True, text="12:00"))
    for c in chunks_b:
        events.append(client.Delta(seq=nxt(), turn_id="t_1", offset=offset, text=c))
        offset += len(c)
    events.append(client.TurnEnd(seq=nxt(), turn_id="t_1", status=end, text="".join(chunks_a + chunks_b)))
    return events


def _split(text: str, rng: random.Random) -> list[str]:
    out, i = [], 0
    while i < len(text):
        n = rng.randint(1, 12)
        out.append(text[i : i + n])
        i += n
    return out


def _translate(events: list[client.Event]) -> tuple[list[dict[str, object]], ResponsesMapper]:
    record = TurnRecord(session_id="s1", turn_id="t_1", user_seq=2, created_at=1, text="hi")
    mapper = ResponsesMapper(record)
    out = mapper.start()
    for ev in events:
        out += mapper.feed(ev)
    return out, mapper


def test_sequence_numbers_do_not_depend_on_how_the_text_was_chunked() -> None:
    reference, mapper = _translate(_turn([TEXT_A], [TEXT_B]))
    assert [e["sequence_number"] for e in reference] == list(range(len(reference)))
    for seed in range(20):
        rng = random.Random(seed)
        again, _ = _translate(_turn(_split(TEXT_A, rng), _split(TEXT_B, rng)))
        assert again == reference
    deltas = [str(e["delta"]) for e in reference if e["type"] == "response.output_text.delta"]
    assert "".join(deltas) == TEXT_A + TEXT_B
    assert all(len(d) <= CHUNK_MAX for d in deltas)
    kinds = [e["type"] for e in reference]
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert kinds[-1] == "response.completed"
    assert "tidewire.status" in kinds and "response.mcp_call.completed" in kinds
    final = mapper.response()
    assert final["status"] == "completed" and final["output_text"] == TEXT_A + TEXT_B
    assert [item["type"] for item in final["output"]] == ["message", "mcp_call", "message"]  # type: ignore[index]


def test_cancelled_turn_ends_with_incomplete_and_status_cancelled() -> None:
    events, mapper = _translate(_turn(["partial "], [], end="cancelled"))
    assert events[-1]["type"] == "response.incomplete"
    assert mapper.response()["status"] == "cancelled"
    assert mapper.response()["output_text"] == "partial "


def test_a_prefix_of_the_events_gives_a_prefix_of_the_translation() -> None:
    """What makes replay-then-live exact: the events of a turn so far translate to a prefix of the
    translation of the whole turn, so `starting_after=N` continues with N+1 on any delivery."""
    events = _turn(_split(TEXT_A, random.Random(1)), _split(TEXT_B, random.Random(2)))
    whole, _ = _translate(events)
    for k in range(len(events)):
        part, _ = _translate(events[:k])
        assert whole[: len(part)] == part


def test_response_id_names_session_and_turn() -> None:
    assert parse_response_id(response_id("abc-_1", "t_x.y")) == ("abc-_1", "t_x.y")


def test_ui_chunks_start_with_the_turn_and_end_with_finish() -> None:
    ui = UiChunks("t_1")
    chunks = ui.start()
    for ev in _turn(["a ", "b"], ["c"]):
        chunks += ui.feed(ev)
    kinds = [c["type"] for c in chunks]
    assert kinds[0] == "start" and chunks[0]["messageId"] == "t_1"
    assert kinds[-1] == "finish" and kinds.count("text-start") == kinds.count("text-end") == 2
    assert "tool-input-available" in kinds and "tool-output-available" in kinds and "data-status" in kinds
