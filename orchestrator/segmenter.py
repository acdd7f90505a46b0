"""Unicode-safe emission of streamed text.

Upstream models chunk text arbitrarily: a chunk may end between the two regional indicators
of a flag, between a letter and its combining accent, or inside an emoji ZWJ sequence, and
HTTP bodies may even end inside a UTF-8 sequence. PROTOCOL.md promises that a `delta` never
splits a code point and should not split a grapheme cluster, so text passes through
`Utf8StreamDecoder` (bytes -> str) and `GraphemeBuffer` (str -> cluster-safe str) before it
becomes a delta.

Offsets in tidewire count **code points** (Python `len`), never UTF-16 units or bytes.
"""

from __future__ import annotations

import codecs
from typing import Any

import regex

__all__ = ["DEFAULT_MAX_HOLD", "GraphemeBuffer", "Utf8StreamDecoder", "code_points"]

_GRAPHEME: Any = regex.compile(r"\X")

DEFAULT_MAX_HOLD = 64
"""Code points a single held cluster may grow to before it is emitted anyway, so that
pathological input (thousands of stacked combining marks) cannot stall a stream or grow
memory without bound. Real clusters (family emoji, tag flags) are well under 16."""


def code_points(s: str) -> int:
    """Length of `s` in code points: the unit of `delta.offset` in PROTOCOL.md.

    Clients in JavaScript must count with `Array.from(s).length`, not `s.length` (UTF-16).
    """
    return len(s)


def _last_cluster_start(text: str) -> int:
    """Index where the last extended grapheme cluster of non-empty `text` starts."""
    start = 0
    for match in _GRAPHEME.finditer(text):
        start = match.start()
    return start


class GraphemeBuffer:
    """Holds back the last grapheme cluster of a stream until it can no longer change.

    Grapheme boundaries are decided from the text on their left plus the next code point,
    so once a later cluster has begun, every earlier boundary is final; only the last
    cluster may still be extended by the next chunk (a combining mark, a ZWJ continuation,
    the second regional indicator, a variation selector, a skin-tone modifier).

    Guarantee: the concatenation of every `feed` output followed by `flush()` equals the
    concatenation of every input. Every `feed` output ends on a grapheme boundary of the
    whole text, unless one cluster exceeded `max_hold` code points.
    """

    __slots__ = ("_held", "_max_hold")

    def __init__(self, *, max_hold: int = DEFAULT_MAX_HOLD) -> None:
        if max_hold < 1:
            raise ValueError("max_hold must be >= 1")
        self._held = ""
        self._max_hold = max_hold

    @property
    def pending(self) -> str:
        """Text received but not yet emitted (at most one grapheme cluster)."""
        return self._held

    def feed(self, text: str) -> str:
        """Add `text`; return the longest prefix of the buffered text that is safe to emit."""
        if not text:
            return ""
        buffered = self._held + text
        cut = _last_cluster_start(buffered)
        if len(buffered) - cut > self._max_hold:
            cut = len(buffered)
        self._held = buffered[cut:]
        return buffered[:cut]

    def flush(self) -> str:
        """Return and forget the held text: call it when the stream ends (or is cancelled)."""
        held, self._held = self._held, ""
        return held


class Utf8StreamDecoder:
    """Decodes a UTF-8 byte stream that may be split anywhere, even inside a character.

    Incomplete trailing bytes are kept for the next `feed`; invalid bytes become U+FFFD
    rather than failing the whole stream (a model answer with one bad byte is still useful).
    """

    __slots__ = ("_decoder",)

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, data: bytes) -> str:
        """Decode `data`, keeping an incomplete trailing sequence for later."""
        return self._decoder.decode(data, final=False)

    def flush(self) -> str:
        """End of stream: an incomplete trailing sequence becomes U+FFFD."""
        out = self._decoder.decode(b"", final=True)
        self._decoder.reset()
        return out
