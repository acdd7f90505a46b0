"""The session runners of one orchestrator: at most one per session, each a task of the process's
task group, found by session id by the intake (to wait on it), the takeover (to skip sessions we
run) and the cancel subscription (to stop a turn)."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time

import msgspec

from orchestrator.ports import TurnPorts
from orchestrator.runner import SessionRunner
from proto import bus as busproto
from shared import telemetry
from shared.bus import BusMessage
from shared.checkpoints import Lease, TurnSnapshot
from shared.supervise import report_failure

log = logging.getLogger(__name__)
DONE_REMEMBERED = 4096  # turn ids this process marked done, so their messages are acked without a read


class RunnerPool:
    def __init__(self, ports: TurnPorts, tg: asyncio.TaskGroup, max_sessions: int) -> None:
        self.ports = ports
        self.max_sessions = max_sessions
        self._tg = tg
        self._entries: dict[str, tuple[SessionRunner, asyncio.Task[None]]] = {}
        self._done: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._slot_waiters: collections.deque[asyncio.Future[None]] = collections.deque()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, sid: object) -> bool:
        return sid in self._entries

    @property
    def full(self) -> bool:
        return len(self._entries) >= self.max_sessions

    def get(self, sid: str) -> SessionRunner | None:
        entry = self._entries.get(sid)
        return entry[0] if entry is not None else None

    @property
    def slot_waiters(self) -> int:
        """Parked turns waiting for a slot here: a freed slot is theirs before any new turn's."""
        return sum(1 for f in self._slot_waiters if not f.done())

    def done(self, turn_id: str) -> bool:
        """Whether one of our runners marked this turn done in the checkpoint store (after its
        commit): its message may be acked without asking the store."""
        return turn_id in self._done

    async def wait_for_slot(self, timeout_s: float) -> None:
        """Waits (at most `timeout_s`) until a runner ends while the pool is full. Waiters are woken
        one per freed slot, in arrival order: a parked turn takes the slot the moment it frees instead
        of at its next 0.25 s poll of Redis, and a freed slot never wakes them all at once."""
        waiters = self._slot_waiters
        while waiters and waiters[0].done():  # those that gave up (they time out oldest first)
            waiters.popleft()
        fut = asyncio.get_running_loop().create_future()
        waiters.append(fut)
        try:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout_s):
                    await fut
        finally:
            if not fut.done():
                fut.cancel()

    def offer_slot(self) -> None:
        """Wakes the longest waiter if a slot is free (a runner ended, or a woken waiter did not
        take the slot it was woken for)."""
        while self._slot_waiters and not self.full:
            fut = self._slot_waiters.popleft()
            if not fut.done():
                fut.set_result(None)
                return

    def _note_done(self, turn_id: str) -> None:
        self._done[turn_id] = None
        if len(self._done) > DONE_REMEMBERED:
            self._done.popitem(last=False)

    def start(self, lease: Lease, first: TurnSnapshot | None = None) -> SessionRunner:
        """Runs the session under `lease` until its queue is empty or the lease is lost."""
        runner = SessionRunner(self.ports, lease, first, on_done=self._note_done)
        task = self._tg.create_task(runner.run(), name=f"session-{lease.session_id}")
        entry = (runner, task)
        self._entries[lease.session_id] = entry
        metrics = self.ports.metrics

        def done(t: asyncio.Task[None]) -> None:
            if self._entries.get(lease.session_id) is entry:
                del self._entries[lease.session_id]
            runner.done_turns.set()
            self.offer_slot()
            if not t.cancelled() and t.exception() is not None:
                metrics["runner_errors"] += 1
                log.error("session runner %s failed", lease.session_id, exc_info=t.exception())

        task.add_done_callback(done)
        return runner

    async def stop_all(self) -> int:
        """Cancels every runner and waits for them (what they checkpointed is where the next owner
        continues); returns how many there were."""
        tasks = [task for _, task in self._entries.values()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        return len(tasks)

    async def on_cancel(self, msg: BusMessage) -> None:
        """The cancel subscription: a stop for a session we run reaches its runner."""
        try:
            cancel = busproto.bus_decoder.decode(msg.data)
        except msgspec.DecodeError as e:
            report_failure("cancel message decode", e, log)
            return
        if not isinstance(cancel, busproto.CancelTurn):
            return
        self.ports.metrics["cancel_requests"] += 1
        runner = self.get(cancel.session_id)
        if runner is None:
            return
        now = time.time_ns()
        telemetry.record_span(
            "orchestrator.cancel_request",
            now,
            now,
            parent=telemetry.extract(msg.headers),
            attributes={"turn_id": cancel.turn_id or "", "reason": cancel.reason},
            kind=telemetry.SpanKind.CONSUMER,
        )
        runner.request_cancel(cancel.turn_id, cancel.reason)
