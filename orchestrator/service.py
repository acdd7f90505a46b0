"""Assembles an orchestrator process and owns all its tasks.

Three loops feed session runners: the JetStream fetch loop (new turns), the takeover scan
(sessions whose owner stopped renewing its lease: a crashed orchestrator's turn is picked up in a
few hundred milliseconds, long before JetStream's ack wait) and the cancel subscription. A turn's
JetStream message is acked only once the turn is done in the checkpoint store, which happens after
its Postgres commit under a re-checked lease; until then it is kept alive with in-progress acks,
so JetStream redelivery remains the backstop if this process dies.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import secrets
import signal
import time
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web
from nats.aio.msg import Msg

from orchestrator.packer import pack
from orchestrator.providers.base import Provider, ToolSpec
from orchestrator.runner import SessionRunner, decode_request
from orchestrator.settings import OrchestratorSettings
from proto import bus as busproto
from proto import client
from proto.state import ChatMessage, SessionState
from shared import subjects
from shared.bus import TURN_ACK_WAIT_S, Bus
from shared.checkpoints import CheckpointStore
from shared.eventlog import EventLog
from shared.sessionstate import SessionStore

log = logging.getLogger(__name__)


def make_provider(name: str) -> Provider:
    if name == "simulated":
        from orchestrator.providers.simulated import SimulatedProvider

        return SimulatedProvider()
    if name == "openai":
        from orchestrator.providers.openai import OpenAIProvider  # type: ignore[import-not-found]

        return OpenAIProvider.from_env()  # type: ignore[no-any-return]
    raise ValueError(f"unknown provider {name!r}")


class OrchestratorService:
    def __init__(self, settings: OrchestratorSettings) -> None:
        self.settings = settings
        # unique per process: a restarted orchestrator with the same name is a different owner
        self.id = (settings.orchestrator_id or "orch") + "/" + secrets.token_hex(4)
        self.metrics: collections.Counter[str] = collections.Counter()
        self.runners: dict[str, tuple[SessionRunner, asyncio.Task[None]]] = {}
        self._states: dict[str, SessionState] = {}
        self._flags: dict[str, dict[str, Any]] = {}
        self._stopping = asyncio.Event()
        self._upstream = asyncio.Semaphore(1024)
        self.provider: Provider = make_provider(settings.provider)
        self.tools: Any = None

    # ---- life cycle --------------------------------------------------------------------------
    async def run(self) -> None:
        s = self.settings
        self.eventlog = await EventLog.connect(s.postgres_dsn, timeout_s=s.postgres_timeout_s, max_size=10)
        self.checkpoints = CheckpointStore.connect(s.redis_url, timeout_s=s.redis_timeout_s, ttl_s=s.session_ttl_s)
        self.bus = await Bus.connect(s.nats_url, name=self.id, timeout_s=s.nats_timeout_s)
        self.sessions = SessionStore(self.checkpoints.redis, self.eventlog, ttl_s=s.session_ttl_s,
                                     window=s.window_messages)
        try:
            await self.bus.ensure_streams()
            await self._start_tools()
            cancel_sub = await self.bus.nc.subscribe(subjects.CANCEL_SUBJECT, cb=self._on_cancel)
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self._stopping.set)
            async with asyncio.TaskGroup() as tg:
                self._tg = tg
                loops = [tg.create_task(self._fetch_loop(), name="fetch"),
                         tg.create_task(self._takeover_loop(), name="takeover")]
                health = await self._start_health()
                log.info("orchestrator %s ready", self.id)
                await self._stopping.wait()
                log.info("orchestrator %s stopping", self.id)
                for t in loops:
                    t.cancel()
                await self._finish_runners()
                await cancel_sub.unsubscribe()
                if health is not None:
                    await health.cleanup()
        finally:
            if self.tools is not None:
                with contextlib.suppress(Exception):
                    await self.tools.close()
            await self.bus.close()
            await self.checkpoints.close()
            await self.eventlog.close()

    async def _finish_runners(self) -> None:
        tasks = [t for _, t in self.runners.values()]
        if tasks:
            _, late = await asyncio.wait(tasks, timeout=self.settings.graceful_s)
            for t in late:
                t.cancel()  # the lease then expires and another orchestrator takes the turn over

    async def _start_tools(self) -> None:
        try:
            from orchestrator.tools import ToolDispatcher, ToolDispatchSettings  # noqa: PLC0415
            from tool_workers.registry import default_registry  # noqa: PLC0415
        except ImportError:
            log.warning("tool dispatcher unavailable: tools are disabled")
            return
        self.tools = ToolDispatcher(self.bus, registry=default_registry(), settings=ToolDispatchSettings())
        await self.tools.start()

    # ---- new turns from JetStream ------------------------------------------------------------
    async def _fetch_loop(self) -> None:
        sub = await self.bus.turn_subscription()
        parked: set[asyncio.Task[None]] = set()
        while True:
            room = self.settings.max_sessions * 4 - len(parked)
            if room <= 0:
                await asyncio.sleep(0.05)
                continue
            try:
                msgs = await sub.fetch(batch=min(room, 64), timeout=1.0)
            except TimeoutError:
                continue
            except Exception as e:  # noqa: BLE001 - broker hiccup: retry after a pause
                log.warning("fetch failed: %s", e)
                await asyncio.sleep(0.5)
                continue
            for msg in msgs:
                t = self._tg.create_task(self._handle_turn_msg(msg))
                parked.add(t)
                t.add_done_callback(parked.discard)

    async def _handle_turn_msg(self, msg: Msg) -> None:
        """Keeps the message until its turn is done (by us or by whoever owns the session)."""
        try:
            req = decode_request(msg.data)
        except Exception:  # noqa: BLE001 - not ours to retry: dead-letter it
            await msg.term()
            return
        cp = self.checkpoints
        last_progress_ack = time.monotonic()
        checked_requeue = False
        while not self._stopping.is_set():
            try:
                state = await cp.turn_state(req.session_id, req.turn_id)
                if state is not None and state[0] == "done":
                    await msg.ack()
                    return
                if state is None and not checked_requeue:
                    checked_requeue = True
                    if await self.eventlog.turn_status(req.turn_id) is not None:
                        await msg.ack()
                        return
                    await cp.ensure_queued(req.session_id, req.turn_id, msg.data)
                runner = self.runners.get(req.session_id)
                if runner is None and len(self.runners) < self.settings.max_sessions:
                    lease = await cp.acquire(req.session_id, self.id, self.settings.lease_ttl_ms)
                    if lease is not None:
                        runner = self._start_runner(lease)
                    runner = self.runners.get(req.session_id)
                waiter = runner[0].done_turns if runner else asyncio.Event()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(0.25 if runner is None else 2.0):
                        await waiter.wait()
                if time.monotonic() - last_progress_ack > TURN_ACK_WAIT_S / 3:
                    await msg.in_progress()
                    last_progress_ack = time.monotonic()
            except Exception as e:  # noqa: BLE001 - a store is down: keep the message, retry
                log.warning("turn %s: %s", req.turn_id, e)
                await asyncio.sleep(0.5)

    def _start_runner(self, lease: Any) -> tuple[SessionRunner, asyncio.Task[None]]:
        runner = SessionRunner(self, lease)
        task = self._tg.create_task(runner.run(), name=f"session-{lease.session_id}")
        entry = (runner, task)
        self.runners[lease.session_id] = entry

        def done(t: asyncio.Task[None]) -> None:
            if self.runners.get(lease.session_id) is entry:
                del self.runners[lease.session_id]
            runner.done_turns.set()
            if not t.cancelled() and t.exception() is not None:
                self.metrics["runner_errors"] += 1
                log.error("session runner %s failed: %r", lease.session_id, t.exception())

        task.add_done_callback(done)
        return entry

    # ---- takeover ----------------------------------------------------------------------------
    async def _takeover_loop(self) -> None:
        cp = self.checkpoints
        while True:
            await asyncio.sleep(self.settings.takeover_scan_ms / 1000)
            try:
                for sid in await cp.expired_leases():
                    if sid in self.runners or len(self.runners) >= self.settings.max_sessions:
                        continue
                    if await cp.lease_holder(sid) is not None:
                        continue
                    if not await cp.pending(sid):
                        await cp.forget_active(sid)
                        continue
                    lease = await cp.acquire(sid, self.id, self.settings.lease_ttl_ms)
                    if lease is not None and sid not in self.runners:
                        log.info("taking over session %s (epoch %d)", sid, lease.epoch)
                        self._start_runner(lease)
            except Exception as e:  # noqa: BLE001 - Redis blip: scan again next tick
                log.debug("takeover scan failed: %s", e)

    # ---- cancel ------------------------------------------------------------------------------
    async def _on_cancel(self, msg: Msg) -> None:
        try:
            cancel = busproto.bus_decoder.decode(msg.data)
        except Exception:  # noqa: BLE001
            return
        if isinstance(cancel, busproto.CancelTurn):
            self.metrics["cancel_requests"] += 1
            entry = self.runners.get(cancel.session_id)
            if entry is not None:
                entry[0].request_cancel(cancel.turn_id, cancel.reason)

    # ---- what runners ask of the service -------------------------------------------------------
    async def context_for(self, req: busproto.TurnRequest) -> list[ChatMessage]:
        state = await self.sessions.load(req.session_id, req.subject)
        self._flags[req.session_id] = dict(state.flags)
        window = [m for m in state.window if m.turn_id != req.turn_id or m.role != "assistant"]
        if not any(m.turn_id == req.turn_id and m.role == "user" for m in window):
            window.append(ChatMessage(role="user", text=req.text, turn_id=req.turn_id, seq=req.user_seq))
        state.window = window
        messages, meta = pack(self.settings.system_prompt, window, self.settings.context_budget_tokens)
        state.packer = meta
        self._states[req.session_id] = state
        return messages

    async def remember_turn(self, req: busproto.TurnRequest, ended: client.TurnEnd) -> None:
        state = self._states.pop(req.session_id, None)
        if state is None:
            return
        state.window.append(ChatMessage(role="assistant", text=ended.text, turn_id=req.turn_id, seq=ended.seq))
        state.last_turn_id = req.turn_id
        try:
            await self.sessions.save(state)
        except Exception as e:  # noqa: BLE001 - a cache: rebuilt from Postgres when missing
            log.debug("session state not saved: %s", e)

    def disconnect_policy(self, session_id: str) -> str:
        return str(self._flags.get(session_id, {}).get("disconnect_policy", self.settings.disconnect_policy))

    def flags_in_force(self, req: busproto.TurnRequest) -> dict[str, Any]:
        return {"provider": self.provider.name, "disconnect_policy": self.disconnect_policy(req.session_id),
                **self._flags.get(req.session_id, {})}

    def model_for(self, req: busproto.TurnRequest) -> str | None:
        model = self._flags.get(req.session_id, {}).get("model")
        return None if model is None else str(model)

    def tool_specs(self) -> list[ToolSpec]:
        return list(self.tools.specs()) if self.tools is not None else []

    async def call_tool(self, session_id: str, turn_id: str, call_id: str, name: str,
                        args: dict[str, Any]) -> tuple[bool, str]:
        if self.tools is None:
            return False, f"{name} is not available: no tool workers are configured"
        self.metrics["tool_calls"] += 1
        outcome = await self.tools.call(session_id, turn_id, call_id, name, args)
        if getattr(outcome, "timed_out", False):
            self.metrics["tool_timeouts"] += 1
        return bool(outcome.ok), str(outcome.text)

    @contextlib.asynccontextmanager
    async def upstream_slot(self) -> AsyncIterator[None]:
        async with self._upstream:
            yield

    def observe_first_event(self, req: busproto.TurnRequest) -> None:
        if req.received_at_ns:
            self.metrics["turns_started"] += 1

    async def dead_letter(self, req: busproto.TurnRequest, reason: str) -> None:
        self.metrics["dead_lettered"] += 1
        try:
            await self.bus.dead_letter(req, reason)
        except Exception as e:  # noqa: BLE001 - the failure is still reported to the user
            log.error("dead-letter publish failed for %s: %s", req.turn_id, e)

    # ---- health ------------------------------------------------------------------------------
    async def _start_health(self) -> web.AppRunner | None:
        if not self.settings.health_port:
            return None
        app = web.Application()

        async def healthz(_: web.Request) -> web.Response:
            return web.json_response({"ok": True})

        async def readyz(_: web.Request) -> web.Response:
            ok = self.bus.connected
            try:
                async with asyncio.timeout(1):
                    await self.checkpoints.ping()
                    await self.eventlog.ping()
            except Exception:  # noqa: BLE001
                ok = False
            return web.json_response({"ok": ok}, status=200 if ok else 503)

        async def metrics(_: web.Request) -> web.Response:
            lines = [f"tidewire_orchestrator_{k} {v}" for k, v in sorted(self.metrics.items())]
            lines.append(f"tidewire_orchestrator_stale_rejections {self.checkpoints.stale_rejections}")
            lines.append(f"tidewire_orchestrator_sessions_owned {len(self.runners)}")
            prov = self.provider
            for name in ("started", "finished", "aborted", "orphaned"):
                if hasattr(prov, name):
                    lines.append(f"tidewire_upstream_{name} {getattr(prov, name)}")
            return web.Response(text="\n".join(lines) + "\n", content_type="text/plain")

        app.add_routes([web.get("/healthz", healthz), web.get("/readyz", readyz), web.get("/metrics", metrics)])
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, self.settings.host, self.settings.health_port).start()
        return runner
