"""The invariants every drill checks, shared by the local chaos test and the Kubernetes drill.

A client's view of a session is the list of sequenced events it received (across reconnects).
The guarantees: seqs strictly increase, and by exactly 1 except onto a merged delta; each turn's
deltas, placed at their code-point offsets, cover the text with no gap and no overlap and equal
`turn_end.text`; and that text equals what Postgres holds.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from proto import client


@dataclass
class TurnView:
    turn_id: str
    text: str = ""
    ends: list[client.TurnEnd] = field(default_factory=list)
    starts: int = 0


class InvariantError(AssertionError):
    pass


def check_seqs(events: Sequence[client.Event], *, merged: bool = True) -> None:
    """Strictly increasing and gap-free, except where deltas were merged (PROTOCOL.md: in every
    delivery mode a connection's deltas may be merged, e.g. when many are ready at once; a merged
    delta carries its last member's seq). So a jump may only land on a delta, and only on one of the
    same turn as the event before it: its missing members are that turn's deltas, never another
    turn's turn_end. `merged=False`: no jump at all."""
    prev: client.Event | None = None
    for ev in events:
        if prev is not None:
            if ev.seq <= prev.seq:
                raise InvariantError(f"seq went from {prev.seq} to {ev.seq}: duplicate or reorder")
            if ev.seq != prev.seq + 1 and not (
                merged and isinstance(ev, client.Delta) and getattr(prev, "turn_id", None) == ev.turn_id
            ):
                raise InvariantError(f"seq gap: {prev.seq} -> {ev.seq} ({type(ev).__name__})")
        prev = ev


def assemble(events: Iterable[client.Event]) -> dict[str, TurnView]:
    """Per turn, the text the deltas give, placed exactly at their offsets (no overlap allowed)."""
    turns: dict[str, TurnView] = {}
    for ev in events:
        if isinstance(ev, client.Message):
            continue
        view = turns.setdefault(ev.turn_id, TurnView(ev.turn_id))
        if isinstance(ev, client.TurnStart):
            view.starts += 1
        elif isinstance(ev, client.Delta):
            if ev.offset != len(view.text):
                raise InvariantError(
                    f"turn {ev.turn_id}: delta at offset {ev.offset}, expected {len(view.text)}"
                )
            view.text += ev.text
        elif isinstance(ev, client.TurnEnd):
            view.ends.append(ev)
    return turns


def check_turns(events: Sequence[client.Event], *, require_end: bool = True) -> dict[str, TurnView]:
    turns = assemble(events)
    for view in turns.values():
        if view.starts > 1:
            raise InvariantError(f"turn {view.turn_id} started {view.starts} times")
        if len(view.ends) > 1:
            raise InvariantError(f"turn {view.turn_id} ended {len(view.ends)} times")
        if require_end and not view.ends:
            raise InvariantError(f"turn {view.turn_id} never ended")
        if view.ends and view.ends[0].text != view.text:
            raise InvariantError(
                f"turn {view.turn_id}: deltas give {len(view.text)} chars, "
                f"turn_end.text has {len(view.ends[0].text)}"
            )
    return turns
