"""A turn's progress as a small state machine with no I/O (the deterministic part).

`TurnProgress` knows what the turn has said so far, allocates offsets in code points, builds the
events to checkpoint (encoded with the `"seq":0` placeholder the checkpoint store replaces), and
can be rebuilt exactly from the checkpointed events after a crash: the new owner continues from
the checkpointed text, which is precisely what any client may have seen.

`TurnPlan` is what the turn runs with (messages, tools, model, disconnect policy, flags in
force), fixed once its context is loaded, so every model step and the turn's row agree.

The turn's decisions live here too: `TurnMachine` is fed what the runner observes, event by
event (claimed, planned, a step, its first text, a step's error, a cancel, a watcher sample, the
end of generation) and answers what the runner does next, built on pure functions (`decide_start`,
`generation_outcome`, `may_retry_step`, `may_ask_model`, `disconnect_grace`). They are what makes
a takeover, a retry or a cancel behave, so they are unit-tested, whole turns replayed event by event
(tests/unit/test_turn_decisions.py), without servers or sleeping.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import msgspec

from orchestrator.flags import parse_route, select_tools
from orchestrator.providers.base import ProviderError, ToolSpec
from proto import client
from proto.state import ChatMessage, SessionState

if TYPE_CHECKING:
    from shared.checkpoints import TurnSnapshot

_enc = client.json_encoder.encode


class TurnProgress:
    def __init__(self, turn_id: str) -> None:
        self.turn_id = turn_id
        self.started = False
        self.start_seq = 0
        self.text = ""
        self.offset = 0
        self.step_start = 0
        self.ended: client.TurnEnd | None = None
        self.calls: dict[str, client.ToolCall] = {}
        self.results: dict[str, client.ToolResult] = {}

    @classmethod
    def restore(cls, turn_id: str, events: Iterable[client.Event]) -> TurnProgress:
        p = cls(turn_id)
        for ev in events:
            if getattr(ev, "turn_id", None) != turn_id:
                continue
            if isinstance(ev, client.TurnStart):
                p.started, p.start_seq = True, ev.seq
            elif isinstance(ev, client.Delta):
                if ev.offset != p.offset:
                    raise ValueError(f"checkpoint of {turn_id} has a hole at offset {p.offset}")
                p.text += ev.text
                p.offset += len(ev.text)
            elif isinstance(ev, client.ToolCall):
                p.calls[ev.call_id] = ev
            elif isinstance(ev, client.ToolResult):
                p.results[ev.call_id] = ev
                p.step_start = p.offset
            elif isinstance(ev, client.TurnEnd):
                p.ended = ev
        return p

    # ---- building events ---------------------------------------------------------------------
    def turn_start(self) -> bytes:
        self.started = True
        return _enc(client.TurnStart(seq=0, turn_id=self.turn_id))

    def delta(self, text: str) -> bytes:
        raw = _enc(client.Delta(seq=0, turn_id=self.turn_id, offset=self.offset, text=text))
        self.text += text
        self.offset += len(text)
        return raw

    def status(self, text: str) -> bytes:
        return _enc(client.Status(seq=0, turn_id=self.turn_id, text=text))

    def tool_call(self, call_id: str, name: str, args: dict[str, Any]) -> bytes:
        ev = client.ToolCall(seq=0, turn_id=self.turn_id, call_id=call_id, name=name, args=args)
        self.calls[call_id] = ev
        return _enc(ev)

    def tool_result(self, call_id: str, ok: bool, text: str) -> bytes:
        ev = client.ToolResult(seq=0, turn_id=self.turn_id, call_id=call_id, ok=ok, text=text)
        self.results[call_id] = ev
        self.step_start = self.offset
        return _enc(ev)

    def end(self, status: client.TurnStatus) -> bytes:
        self.ended = client.TurnEnd(seq=0, turn_id=self.turn_id, status=status, text=self.text)
        return _enc(self.ended)

    # ---- what the model needs -------------------------------------------------------------------
    def step_text(self) -> str:
        """The text of the current model step, for `continue_from` after a takeover."""
        return self.text[self.step_start :]

    def unfinished_calls(self) -> list[client.ToolCall]:
        return [c for cid, c in self.calls.items() if cid not in self.results]

    def tool_messages(self) -> list[ChatMessage]:
        out: list[ChatMessage] = []
        if self.calls and self.step_start:
            out.append(ChatMessage(role="assistant", text=self.text[: self.step_start], turn_id=self.turn_id))
        for cid, res in self.results.items():
            out.append(
                ChatMessage(
                    role="tool",
                    text=res.text,
                    tool_call_id=cid,
                    name=self.calls[cid].name,
                    turn_id=self.turn_id,
                )
            )
        return out


def status_line(names: list[str]) -> str:
    """The short human line shown the moment the model reaches for a tool."""
    pretty = {
        "clock": "the clock",
        "calculator": "the calculator",
        "slow_lookup": "a slow lookup",
        "http_get": "the web",
    }
    what = ", ".join(pretty.get(n, n) for n in names)
    return f"Let me check {what}…"


@dataclass(frozen=True, slots=True)
class TurnPlan:
    """What one turn runs with, decided once when its context is loaded. A turn that never loads
    it (ended before the model, or taken over after its model was done) runs with `unloaded`."""

    messages: tuple[ChatMessage, ...]
    tools: tuple[ToolSpec, ...]
    model: str | None
    disconnect_policy: str
    flags_in_force: Mapping[str, Any]  # recorded on the turn's row, so an incident sees what was used
    state: SessionState | None = field(default=None, compare=False)  # as packed; None: not loaded

    @classmethod
    def build(
        cls,
        flags: Mapping[str, Any],
        *,
        messages: Sequence[ChatMessage],
        tools: Sequence[ToolSpec],
        default_provider: str,
        default_disconnect_policy: str,
        state: SessionState | None = None,
    ) -> TurnPlan:
        """From the turn's resolved flags; `tools` are all the tools offered, before `tool_set`."""
        policy = str(flags.get("disconnect_policy", default_disconnect_policy))
        model = flags.get("model")
        in_force = {
            "provider": parse_route(model, default_provider=default_provider).provider,
            "disconnect_policy": policy,
            **flags,
        }
        return cls(
            messages=tuple(messages),
            tools=tuple(select_tools(tools, flags.get("tool_set"))),
            model=None if model is None else str(model),
            disconnect_policy=policy,
            flags_in_force=in_force,
            state=state,
        )

    @classmethod
    def unloaded(cls, *, default_provider: str, default_disconnect_policy: str) -> TurnPlan:
        return cls.build(
            {},
            messages=(),
            tools=(),
            default_provider=default_provider,
            default_disconnect_policy=default_disconnect_policy,
        )

    def state_after(self, turn_id: str, ended: client.TurnEnd) -> SessionState | None:
        """The session state with this turn's answer (None: never loaded; rebuilt when needed)."""
        if self.state is None:
            return None
        answer = ChatMessage(role="assistant", text=ended.text, turn_id=turn_id, seq=ended.seq)
        return msgspec.structs.replace(self.state, window=[*self.state.window, answer], last_turn_id=turn_id)


