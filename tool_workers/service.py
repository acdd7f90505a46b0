"""The tool worker: runs tool jobs from JetStream so slow tools never block a turn's stream.

One durable pull consumer per pool (`tool-pool-<pool>` on `TW_TOOLS`) with explicit acks and a
short `ack_wait`; while a tool runs the worker sends `in_progress` every half second, so a
healthy worker keeps its job and a SIGKILLed one loses it to another worker within seconds.
A semaphore per pool caps concurrent runs and the worker fetches only when it has a free slot,
so a busy worker never sits on jobs an idle one could run.

Crash and retry semantics (docs/tools.md):
- Idempotent tools are simply run again on redelivery; transient errors inside a run are retried
  by the named tenacity policy `shared.retry.transient_tool_retry`.
- Non-idempotent tools are run at most once: "started" is written to the call ledger
  (`shared.call_ledger`, KV bucket `tw_tool_calls`) BEFORE the run; a redelivered call found "started" but not "done" is answered
  "<name> was interrupted and was not retried because it is not idempotent".
- A call found "done" in the ledger is answered with the stored result, not run again.
- The worker enforces each tool's time limit itself, and a `ToolCancel` on `tw.toolcancel`
  cancels the running coroutine of that call ("cancelled call <id>" in the log).
- SIGTERM: stop fetching, let running tools finish for `shutdown_grace_seconds`, then cancel
  them (idempotent ones are handed back with a nak for another worker to run).

Telemetry: a job continues the trace of the turn that called it (W3C `traceparent` in the
JetStream message headers) with a `tool.run` span; run latency, outcomes and timeouts are
metrics, served with `/healthz` and `/readyz` on the health port at `/metrics`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgspec
from aiohttp import web
from opentelemetry import trace

from proto import bus as busproto
from proto.tools import CallRecord
from shared import health, telemetry
from shared.bus import Bus, BusMessage, PullSubscription, fetch_batch
from shared.call_ledger import CallLedger
from shared.retry import transient_tool_retry
from shared.toolbus import ToolBus
from tool_workers.registry import (
    Tool,
    ToolArgsError,
    ToolContext,
    ToolError,
    ToolRegistry,
    TransientToolError,
    call_key,
)
from tool_workers.settings import ToolWorkerSettings

log = logging.getLogger("tool_workers")

_job_decoder = msgspec.msgpack.Decoder(busproto.ToolJob)

_run_seconds = telemetry.histogram(
    "tidewire_tool_run_seconds",
    description="Tool job handling time on the worker, by tool and outcome",
)
_jobs = telemetry.counter("tidewire_tool_jobs", description="Tool jobs handled, by tool and outcome")
_timeouts = telemetry.counter("tidewire_tool_timeouts", description="Tool runs that hit their time limit")

FETCH_WAIT_S = 1.0  # how long one fetch long-polls; also bounds how fast SIGTERM stops fetching
_MAX_REMEMBERED_CANCELS = 10_000


def interrupted_text(name: str) -> str:
    return f"{name} was interrupted and was not retried because it is not idempotent"


@dataclass(frozen=True)
class HandBack:
    """Return the job to the queue (nak) instead of answering: another worker, or a later
    attempt, will run it. `delay` spaces out attempts while something is down."""

    delay: float = 0.0


@dataclass
class _Running:
    task: asyncio.Task[tuple[bool, str]]
    call_id: str
    reason: str = ""  # "cancel" (a ToolCancel) or "shutdown" (grace period over)


class ToolWorker:
    """Serves the registry's tools for the configured pools until `stop` is set."""

    def __init__(self, bus: Bus, registry: ToolRegistry, settings: ToolWorkerSettings) -> None:
        self._bus = bus
        self._tools = ToolBus(bus)
        self._registry = registry
        self._settings = settings
        wanted = settings.pools or tuple(registry.pools())
        self.pools: tuple[str, ...] = tuple(p for p in wanted if p in registry.pools())
        self._slots = {pool: asyncio.Semaphore(settings.concurrency) for pool in self.pools}
        self._running: dict[str, _Running] = {}
        self._cancelled: OrderedDict[str, None] = OrderedDict()
        self._jobs: set[asyncio.Task[None]] = set()
        self._stopping = asyncio.Event()
        self._closing = False  # grace period over: start nothing new
        self._ledger: CallLedger | None = None
        self.ready = False

    @property
    def running_calls(self) -> int:
        return len(self._running)

    async def serve(self, stop: asyncio.Event) -> None:
        if not self.pools:
            raise RuntimeError(f"no known pool in {self._settings.pools}; known: {self._registry.pools()}")
        telemetry.setup("tool-worker", f"tool-worker-{os.getpid()}")
        telemetry.observe(
            "tidewire_tool_worker_running",
            lambda: self.running_calls,
            description="Tool calls running on this worker",
        )
        await self._bus.ensure_streams()
        self._ledger = await CallLedger.open(self._bus, ttl_s=self._settings.call_ledger_ttl_seconds)
        subs: dict[str, PullSubscription] = {}
        for pool in self.pools:
            await self._tools.declare_pool(
                pool, ack_wait_s=self._settings.ack_wait_seconds, max_deliver=self._settings.max_deliver
            )
            subs[pool] = await self._tools.pool_subscription(pool)
        cancel_sub = await self._tools.subscribe_cancels(self._on_cancel)
        try:
            async with asyncio.TaskGroup() as tg:
                for pool, sub in subs.items():
                    tg.create_task(self._fetch_loop(tg, pool, sub), name=f"fetch:{pool}")
                self.ready = True
                log.info(
                    "tool worker ready pools=%s tools=%s concurrency=%d",
                    ",".join(self.pools),
                    ",".join(t.name for t in self._registry if t.pool in self.pools),
                    self._settings.concurrency,
                )
                await stop.wait()
                await self._drain()
        finally:
            self.ready = False
            # Unsubscribed here rather than drained with the connection: an expired pull request's
            # status message left in a pull inbox would make a drain wait for its whole timeout.
            for pull in subs.values():
                with contextlib.suppress(Exception):
                    await pull.unsubscribe()
            with contextlib.suppress(Exception):
                await cancel_sub.unsubscribe()
            telemetry.flush()
            log.info("tool worker stopped")

    # ---- fetching ----------------------------------------------------------------------------
    async def _fetch_loop(self, tg: asyncio.TaskGroup, pool: str, sub: PullSubscription) -> None:
        """Fetches one job whenever a slot is free, until SIGTERM."""
        slots = self._slots[pool]
        while not self._stopping.is_set():
            await slots.acquire()
            msgs: list[BusMessage] = []
            if not self._stopping.is_set():
                msgs = await fetch_batch(sub, 1, FETCH_WAIT_S, what=f"pool {pool}")
            if not msgs:
                slots.release()
                continue
            msg = msgs[0]
            if self._stopping.is_set():  # fetched while shutting down: let another worker have it
                slots.release()
                await _quietly(msg.nak())
                continue
            task = tg.create_task(self._handle(msg, slots), name=f"job:{pool}")
            self._jobs.add(task)
            task.add_done_callback(self._jobs.discard)

    async def _drain(self) -> None:
        self._stopping.set()
        if self._jobs:
            grace = self._settings.shutdown_grace_seconds
            log.info("stopping: waiting up to %g s for %d running calls", grace, len(self._jobs))
            _, pending = await asyncio.wait(set(self._jobs), timeout=grace)
            if pending:
                self._closing = True
                for entry in list(self._running.values()):
                    entry.reason = "shutdown"
                    entry.task.cancel()

    # ---- one job -----------------------------------------------------------------------------
    async def _handle(self, msg: BusMessage, slots: asyncio.Semaphore) -> None:
        """Never raises: a job's failure is an ok=false result, not a dead worker. Frees its slot."""
        try:
            await self._handle_job(msg)
        finally:
            slots.release()

    async def _handle_job(self, msg: BusMessage) -> None:
        try:
            job = _job_decoder.decode(msg.data)
        except msgspec.DecodeError as exc:
            log.error("undecodable tool job dropped: %s", exc)
            await _quietly(msg.term())
            return
        heartbeat = asyncio.create_task(self._keep_alive(msg), name=f"in-progress:{job.call_id}")
        tool_label = job.name if self._registry.get(job.name) is not None else "unknown"
        outcome = "crashed"
        t0 = time.perf_counter()
        span = telemetry.tracer.start_span(
            "tool.run",
            context=telemetry.extract(msg.headers),
            kind=telemetry.SpanKind.CONSUMER,
            attributes={"tool": job.name, "call_id": job.call_id, "attempt": msg.metadata.num_delivered},
        )
        try:
            with trace.use_span(span, end_on_exit=False):
                result = await self._process(job, msg.metadata.num_delivered)
            if isinstance(result, HandBack):  # to be run elsewhere or later
                outcome = "handed_back"
                await _quietly(msg.nak(delay=result.delay or None))
                return
            outcome = "timeout" if result.timed_out else "ok" if result.ok else "error"
            if result.timed_out:
                _timeouts.add(1, {"tool": tool_label})
            if job.reply_subject:
                await self._tools.publish_result(job.reply_subject, result)
            await msg.ack()
        except Exception:  # noqa: BLE001
            log.exception("call %s: unexpected failure; leaving it to redelivery", job.call_id)
        finally:
            span.set_attribute("outcome", outcome)
            span.end()
            attrs = {"tool": tool_label, "outcome": outcome}
            _run_seconds.record(time.perf_counter() - t0, attrs)
            _jobs.add(1, attrs)
            heartbeat.cancel()
            await asyncio.wait([heartbeat])

    async def _keep_alive(self, msg: BusMessage) -> None:
        while True:
            await asyncio.sleep(self._settings.in_progress_interval_seconds)
            with contextlib.suppress(Exception):
                await msg.in_progress()

    async def _process(self, job: busproto.ToolJob, attempt: int) -> busproto.ToolResultMsg | HandBack:
        """The result to send, or HandBack to return the job to the queue (nak)."""
        limit_chars = self._settings.max_result_chars

        def result(ok: bool, text: str, *, timed_out: bool = False) -> busproto.ToolResultMsg:
            return busproto.ToolResultMsg(
                session_id=job.session_id,
                turn_id=job.turn_id,
                call_id=job.call_id,
                ok=ok,
                text=text[:limit_chars],
                attempt=attempt,
                timed_out=timed_out,
            )

        key = call_key(job.turn_id, job.call_id)
        tool = self._registry.get(job.name)
        if tool is None:
            return result(False, f"unknown tool {job.name!r}")
        if job.schema_version != tool.schema_version:
            return result(
                False,
                f"{tool.name}: argument schema v{job.schema_version} is not the worker's "
                f"v{tool.schema_version}",
            )
        if key in self._cancelled:
            log.info("skipping cancelled call %s", job.call_id)
            return result(False, f"{tool.name} was cancelled")
        try:
            args = tool.validate(job.args)
        except ToolArgsError as exc:
            return result(False, str(exc))
        remaining = job.deadline_ms / 1000 - time.time() if job.deadline_ms else tool.max_seconds
        if remaining <= 0:
            log.info("call %s expired in the queue", job.call_id)
            return result(False, tool.timeout_text(), timed_out=True)

        ledger = self._ledger
        assert ledger is not None
        try:
            record = await ledger.get(key)
        except Exception as exc:  # noqa: BLE001
            if not tool.idempotent:
                log.warning(
                    "call %s: ledger unavailable (%r); not running a non-idempotent tool", job.call_id, exc
                )
                return HandBack(delay=1.0)
            record = None
        if record is not None and record.state == "done":
            log.info("call %s already done: answering from the ledger", job.call_id)
            return result(record.ok, record.text, timed_out=record.timed_out)
        if self._closing:
            return HandBack()
        if not tool.idempotent:
            try:
                first = record is None and await ledger.mark_started(key, name=tool.name, attempt=attempt)
            except Exception as exc:  # noqa: BLE001
                log.warning("call %s: could not record the start (%r); handing it back", job.call_id, exc)
                return HandBack(delay=1.0)
            if not first:
                log.warning(
                    "call %s (%s) was started before and is not idempotent: not retried",
                    job.call_id,
                    tool.name,
                )
                refused = result(False, interrupted_text(tool.name))
                await self._remember(ledger, key, tool, refused)
                return refused

        res = await self._run(job, tool, args, attempt, min(tool.max_seconds, remaining), result)
        if not isinstance(res, HandBack):
            await self._remember(ledger, key, tool, res)
        return res

    async def _run(
        self,
        job: busproto.ToolJob,
        tool: Tool[Any],
        args: Any,
        attempt: int,
        limit: float,
        result: Callable[..., busproto.ToolResultMsg],
    ) -> busproto.ToolResultMsg | HandBack:
        key = call_key(job.turn_id, job.call_id)
        ctx = ToolContext(
            session_id=job.session_id,
            turn_id=job.turn_id,
            call_id=job.call_id,
            attempt=attempt,
            settings=self._settings,
        )
        run_task = asyncio.create_task(self._invoke(tool, args, ctx), name=f"tool:{tool.name}:{job.call_id}")
        entry = _Running(task=run_task, call_id=job.call_id)
        self._running[key] = entry
        log.info("started call %s tool=%s attempt=%d", job.call_id, tool.name, attempt)
        try:
            async with asyncio.timeout(limit):
                ok, text = await run_task
            log.info("finished call %s tool=%s ok=%s", job.call_id, tool.name, ok)
            return result(ok, text)
        except TimeoutError:
            log.warning("timed out call %s tool=%s after %g s", job.call_id, tool.name, limit)
            return result(False, tool.timeout_text(), timed_out=True)
        except asyncio.CancelledError:
            me = asyncio.current_task()
            if me is not None and me.cancelling():
                raise  # this handler itself is being cancelled, not just the tool
            if entry.reason == "shutdown":
                if tool.idempotent:
                    log.info("call %s interrupted by shutdown: handed back for another worker", job.call_id)
                    return HandBack()
                log.warning("call %s interrupted by shutdown (not idempotent)", job.call_id)
                return result(False, interrupted_text(tool.name))
            log.info("cancelled call %s tool=%s", job.call_id, tool.name)
            return result(False, f"{tool.name} was cancelled")
        finally:
            if self._running.get(key) is entry:
                del self._running[key]
            if not run_task.done():
                run_task.cancel()
                await asyncio.wait([run_task], timeout=1.0)

    async def _invoke(self, tool: Tool[Any], args: Any, ctx: ToolContext) -> tuple[bool, str]:
        try:
            if tool.idempotent:
                text: str = await transient_tool_retry(TransientToolError)(tool.run, args, ctx)
            else:
                text = await tool.run(args, ctx)
        except ToolError as exc:
            return False, str(exc) or f"{tool.name} failed"
        except Exception:  # noqa: BLE001 - a bug in one tool must not kill the worker
            log.exception("tool %s crashed on call %s", tool.name, ctx.call_id)
            return False, f"{tool.name} failed with an internal error"
        return True, text

    async def _remember(
        self, ledger: CallLedger, key: str, tool: Tool[Any], res: busproto.ToolResultMsg
    ) -> None:
        record = CallRecord(
            state="done",
            name=tool.name,
            ok=res.ok,
            text=res.text,
            timed_out=res.timed_out,
            attempt=res.attempt,
        )
        try:
            await ledger.mark_done(key, record)
        except Exception as exc:  # noqa: BLE001 - the reply still goes out
            log.warning("call %s: result not stored in the ledger: %r", res.call_id, exc)

    # ---- cancellation ------------------------------------------------------------------------
    async def _on_cancel(self, cancel: busproto.ToolCancel) -> None:
        if cancel.turn_id:
            keys = [call_key(cancel.turn_id, cancel.call_id)]
        else:  # an older sender: match by call id alone
            keys = [k for k, e in self._running.items() if e.call_id == cancel.call_id]
        for key in keys:
            self._cancelled[key] = None
            self._cancelled.move_to_end(key)
            entry = self._running.get(key)
            if entry is not None and not entry.task.done():
                log.info("cancel requested for call %s", cancel.call_id)
                entry.reason = "cancel"
                entry.task.cancel()
        while len(self._cancelled) > _MAX_REMEMBERED_CANCELS:
            self._cancelled.popitem(last=False)


async def _quietly(aw: Any) -> None:
    with contextlib.suppress(Exception):
        await aw


# ---- health ---------------------------------------------------------------------------------
def create_health_app(worker: ToolWorker, bus: Bus) -> web.Application:
    """`/readyz` is 200 while the worker fetches jobs and NATS is connected (with its pools and the
    calls running), `/healthz` while the process answers, `/metrics` in Prometheus text format."""
    app = web.Application()
    health.add_routes(
        app,
        checks=lambda: {"fetching": lambda: worker.ready, "nats": lambda: bus.connected},
        details=lambda: {"pools": list(worker.pools), "running": worker.running_calls},
    )
    return app
