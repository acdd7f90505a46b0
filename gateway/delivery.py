"""Per-connection outbound buffer: bounded memory and delivery-mode merging (pure logic, no I/O).

Every client connection owns one `OutboundBuffer`. The producer (the session fan-out) pushes frames;
the connection's sender task pops what is ready and writes it. The buffer exists so that memory per
connection stays bounded whatever the client does: contiguous `delta`s are merged (PROTOCOL.md: a
merged delta has the seq of its LAST member and the offset of its FIRST, text concatenated), and when
even merging cannot keep the buffer within `max_frames` / `max_chars`, `push` raises `SlowConsumer`.

Slow-consumer policy: on `SlowConsumer` the connection layer closes the connection with code 4410
("too far behind, resume"); the client reconnects with its `last_seen_seq` and the server replays
what it missed from the checkpoint store / event log, in bounded memory. Memory per connection is
therefore bounded by about `max_chars` code points of text plus `max_frames` frame objects.

Delivery modes (the `delivery` field of `hello`):

- ``tokens``: everything is ready at once. Deltas are merged only when they are waiting anyway
  (the reader is slower than the producer), so a slow reader gets fewer, bigger frames instead of
  an unbounded queue; a reader that keeps up gets every delta unchanged (the very same object).
- ``phrases``: deltas are held and merged until the merged text ends at a clause boundary
  (``.,;:!?``, a newline, or CJK ``。，！？；：``, optionally followed by closing quotes/brackets,
  then whitespace or end of text), reaches `phrase_max_chars`, or has been held `phrase_max_wait_s`.
- ``batched``: deltas are held and released at most once per `batch_interval_s` (~2 frames/s).
  The first delta after a quiet period goes out at once; the following ones wait until
  `batch_interval_s` after the previous delta release.

In every mode a non-delta frame (any other event, or a control frame: ack, error, pong, ready) is
never merged, dropped or reordered, and flushes the deltas held before it. Nothing is ever
reordered, no text is ever lost, and merging never crosses a non-delta frame.

Time is passed in (`now`, a monotonic clock reading) so the logic is deterministic and testable.
"""

from __future__ import annotations

from collections import deque
from typing import Literal

from proto.client import (
    Delta,
    Error,
    Message,
    ServerFrame,
    Status,
    ToolCall,
    ToolResult,
    TurnEnd,
    json_encoder,
)

__all__ = [
    "DeliveryMode",
    "OutboundBuffer",
    "SLOW_CONSUMER_CLOSE_CODE",
    "SLOW_CONSUMER_REASON",
    "SlowConsumer",
    "ends_at_clause_boundary",
]

DeliveryMode = Literal["tokens", "phrases", "batched"]

SLOW_CONSUMER_CLOSE_CODE = 4410
SLOW_CONSUMER_REASON = "too far behind, resume"

_MODES: frozenset[str] = frozenset(("tokens", "phrases", "batched"))
# Loose parts of a run are joined into one chunk every _COMPACT_EVERY deltas, so a long run of tiny
# deltas costs about its text size in memory, not one string object per delta.
_COMPACT_EVERY = 64
# How far back the clause-boundary check looks (whitespace and closing punctuation are skipped).
_BOUNDARY_SCAN = 64

_CLAUSE_END = frozenset(".,;:!?。，！？；：")
_NEWLINES = frozenset("\n\r\u2028\u2029\x85")
_CLOSERS = frozenset("\"')]}»”’」』）】〉》")


class SlowConsumer(Exception):
    """The buffer is over its bounds even after merging: close the connection (4410) so the client resumes.

    Raised by `OutboundBuffer.push`. The frame being pushed is kept (so what is still held stays
    gap-free if the sender drains it before closing) and every later `push` raises again, so a
    producer that ignores the exception can never create a gap in the client's stream.
    """

    close_code = SLOW_CONSUMER_CLOSE_CODE
    reason = SLOW_CONSUMER_REASON

    def __init__(self, frames: int, chars: int, max_frames: int, max_chars: int) -> None:
        super().__init__(
            f"slow consumer: {frames} frames / {chars} chars held (limits {max_frames} / {max_chars})"
        )
        self.frames = frames
        self.chars = chars
        self.max_frames = max_frames
        self.max_chars = max_chars


def ends_at_clause_boundary(text: str) -> bool:
    """True when `text` ends at a clause boundary, i.e. a good place to hand a phrase to a screen reader.

    A boundary is a newline, or one of ``.,;:!?`` / CJK ``。，！？；：`` optionally followed by closing
    quotes or brackets, followed by whitespace or the end of the text. Only the last
    `_BOUNDARY_SCAN` code points are examined, so the check is O(1) however long the text is.
    """
    i = len(text) - 1
    stop = max(-1, i - _BOUNDARY_SCAN)
    while i > stop and text[i].isspace():
        if text[i] in _NEWLINES:
            return True
        i -= 1
    while i > stop and text[i] in _CLOSERS:
        i -= 1
    return i > stop and text[i] in _CLAUSE_END


