"""The turn's decisions (orchestrator/turn.py), event by event, without servers."""

from __future__ import annotations

import pytest

from orchestrator.providers.base import ProviderError, ToolSpec
from orchestrator.turn import (
    DeadLetter,
    Outcome,
    Run,
    Skip,
    TurnMachine,
    TurnPlan,
    decide_start,
    disconnect_grace,
    generation_outcome,
    may_ask_model,
    may_retry_step,
)
from proto import client
from proto.state import ChatMessage, SessionState
from shared.checkpoints import TurnSnapshot


def snap(
    *,
    request: bytes | None = b"{}",
    state: tuple[str, str] | None = None,
    starts: int = 1,
    failures: int = 0,
    cancelled: bool = False,
) -> TurnSnapshot:
    return TurnSnapshot(
        request=request, state=state, starts=starts, failures=failures, cancelled=cancelled, turn_id="t1"
    )


def start(s: TurnSnapshot) -> object:
    return decide_start(s, max_attempts=3, max_starts=10)


# ---- at start ------------------------------------------------------------------------------------
def test_a_fresh_turn_runs() -> None:
    assert start(snap()) == Run()


def test_a_takeover_of_a_running_turn_runs() -> None:
    assert start(snap(state=("running", "7"), starts=2)) == Run()


def test_a_turn_already_done_is_finished_with_its_status() -> None:
    assert start(snap(state=("done", "completed"))) == Skip("completed")


def test_a_done_turn_is_skipped_even_when_cancelled_or_poisoned() -> None:
    assert start(snap(state=("done", "cancelled"), failures=9, starts=99, cancelled=True)) == Skip(
        "cancelled"
    )


def test_a_turn_without_its_request_is_finished_failed() -> None:
    assert start(snap(request=None)) == Skip("failed")


def test_dead_letter_after_max_turn_attempts_failures() -> None:
    assert start(snap(failures=2, starts=3)) == Run()
    d = start(snap(failures=3, starts=4))
    assert isinstance(d, DeadLetter)
    assert d.reason == "failed 3 times, started 3 times"
    assert d.outcome == Outcome(
        "failed", "dead-lettered", "This message could not be processed after 3 attempts."
    )


def test_dead_letter_after_max_turn_starts_counts_the_starts_before_this_one() -> None:
    assert start(snap(starts=10)) == Run()
    d = start(snap(starts=11))
    assert isinstance(d, DeadLetter)
    assert d.reason == "failed 0 times, started 10 times"
    assert d.outcome.notice == "This message could not be processed after 10 attempts."


def test_dead_letter_wins_over_a_cancel_before_start() -> None:
    assert isinstance(start(snap(failures=3, cancelled=True)), DeadLetter)


def test_cancelled_before_it_started_ends_without_the_model() -> None:
    assert start(snap(cancelled=True)) == Outcome("cancelled", "cancelled before it started")


# ---- the outcome of generation ---------------------------------------------------------------------
def outcome(
    *, finished: bool, error: BaseException | None = None, cancel_reason: str | None = None
) -> Outcome:
    return generation_outcome(finished=finished, error=error, cancel_reason=cancel_reason, timeout_s=2.5)


def test_a_finished_generation_is_completed_with_nothing_to_add() -> None:
    assert outcome(finished=True) == Outcome("completed", "", None)


def test_a_provider_error_fails_the_turn_with_its_status_line() -> None:
    err = ProviderError("upstream 503", retryable=True)
    assert outcome(finished=True, error=err) == Outcome("failed", str(err), f"The model failed: {err}")


def test_any_other_error_is_not_an_outcome_but_re_raised() -> None:
    with pytest.raises(KeyError):
        outcome(finished=True, error=KeyError("bug"))


def test_a_cancel_stops_the_turn_with_its_reason() -> None:
    assert outcome(finished=False, cancel_reason="stop") == Outcome("cancelled", "stop")
    assert (
        outcome(finished=False, cancel_reason="every client disconnected for 5 s").why
        == "every client disconnected for 5 s"
    )


def test_stopped_without_a_cancel_is_a_timeout() -> None:
    assert outcome(finished=False) == Outcome("timed_out", "no answer within 2.5 s")


