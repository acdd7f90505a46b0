"""The client-side invariants every drill and test checks (tidewire/invariants.py)."""

from __future__ import annotations

import pytest

from proto import client
from tidewire.invariants import InvariantError, check_seqs, check_turns


def turn(turn_id: str, first_seq: int, pieces: list[str], *, merge: tuple[int, int] | None = None) -> list:
    """turn_start, one delta per piece, turn_end; `merge=(i, j)` merges pieces i..j into one delta
    carrying the last member's seq and the first's offset, as the gateway does."""
    evs: list[client.Event] = [client.TurnStart(seq=first_seq, turn_id=turn_id)]
    seq, offset = first_seq, 0
    deltas = []
    for p in pieces:
        seq += 1
        deltas.append(client.Delta(seq=seq, turn_id=turn_id, offset=offset, text=p))
        offset += len(p)
    if merge is not None:
        i, j = merge
        run = deltas[i : j + 1]
        one = client.Delta(
            seq=run[-1].seq, turn_id=turn_id, offset=run[0].offset, text="".join(d.text for d in run)
        )
        deltas[i : j + 1] = [one]
    evs.extend(deltas)
    evs.append(client.TurnEnd(seq=seq + 1, turn_id=turn_id, status="completed", text="".join(pieces)))
    return evs


def test_gap_free_events_pass_both_ways() -> None:
    evs = turn("a", 1, ["x", "y", "z"]) + turn("b", 6, ["p"])
    check_seqs(evs)
    check_seqs(evs, merged=False)
    assert check_turns(evs)["a"].text == "xyz"


def test_a_merged_delta_may_jump_and_its_text_stays_exact() -> None:
    evs = turn("a", 1, ["x", "y", "z", "w"], merge=(1, 3))
    check_seqs(evs)
    assert check_turns(evs)["a"].text == "xyzw"
    with pytest.raises(InvariantError, match="seq gap: 2 -> 5"):
        check_seqs(evs, merged=False)


def test_a_jump_onto_anything_but_a_delta_is_a_gap() -> None:
    evs = turn("a", 1, ["x", "y"])
    del evs[2]  # the last delta lost: turn_end follows a hole
    with pytest.raises(InvariantError, match="seq gap: 2 -> 4 \\(TurnEnd\\)"):
        check_seqs(evs)


def test_a_jump_across_turns_is_a_gap_even_onto_a_delta() -> None:
    a, b = turn("a", 1, ["x"]), turn("b", 4, ["p", "q"])
    evs = a[:-1] + b[1:]  # a's turn_end and b's turn_start missing
    with pytest.raises(InvariantError, match="seq gap: 2 -> 5"):
        check_seqs(evs)


def test_a_repeat_or_reorder_is_refused() -> None:
    evs = turn("a", 1, ["x", "y"])
    with pytest.raises(InvariantError, match="duplicate or reorder"):
        check_seqs([*evs[:2], evs[1], *evs[2:]])


def test_a_hole_in_the_text_is_refused_even_where_seqs_may_jump() -> None:
    evs = turn("a", 1, ["x", "y", "z"])
    del evs[2]  # 'y' lost: the seq jump lands on a delta, but its offset shows the hole
    check_seqs(evs)
    with pytest.raises(InvariantError, match="offset 2, expected 1"):
        check_turns(evs)
