"""The gateway's metrics and its end of a turn's trace: TTFT to the first byte written, `/metrics`.

The gateway that handles a `send` remembers the turn's span context and receive time
(`TurnTraces`, bounded). When any connection's sender writes the first `delta` of that turn,
the gateway records `tidewire_ttft_seconds` (receipt → first delta written to a client) and a
`gateway.first_byte` span in the turn's trace. Only the gateway that received the message
measures it; a client watching from another gateway is not counted (docs/operations.md).

Counters that handlers bump on their hot paths are plain ints on `Deps.counters`; they are read
here only when `/metrics` is scraped.
"""

from __future__ import annotations

import collections
import dataclasses
import time
from typing import TYPE_CHECKING

from proto import client
from shared import telemetry

if TYPE_CHECKING:
    from opentelemetry.trace import SpanContext

    from gateway.deps import Deps

_ttft = telemetry.histogram(
    "tidewire_ttft_seconds",
    description="Time to first token: the gateway received the user message -> first delta written to a client",
)

GAUGES = frozenset({"sockets", "sse_streams"})  # Counters fields that go up and down


class TurnTraces:
    """turn_id → (span context of the `send`, monotonic receive time), for turns this gateway
    received and whose first delta was not written yet. Bounded: the oldest are forgotten."""

    def __init__(self, max_turns: int = 10_000) -> None:
        self._turns: collections.OrderedDict[str, tuple[SpanContext, int]] = collections.OrderedDict()
        self._recent: collections.OrderedDict[str, SpanContext] = collections.OrderedDict()  # for `stop`
        self._max = max_turns

    def __bool__(self) -> bool:
        return bool(self._turns)

    def __len__(self) -> int:
        return len(self._turns)

    def started(self, turn_id: str, span_context: SpanContext, received_mono_ns: int) -> None:
        self._turns[turn_id] = (span_context, received_mono_ns)
        self._recent[turn_id] = span_context
        while len(self._turns) > self._max:
            self._turns.popitem(last=False)
        while len(self._recent) > self._max:
            self._recent.popitem(last=False)

    def forget(self, turn_id: str) -> None:
        """The send failed: no turn will come of it (the client retries with the same client_msg_id)."""
        self._turns.pop(turn_id, None)
        self._recent.pop(turn_id, None)

    def span_context(self, turn_id: str) -> SpanContext | None:
        return self._recent.get(turn_id)

    def written(self, frames: list[client.ServerFrame], write_started_ns: int) -> None:
        """Called by a sender after a write, only while some turn is awaited (cheap otherwise)."""
        for f in frames:
            kind = type(f)
            if kind is client.Delta:
                hit = self._turns.pop(f.turn_id, None)  # type: ignore[union-attr]
                if hit is None:
                    continue
                span_context, received = hit
                ttft = (time.monotonic_ns() - received) / 1e9
                _ttft.record(ttft)
                telemetry.record_span(
                    "gateway.first_byte",
                    write_started_ns,
                    time.time_ns(),
                    parent=telemetry.context_of(span_context),
                    attributes={"turn_id": f.turn_id, "ttft_s": ttft},  # type: ignore[union-attr]
                    kind=telemetry.SpanKind.PRODUCER,
                )
            elif kind is client.TurnEnd:  # ended without any text: nothing to measure
                self._turns.pop(f.turn_id, None)  # type: ignore[union-attr]


def install(deps: Deps) -> None:
    """Exposes this gateway's counters (names kept: `tidewire_gateway_<field>`)."""
    for f in dataclasses.fields(deps.counters):
        name = f.name

        def read(name: str = name) -> int:
            return int(getattr(deps.counters, name))

        telemetry.observe(f"tidewire_gateway_{name}", read, kind="gauge" if name in GAUGES else "counter")
    telemetry.observe("tidewire_gateway_turns_awaiting_first_byte", lambda: len(deps.turn_traces))