def test_a_finish_wins_over_a_cancel_asked_too_late() -> None:
    assert outcome(finished=True, cancel_reason="stop").status == "completed"


# ---- retry eligibility of a model step --------------------------------------------------------------
def test_a_retryable_provider_error_before_the_first_token_is_retried() -> None:
    assert may_retry_step(ProviderError("503", retryable=True), first_token=False)


def test_no_retry_after_the_first_token() -> None:
    assert not may_retry_step(ProviderError("503", retryable=True), first_token=True)


def test_no_retry_of_a_permanent_provider_error_or_another_error() -> None:
    assert not may_retry_step(ProviderError("400", retryable=False), first_token=False)
    assert not may_retry_step(TimeoutError(), first_token=False)


# ---- the tool-step budget -----------------------------------------------------------------------------
def test_the_model_is_asked_once_plus_once_per_allowed_tool_step() -> None:
    asked = 0
    while may_ask_model(asked, 3):
        asked += 1
    assert asked == 4


def test_a_zero_budget_still_asks_the_model_once() -> None:
    assert may_ask_model(0, 0) and not may_ask_model(1, 0)


# ---- the disconnect policy ----------------------------------------------------------------------------
def test_disconnect_policy_grace() -> None:
    assert disconnect_grace("continue") is None
    assert disconnect_grace("cancel_after=5") == 5.0
    assert disconnect_grace("cancel_after=0.5") == 0.5


# ---- the turn's plan ----------------------------------------------------------------------------------
SPECS = [ToolSpec(name=n, description=n, parameters={}) for n in ("clock", "calculator", "http_get")]


def plan(flags: dict[str, object], state: SessionState | None = None) -> TurnPlan:
    return TurnPlan.build(
        flags,
        messages=[ChatMessage(role="user", text="hi", turn_id="t1")],
        tools=SPECS,
        default_provider="simulated",
        default_disconnect_policy="continue",
        state=state,
    )


def test_an_unloaded_plan_records_the_defaults_in_force() -> None:
    p = TurnPlan.unloaded(default_provider="simulated", default_disconnect_policy="continue")
    assert p.flags_in_force == {"provider": "simulated", "disconnect_policy": "continue"}
    assert p.model is None and p.tools == () and p.messages == () and p.state is None


def test_the_plan_takes_model_policy_and_tools_from_the_flags() -> None:
    p = plan({"model": "openai:gpt-4o-mini", "disconnect_policy": "cancel_after=2", "tool_set": ["clock"]})
    assert p.model == "openai:gpt-4o-mini"
    assert p.disconnect_policy == "cancel_after=2"
    assert [t.name for t in p.tools] == ["clock"]
    assert p.flags_in_force == {
        "provider": "openai",
        "disconnect_policy": "cancel_after=2",
        "model": "openai:gpt-4o-mini",
        "tool_set": ["clock"],
    }


def test_without_flags_the_plan_offers_every_tool_on_the_default_route() -> None:
    p = plan({})
    assert [t.name for t in p.tools] == ["clock", "calculator", "http_get"]
    assert p.flags_in_force == {"provider": "simulated", "disconnect_policy": "continue"}


def test_state_after_appends_the_answer_without_touching_the_plan() -> None:
    state = SessionState(
        session_id="s1", subject="u1", window=[ChatMessage(role="user", text="hi", turn_id="t1")]
    )
    p = plan({}, state)
    ended = client.TurnEnd(seq=9, turn_id="t1", status="completed", text="hello")
    after = p.state_after("t1", ended)
    assert after is not None and after.last_turn_id == "t1"
    assert [(m.role, m.text, m.seq) for m in after.window][-1] == ("assistant", "hello", 9)
    assert len(state.window) == 1 and state.last_turn_id is None
    assert plan({}).state_after("t1", ended) is None


# ---- whole turns, replayed event by event through the machine ------------------------------------------
def machine(*, max_tool_steps: int = 2) -> TurnMachine:
    return TurnMachine(
        TurnPlan.unloaded(default_provider="simulated", default_disconnect_policy="continue"),
        max_attempts=3,
        max_starts=10,
        max_tool_steps=max_tool_steps,
        turn_timeout_s=30.0,
    )


def planned(m: TurnMachine, policy: str) -> TurnMachine:
    m.planned(plan({"disconnect_policy": policy}))
    return m


