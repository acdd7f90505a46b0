"""Assembles an orchestrator process and owns all its tasks.

Three loops feed session runners: the JetStream fetch loop (new turns), the takeover scan
(sessions whose owner stopped renewing its lease: a crashed orchestrator's turn is picked up in a
few hundred milliseconds, long before JetStream's ack wait) and the cancel subscription. A turn's
JetStream message is acked only once the turn is done in the checkpoint store, which happens after
its Postgres commit under a re-checked lease; until then it is kept alive with in-progress acks,
so JetStream redelivery remains the backstop if this process dies.

Telemetry: the process continues each turn's trace from `TurnRequest.trace_context` (runner.py),
times the stages before the first token (session fetch, context pack, retrieval, model queue),
samples the turn queue every second for `tidewire_turn_queue_pending`, and serves `/metrics` on
the health port (shared.telemetry renders it; the `tidewire_orchestrator_*` and
`tidewire_upstream_*` names are kept).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import secrets
import signal
import time
import weakref
from collections.abc import AsyncIterator, Callable
from typing import Any

import msgspec
from aiohttp import web

from orchestrator.analytics import AnalyticsPublisher, tool_calls_in, turn_analytics
from orchestrator.flags import FlagResolver, load_system_prompts, system_prompt_for
from orchestrator.leases import LeaseKeeper
from orchestrator.load import LoadReporter
from orchestrator.packer import pack
from orchestrator.peers import PEER_SOCKETS, PeerWatch, close_peer_sockets, peer_endpoint
from orchestrator.providers.base import Provider, ToolSpec
from orchestrator.runner import SessionRunner, decode_request
from orchestrator.settings import OrchestratorSettings
from orchestrator.turn import TurnPlan
from orchestrator.upstream import UpstreamRouter
from proto import bus as busproto
from proto import client
from proto.state import ChatMessage, SessionState
from shared import telemetry
from shared.bus import TURN_ACK_WAIT_S, Bus, BusMessage, fetch_batch
from shared.checkpoints import CheckpointStore, Lease, TurnSnapshot
from shared.eventlog import EventLog
from shared.sessionstate import SessionStore
from shared.supervise import install_task_dump, report_failure, supervised

log = logging.getLogger(__name__)

QUEUE_SAMPLE_S = 1.0
# Counted in OrchestratorService.metrics; always exposed (0 until they happen) so alerts can rely on them.
COUNTERS = (
    "peer_deaths",
    "cancel_requests",
    "cancel_success",
    "lease_lost",
    "turn_errors",
    "runner_errors",
    "takeovers",
    "tool_calls",
    "tool_timeouts",
    "dead_lettered",
    "turns_started",
    "turns_completed",
    "turns_cancelled",
    "turns_failed",
    "turns_timed_out",
)
UPSTREAM_COUNTERS = ("started", "finished", "aborted", "failed")

_meter = telemetry.meter("tidewire.orchestrator")
_tool_seconds = _meter.create_histogram(
    "tidewire_tool_call_seconds",
    unit="s",
    description="Tool call latency seen by the turn (dispatch -> result)",
    explicit_bucket_boundaries_advisory=telemetry.LATENCY_BUCKETS_S,
)
_turn_seconds = _meter.create_histogram(
    "tidewire_turn_seconds",
    unit="s",
    description="Whole turn duration, pickup -> turn_end durable",
    explicit_bucket_boundaries_advisory=telemetry.LATENCY_BUCKETS_S,
)


def make_provider(name: str) -> Provider:
    if name == "simulated":
        from orchestrator.providers.simulated import SimulatedProvider

        return SimulatedProvider()
    if name == "openai":
        from orchestrator.providers.openai import OpenAIProvider

        return OpenAIProvider.from_env()
    raise ValueError(f"unknown provider {name!r}")


class OrchestratorService:
    def __init__(self, settings: OrchestratorSettings) -> None:
        self.settings = settings
        # unique per process: a restarted orchestrator with the same name is a different owner
        self.id = (settings.orchestrator_id or "orch") + "/" + secrets.token_hex(4)
        self.metrics: collections.Counter[str] = collections.Counter()
        self.runners: dict[str, tuple[SessionRunner, asyncio.Task[None]]] = {}
        self._stopping = asyncio.Event()
        self._upstream = asyncio.Semaphore(1024)
        # the model.queue stage is measured once, by upstream_slot (the router's per-upstream gate
        # waits fall into upstream_first_token); observing both would count every step twice
        self.upstreams = UpstreamRouter(make_provider(settings.provider), factory=make_provider)
        self.provider: Provider = self.upstreams
        self._system_prompts = load_system_prompts()
        self.tools: Any = None
        self.queue_depth: tuple[int, int] | None = None  # (waiting, delivered but unacked), sampled
        self.dead_letters: int | None = None

    # ---- life cycle --------------------------------------------------------------------------
    async def run(self) -> None:
        s = self.settings
        telemetry.setup("orchestrator", self.id)
        self.eventlog = await EventLog.connect(s.postgres_dsn, timeout_s=s.postgres_timeout_s, max_size=10)
        self.checkpoints = CheckpointStore.connect(
            s.redis_url, timeout_s=s.redis_timeout_s, ttl_s=s.session_ttl_s, min_replicas=s.redis_min_replicas
        )
        self.bus = await Bus.connect(
            s.nats_url, name=self.id, timeout_s=s.nats_timeout_s, replicas=s.nats_replicas
        )
        self.sessions = SessionStore(
            self.checkpoints, self.eventlog, ttl_s=s.session_ttl_s, window=s.window_messages
        )
        self.flags = FlagResolver(self.eventlog, ttl_s=2.0)
        self.load = LoadReporter(self.checkpoints, self.id)
        advertise = s.advertise_url or (
            f"http://{'127.0.0.1' if s.host in ('0.0.0.0', '::') else s.host}:{s.health_port}"
            if s.health_port
            else None
        )
        self.peers = PeerWatch(self.checkpoints, self.id, advertise, self._peer_gone)
        self.leases = LeaseKeeper(self.checkpoints, ttl_ms=s.lease_ttl_ms, renew_ms=s.lease_renew_ms)
        self.analytics = AnalyticsPublisher(self.bus)
        try:
            await self.bus.ensure_streams()
            await self._start_tools()
            cancel_sub = await self.bus.subscribe_turn_cancels(self._on_cancel)
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self._stopping.set)
            install_task_dump(loop)
            async with asyncio.TaskGroup() as tg:
                self._tg = tg
                keeper = tg.create_task(self.leases.run(), name="leases")
                loops = [
                    tg.create_task(self._fetch_loop(), name="fetch"),
                    tg.create_task(self.load.run(), name="load-report"),
                    tg.create_task(self._takeover_loop(), name="takeover"),
                    tg.create_task(self._sample_queue(), name="queue-sampler"),
                    tg.create_task(self.upstreams.publish_loop(self.checkpoints), name="breakers"),
                ]
                analytics = tg.create_task(self.analytics.run(), name="analytics")
                health = await self._start_health()
                loops.append(tg.create_task(self.peers.run(), name="peers"))  # peers may watch us now
                log.info("orchestrator %s ready", self.id)
                await self._stopping.wait()
                log.info("orchestrator %s stopping", self.id)
                for t in loops:
                    t.cancel()
                handed = await self._hand_over()
                if health is not None:
                    await health.cleanup()  # closes the peer links: the peers claim the sessions now
                await self.peers.leave()
                log.info("orchestrator %s handed %d sessions over", self.id, handed)
                keeper.cancel()
                await self.analytics.flush(2.0)
                analytics.cancel()
                await self.bus.unsubscribe(cancel_sub)
        finally:
            if self.tools is not None:
                with contextlib.suppress(Exception):
                    await self.tools.close()
            await self.upstreams.close()
            await self.bus.close()
            await self.checkpoints.close()
            await self.eventlog.close()
            telemetry.flush()

    async def _hand_over(self) -> int:
        """A planned stop hands every session over at once instead of finishing its turns: the
        runners stop (what they checkpointed is where the next owner continues), their leases are
        deleted, and closing the peer links tells the other orchestrators to claim them. Without a
        peer watching (no health port), the takeover scan finds the released sessions."""
        entries = list(self.runners.values())
        for _, task in entries:
            task.cancel()
        await asyncio.gather(*(task for _, task in entries), return_exceptions=True)
        return len(await self.checkpoints.break_leases_of(self.id))

    async def _start_tools(self) -> None:
        from orchestrator.tools import ToolDispatcher, ToolDispatchSettings
        from shared.tool_catalogue import default_catalogue

        self.tools = ToolDispatcher(self.bus, registry=default_catalogue(), settings=ToolDispatchSettings())
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
            msgs = await fetch_batch(sub, min(room, 64), 1.0, what="the turn queue")
            for msg in msgs:
                t = self._tg.create_task(self._handle_turn_msg(msg))
                parked.add(t)
                t.add_done_callback(parked.discard)

    async def _handle_turn_msg(self, msg: BusMessage) -> None:
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
                runner = self.runners.get(req.session_id)
                if runner is None and len(self.runners) < self.settings.max_sessions:
                    # one round trip: this turn's state and, if the session is free, its lease and first turn
                    claim = await cp.claim(req.session_id, self.id, self.settings.lease_ttl_ms, req.turn_id)
                    state = claim.msg_turn_state
                    if claim.lease is not None:
                        runner = self._start_runner(claim.lease, claim.first)
                else:
                    state = await cp.turn_state(req.session_id, req.turn_id)
                if state is not None and state[0] == "done":
                    await msg.ack()
                    return
                if state is None and not checked_requeue and msg.metadata.num_delivered > 1:
                    # a redelivery: the turn may be done already, or Redis may have lost its queue entry
                    checked_requeue = True
                    if await self.eventlog.turn_status(req.turn_id) is not None:
                        await msg.ack()
                        return
                    if await cp.ensure_queued(req.session_id, req.turn_id, msg.data):
                        continue
                waiter = runner[0].done_turns if runner else asyncio.Event()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(0.25 if runner is None else 2.0):
                        await waiter.wait()
                if time.monotonic() - last_progress_ack > TURN_ACK_WAIT_S / 3:
                    await msg.in_progress()
                    last_progress_ack = time.monotonic()
            except Exception as e:  # noqa: BLE001 - a store is down: keep the message, retry
                report_failure(f"turn message {req.turn_id}", e, log)
                await asyncio.sleep(0.5)

    def _start_runner(
        self, lease: Lease, first: TurnSnapshot | None = None
    ) -> tuple[SessionRunner, asyncio.Task[None]]:
        runner = SessionRunner(self, lease, first)
        task = self._tg.create_task(runner.run(), name=f"session-{lease.session_id}")
        entry = (runner, task)
        self.runners[lease.session_id] = entry

        def done(t: asyncio.Task[None]) -> None:
            if self.runners.get(lease.session_id) is entry:
                del self.runners[lease.session_id]
            runner.done_turns.set()
            if not t.cancelled() and t.exception() is not None:
                self.metrics["runner_errors"] += 1
                log.error("session runner %s failed", lease.session_id, exc_info=t.exception())

        task.add_done_callback(done)
        return entry

    # ---- takeover ----------------------------------------------------------------------------
    async def _takeover_loop(self) -> None:
        await supervised(
            "takeover", self._takeover_scan, every_s=self.settings.takeover_scan_ms / 1000, logger=log
        )

    async def _takeover_scan(self) -> None:
        """Sessions whose owner stopped renewing its lease: take them over (a failure here would
        silently disable crash recovery, hence the supervised loop around it)."""
        for sid in await self.checkpoints.expired_leases():
            await self._take_over(sid)

    async def _take_over(self, sid: str) -> None:
        cp = self.checkpoints
        if sid in self.runners or len(self.runners) >= self.settings.max_sessions:
            return
        claim = await cp.claim(sid, self.id, self.settings.lease_ttl_ms)
        if claim.held:
            return
        if claim.lease is None:
            # its owner died after finishing a turn, maybe before showing turn_end live
            tail = await cp.last_event(sid)
            if tail is not None:
                await self.bus.publish_events(sid, [tail])
            await cp.forget_active(sid)
            return
        log.info("taking over session %s (epoch %d)", sid, claim.lease.epoch)
        self._start_runner(claim.lease, claim.first)

    async def _peer_gone(self, instance: str) -> None:
        """A peer's process is gone (its peer socket closed): its sessions are taken over now, not
        when their leases lapse."""
        self.metrics["peer_deaths"] += 1
        sids = await self.checkpoints.break_leases_of(instance)
        if sids:
            log.info("peer %s is gone: taking over %d sessions", instance, len(sids))
        for sid in sids:
            await self._take_over(sid)

    # ---- cancel ------------------------------------------------------------------------------
    async def _on_cancel(self, msg: BusMessage) -> None:
        try:
            cancel = busproto.bus_decoder.decode(msg.data)
        except msgspec.DecodeError as e:
            report_failure("cancel message decode", e, log)
            return
        if isinstance(cancel, busproto.CancelTurn):
            self.metrics["cancel_requests"] += 1
            entry = self.runners.get(cancel.session_id)
            if entry is not None:
                now = time.time_ns()
                telemetry.record_span(
                    "orchestrator.cancel_request",
                    now,
                    now,
                    parent=telemetry.extract(msg.headers),
                    attributes={"turn_id": cancel.turn_id or "", "reason": cancel.reason},
                    kind=telemetry.SpanKind.CONSUMER,
                )
                entry[0].request_cancel(cancel.turn_id, cancel.reason)

    # ---- what runners ask of the service -------------------------------------------------------
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
            flags.get("system_prompt_version"), self.settings.system_prompt, self._system_prompts
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
        self, session_id: str, turn_id: str, call_id: str, name: str, args: dict[str, Any]
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
                outcome = await self.tools.call(session_id, turn_id, call_id, name, args)
                timed_out = bool(getattr(outcome, "timed_out", False))
                outcome_label = "timeout" if timed_out else "ok" if outcome.ok else "error"
                span.set_attribute("outcome", outcome_label)
            finally:
                _tool_seconds.record(time.perf_counter() - t0, {"tool": name, "outcome": outcome_label})
        if timed_out:
            self.metrics["tool_timeouts"] += 1
        return bool(outcome.ok), str(outcome.text)

    @contextlib.asynccontextmanager
    async def upstream_slot(self) -> AsyncIterator[None]:
        """A slot for one upstream model stream; the wait for it is the `model.queue` stage."""
        start_ns, t0 = time.time_ns(), time.perf_counter()
        async with self._upstream:
            telemetry.observe_stage("model_queue", time.perf_counter() - t0)
            telemetry.record_span("model.queue", start_ns, time.time_ns())
            yield

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

    # ---- metrics -----------------------------------------------------------------------------
    async def _sample_queue(self) -> None:
        """Turn-queue depth and dead letters, once a second: a scrape never waits on NATS."""
        await supervised("queue-sampler", self._sample_queue_once, every_s=QUEUE_SAMPLE_S, logger=log)

    async def _sample_queue_once(self) -> None:
        self.queue_depth = await self.bus.turn_queue_depth()
        self.dead_letters = await self.bus.dead_lettered()

    def _install_metrics(self) -> None:
        def counter(key: str) -> Callable[[], int]:
            return lambda: self.metrics[key]

        for key in COUNTERS:
            telemetry.observe(f"tidewire_orchestrator_{key}", counter(key), kind="counter")
        telemetry.observe(
            "tidewire_orchestrator_stale_rejections",
            lambda: self.checkpoints.stale_rejections,
            kind="counter",
            description="Checkpoint writes refused: a stale owner was fenced off",
        )
        telemetry.observe(
            "tidewire_orchestrator_sessions_owned",
            lambda: len(self.runners),
            description="Sessions whose lease this orchestrator holds",
        )
        prov = self.provider

        def upstream(name: str) -> Callable[[], int]:
            return lambda: int(getattr(prov, name))

        for name in UPSTREAM_COUNTERS:
            if hasattr(prov, name):
                telemetry.observe(f"tidewire_upstream_{name}", upstream(name), kind="counter")
        if hasattr(prov, "orphaned"):
            telemetry.observe(
                "tidewire_upstream_orphaned",
                upstream("orphaned"),
                description="Upstream streams started and not finished, failed or aborted",
            )

        def queue(i: int | None) -> Any:
            depth = self.queue_depth
            if depth is None:
                return []
            return [({}, sum(depth) if i is None else depth[i])]

        telemetry.observe(
            "tidewire_turn_queue_pending",
            lambda: queue(None),
            description="Turns queued in JetStream: waiting + delivered but unacked (sampled 1/s)",
        )
        telemetry.observe(
            "tidewire_turn_queue_waiting",
            lambda: queue(0),
            description="Turns not yet delivered to any orchestrator",
        )
        telemetry.observe(
            "tidewire_turn_queue_ack_pending",
            lambda: queue(1),
            description="Turns delivered to an orchestrator and not yet acked (running or parked)",
        )
        telemetry.observe(
            "tidewire_dead_letter_messages",
            lambda: [] if self.dead_letters is None else [({}, self.dead_letters)],
            description="Turns in the dead-letter stream (kept 14 days)",
        )

    def _extra_metrics(self) -> list[tuple[str, str, float | int]]:
        """Counters bumped under names that are not pre-declared (exposed, untyped, all the same)."""
        return [
            (f"tidewire_orchestrator_{k}", "untyped", v)
            for k, v in sorted(self.metrics.items())
            if k not in COUNTERS
        ]

    # ---- health ------------------------------------------------------------------------------
    async def _start_health(self) -> web.AppRunner | None:
        self._install_metrics()
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
            return web.Response(
                text=telemetry.render_prometheus(self._extra_metrics()),
                content_type=telemetry.PROMETHEUS_CONTENT_TYPE,
            )

        app[PEER_SOCKETS] = weakref.WeakSet()
        app.on_shutdown.append(close_peer_sockets)
        app.add_routes(
            [
                web.get("/healthz", healthz),
                web.get("/readyz", readyz),
                web.get("/metrics", metrics),
                web.get("/v1/peer", peer_endpoint),
            ]
        )
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, self.settings.host, self.settings.health_port).start()
        return runner
