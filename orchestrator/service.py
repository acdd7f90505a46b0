"""Assembles an orchestrator process and owns all its tasks.

`run()` connects the adapters (Postgres, Redis, NATS), builds the turn's process side
(`TurnServices`, orchestrator/turn_services.py), and runs, in one task group: the intake
(orchestrator/intake.py: new turns from JetStream, each message kept until its turn is done), the
takeover scan and the peer watch (orchestrator/takeover.py, orchestrator/peers.py), the cancel
subscription, the session runners (orchestrator/runners.py), the lease keeper, load reports,
breaker publication, analytics and the queue sampler. A planned stop (SIGTERM) hands every session
over instead of finishing its turns.

Telemetry: the process continues each turn's trace from `TurnRequest.trace_context` (runner.py),
times the stages before the first token (session fetch, context pack, retrieval, model queue),
samples the turn queue every second for `tidewire_turn_queue_pending`, and serves `/metrics` on
the health port (shared/health.py; the `tidewire_orchestrator_*` and `tidewire_upstream_*` names
are kept).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import secrets
import signal
import weakref
from collections.abc import Callable
from typing import Any

from aiohttp import web

from orchestrator.analytics import AnalyticsPublisher
from orchestrator.flags import FlagResolver, load_system_prompts
from orchestrator.intake import TurnIntake
from orchestrator.leases import LeaseKeeper
from orchestrator.load import LoadReporter
from orchestrator.peers import PEER_SOCKETS, PeerWatch, close_peer_sockets, peer_endpoint
from orchestrator.providers.base import Provider
from orchestrator.runners import RunnerPool
from orchestrator.settings import OrchestratorSettings
from orchestrator.takeover import Takeover
from orchestrator.tools import ToolDispatcher, ToolDispatchSettings
from orchestrator.turn_services import TurnServices
from orchestrator.upstream import UpstreamRouter
from shared import health, telemetry
from shared.bus import Bus
from shared.checkpoints import CheckpointStore
from shared.eventlog import EventLog
from shared.sessionstate import SessionStore
from shared.supervise import install_task_dump, supervised
from shared.tool_catalogue import default_catalogue

log = logging.getLogger(__name__)

QUEUE_SAMPLE_S = 1.0
# Counted in the process's metrics counter; always exposed (0 until they happen) so alerts can rely on them.
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
        self._stopping = asyncio.Event()
        self.upstreams = UpstreamRouter(make_provider(settings.provider), factory=make_provider)
        self.runners: RunnerPool | None = None
        self.queue_depth: tuple[int, int] | None = None  # (waiting, delivered but unacked), sampled
        self.dead_letters: int | None = None

    # ---- life cycle --------------------------------------------------------------------------
    async def run(self) -> None:
        s = self.settings
        telemetry.setup("orchestrator", self.id)
        tools: ToolDispatcher | None = None
        async with contextlib.AsyncExitStack() as stack:
            stack.callback(telemetry.flush)
            self.eventlog = await stack.enter_async_context(
                await EventLog.connect(s.postgres_dsn, timeout_s=s.postgres_timeout_s, max_size=10)
            )
            self.checkpoints = await stack.enter_async_context(
                CheckpointStore.connect(
                    s.redis_url,
                    timeout_s=s.redis_timeout_s,
                    ttl_s=s.session_ttl_s,
                    min_replicas=s.redis_min_replicas,
                )
            )
            self.bus = await stack.enter_async_context(
                await Bus.connect(
                    s.nats_url, name=self.id, timeout_s=s.nats_timeout_s, replicas=s.nats_replicas
                )
            )
            stack.push_async_callback(self.upstreams.close)
            await self.bus.ensure_streams()
            tools = ToolDispatcher(self.bus, registry=default_catalogue(), settings=ToolDispatchSettings())
            await tools.start()
            stack.push_async_callback(_quietly, tools.close)
            ports = TurnServices(
                id=self.id,
                settings=s,
                metrics=self.metrics,
                checkpoints=self.checkpoints,
                eventlog=self.eventlog,
                bus=self.bus,
                leases=LeaseKeeper(self.checkpoints, ttl_ms=s.lease_ttl_ms, renew_ms=s.lease_renew_ms),
                load=LoadReporter(self.checkpoints, self.id),
                provider=self.upstreams,
                sessions=SessionStore(
                    self.checkpoints, self.eventlog, ttl_s=s.session_ttl_s, window=s.window_messages
                ),
                flags=FlagResolver(self.eventlog, ttl_s=2.0),
                analytics=AnalyticsPublisher(self.bus),
                tools=tools,
                system_prompts=load_system_prompts(),
            )
            await self._serve(ports)

    async def _serve(self, ports: TurnServices) -> None:
        s = self.settings
        advertise = s.advertise_url or (
            f"http://{'127.0.0.1' if s.host in ('0.0.0.0', '::') else s.host}:{s.health_port}"
            if s.health_port
            else None
        )
        takeover: Takeover | None = None

        async def peer_gone(instance: str) -> None:
            if takeover is not None:
                await takeover.peer_gone(instance)

        peers = PeerWatch(self.checkpoints, self.id, advertise, peer_gone)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stopping.set)
        install_task_dump(loop)
        async with asyncio.TaskGroup() as tg:
            runners = self.runners = RunnerPool(ports, tg, s.max_sessions)
            takeover = Takeover(ports, runners)
            intake = TurnIntake(ports, runners, tg, self._stopping)
            cancel_sub = await self.bus.subscribe_turn_cancels(runners.on_cancel)
            keeper = tg.create_task(ports.leases.run(), name="leases")
            loops = [
                tg.create_task(intake.run(), name="fetch"),
                tg.create_task(ports.load.run(), name="load-report"),
                tg.create_task(takeover.run(), name="takeover"),
                tg.create_task(self._sample_queue(), name="queue-sampler"),
                tg.create_task(self.upstreams.publish_loop(self.checkpoints), name="breakers"),
            ]
            analytics = tg.create_task(ports.analytics.run(), name="analytics")
            health_server = await self._start_health()
            loops.append(tg.create_task(peers.run(), name="peers"))  # peers may watch us now
            log.info("orchestrator %s ready", self.id)
            await self._stopping.wait()
            log.info("orchestrator %s stopping", self.id)
            for t in loops:
                t.cancel()
            handed = await self._hand_over(runners)
            if health_server is not None:
                await health_server.cleanup()  # closes the peer links: the peers claim the sessions now
            await peers.leave()
            log.info("orchestrator %s handed %d sessions over", self.id, handed)
            keeper.cancel()
            await ports.analytics.flush(2.0)
            analytics.cancel()
            await self.bus.unsubscribe(cancel_sub)

    async def _hand_over(self, runners: RunnerPool) -> int:
        """A planned stop hands every session over at once instead of finishing its turns: the
        runners stop (what they checkpointed is where the next owner continues), their leases are
        deleted, and closing the peer links tells the other orchestrators to claim them. Without a
        peer watching (no health port), the takeover scan finds the released sessions."""
        await runners.stop_all()
        return len(await self.checkpoints.break_leases_of(self.id))

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
            lambda: len(self.runners) if self.runners is not None else 0,
            description="Sessions whose lease this orchestrator holds",
        )
        prov = self.upstreams

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
        health.add_routes(
            app,
            checks=lambda: {
                "nats": lambda: self.bus.connected,
                "redis": self.checkpoints.ping,
                "postgres": self.eventlog.ping,
            },
            extra_metrics=self._extra_metrics,
        )
        app[PEER_SOCKETS] = weakref.WeakSet()
        app.on_shutdown.append(close_peer_sockets)
        app.router.add_get("/v1/peer", peer_endpoint)
        return await health.serve(app, self.settings.host, self.settings.health_port)


async def _quietly(close: Callable[[], Any]) -> None:
    with contextlib.suppress(Exception):
        await close()
