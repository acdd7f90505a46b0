"""What a gateway request handler needs, assembled once per process by `gateway.app.create_app`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from gateway.metrics import TurnTraces
from gateway.settings import GatewaySettings
from gateway.shedding import AcceptDelays
from shared.bus import Bus
from shared.checkpoints import CheckpointStore
from shared.eventlog import EventLog
from shared.flags import FlagResolver


@dataclass
class Counters:
    """Plain ints bumped on hot paths; exposed as `tidewire_gateway_<field>` by gateway.metrics
    (`sockets` and `sse_streams` are gauges, the rest counters)."""

    sockets: int = 0
    sse_streams: int = 0
    reconnects: int = 0  # a stream opened with last_seen_seq > 0 (any transport)
    resumes: int = 0
    resets: int = 0
    degraded: int = 0
    merged_deltas: int = 0
    slow_consumers: int = 0
    bad_frames: int = 0
    sends: int = 0
    cancel_requests: int = 0
    gap_reads: int = 0  # store reads because a live event did not follow the last seq delivered


FLAG_TTL_S = 2.0  # as in the orchestrator: a flag flip applies to sends a couple of seconds later


@dataclass
class Deps:
    settings: GatewaySettings
    eventlog: EventLog
    checkpoints: CheckpointStore
    bus: Bus
    gateway_id: str
    counters: Counters = field(default_factory=Counters)
    turn_traces: TurnTraces = field(default_factory=TurnTraces)
    accepts: AcceptDelays = field(default_factory=AcceptDelays)  # for delay-based shedding
    draining: bool = False
    flag_cache: dict[str, tuple[float, dict[str, object]]] = field(default_factory=dict)
    flags: FlagResolver = field(init=False)  # deployment / tenant / operator scopes (shared.flags)
    media: Any = None  # gateway.media.MediaStore: uploads referenced by `send.attachments`

    def __post_init__(self) -> None:
        self.flags = FlagResolver(self.eventlog, ttl_s=FLAG_TTL_S)
