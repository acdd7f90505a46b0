"""Wire types, the committed JSON Schema, and the pure pieces of the durable path."""

from __future__ import annotations

import json
from pathlib import Path

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from orchestrator.turn import TurnProgress
from proto import client, schema
from shared.checkpoints import with_seq
from shared.eventlog import merge_turn_rows

ROOT = Path(__file__).resolve().parents[2]


def test_committed_schema_is_not_stale() -> None:
    committed = (ROOT / "proto" / "client.schema.json").read_text()
    assert committed == schema.render(), "run `make schema` and commit proto/client.schema.json"


def test_schema_covers_every_protocol_frame() -> None:
    defs = json.loads(schema.render())["$defs"]
    for name in (
        "Hello",
        "Send",
        "Stop",
        "Ping",
        "Ready",
        "Ack",
        "Pong",
        "Error",
        "Message",
        "TurnStart",
        "Delta",
        "Status",
        "ToolCall",
        "ToolResult",
        "TurnEnd",
    ):
        assert name in defs


def test_unknown_fields_are_ignored_and_unknown_types_refused() -> None:
    frame = client.client_frame_decoder.decode(b'{"type":"send","client_msg_id":"a","text":"hi","future":1}')
    assert frame == client.Send(client_msg_id="a", text="hi")
    with pytest.raises(msgspec.ValidationError):
        client.client_frame_decoder.decode(b'{"type":"teleport"}')


def test_ack_always_carries_duplicate_and_message_carries_role() -> None:
    ack = json.loads(
        client.json_encoder.encode(client.Ack(client_msg_id="c", seq=3, turn_id="t", duplicate=False))
    )
    assert ack == {"type": "ack", "client_msg_id": "c", "seq": 3, "turn_id": "t", "duplicate": False}
    msg = json.loads(
        client.json_encoder.encode(
            client.Message(seq=1, turn_id="t", client_msg_id="c", role="user", text="x")
        )
    )
    assert msg["role"] == "user"


@given(st.text(), st.integers(min_value=1, max_value=10**12))
def test_seq_placeholder_substitution_matches_encoding(text: str, seq: int) -> None:
    placeholder = client.json_encoder.encode(client.Delta(seq=0, turn_id="t", offset=5, text=text))
    assert with_seq(placeholder, seq) == client.json_encoder.encode(
        client.Delta(seq=seq, turn_id="t", offset=5, text=text)
    )


@given(st.lists(st.text(min_size=1, max_size=8), min_size=1, max_size=30), st.integers(0, 29))
def test_merged_rows_replay_exactly_from_any_member(chunks: list[str], cut: int) -> None:
    p = TurnProgress("t")
    raws = [with_seq(p.turn_start(), 10)]
    for i, c in enumerate(chunks):
        raws.append(with_seq(p.delta(c), 11 + i))
    raws.append(with_seq(p.end("completed"), 11 + len(chunks)))
    rows = merge_turn_rows("s", raws)
    assert [r[3] for r in rows] == ["turn_start", "delta", "turn_end"]
    _, seq, first_seq, _, _, _, payload, mark_seqs, mark_ends = rows[1]
    merged = client.event_decoder.decode(payload.encode())
    assert isinstance(merged, client.Delta)
    assert (merged.seq, first_seq, merged.offset, merged.text) == (10 + len(chunks), 11, 0, "".join(chunks))
    k = min(cut, len(chunks) - 1)
    assert mark_ends[k] == len("".join(chunks[: k + 1])) and mark_seqs[k] == 11 + k


def test_progress_restores_exactly_and_refuses_holes() -> None:
    p = TurnProgress("t")
    events = [client.event_decoder.decode(with_seq(p.turn_start(), 1))]
    for i, c in enumerate(["Hel", "lo ", "👩‍💻"]):
        events.append(client.event_decoder.decode(with_seq(p.delta(c), 2 + i)))
    q = TurnProgress.restore("t", events)
    assert (q.text, q.offset, q.started, q.start_seq) == ("Hello 👩‍💻", len("Hello 👩‍💻"), True, 1)
    holed = [events[0], events[1], events[3]]
    with pytest.raises(ValueError, match="hole"):
        TurnProgress.restore("t", holed)


def test_readme_configuration_table_is_current() -> None:
    from tidewire import settings_doc

    text = (ROOT / "README.md").read_text()
    assert settings_doc.BEGIN + "\n" + settings_doc.render() + settings_doc.END in text, (
        "run `python -m tidewire.settings_doc` and commit README.md"
    )


def test_dependency_failures_are_degraded_not_internal() -> None:
    import asyncpg
    import redis.exceptions

    from shared.errors import from_dependency

    for e in (
        redis.exceptions.ConnectionError("pool"),
        asyncpg.exceptions.CannotConnectNowError("x"),
        TimeoutError(),
        ConnectionRefusedError(),
    ):
        d = from_dependency(e)
        assert d is not None and d.code == "degraded" and d.retry_after_ms
    assert from_dependency(ValueError("bug")) is None