def test_a_plain_turn_one_step_its_first_text_urgent_and_completed() -> None:
    m = machine()
    assert m.claimed(snap()) == Run()
    planned(m, "continue")
    assert m.next_step()
    assert m.text(now_ns=1_000) is True  # TTFT: sent at once
    assert [m.text(now_ns=t) for t in (2_000, 3_000)] == [False, False]
    assert m.first_token_ns == 1_000
    assert m.generation_ended(finished=True, error=None) == Outcome("completed")
    assert not m.ending


def test_each_tool_step_s_first_text_is_urgent_again_and_the_budget_ends_the_loop() -> None:
    m = planned(machine(max_tool_steps=2), "continue")
    urgent = []
    while m.next_step():
        urgent.append([m.text(now_ns=10 * m.steps + i) for i in range(3)])
    assert urgent == [[True, False, False]] * 3  # asked once plus once per allowed tool step
    assert m.steps == 3 and m.first_token_ns == 10  # the turn's first text, not the last step's


def test_a_step_is_retried_until_its_first_text_then_never() -> None:
    m = planned(machine(), "continue")
    assert m.next_step()
    transient = ProviderError("503", retryable=True)
    assert m.step_failed(transient)  # nothing shown yet: ask again
    assert m.step_failed(transient)
    m.text(now_ns=5)
    assert not m.step_failed(transient)  # shown: a retry would say it twice
    assert m.generation_ended(finished=True, error=transient).status == "failed"
    assert m.next_step() and m.step_failed(transient)  # the next step starts with nothing shown


def test_a_stop_mid_answer_is_cancelled_with_the_first_reason_and_abandons_tools() -> None:
    m = planned(machine(), "continue")
    m.next_step()
    m.text(now_ns=1)
    m.cancel("stop")
    m.cancel("operator")  # a second request does not rewrite why
    m.stop()
    assert m.ending
    assert m.generation_ended(finished=False, error=None) == Outcome("cancelled", "stop")


def test_unfinished_without_a_cancel_is_the_timeout() -> None:
    m = planned(machine(), "continue")
    m.next_step()
    m.stop()
    assert m.generation_ended(finished=False, error=None) == Outcome("timed_out", "no answer within 30 s")


def test_a_turn_that_finished_as_the_stop_arrived_is_completed() -> None:
    m = planned(machine(), "continue")
    m.next_step()
    m.cancel("stop")
    assert m.generation_ended(finished=True, error=None).status == "completed"


def test_cancel_after_counts_the_unwatched_time_from_the_first_lonely_sample() -> None:
    m = machine()
    assert not m.watches_clients  # before the plan: the default policy, `continue`
    planned(m, "cancel_after=1")
    assert m.watches_clients
    samples = [(True, 0.0), (False, 10.0), (False, 10.5), (True, 10.9), (False, 11.0), (False, 11.9)]
    assert [m.watcher_sample(w, t) for w, t in samples] == [False] * 6  # a watcher reset the grace
    assert m.watcher_sample(False, 12.0)  # 1 s alone since 11.0
    m.stop()
    assert m.generation_ended(finished=False, error=None) == Outcome(
        "cancelled", "every client disconnected for 1 s"
    )


def test_continue_never_cancels_however_long_nobody_watches() -> None:
    m = planned(machine(), "continue")
    assert not m.watches_clients
    assert not any(m.watcher_sample(False, t) for t in (0.0, 100.0, 10_000.0))
    assert m.cancel_reason is None


def test_a_stop_asked_before_the_grace_ran_out_keeps_its_reason() -> None:
    m = planned(machine(), "cancel_after=0.5")
    m.watcher_sample(False, 0.0)
    m.cancel("stop")
    assert m.watcher_sample(False, 0.5)
    m.stop()
    assert m.generation_ended(finished=False, error=None).why == "stop"


def test_a_takeover_of_a_poisoned_turn_is_dead_lettered_without_the_model() -> None:
    m = machine()
    d = m.claimed(snap(state=("running", "4"), failures=3, starts=4))
    assert isinstance(d, DeadLetter) and d.outcome.status == "failed"
    assert m.steps == 0 and m.first_token_ns is None
