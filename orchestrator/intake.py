"""New turns from JetStream, and keeping each turn's message until the turn is done.

The fetch loop pulls turn messages only while this process has a free session slot (at most as many
as it has free, so a full orchestrator leaves new turns in JetStream for one with room) and parks one
task per message. A parked message starts the session's runner when the session is free (one
round trip: `CheckpointStore.claim`), or waits on whoever runs it; it is acked only once the turn
is `done` in the checkpoint store (after its Postgres commit), and kept alive with in-progress
acks until then, so JetStream redelivery stays the backstop if this process dies. A redelivered
message whose turn Redis does not know is checked against Postgres (done: ack) and re-queued.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from orchestrator.ports import TurnPorts
from orchestrator.runner import decode_request
from orchestrator.runners import RunnerPool
from shared.bus import TURN_ACK_WAIT_S, BusMessage, fetch_batch
from shared.supervise import report_failure

log = logging.getLogger(__name__)

PARKED_PER_SESSION = 4  # parked turn messages per session slot (a burst of sends waits in JetStream)
# How the turn queue is pulled. nats-py's fetch of a batch returns only when the batch is full or its
# pull request expires, unless the messages were already waiting: on a quiet queue a turn that
# arrived alone waited for the rest of the request (measured: every other turn of a quiet session
# started 0.75-0.9 s after its ack). So a quiet queue is pulled one message at a time (handed over the
# moment it arrives, one request per second while nothing happens), and a busy one (the last message
# said more were pending) in batches whose requests expire within BUSY_WAIT_S (what is waiting comes
# at once; a lull costs at most that).
FETCH_BATCH = 64
FETCH_WAIT_S = 1.0
BUSY_WAIT_S = 0.05
FULL_PAUSE_S = 0.05  # a full orchestrator leaves new turns in JetStream, where another one takes them
SLOT_WAIT_S = TURN_ACK_WAIT_S / 3  # a parked turn is woken by a freed slot; this is only the backstop


class TurnIntake:
    def __init__(
        self, ports: TurnPorts, runners: RunnerPool, tg: asyncio.TaskGroup, stopping: asyncio.Event
    ) -> None:
        self.ports = ports
        self.runners = runners
        self._tg = tg
        self._stopping = stopping
        self._deciding = 0  # fetched turns not yet past their first claim: they may take a slot

    async def run(self) -> None:
        sub = await self.ports.bus.turn_subscription()
        parked: set[asyncio.Task[None]] = set()
        quiet = True
        while True:
            room = self.runners.max_sessions * PARKED_PER_SESSION - len(parked)
            free = self.runners.max_sessions - len(self.runners) - self._deciding - self.runners.slot_waiters
            if room <= 0 or free <= 0:
                # Fetching while every slot is taken only moved turns from the broker into this
                # process, where each waited (and polled Redis) while the other orchestrators may have
                # had room: at 200 msg/s a full orchestrator had 374-947 turns unacked, 150-270 running.
                await asyncio.sleep(FULL_PAUSE_S)
                continue
            if quiet:
                msgs = await fetch_batch(sub, 1, FETCH_WAIT_S, what="the turn queue")
            else:
                msgs = await fetch_batch(
                    sub, min(room, free, FETCH_BATCH), BUSY_WAIT_S, what="the turn queue"
                )
            # Quiet unless the broker says more are waiting (`num_pending` after the last one): a lone
            # turn's batch request would cost a no-wait probe, its 404 and a lingering request's 408.
            quiet = not msgs or msgs[-1].metadata.num_pending == 0
            for msg in msgs:
                self._deciding += 1
                t = self._tg.create_task(self.keep(msg))
                parked.add(t)
                t.add_done_callback(parked.discard)

    async def keep(self, msg: BusMessage) -> None:
        """Keeps the message until its turn is done (by us or by whoever owns the session)."""
        deciding = True

        def decided() -> None:
            nonlocal deciding
            if deciding:
                deciding = False
                self._deciding -= 1

        try:
            await self._keep(msg, decided)
        finally:
            decided()

    async def _keep(self, msg: BusMessage, decided: Callable[[], None]) -> None:
        try:
            req = decode_request(msg.data)
        except Exception:  # noqa: BLE001 - not ours to retry: dead-letter it
            await msg.term()
            return
        ports, cp = self.ports, self.ports.checkpoints
        last_progress_ack = time.monotonic()
        checked_requeue = False
        while not self._stopping.is_set():
            try:
                if self.runners.done(req.turn_id):  # we finished it: no store read needed
                    await msg.ack()
                    return
                runner = self.runners.get(req.session_id)
                full = runner is None and self.runners.full
                if runner is None and not full:
                    # one round trip: this turn's state and, if the session is free, its lease and first turn
                    claim = await cp.claim(req.session_id, ports.id, ports.settings.lease_ttl_ms, req.turn_id)
                    state = claim.msg_turn_state
                    if claim.lease is not None:
                        runner = self.runners.start(claim.lease, claim.first)
                    else:  # held elsewhere: the free slot goes to the next parked turn
                        self.runners.offer_slot()
                else:
                    if runner is not None and not self.runners.full:
                        self.runners.offer_slot()  # woken for a slot this turn does not need
                    state = await cp.turn_state(req.session_id, req.turn_id)
                if state is not None and state[0] == "done":
                    await msg.ack()
                    return
                if state is None and not checked_requeue and msg.metadata.num_delivered > 1:
                    # a redelivery: the turn may be done already, or Redis may have lost its queue entry
                    checked_requeue = True
                    if await ports.eventlog.turn_status(req.turn_id) is not None:
                        await msg.ack()
                        return
                    if await cp.ensure_queued(req.session_id, req.turn_id, msg.data):
                        continue
                decided()  # it runs, waits on its session's runner or for a slot: counted there now
                if runner is not None:
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(2.0):
                            await runner.done_turns.wait()
                elif full:  # woken the moment one of our runners ends (the timeout is a backstop)
                    await self.runners.wait_for_slot(SLOT_WAIT_S)
                else:  # another process runs the session
                    await asyncio.sleep(0.25)
                if time.monotonic() - last_progress_ack > TURN_ACK_WAIT_S / 3:
                    await msg.in_progress()
                    last_progress_ack = time.monotonic()
            except Exception as e:  # noqa: BLE001 - a store is down: keep the message, retry
                log.debug("turn message %s kept after a store failure: %r", req.turn_id, e)
                report_failure("turn-intake", e, log)  # one label for every message, never one each
                await asyncio.sleep(0.5)
