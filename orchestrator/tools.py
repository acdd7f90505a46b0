"""Tool dispatch for the turn loop: tool calls go to tool workers, never run in the orchestrator.

`ToolDispatcher.call` validates the arguments against the tool catalogue (`shared.tool_catalogue`,
the contract the workers implement), publishes a `ToolJob` to JetStream (`tw.tools.<pool>`,
`Nats-Msg-Id` = the call key, so a retried publish is a no-op) and waits for the worker's
`ToolResultMsg` on core NATS, all through `shared.toolbus.ToolBus`; the call ledger is
`shared.call_ledger.CallLedger`, the same adapter the workers use. Guarantees:

- `call` always returns a `ToolOutcome` within the tool's `max_seconds` plus a small grace;
  past the limit it is `ok=False, timed_out=True, text="<name> timed out after N s"`, never
  silence, and a `ToolCancel` tells the worker to stop.
- Cancelling the task awaiting `call` when the turn ends for good (`abandon_on_cancel()` true:
  a stop, the turn's timeout, the disconnect policy) sends a `ToolCancel` too, and a call no
  worker started yet is marked done in the call ledger, so it never starts later. A cancel that
  only means this owner is going (lease lost, fenced, shutting down) leaves the call running:
  the next owner re-issues it under the same call key and joins the run in flight.
- A result that arrives after its call timed out or was cancelled has no waiter and is dropped.
- A call whose publish was deduplicated (the same turn re-run after an orchestrator crash) is
  answered from the call ledger when it already finished, else by the run still in flight.

One wildcard subscription (`tw.toolresult.>`) serves every call of this process; results are
routed by call key to the waiting future.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgspec

from orchestrator.providers.base import ToolSpec
from proto import bus as busproto
from proto.tools import CallRecord
from shared import subjects
from shared.bus import Bus, BusSubscription
from shared.call_ledger import CallLedger
from shared.tool_catalogue import ToolArgsError, ToolCatalogue, ToolDef, call_key
from shared.toolbus import ToolBus

__all__ = ["ToolDispatchSettings", "ToolDispatcher", "ToolOutcome"]

log = logging.getLogger(__name__)


class ToolOutcome(msgspec.Struct, frozen=True, kw_only=True):
    """What the turn loop reports as `tool_result {ok, text}` and gives back to the model."""

    ok: bool
    text: str
    timed_out: bool = False


@dataclass(frozen=True, kw_only=True)
class ToolDispatchSettings:
    # Wait this long past a tool's limit for the worker's own answer (it enforces the limit too).
    extra_grace_seconds: float = 2.0
    publish_timeout_seconds: float = 3.0
    # Calls waiting at once in this process; beyond it a call fails at once instead of queueing.
    max_in_flight: int = 10_000


class ToolDispatcher:
    """Runs tool calls on tool workers. Many `call`s may run concurrently (one TaskGroup per step)."""

    def __init__(
        self, bus: Bus, *, registry: ToolCatalogue[Any], settings: ToolDispatchSettings | None = None
    ) -> None:
        self._bus = bus
        self._tools = ToolBus(bus)
        self._registry = registry
        self._settings = settings or ToolDispatchSettings()
        self._specs = [
            ToolSpec(name=t.name, description=t.description, parameters=t.parameters()) for t in registry
        ]
        self._waiters: dict[str, asyncio.Future[ToolOutcome]] = {}
        self._sub: BusSubscription | None = None
        self._ledger: CallLedger | None = None

    async def start(self) -> None:
        """Subscribes to tool results; call once before `call`."""
        if self._sub is None:
            self._sub = await self._tools.subscribe_results(self._on_result)

    async def close(self) -> None:
        """Unsubscribes; calls still waiting end at once with ok=False."""
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()
            self._sub = None
        for fut in self._waiters.values():
            if not fut.done():
                fut.set_result(
                    ToolOutcome(ok=False, text="the tool call was abandoned: the orchestrator is stopping")
                )

    def specs(self) -> list[ToolSpec]:
        """The tools to offer the model (name, description, JSON schema of the arguments)."""
        return list(self._specs)

    async def call(
        self,
        session_id: str,
        turn_id: str,
        call_id: str,
        name: str,
        args: dict[str, Any],
        *,
        abandon_on_cancel: Callable[[], bool] = lambda: True,
    ) -> ToolOutcome:
        """Runs one tool call on a worker; see the module docstring for what is guaranteed."""
        tool = self._registry.get(name)
        if tool is None:
            return ToolOutcome(
                ok=False, text=f"unknown tool {name!r}; available: {', '.join(self._registry.names())}"
            )
        try:
            tool.validate(args)
        except ToolArgsError as exc:
            return ToolOutcome(ok=False, text=str(exc))
        if self._sub is None:
            raise RuntimeError("ToolDispatcher.start() was not awaited")
        key = call_key(turn_id, call_id)
        if key in self._waiters:
            return ToolOutcome(ok=False, text=f"{name}: call {call_id} is already running")
        if len(self._waiters) >= self._settings.max_in_flight:
            return ToolOutcome(ok=False, text=f"{name} was not started: too many tool calls in flight")

        fut: asyncio.Future[ToolOutcome] = asyncio.get_running_loop().create_future()
        self._waiters[key] = fut
        job = busproto.ToolJob(
            session_id=session_id,
            turn_id=turn_id,
            call_id=call_id,
            name=name,
            args=args,
            deadline_ms=int((time.time() + tool.max_seconds) * 1000),
            schema_version=tool.schema_version,
            reply_subject=subjects.tool_result_subject(turn_id),
        )
        try:
            async with asyncio.timeout(tool.max_seconds + self._settings.extra_grace_seconds):
                try:
                    duplicate = await self._tools.publish_job(
                        tool.pool, job, key=key, timeout_s=self._settings.publish_timeout_seconds
                    )
                except Exception as exc:  # noqa: BLE001 - reported to the model, not raised
                    log.warning("call %s: job not published: %r", call_id, exc)
                    return ToolOutcome(
                        ok=False, text=f"{name} could not be started: the tool queue is unavailable"
                    )
                if duplicate:
                    stored = await self._stored_outcome(key)
                    if stored is not None:
                        return stored
                return await fut
        except TimeoutError:
            log.warning("call %s (%s) timed out after %g s", call_id, name, tool.max_seconds)
            await self._abandon(tool, turn_id, call_id, key, tool.timeout_text(), timed_out=True)
            return ToolOutcome(ok=False, text=tool.timeout_text(), timed_out=True)
        except asyncio.CancelledError:
            if abandon_on_cancel():
                await self._abandon(tool, turn_id, call_id, key, f"{name} was cancelled", timed_out=False)
            raise
        finally:
            self._waiters.pop(key, None)

    async def _on_result(self, res: busproto.ToolResultMsg) -> None:
        fut = self._waiters.get(call_key(res.turn_id, res.call_id))
        if fut is None or fut.done():
            log.debug("result of call %s has no waiter (late, cancelled or another process's)", res.call_id)
            return
        fut.set_result(ToolOutcome(ok=res.ok, text=res.text, timed_out=res.timed_out))

    async def _abandon(
        self, tool: ToolDef[Any], turn_id: str, call_id: str, key: str, text: str, *, timed_out: bool
    ) -> None:
        """Tells workers to stop the call; if none started it yet, makes sure none ever will."""
        with contextlib.suppress(Exception):  # core NATS publish: buffered, fails only when closed
            await self._tools.publish_cancel(busproto.ToolCancel(call_id=call_id, turn_id=turn_id))
        ledger = await self._open_ledger()
        if ledger is None:
            return
        record = CallRecord(state="done", name=tool.name, ok=False, text=text, timed_out=timed_out)
        with contextlib.suppress(Exception):  # a NATS failure here leaves only the cancel to stop it
            await asyncio.wait_for(ledger.forestall(key, record), self._settings.publish_timeout_seconds)

    async def _stored_outcome(self, key: str) -> ToolOutcome | None:
        ledger = await self._open_ledger()
        if ledger is None:
            return None
        try:
            record = await ledger.get(key)
        except Exception as exc:  # noqa: BLE001 - fall back to waiting for the run in flight
            log.warning("call ledger unreadable: %r", exc)
            return None
        if record is None or record.state != "done":
            return None
        return ToolOutcome(ok=record.ok, text=record.text, timed_out=record.timed_out)

    async def _open_ledger(self) -> CallLedger | None:
        """The workers create the bucket; until one has, there is nothing to read or guard."""
        if self._ledger is None:
            with contextlib.suppress(Exception):  # NATS trouble: tried again on the next call
                self._ledger = await CallLedger.existing(self._bus)
        return self._ledger
