"""DelayShedder (gateway/shedding.py): refuses about the excess while turns stand waiting, nothing
on a quiet stack, and lets go once the wait is gone."""

from __future__ import annotations

import random

from gateway.limits import standing_delay_ms
from gateway.shedding import AcceptDelays, DelayShedder, standing_delay_s


def _admitted(shedder: DelayShedder, n: int, rng: random.Random) -> int:
    return sum(shedder.admits(rng.random()) for _ in range(n))


def test_nothing_is_refused_while_turns_start_in_time() -> None:
    s = DelayShedder(0.25)
    for d in (None, 0.01, 0.2, None, 0.24, 0.1):
        assert s.update(d) == 0.0, f"refusing at delay {d}"
    assert _admitted(s, 1000, random.Random(1)) == 1000


def test_a_standing_wait_raises_the_refused_fraction_step_by_step() -> None:
    s = DelayShedder(0.25)
    seen = [s.update(1.0) for _ in range(4)]
    assert seen == sorted(seen) and seen[0] > 0, f"probabilities under a 1 s wait: {seen}"
    assert seen[-1] < 1.0, "four samples of 1 s must not refuse every send yet"
    # a delay that keeps growing adds the growth term on top
    grower = DelayShedder(0.25)
    for d in (0.5, 1.0, 1.5):
        grower.update(d)
    steady = DelayShedder(0.25)
    for d in (1.0, 1.0, 1.0):
        steady.update(d)
    assert grower.p > steady.p, (grower.p, steady.p)


def test_the_admitted_fraction_follows_the_probability() -> None:
    s = DelayShedder(0.25, p=0.3, delay_s=1.0)
    n = _admitted(s, 10_000, random.Random(7))
    assert 6_700 < n < 7_300, f"{n} of 10,000 admitted at p=0.3"


def test_once_turns_stop_waiting_the_refusals_stop_within_a_few_samples() -> None:
    s = DelayShedder(0.25)
    for _ in range(20):
        s.update(2.0)
    assert s.p == 1.0
    assert s.update(None) == 0.0, "too few samples to tell: the load is gone, refuse nothing"
    for _ in range(20):
        s.update(2.0)
    after = [s.update(0.01) for _ in range(8)]  # turns start in time again
    assert after[-1] == 0.0, f"still refusing after the wait went away: {after}"
    assert after.index(0.0) <= 7, f"took {after.index(0.0) + 1} samples to stop refusing: {after}"


def test_the_standing_delay_is_the_median_of_the_orchestrators_that_can_tell() -> None:
    assert standing_delay_ms([]) is None
    assert standing_delay_ms([(900, 5, -1), (800, 3, -1)]) is None  # too few pickups anywhere
    assert standing_delay_ms([(900, 5, 400), (800, 3, -1), (50, 1, 10)]) == 400
    assert standing_delay_ms([(900, 5, 400), (80, 3, 20), (50, 1, 10)]) == 20  # one slow one sheds nothing


def test_accepts_tell_a_standing_wait_only_from_enough_of_them() -> None:
    a = AcceptDelays()
    for v in (0.9, 0.7, 0.8):
        a.note(v)
    assert a.take() is None, "three accepts are too few to tell"
    for v in (0.9, 0.7, 0.8, 1.2, 0.01):
        a.note(v)
    assert a.take() == 0.8, "the median of the window"
    assert a.take() is None, "a new window starts empty"
    assert standing_delay_s(None, None) is None
    assert standing_delay_s(0.7, None) == 0.7
    assert standing_delay_s(0.2, 1.1) == 1.1
