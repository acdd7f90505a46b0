"""Grapheme-safe emission and incremental UTF-8 decoding, checked on adversarial chunkings."""

from __future__ import annotations

import regex
from hypothesis import given, settings
from hypothesis import strategies as st

from orchestrator.segmenter import GraphemeBuffer, Utf8StreamDecoder, code_points

# Pieces chosen so that random concatenations create, extend and split clusters.
AWKWARD_PIECES = [
    "a", "Z", " ", "\n", "\r", ".", "e\u0301", "\u0301", "\u0308", "\u200d", "\u200d\U0001f4bb",
    "\U0001f469", "\U0001f4bb", "\U0001f469\u200d\U0001f4bb", "\U0001f1ef", "\U0001f1f5",
    "\U0001f1ef\U0001f1f5", "\U0001f44d", "\U0001f3fd", "\u2764", "\ufe0f", "1\ufe0f\u20e3",
    "\u20e3", "東", "京", "漢字", "\u1100", "\u1161", "\u11a8", "\u0915\u094d\u0937",
    "\U0001f3f4\U000e0067\U000e0062\U000e0065\U000e006e\U000e0067\U000e007f",
]  # fmt: skip


def grapheme_boundaries(text: str) -> set[int]:
    return {m.end() for m in regex.finditer(r"\X", text)} | {0}


@st.composite
def text_and_chunks(draw: st.DrawFn) -> tuple[str, list[str]]:
    text = "".join(draw(st.lists(st.sampled_from(AWKWARD_PIECES), max_size=40)))
    cuts = sorted(set(draw(st.lists(st.integers(0, len(text)), max_size=20))))
    bounds = [0, *cuts, len(text)]
    return text, [text[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]


@settings(max_examples=400, deadline=None)
@given(text_and_chunks())
def test_emitted_pieces_concatenate_to_input_and_end_on_final_grapheme_boundaries(
    case: tuple[str, list[str]],
) -> None:
    text, chunks = case
    buffer = GraphemeBuffer(max_hold=10_000)
    boundaries = grapheme_boundaries(text)
    emitted: list[str] = []
    offset = 0
    for chunk in chunks:
        out = buffer.feed(chunk)
        emitted.append(out)
        offset += len(out)
        assert offset in boundaries, (text, chunks, emitted)
        assert len(regex.findall(r"\X", buffer.pending)) <= 1
    emitted.append(buffer.flush())
    assert "".join(emitted) == text
    assert buffer.pending == ""


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=60), st.data())
def test_any_text_any_chunking_is_lossless(text: str, data: st.DataObject) -> None:
    cuts = sorted(set(data.draw(st.lists(st.integers(0, len(text)), max_size=15))))
    bounds = [0, *cuts, len(text)]
    buffer = GraphemeBuffer(max_hold=10_000)
    boundaries = grapheme_boundaries(text)
    out = ""
    for a, b in zip(bounds, bounds[1:], strict=False):
        out += buffer.feed(text[a:b])
        assert text.startswith(out) and len(out) in boundaries
    assert out + buffer.flush() == text


def test_flag_split_between_regional_indicators_is_held_until_complete() -> None:
    buffer = GraphemeBuffer()
    assert buffer.feed("Tokyo \U0001f1ef") == "Tokyo "
    assert buffer.feed("\U0001f1f5 and") == "\U0001f1ef\U0001f1f5 an"
    assert buffer.flush() == "d"


def test_combining_mark_and_zwj_continuations_are_not_split() -> None:
    buffer = GraphemeBuffer()
    assert buffer.feed("cafe") == "caf"
    assert buffer.feed("\u0301 \U0001f469") == "e\u0301 "
    assert buffer.feed("\u200d") == ""
    assert buffer.feed("\U0001f4bb!") == "\U0001f469\u200d\U0001f4bb"
    assert buffer.flush() == "!"


def test_a_runaway_cluster_is_emitted_once_it_exceeds_max_hold() -> None:
    buffer = GraphemeBuffer(max_hold=8)
    pieces = ["e"] + ["\u0301"] * 30
    out = [buffer.feed(p) for p in pieces]
    assert any(out), "held text must not grow without bound"
    assert len(buffer.pending) <= 8
    assert "".join(out) + buffer.flush() == "".join(pieces)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=80), st.data())
def test_utf8_bytes_split_anywhere_decode_to_the_text(text: str, data: st.DataObject) -> None:
    raw = text.encode("utf-8")
    cuts = sorted(set(data.draw(st.lists(st.integers(0, len(raw)), max_size=20))))
    bounds = [0, *cuts, len(raw)]
    decoder = Utf8StreamDecoder()
    out = "".join(decoder.feed(raw[a:b]) for a, b in zip(bounds, bounds[1:], strict=False))
    assert out + decoder.flush() == text


def test_utf8_invalid_and_truncated_bytes_become_replacement_characters() -> None:
    decoder = Utf8StreamDecoder()
    assert decoder.feed(b"ok \xff ") == "ok \ufffd "
    assert decoder.feed("\U0001f1ef".encode()[:2]) == ""
    assert decoder.flush() == "\ufffd"
    assert decoder.feed("é".encode()) == "é", "the decoder is reusable after flush"


def test_code_points_counts_code_points_not_utf16_units_or_bytes() -> None:
    assert code_points("\U0001f469\u200d\U0001f4bb") == 3
    assert code_points("e\u0301") == 2
    assert code_points("東京") == 2
