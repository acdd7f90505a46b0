"""What a session runner needs from its process, and nothing more.

The runner is typed against `TurnPorts`, not against `OrchestratorService`: the turn's effects go
through these adapters and hooks only, so the runner can be driven by anything that provides them
(the service satisfies the protocol structurally) and the runner never imports the service.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable
from typing import Any, Protocol

from orchestrator.leases import LeaseKeeper
from orchestrator.load import LoadReporter
from orchestrator.providers.base import Provider
from orchestrator.settings import OrchestratorSettings
from orchestrator.turn import TurnPlan
from proto import bus as busproto
from proto import client
from proto.state import SessionState
from shared.bus import Bus
from shared.checkpoints import CheckpointStore
from shared.eventlog import EventLog


class Clock(Protocol):
    """Where a runner reads time: the turn's decisions take it as arguments (`TurnMachine`), so
    a test can drive a runner with a clock of its own."""

    def monotonic(self) -> float: ...
    def time_ns(self) -> int: ...


class SystemClock:
    def monotonic(self) -> float:
        return time.monotonic()

    def time_ns(self) -> int:
        return time.time_ns()


class TurnPorts(Protocol):
    # ---- identity, settings, clock and counters --------------------------------------------------
    @property
    def id(self) -> str: ...
    @property
    def clock(self) -> Clock: ...
    @property
    def settings(self) -> OrchestratorSettings: ...
    @property
    def metrics(self) -> collections.Counter[str]: ...

    # ---- adapters --------------------------------------------------------------------------------
    @property
    def leases(self) -> LeaseKeeper: ...
    @property
    def checkpoints(self) -> CheckpointStore: ...
    @property
    def eventlog(self) -> EventLog: ...
    @property
    def bus(self) -> Bus: ...
    @property
    def load(self) -> LoadReporter: ...
    @property
    def provider(self) -> Provider: ...

    # ---- per-turn context ------------------------------------------------------------------------
    async def plan_turn(self, req: busproto.TurnRequest, stored_state: bytes | None) -> TurnPlan: ...
    def encode_state(self, state: SessionState) -> bytes: ...

    # ---- effects ---------------------------------------------------------------------------------
    async def call_tool(
        self,
        session_id: str,
        turn_id: str,
        call_id: str,
        name: str,
        args: dict[str, Any],
        *,
        abandon_on_cancel: Callable[[], bool],
    ) -> tuple[bool, str]: ...
    async def dead_letter(self, req: busproto.TurnRequest, reason: str) -> None: ...
    def record_analytics(
        self, req: busproto.TurnRequest, ended: client.TurnEnd, raws: list[bytes], first_token_ns: int | None
    ) -> None: ...

    # ---- metrics hooks ---------------------------------------------------------------------------
    def observe_first_event(self, req: busproto.TurnRequest) -> None: ...
    def observe_turn(self, seconds: float, status: str) -> None: ...
