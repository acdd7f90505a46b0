"""The turn loop: while it holds a session's lease, a runner plays the session's queued turns in
order, one at a time, and gives the session up only when the queue is empty.

Each turn: restore progress from the checkpoint (a takeover continues where the dead owner's
last checkpointed event ended), stream the model through the grapheme buffer into the checkpoint
writer, run tool calls concurrently, end with `turn_end`, write the turn to Postgres, then mark it
done in Redis under the lease (the fencing re-check) — only after that may the JetStream message
be acked. Losing the lease (a renewal refused) cancels everything at once: a stale owner writes
nothing more.

The runner performs effects only: what to do next (skip, dead-letter, retry a step, stop asking
the model, cancel an unwatched turn, how the turn ended) it asks the turn's `TurnMachine`
(`orchestrator/turn.py`, pure), feeding it each event it observes with the time from its clock
port; it reaches its process only through `orchestrator/ports.py` `TurnPorts`.

Each turn continues the trace its gateway started (`TurnRequest.trace_context`, stored with the
request, so a takeover lands in the same trace): `orchestrator.pickup` spans the queue wait from
the gateway's receipt and `orchestrator.turn` the whole turn; each model call's `model.queue` and
`upstream.first_token` are timed by the router that gates it (`orchestrator/upstream.py`). No span
is made per delta.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import signal
from collections.abc import Callable
from typing import Any

import msgspec
from opentelemetry import trace

from orchestrator.checkpoint_writer import CheckpointWriter
from orchestrator.ports import TurnPorts
from orchestrator.providers.base import ProviderError, ProviderRequest, TextDelta, ToolCallRequest
from orchestrator.segmenter import GraphemeBuffer
from orchestrator.turn import (
    DeadLetter,
    Outcome,
    Skip,
    StartDecision,
    TurnMachine,
    TurnPlan,
    TurnProgress,
    status_line,
)
from proto import bus as busproto
from proto import client
from shared import telemetry
from shared.checkpoints import Lease, TurnSnapshot
from shared.errors import StaleEpoch
from shared.retry import model_step_retry

log = logging.getLogger(__name__)


class LeaseLost(Exception):
    pass


class TurnCancelled(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class SessionRunner:
    def __init__(
        self,
        svc: TurnPorts,
        lease: Lease,
        first: TurnSnapshot | None = None,
        on_done: Callable[[str], None] | None = None,
    ) -> None:
        self.svc = svc
        self._on_done = on_done  # told each turn id marked done (committed) by this runner
        self.lease = lease
        self._first = first  # the queue's head, read with the lease (CheckpointStore.claim)
        self.sid = lease.session_id
        self.current: str | None = None
        self._cancel = asyncio.Event()  # wakes the turn; the reason is in its machine
        self._turn = self._machine()  # the current turn's decisions and their state
        self.done_turns: asyncio.Event = asyncio.Event()

    # ---- control -----------------------------------------------------------------------------
    def request_cancel(self, turn_id: str | None, reason: str = "stop") -> None:
        if self.current is not None and (turn_id is None or turn_id == self.current):
            self._turn.cancel(reason)
            self._cancel.set()

    async def run(self) -> None:
        lost = self.svc.leases.hold(self.lease)
        drain = asyncio.create_task(self._drain(), name=f"drain-{self.sid}")
        watch = asyncio.create_task(lost.wait())
        try:
            await asyncio.wait([drain, watch], return_when=asyncio.FIRST_COMPLETED)
            if not drain.done():  # the lease is gone: stop at once, write nothing more
                drain.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await drain
                raise LeaseLost(self.lease.token)
            drain.result()
        except Exception as e:
            if not (isinstance(e, (LeaseLost, StaleEpoch)) or self.svc.leases.lapsed(self.lease)):
                # A bug or a store failure in this turn while we still own it: keep the lease until
                # it lapses, so the turn is retried (here or elsewhere) after a pause; its failures
                # are counted and a turn that keeps failing is dead-lettered. Never let it take the
                # process down.
                log.error("session %s: a turn failed: %r", self.sid, e, exc_info=e)
                self.svc.metrics["turn_errors"] += 1
                return
            log.warning(
                "lost the lease of session %s (epoch %s): stopping without writing",
                self.sid,
                self.lease.epoch,
            )
            self.svc.metrics["lease_lost"] += 1
        finally:
            watch.cancel()
            if not drain.done():
                drain.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await drain
            self.svc.leases.drop(self.lease)

    async def _drain(self) -> None:
        """Plays the queue's turns in order; each turn's finish step returns the next one or gives
        the session up, in the same round trip."""
        cp = self.svc.checkpoints
        snap, self._first = self._first, None
        while True:
            if snap is None:
                snap = await cp.finish_and_next(self.lease)
                if snap is None:
                    return
            turn_id = snap.turn_id
            self.current = turn_id
            self._cancel.clear()
            self._turn = self._machine()
            try:
                snap = await self._run_turn(snap)
                if self._on_done is not None:  # done in the store: its message may be acked
                    self._on_done(turn_id)
                if snap is None:
                    return
            except (LeaseLost, StaleEpoch, asyncio.CancelledError):
                raise
            except Exception:
                if not self.svc.leases.lapsed(self.lease):  # a lapsed lease is not the turn's fault
                    with contextlib.suppress(Exception):
                        await cp.record_failure(self.sid, turn_id)
                raise
            finally:
                self.current = None
                self.done_turns.set()
                self.done_turns = asyncio.Event()

    def _machine(self) -> TurnMachine:
        """A turn's machine starts with the defaults' plan (`planned` once its context is loaded):
        a turn that never loads it records what was in force."""
        s = self.svc.settings
        return TurnMachine(
            TurnPlan.unloaded(default_provider=s.provider, default_disconnect_policy=s.disconnect_policy),
            max_attempts=s.max_turn_attempts,
            max_starts=s.max_turn_starts,
            max_tool_steps=s.max_tool_steps,
            turn_timeout_s=s.turn_timeout_s,
        )

    # ---- one turn ----------------------------------------------------------------------------
    async def _run_turn(self, snap: TurnSnapshot) -> TurnSnapshot | None:
        """Plays one turn; returns the next queued turn (None: the session was given up)."""
        svc, cp = self.svc, self.svc.checkpoints
        turn_id = snap.turn_id
        start = self._turn.claimed(snap)
        if isinstance(start, Skip):
            return await cp.finish_and_next(self.lease, turn_id, start.status)
        assert snap.request is not None
        req = busproto.bus_decoder.decode(snap.request)
        assert isinstance(req, busproto.TurnRequest)
        parent = telemetry.extract(req.trace_context)
        picked_ns, picked = svc.clock.time_ns(), svc.clock.monotonic()
        if req.received_at_ns:
            wait_s = max(0.0, (picked_ns - req.received_at_ns) / 1e9)
            telemetry.observe_stage("queue_wait", wait_s)
            if snap.state is None and snap.starts <= 1:  # a takeover's or retry's wait is no queue
                svc.load.picked(wait_s)
            telemetry.record_span(
                "orchestrator.pickup",
                req.received_at_ns,
                picked_ns,
                parent=parent,
                attributes={"queue_wait_s": wait_s, "orchestrator": svc.id},
                kind=telemetry.SpanKind.CONSUMER,
            )
        with telemetry.tracer.start_as_current_span(
            "orchestrator.turn",
            context=parent,
            kind=telemetry.SpanKind.CONSUMER,
            attributes={
                "session_id": self.sid,
                "turn_id": turn_id,
                "orchestrator": svc.id,
                "lease_epoch": self.lease.epoch,
            },
        ) as span:
            status, nxt = await self._play_turn(req, turn_id, snap, start, span)
        svc.observe_turn(svc.clock.monotonic() - picked, status)
        return nxt

    async def _play_turn(
        self, req: busproto.TurnRequest, turn_id: str, snap: TurnSnapshot, start: StartDecision, span: Any
    ) -> tuple[str, TurnSnapshot | None]:
        svc, cp = self.svc, self.svc.checkpoints
        state = snap.state
        span.set_attribute("attempt", snap.starts)
        progress = TurnProgress(turn_id)
        if state is not None:  # running: a takeover, or a retry after a failure
            progress = TurnProgress.restore(turn_id, await self._turn_events(int(state[1])))
            svc.metrics["takeovers"] += 1
            span.set_attribute("takeover", True)
        writer = CheckpointWriter(
            cp, svc.eventlog, svc.bus, self.lease, linger_s=svc.settings.checkpoint_linger_ms / 1000
        )
        if progress.ended is None:
            fresh = not progress.started
            if fresh:
                writer.start(progress.turn_start(), turn_id)
                svc.observe_first_event(req)
            status, why = await self._generate(req, progress, writer, snap, start)
            # Checkpointed first, so that a crash before the commit still ends the turn exactly once
            # (the taker-over finds it and commits it); held from readers until the commit is done.
            t_end = svc.clock.monotonic()
            await writer.finish([progress.end(status)])
            telemetry.observe_stage("checkpoint_turn_end", svc.clock.monotonic() - t_end)
            if fresh:
                progress.start_seq = writer.start_seq
            if why:
                log.info("turn %s ended %s: %s", turn_id, status, why)
            marker = svc.settings.fault_kill_before_commit
            if marker and marker in req.text:  # tests: the runner that checkpointed turn_end dies before
                os.kill(os.getpid(), signal.SIGKILL)  # the commit (its taker finds it ended and commits)
        raws = (
            writer.written
            if state is None and writer.contiguous_from(progress.start_seq)
            else [raw for _, raw in await self._log_from(progress.start_seq)]
        )
        user_seq = (
            snap.user_seq if snap.user_seq is not None else await cp.user_seq(self.sid, req.client_msg_id)
        )
        ended_raw, ended = next(
            (r, ev)
            for r, ev in ((r, client.event_decoder.decode(r)) for r in reversed(raws))
            if isinstance(ev, client.TurnEnd) and ev.turn_id == turn_id
        )
        t_commit = svc.clock.monotonic()
        with telemetry.tracer.start_as_current_span("eventlog.append_turn"):
            await svc.eventlog.append_turn(
                self.sid,
                turn_id,
                user_seq or req.user_seq,
                raws,
                ended,
                self.lease.epoch,
                flags=dict(self._turn.plan.flags_in_force),
            )
        # Durable now: released to readers by finish_turn, then shown live, so whoever is woken by the
        # live turn_end and re-reads the store finds it. A crash between the two: the takeover scan
        # re-publishes the log's tail (orchestrator/takeover.py).
        t_finish = svc.clock.monotonic()
        telemetry.observe_stage("eventlog_commit", t_finish - t_commit)
        after = self._turn.plan.state_after(turn_id, ended)
        nxt = await cp.finish_and_next(
            self.lease, turn_id, ended.status, None if after is None else svc.encode_state(after)
        )
        telemetry.observe_stage("turn_finish", svc.clock.monotonic() - t_finish)
        await writer.publish([ended_raw])
        svc.record_analytics(req, ended, raws, self._turn.first_token_ns)
        svc.metrics["turns_" + ended.status] += 1
        span.set_attribute("status", ended.status)
        return ended.status, nxt

    async def _log_from(self, start_seq: int) -> list[tuple[int, bytes]]:
        out: list[tuple[int, bytes]] = []
        after = start_seq - 1
        while True:
            page = await self.svc.checkpoints.read_log(self.sid, after, 1000)
            out.extend(page)
            if len(page) < 1000:
                return out
            after = page[-1][0]

    async def _turn_events(self, start_seq: int) -> list[client.Event]:
        return [client.event_decoder.decode(raw) for _, raw in await self._log_from(start_seq)]

    async def _generate(
        self,
        req: busproto.TurnRequest,
        progress: TurnProgress,
        writer: CheckpointWriter,
        snap: TurnSnapshot,
        start: StartDecision,
    ) -> tuple[client.TurnStatus, str]:
        svc = self.svc
        if isinstance(start, DeadLetter):
            await svc.dead_letter(req, start.reason)
            start = start.outcome
        if isinstance(start, Outcome):
            if start.notice is not None:  # shown with the turn's end, just before it
                writer.add(progress.status(start.notice))
            return start.status, start.why
        writer_task = asyncio.create_task(writer.run(), name=f"writer-{progress.turn_id}")
        planned = asyncio.Event()
        gen = asyncio.create_task(
            self._steps(req, progress, writer, snap.session_state, planned), name=f"steps-{progress.turn_id}"
        )
        watchers = [
            asyncio.create_task(self._cancel.wait()),
            asyncio.create_task(self._disconnect_watch(planned)),
        ]
        owned = [gen, *watchers]
        try:
            await asyncio.wait(
                [gen, writer_task, *watchers],
                timeout=svc.settings.turn_timeout_s,
                return_when=asyncio.FIRST_COMPLETED,
            )
            if writer_task.done():
                writer_task.result()  # a stale epoch surfaces here
            finished = gen.done()
            if finished:  # a non-provider error is re-raised here, before anything more is written
                outcome = self._turn.generation_ended(finished=True, error=gen.exception())
            else:
                self._turn.stop()
                gen.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await gen
            await writer.settle()  # what is still queued goes with the turn's end
            if not finished:
                outcome = self._turn.generation_ended(finished=False, error=None)
                if outcome.status == "cancelled":
                    svc.metrics["cancel_success"] += 1
                    trace.get_current_span().add_event("cancelled", {"reason": outcome.why})
            if outcome.notice is not None:
                writer.add(progress.status(outcome.notice))
            return outcome.status, outcome.why
        finally:
            for t in owned:
                t.cancel()
            await asyncio.gather(*owned, return_exceptions=True)
            writer_task.cancel()
            await asyncio.gather(writer_task, return_exceptions=True)

    async def _disconnect_watch(self, planned: asyncio.Event) -> None:
        """Samples the session's watchers for the disconnect policy, once the plan (and with it the
        turn's policy) is loaded. Under `continue` (the default) it takes no sample and keeps no
        timer: a 4 Hz tick per running turn cost wake-ups in proportion to the turns in flight."""
        turn = self._turn
        await planned.wait()
        if not turn.watches_clients:
            await asyncio.Event().wait()  # until the turn ends and cancels it
        while True:
            await asyncio.sleep(0.25)
            watched = await self.svc.checkpoints.watched(self.sid)
            if turn.watcher_sample(watched, self.svc.clock.monotonic()):
                self._cancel.set()
                return

    async def _steps(
        self,
        req: busproto.TurnRequest,
        progress: TurnProgress,
        writer: CheckpointWriter,
        stored_state: bytes | None,
        planned: asyncio.Event,
    ) -> None:
        svc = self.svc
        marker = svc.settings.fault_poison_marker
        if marker and marker in req.text:
            raise RuntimeError("injected poison turn")
        plan = await svc.plan_turn(req, stored_state)
        turn = self._turn
        turn.planned(plan)
        planned.set()
        while turn.next_step():
            pending_calls = progress.unfinished_calls()
            if pending_calls:
                await self._run_tools(
                    req, progress, writer, [(c.call_id, c.name, c.args) for c in pending_calls]
                )
            preq = ProviderRequest(
                session_id=self.sid,
                turn_id=progress.turn_id,
                messages=[*plan.messages, *progress.tool_messages()],
                tools=list(plan.tools),
                continue_from=progress.step_text(),
                model=plan.model,
            )
            calls = await self._stream_step(preq, progress, writer)
            if not calls:
                return
            names = [c.name for c in calls]
            await writer.put(functools.partial(progress.status, status_line(names)), urgent=True)
            for c in calls:
                await writer.put(functools.partial(progress.tool_call, c.call_id, c.name, c.args))
            await self._run_tools(req, progress, writer, [(c.call_id, c.name, c.args) for c in calls])

    async def _stream_step(
        self, preq: ProviderRequest, progress: TurnProgress, writer: CheckpointWriter
    ) -> list[ToolCallRequest]:
        svc, turn = self.svc, self._turn
        calls: list[ToolCallRequest] = []

        async for attempt in model_step_retry(turn.step_failed):
            with attempt:
                calls.clear()
                graphemes = GraphemeBuffer()
                try:
                    async with contextlib.aclosing(svc.provider.stream(preq)) as stream:
                        async for ev in stream:
                            if isinstance(ev, TextDelta):
                                out = graphemes.feed(ev.text)
                                if out:
                                    urgent = turn.text(svc.clock.time_ns())  # the step's first: TTFT
                                    await writer.put(functools.partial(progress.delta, out), urgent=urgent)
                            elif isinstance(ev, ToolCallRequest):
                                calls.append(ev)
                except ProviderError:
                    tail = graphemes.flush() if turn.step_has_text else ""
                    if tail:  # text already promised must not lose its held-back last cluster
                        await writer.put(functools.partial(progress.delta, tail))
                    raise
                tail = graphemes.flush()
                if tail:
                    await writer.put(functools.partial(progress.delta, tail))
        return calls

    async def _run_tools(
        self,
        req: busproto.TurnRequest,
        progress: TurnProgress,
        writer: CheckpointWriter,
        calls: list[tuple[str, str, dict[str, Any]]],
    ) -> None:
        svc, turn = self.svc, self._turn

        async def one(call_id: str, name: str, args: dict[str, Any]) -> None:
            ok, text = await svc.call_tool(
                self.sid, progress.turn_id, call_id, name, args, abandon_on_cancel=lambda: turn.ending
            )
            await writer.put(functools.partial(progress.tool_result, call_id, ok, text))

        async with asyncio.TaskGroup() as tg:
            for call in calls:
                tg.create_task(one(*call))


def decode_request(raw: bytes) -> busproto.TurnRequest:
    req = busproto.bus_decoder.decode(raw)
    if not isinstance(req, busproto.TurnRequest):
        raise msgspec.ValidationError("not a turn request")
    return req