def _weight(frame: ServerFrame) -> int:
    """Code points of text a frame holds, for the `max_chars` bound."""
    if isinstance(frame, Delta | Message | Status | ToolResult | TurnEnd):
        return len(frame.text)
    if isinstance(frame, Error):
        return len(frame.message)
    if isinstance(frame, ToolCall):
        # args is arbitrary JSON; its encoded size is a fair, bounded proxy (tool calls are rare).
        return len(frame.name) + len(json_encoder.encode(frame.args))
    return 0


class _Run:
    """Consecutive contiguous deltas of one turn, merged lazily (the text is joined only when sent)."""

    __slots__ = ("first", "turn_id", "offset", "length", "last_seq", "count", "parts", "packed", "held_since")

    def __init__(self, delta: Delta, now: float) -> None:
        self.first = delta  # returned unchanged when the run has a single member
        self.turn_id = delta.turn_id
        self.offset = delta.offset
        self.length = len(delta.text)
        self.last_seq = delta.seq
        self.count = 1
        self.parts: list[str] = [delta.text] if delta.text else []
        self.packed = 0  # parts[:packed] are already-compacted chunks
        self.held_since = now

    def accepts(self, delta: Delta) -> bool:
        return (
            delta.turn_id == self.turn_id
            and delta.offset == self.offset + self.length
            and delta.seq > self.last_seq
        )

    def extend(self, delta: Delta) -> None:
        if delta.text:
            self.parts.append(delta.text)
            self.length += len(delta.text)
            self._compact()
        self.last_seq = delta.seq
        self.count += 1

    def can_absorb(self, other: _Run) -> bool:
        return (
            other.turn_id == self.turn_id
            and other.offset == self.offset + self.length
            and other.first.seq > self.last_seq
        )

    def absorb(self, other: _Run) -> None:
        self.parts.extend(other.parts)
        self.length += other.length
        self.last_seq = other.last_seq
        self.count += other.count
        self._compact()

    def _compact(self) -> None:
        if len(self.parts) - self.packed >= _COMPACT_EVERY:
            self.parts[self.packed :] = ["".join(self.parts[self.packed :])]
            self.packed += 1

    def text(self) -> str:
        return "".join(self.parts)

    def tail(self, n: int) -> str:
        """At least the last `n` code points of the text (all of it if shorter), without joining it all."""
        k = len(self.parts)
        got = 0
        while k > 0 and got < n:
            k -= 1
            got += len(self.parts[k])
        return "".join(self.parts[k:])

    def frame(self) -> Delta:
        if self.count == 1:
            return self.first
        return Delta(seq=self.last_seq, turn_id=self.turn_id, offset=self.offset, text=self.text())