# ---- the turn's decisions (pure) -------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Outcome:
    """How a turn ends: its `turn_end` status, a reason for the log, and a status line shown to
    the user just before `turn_end` (None: nothing to add)."""

    status: client.TurnStatus
    why: str = ""
    notice: str | None = None


@dataclass(frozen=True, slots=True)
class Skip:
    """Nothing to play (already done, or its request is gone): finish it with `status`."""

    status: str


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A poison turn: park its request in the dead-letter stream, then end it with `outcome`."""

    reason: str
    outcome: Outcome


@dataclass(frozen=True, slots=True)
class Run:
    """Ask the model."""


StartDecision = Skip | DeadLetter | Outcome | Run


def decide_start(snap: TurnSnapshot, *, max_attempts: int, max_starts: int) -> StartDecision:
    """What to do with a claimed turn. `starts` counts this start too. Starts get a much higher
    ceiling than failures: an owner dying mid-turn is indistinguishable from chaos, so only a
    crash loop trips it. An `Outcome` means: end the turn at once, without the model."""
    state = snap.state
    if snap.request is None or (state is not None and state[0] == "done"):
        return Skip(state[1] if state else "failed")
    failures, starts = snap.failures, snap.starts
    if failures >= max_attempts or starts > max_starts:
        tries = max(failures, starts - 1)
        return DeadLetter(
            f"failed {failures} times, started {starts - 1} times",
            Outcome(
                "failed", "dead-lettered", f"This message could not be processed after {tries} attempts."
            ),
        )
    if snap.cancelled:
        return Outcome("cancelled", "cancelled before it started")
    return Run()


def generation_outcome(
    *, finished: bool, error: BaseException | None, cancel_reason: str | None, timeout_s: float
) -> Outcome:
    """The outcome of the model's part of a turn. Only a provider error is an outcome the user
    sees; any other error is re-raised (a bug or a store failure: the turn is retried and its
    failures counted). Unfinished means stopped: by a cancel if one was asked, else the timeout."""
    if finished:
        if isinstance(error, ProviderError):
            return Outcome("failed", str(error), f"The model failed: {error}")
        if error is not None:
            raise error
        return Outcome("completed")
    if cancel_reason is not None:
        return Outcome("cancelled", cancel_reason)
    return Outcome("timed_out", f"no answer within {timeout_s:g} s")


def may_retry_step(error: BaseException, *, first_token: bool) -> bool:
    """A model step is retried only before its first token: after it, the text already shown
    would be said twice."""
    return isinstance(error, ProviderError) and error.retryable and not first_token


def may_ask_model(steps_taken: int, max_tool_steps: int) -> bool:
    """The tool-step budget: the model may be asked once plus once after each of at most
    `max_tool_steps` rounds of tool calls; past that the turn ends with what it has."""
    return steps_taken <= max_tool_steps


def disconnect_grace(policy: str) -> float | None:
    """Seconds a turn may run unwatched under `cancel_after=<s>`; None for `continue`."""
    if not policy.startswith("cancel_after="):
        return None
    return float(policy.split("=", 1)[1])


class TurnMachine:
    """One turn's decisions with their state, fed what the runner observes, event by event: the
    claim, the plan once loaded, each model step and its first text, a step's error, a cancel, a
    watcher sample, the end of generation. It answers what the runner does next, and holds what
    those answers depend on (steps asked, whether the step has shown text, the cancel's reason, since
    when nobody watched), so the runner keeps none of it. Time arrives as arguments (the runner's
    clock port), so a test replays a turn, disconnect grace included, without sleeping."""

    def __init__(
        self,
        plan: TurnPlan,
        *,
        max_attempts: int,
        max_starts: int,
        max_tool_steps: int,
        turn_timeout_s: float,
    ) -> None:
        self.plan = plan
        self.max_attempts, self.max_starts = max_attempts, max_starts
        self.max_tool_steps, self.turn_timeout_s = max_tool_steps, turn_timeout_s
        self.steps = 0
        self.step_has_text = False
        self.first_token_ns: int | None = None  # wall clock of the turn's first text, for analytics
        self.cancel_reason: str | None = None
        self.ending = False  # stopped for good (cancel, timeout, policy): its tool calls are abandoned
        self._alone_since: float | None = None

    def claimed(self, snap: TurnSnapshot) -> StartDecision:
        return decide_start(snap, max_attempts=self.max_attempts, max_starts=self.max_starts)

    def planned(self, plan: TurnPlan) -> None:
        self.plan = plan

    def next_step(self) -> bool:
        """Before each model step: False when the tool-step budget is spent (end with what it has)."""
        if not may_ask_model(self.steps, self.max_tool_steps):
            return False
        self.steps += 1
        self.step_has_text = False
        return True

    def text(self, now_ns: int) -> bool:
        """Text of the current step is ready; True for the step's first (sent at once: it is TTFT)."""
        first = not self.step_has_text
        self.step_has_text = True
        if self.first_token_ns is None:
            self.first_token_ns = now_ns
        return first

    def step_failed(self, error: BaseException) -> bool:
        """True: ask the model again for this step."""
        return may_retry_step(error, first_token=self.step_has_text)

    def cancel(self, reason: str) -> None:
        """A stop asked (by a client, an operator, the disconnect policy); the first reason is kept."""
        if self.cancel_reason is None:
            self.cancel_reason = reason

    @property
    def watches_clients(self) -> bool:
        """Whether the disconnect policy needs watcher samples at all (`continue` does not)."""
        return disconnect_grace(self.plan.disconnect_policy) is not None

    def watcher_sample(self, watched: bool, now: float) -> bool:
        """Whether any connection watches the session, sampled at `now` (monotonic seconds).
        True: the grace is spent, the turn is cancelled (`cancel_reason` says why)."""
        grace = disconnect_grace(self.plan.disconnect_policy)
        if grace is None or watched:
            self._alone_since = None
            return False
        if self._alone_since is None:
            self._alone_since = now
        if now - self._alone_since < grace:
            return False
        self.cancel(f"every client disconnected for {grace:g} s")
        return True

    def stop(self) -> None:
        """Generation is stopped before it finished (a cancel or the timeout): the turn ends for good."""
        self.ending = True

    def generation_ended(self, *, finished: bool, error: BaseException | None) -> Outcome:
        return generation_outcome(
            finished=finished,
            error=error,
            cancel_reason=None if finished else self.cancel_reason,
            timeout_s=self.turn_timeout_s,
        )
