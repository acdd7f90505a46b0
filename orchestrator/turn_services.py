"""The process side of a turn: what a session runner asks of its orchestrator (`TurnPorts`).

One object holds the adapters a turn uses and the few effects that need the process's shared
state: the session fetch, flag resolution and context pack before the model is asked (three timed
stages), the shared upstream gate, tool calls through the dispatcher, dead letters and analytics.
A runner sees this object only through `orchestrator.ports.TurnPorts`.
"""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec

from orchestrator.analytics import AnalyticsPublisher, tool_calls_in, turn_analytics
from orchestrator.flags import FlagResolver, system_prompt_for
from orchestrator.leases import LeaseKeeper
from orchestrator.load import LoadReporter
from orchestrator.packer import pack
from orchestrator.ports import Clock, SystemClock
from orchestrator.providers.base import Provider, ToolSpec
from orchestrator.settings import OrchestratorSettings
from orchestrator.tools import ToolDispatcher
from orchestrator.turn import TurnPlan
from proto import bus as busproto
from proto import client
from proto.state import ChatMessage, SessionState
from shared import telemetry
from shared.bus import Bus
from shared.checkpoints import CheckpointStore
from shared.eventlog import EventLog
from shared.sessionstate import SessionStore

log = logging.getLogger(__name__)

_tool_seconds = telemetry.histogram(
    "tidewire_tool_call_seconds",
    description="Tool call latency seen by the turn (dispatch -> result)",
)
_turn_seconds = telemetry.histogram(
    "tidewire_turn_seconds",
    description="Whole turn duration, pickup -> turn_end durable",
)


@dataclass(eq=False, kw_only=True)
class TurnServices:
    id: str
    settings: OrchestratorSettings
    metrics: collections.Counter[str]
    checkpoints: CheckpointStore
    eventlog: EventLog
    bus: Bus
    leases: LeaseKeeper
    load: LoadReporter
    provider: Provider
    sessions: SessionStore
    flags: FlagResolver
    analytics: AnalyticsPublisher
    tools: ToolDispatcher | None
    system_prompts: dict[str, str]
    clock: Clock = field(default_factory=SystemClock)

    async def plan_turn(self, req: busproto.TurnRequest, stored_state: bytes | None) -> TurnPlan:
        """Session fetch, context pack and retrieval: three timed stages before the model is asked.
        `stored_state` came with the turn's claim (None: nothing stored, rebuild from the log)."""
        tracer = telemetry.tracer
        t0 = time.perf_counter()
        with tracer.start_as_current_span("session.fetch"):
            state = await self.sessions.load(req.session_id, req.subject, stored=stored_state)
            flags = await self.flags.resolve(req.session_id, req.subject, state.flags)
        t1 = time.perf_counter()
        telemetry.observe_stage("session_fetch", t1 - t0)
        with tracer.start_as_current_span("context.pack"):
            messages = self._pack(req, state, flags)
        t2 = time.perf_counter()
        telemetry.observe_stage("context_pack", t2 - t1)
        with tracer.start_as_current_span("retrieval", attributes={"retrieval.enabled": False}):
            pass  # no retrieval stage yet: the span and histogram mark where it will go
        telemetry.observe_stage("retrieval", time.perf_counter() - t2)
        return TurnPlan.build(
            flags,
            messages=messages,
            tools=self.tool_specs(),
            state=state,
            default_provider=self.settings.provider,
            default_disconnect_policy=self.settings.disconnect_policy,
        )

    def _pack(
        self, req: busproto.TurnRequest, state: SessionState, flags: dict[str, Any]
    ) -> list[ChatMessage]:
        window = [m for m in state.window if m.turn_id != req.turn_id or m.role != "assistant"]
        if not any(m.turn_id == req.turn_id and m.role == "user" for m in window):
            window.append(ChatMessage(role="user", text=req.text, turn_id=req.turn_id, seq=req.user_seq))
        if req.attachments:
            note = "\n".join(f"[attachment {a.media_id}]" for a in req.attachments)
            window = [
                msgspec.structs.replace(m, text=f"{m.text}\n{note}")
                if m.turn_id == req.turn_id and m.role == "user" and note not in m.text
                else m
                for m in window
            ]
        state.window = window
        prompt = system_prompt_for(
            flags.get("system_prompt_version"), self.settings.system_prompt, self.system_prompts
        )
        messages, meta = pack(prompt, window, self.settings.context_budget_tokens)
        state.packer = meta
        return messages

    def encode_state(self, state: SessionState) -> bytes:
        """The session state as the turn's finish step stores it."""
        return self.sessions.encode(state)

    def tool_specs(self) -> list[ToolSpec]:
        return list(self.tools.specs()) if self.tools is not None else []

    def record_analytics(
        self, req: busproto.TurnRequest, ended: client.TurnEnd, raws: list[bytes], first_token_ns: int | None
    ) -> None:
        """Never on the token path: a bounded queue, published in the background, dropped when full."""
        self.analytics.offer(
            turn_analytics(req, ended, first_token_ns=first_token_ns, tool_calls=tool_calls_in(raws))
        )

    async def call_tool(
        self,
        session_id: str,
        turn_id: str,
        call_id: str,
        name: str,
        args: dict[str, Any],
        *,
        abandon_on_cancel: Callable[[], bool],
    ) -> tuple[bool, str]:
        if self.tools is None:
            return False, f"{name} is not available: no tool workers are configured"
        self.metrics["tool_calls"] += 1
        t0 = time.perf_counter()
        outcome_label = "cancelled"
        with telemetry.tracer.start_as_current_span(
            "tool.call", kind=telemetry.SpanKind.PRODUCER, attributes={"tool": name, "call_id": call_id}
        ) as span:
            try:
                outcome = await self.tools.call(
                    session_id, turn_id, call_id, name, args, abandon_on_cancel=abandon_on_cancel
                )
                timed_out = bool(getattr(outcome, "timed_out", False))
                outcome_label = "timeout" if timed_out else "ok" if outcome.ok else "error"
                span.set_attribute("outcome", outcome_label)
            finally:
                _tool_seconds.record(time.perf_counter() - t0, {"tool": name, "outcome": outcome_label})
        if timed_out:
            self.metrics["tool_timeouts"] += 1
        return bool(outcome.ok), str(outcome.text)

    def observe_turn(self, seconds: float, status: str) -> None:
        _turn_seconds.record(seconds, {"status": status})

    def observe_first_event(self, req: busproto.TurnRequest) -> None:
        if req.received_at_ns:
            self.metrics["turns_started"] += 1

    async def dead_letter(self, req: busproto.TurnRequest, reason: str) -> None:
        self.metrics["dead_lettered"] += 1
        telemetry.tracer.start_span("orchestrator.dead_letter", attributes={"reason": reason}).end()
        try:
            await self.bus.dead_letter(req, reason)
        except Exception as e:  # noqa: BLE001 - the failure is still reported to the user
            log.error("dead-letter publish failed for %s: %s", req.turn_id, e)