class OutboundBuffer:
    """The per-connection outbound queue: merges deltas per delivery mode and bounds memory.

    Not thread-safe and not async: one producer and one sender on the same event loop. The sender
    loop is typically: `d = buf.next_deadline()`; if `d is None` wait for a push; if `d > now` wait
    until `d` or a push; then write `buf.pop_ready(now)`.
    """

    def __init__(
        self,
        mode: DeliveryMode = "tokens",
        *,
        max_frames: int = 512,
        max_chars: int = 1_000_000,
        batch_interval_s: float = 0.5,
        phrase_max_chars: int = 160,
        phrase_max_wait_s: float = 0.4,
        tokens_merge_after: int = 32,
    ) -> None:
        if mode not in _MODES:
            raise ValueError(f"unknown delivery mode {mode!r}")
        if max_frames < 1 or max_chars < 1:
            raise ValueError("max_frames and max_chars must be >= 1")
        if batch_interval_s < 0 or phrase_max_wait_s < 0 or phrase_max_chars < 1:
            raise ValueError("intervals must be >= 0 and phrase_max_chars >= 1")
        self.mode: DeliveryMode = mode
        self.max_frames = max_frames
        self.max_chars = max_chars
        self.batch_interval_s = batch_interval_s
        self.phrase_max_chars = phrase_max_chars
        self.phrase_max_wait_s = phrase_max_wait_s
        self.tokens_merge_after = tokens_merge_after
        self._q: deque[ServerFrame | _Run] = deque()
        self._held: _Run | None = None  # the tail run while it is held (phrases / batched only)
        self._chars = 0
        self._ready_at: float | None = None  # when the ready prefix of the queue became non-empty
        self._last_release = float("-inf")  # batched: when deltas were last handed to the sender
        self._merged = 0
        self._overflowed = False

    # ---- producer side --------------------------------------------------------------------------

    def push(self, frame: ServerFrame, now: float) -> None:
        """Queue one frame (in order). Raises `SlowConsumer` when over bounds after merging.

        A frame pushed into an empty buffer is always accepted, whatever its size, so that a single
        oversized event can still be delivered; the bounds apply to what piles up behind it.
        """
        if self._overflowed:
            raise SlowConsumer(len(self._q), self._chars, self.max_frames, self.max_chars)
        was_empty = not self._q
        if isinstance(frame, Delta):
            self._push_delta(frame, now)
        else:
            if self._held is not None:
                self._seal(now)  # a non-delta frame flushes what is held before it
            self._q.append(frame)
            self._chars += _weight(frame)
            self._mark_ready(now)
        if not was_empty and (len(self._q) > self.max_frames or self._chars > self.max_chars):
            self._overflowed = True
            raise SlowConsumer(len(self._q), self._chars, self.max_frames, self.max_chars)

    def _push_delta(self, delta: Delta, now: float) -> None:
        self._chars += len(delta.text)
        if self.mode == "tokens":
            tail = self._q[-1] if self._q else None
            # Everything queued is ready, so merging into the tail only ever merges deltas the reader
            # has not taken yet. It starts once the reader is really behind (`tokens_merge_after`
            # frames waiting): a reader that keeps up gets every delta as its own frame.
            behind = len(self._q) >= min(self.tokens_merge_after, max(1, self.max_frames // 2))
            if behind and isinstance(tail, _Run) and tail.accepts(delta):
                tail.extend(delta)
                self._merged += 1
            else:
                self._q.append(_Run(delta, now))
            self._mark_ready(now)
            return
        held = self._held
        if held is not None and held.accepts(delta):
            held.extend(delta)
            self._merged += 1
        else:
            if held is not None:
                self._seal(now)
            held = _Run(delta, now)
            self._q.append(held)
            self._held = held
        if self.mode == "phrases" and (
            held.length >= self.phrase_max_chars or ends_at_clause_boundary(held.tail(_BOUNDARY_SCAN + 1))
        ):
            self._seal(now)

    def _seal(self, now: float) -> None:
        """Make the held tail run ready; fold it into a contiguous ready run the reader has not taken yet."""
        run = self._held
        assert run is not None and self._q and self._q[-1] is run
        self._held = None
        if len(self._q) >= 2:
            prev = self._q[-2]
            if isinstance(prev, _Run) and prev.can_absorb(run):
                prev.absorb(run)
                self._q.pop()
                self._merged += 1
        self._mark_ready(now)

    def _mark_ready(self, now: float) -> None:
        if self._ready_at is None:
            self._ready_at = now

    # ---- sender side ----------------------------------------------------------------------------

    def _held_deadline(self, held: _Run) -> float:
        if self.mode == "phrases":
            return held.held_since + self.phrase_max_wait_s
        return max(held.held_since, self._last_release + self.batch_interval_s)

    def pop_ready(self, now: float) -> list[ServerFrame]:
        """Frames ready to send at `now`, in order, merged per mode (possibly empty)."""
        if self._held is not None and self._held_deadline(self._held) <= now:
            self._seal(now)
        return self._pop_until_held(now)

    def pop_all(self, now: float) -> list[ServerFrame]:
        """Everything held, ignoring phrase/batch holds (for a long-poll answer or a graceful close)."""
        if self._held is not None:
            self._seal(now)
        return self._pop_until_held(now)

    def _pop_until_held(self, now: float) -> list[ServerFrame]:
        out: list[ServerFrame] = []
        released_delta = False
        q = self._q
        while q and q[0] is not self._held:
            entry = q.popleft()
            if isinstance(entry, _Run):
                self._chars -= entry.length
                out.append(entry.frame())
                released_delta = True
            else:
                self._chars -= _weight(entry)
                out.append(entry)
        self._ready_at = None
        if released_delta:
            self._last_release = now
        return out

    def next_deadline(self) -> float | None:
        """Earliest time at which `pop_ready` returns something; None when nothing is held.

        When frames are ready already this is the (past) time they became ready, so `<= now`.
        """
        if self._ready_at is not None:
            return self._ready_at
        if self._held is not None:
            return self._held_deadline(self._held)
        return None

    # ---- introspection --------------------------------------------------------------------------

    def __len__(self) -> int:
        """Frames held (a merged run of deltas counts as one)."""
        return len(self._q)

    @property
    def held_chars(self) -> int:
        """Code points of text held, the quantity bounded by `max_chars`."""
        return self._chars

    @property
    def merged_count(self) -> int:
        """Total deltas merged away (pushed deltas minus delta frames they became): a metric."""
        return self._merged

    @property
    def overflowed(self) -> bool:
        """True once `SlowConsumer` was raised: the connection must be closed with 4410."""
        return self._overflowed
