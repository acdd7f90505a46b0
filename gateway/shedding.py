"""Delay-based shedding: the fraction of new sends a gateway refuses, from how long turns wait.

PIE (RFC 8033), on the turn queue instead of a router's: every sample (`shed_sample_ms`) the refusal
probability moves by `alpha` per second the delay stands above the target and by `beta` per second
it grew since the last sample (growth only counts above the target), and each send is refused with that probability. So past capacity a
gateway refuses about the excess — answered `degraded` at once, with no I/O — and admits the rest,
instead of letting every send in until queues, timeouts and lease lapses take the stack down, or
refusing everything while one sample looks bad (the binary thresholds of `gateway/limits.py`).

The delay is the longer of two waits, each from a window with enough samples, so that a lone slow
turn or a takeover's old receipt time does not count: the median of this gateway's own accepts
(receipt to ack: the stores and the bus making the message durable, `AcceptDelays`), and the
orchestrators' shortest pickup (receipt to turn start: when even the quickest turn waited, the
queue stands; the median over orchestrators, orchestrator/load.py). No evidence (too few samples) means the load is gone:
the refusals stop at once, and nothing is refused on a quiet stack.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class DelayShedder:
    target_s: float
    alpha: float = 0.25  # per sample, per second of delay above the target
    beta: float = 0.25  # per sample, per second the delay grew since the last sample
    max_step: float = 0.2  # the most one sample may add: a spike alone never refuses everything
    p: float = 0.0  # the probability that a new send is refused
    delay_s: float = 0.0  # the last delay it was told

    def update(self, delay_s: float | None) -> float:
        """One sample's delay (None: too few accepts and pickups to tell); returns the new
        probability. Too few to tell means the load is gone (a standing queue always has pickups),
        so the refusals stop at once: after a 400 msg/s level the halving decay still refused the
        canary sent 1-2 s after the backlog had drained."""
        if delay_s is None:
            self.p, self.delay_s = 0.0, 0.0
            return 0.0
        d = max(0.0, delay_s)
        step = self.alpha * (d - self.target_s) + self.beta * (d - self.delay_s)
        p = self.p + min(step, self.max_step)
        if d <= self.target_s:
            p = min(p, self.p)  # growth under the target refuses nothing more
        if d < self.target_s / 2 and self.delay_s < self.target_s / 2:
            p = min(p, self.p / 2)  # two samples well under the target: decay fast
            if p < 0.01:
                p = 0.0
        self.p = min(1.0, max(0.0, p))
        self.delay_s = d
        return self.p

    def admits(self, u: float) -> bool:
        """Whether a send with the uniform draw `u` in [0, 1) is admitted."""
        return u >= self.p


class AcceptDelays:
    """This gateway's accepts (receipt to ack) since the last sample: their median, when there were
    enough to tell (`MIN_EVIDENCE`). The median, not the shortest: a send waits in connection pools
    whose waits vary a lot, and the lucky few that found a free connection hid the queue (at 300
    msg/s the shortest stayed low while most sends timed out)."""

    MIN_EVIDENCE = 4
    KEPT = 256  # values kept per window: enough for a median, bounded
    __slots__ = ("_values",)

    def __init__(self) -> None:
        self._values: list[float] = []

    def note(self, seconds: float) -> None:
        if len(self._values) < self.KEPT:
            self._values.append(seconds)

    def take(self) -> float | None:
        """The window's median accept (None: too few), and a new window."""
        values, self._values = self._values, []
        if len(values) < self.MIN_EVIDENCE:
            return None
        values.sort()
        return values[len(values) // 2]


def standing_delay_s(*delays: float | None) -> float | None:
    """The longest of the standing waits that could be told."""
    known = [d for d in delays if d is not None]
    return max(known) if known else None
