"""The chaos drill over the production topology (tidewire.cluster): 24 sessions stream long answers
through HAProxy with reconnecting clients (tidewire.drill) while, one after the other, a gateway, an
orchestrator, a NATS node, the Redis primary (Sentinel fails over) and the Postgres primary (the
supervisor promotes the synchronous standby) are SIGKILLed. Afterwards every guarantee is checked
against the durable history: every acked message stored at its seq; every turn ended exactly once;
client text == turn_end.text == stored text; seqs gap-free. Per fault, the pause the streaming
clients saw and the errors they got are printed (and written to <state>/drill.json).

A gateway is also drained once (HAProxy `state drain`, then SIGTERM: a planned restart). A probe
session sends a short turn after another during the whole drill: its send→turn_end times show how
long each fault held up writes (Postgres, Redis, NATS), which the streaming clients cannot show.

Known hazard not exercised deterministically here: Redis replication is asynchronous, so a Sentinel
failover can lose an event the old primary accepted (and the orchestrator published) but had not yet
sent to the replica, and re-issue its seq with other content. On loopback the replica is microseconds
behind and the drill has not hit it; tests/integration/test_redis_connect.py shows the loss with a
lagging replica. `TIDEWIRE_CHAOS_NO_REDIS_FAILOVER=1` leaves the Redis fault out of the drill.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import shutil
import statistics
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest

from proto import client
from tests.integration.conftest import GENEROUS_LIMITS, SECRET, make_token
from tidewire import invariants
from tidewire.cluster import Cluster, FaultRecord
from tidewire.drill import DrillClient, check

SESSIONS = 24
TURNS = 4
# ~10 s per answer at 40 tokens/s: every fault lands while most sessions are mid-answer
TEXT = "/sim tokens=400 rate=40\ncluster drill turn {turn}"
FAULT_EVERY_S = 6.0
PAUSE_WINDOW_S = 12.0
PROBE_TEXT = "/sim tokens=4 rate=1000\nprobe {turn}"
FAULTS = ["gateway", "gateway-drain", "orchestrator", "nats", "redis-primary", "postgres-primary"]
if os.environ.get("TIDEWIRE_CHAOS_NO_REDIS_FAILOVER") == "1":
    FAULTS.remove("redis-primary")


class TimedEvents(list):  # type: ignore[type-arg]
    """The client's event list, with the arrival time of each event (to measure pauses)."""

    def __init__(self) -> None:
        super().__init__()
        self.times: list[float] = []

    def append(self, item: Any) -> None:
        self.times.append(time.monotonic())
        super().append(item)


@dataclass
class TimedClient(DrillClient):
    errors: list[tuple[float, str]] = field(default_factory=list)

    async def _connection(self, http: aiohttp.ClientSession, text: str, cmid: str) -> None:
        try:
            await super()._connection(http, text, cmid)
        except BaseException as e:
            self.errors.append((time.monotonic(), f"{type(e).__name__}: {e}"[:120]))
            raise


def pause_report(rec: FaultRecord, until: float, clients: list[TimedClient],
                 probes: list[tuple[float, float, TimedClient]]) -> dict[str, Any]:
    """For each client streaming when the fault hit (an event in the second before it): the longest
    gap between two events that ended after the fault and before the next fault (`until`); and the
    longest send→turn_end of the probe turns running in that interval."""
    pauses = []
    errors: dict[str, int] = {}
    for c in clients:
        times = c.events.times  # type: ignore[attr-defined]
        if not any(rec.at - 1.0 <= t < rec.at for t in times):
            continue
        gaps = [b - a for a, b in zip(times, times[1:], strict=False) if b > rec.at and a < until]
        if gaps:
            pauses.append(max(gaps))
        for t, e in c.errors:
            if rec.at <= t < until:
                key = e.split(":", 1)[0] if "send refused" not in e else e
                errors[key] = errors.get(key, 0) + 1
    pauses.sort()
    probe_turns = [end - start for start, end, _ in probes if end > rec.at and start < until]
    for start, _end, p in probes:
        for t, e in p.errors:
            if rec.at <= t < until and start <= t:
                errors["probe " + e[:60]] = errors.get("probe " + e[:60], 0) + 1
    return {"fault": rec.kind, "target": rec.target, "heal_s": rec.heal_seconds, **rec.detail,
            "streaming_clients": len(pauses),
            "pause_p50_ms": round(statistics.median(pauses) * 1000) if pauses else None,
            "pause_max_ms": round(pauses[-1] * 1000) if pauses else None,
            "probe_turn_max_ms": round(max(probe_turns) * 1000) if probe_turns else None,
            "client_errors": errors}


async def probe_loop(url: str, stop: asyncio.Event, out: list[tuple[float, float, TimedClient]]) -> None:
    """Short turns one after another, each in a new session: (start, turn_end received, client)."""
    i = 0
    while not stop.is_set():
        c = TimedClient(url, make_token(f"probe-{i % 4}"), turns=1, text=PROBE_TEXT, events=TimedEvents())
        t0 = time.monotonic()
        await c.run()
        out.append((t0, time.monotonic(), c))
        i += 1
        await asyncio.sleep(0.05)


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    # not under pytest's tmp dir: postgres runs as an unprivileged user that must traverse the path
    state = Path(tempfile.mkdtemp(prefix="tidewire-cluster-"))
    state.chmod(0o755)
    env = {**GENEROUS_LIMITS, "TIDEWIRE_TEST_TOOLS": "1", "TIDEWIRE_LOG_LEVEL": "INFO"}
    c = Cluster(state / "state", service_env=env, jwt_secret=SECRET, restart_delay_s=0.5)
    c.start()
    try:
        yield c
    finally:
        c.stop()
        if os.environ.get("TIDEWIRE_KEEP_CLUSTER") != "1":  # logs and drill.json stay with =1
            shutil.rmtree(state, ignore_errors=True)


async def run_drill(cluster: Cluster, faults: list[str]) -> tuple[list[TimedClient], list[dict[str, Any]]]:
    clients = [TimedClient(cluster.url, make_token(f"cluster-{i}"), turns=TURNS, text=TEXT, events=TimedEvents())
               for i in range(SESSIONS)]
    rng = random.Random(16)
    work = asyncio.gather(*(c.run() for c in clients))
    probes: list[tuple[float, float, TimedClient]] = []
    stop_probes = asyncio.Event()
    prober = asyncio.create_task(probe_loop(cluster.url, stop_probes, probes))
    records: list[FaultRecord] = []
    await asyncio.sleep(4.0)
    for kind in faults:
        if work.done():
            break
        if kind == "gateway":
            rec = await asyncio.to_thread(cluster.kill_gateway, rng.choice(cluster.nodes("gateway")).name)
        elif kind == "gateway-drain":
            rec = await asyncio.to_thread(cluster.drain_gateway, rng.choice(cluster.nodes("gateway")).name)
        elif kind == "orchestrator":
            rec = await asyncio.to_thread(cluster.kill_orchestrator, rng.choice(cluster.nodes("orchestrator")).name)
        elif kind == "nats":
            rec = await asyncio.to_thread(cluster.kill_nats, rng.choice(cluster.nodes("nats")).name)
        elif kind == "redis-primary":
            rec = await asyncio.to_thread(cluster.kill_redis_primary)
        elif kind == "postgres-primary":
            rec = await asyncio.to_thread(cluster.kill_postgres_primary)
        else:
            raise AssertionError(kind)
        records.append(rec)
        await asyncio.sleep(FAULT_EVERY_S)
    await asyncio.wait_for(work, 240)
    stop_probes.set()
    await asyncio.wait_for(prober, 120)
    for rec in records:
        await asyncio.to_thread(cluster.wait_healed, rec, 90)
    ends = [r.at for r in records[1:]] + [time.monotonic()]
    reports = [pause_report(rec, min(until, rec.at + PAUSE_WINDOW_S), clients, probes)
               for rec, until in zip(records, ends, strict=True)]
    out = cluster.state_dir / "drill.json"
    out.write_text(json.dumps({"faults": reports, "supervisor": [(round(t, 2), e) for t, e in cluster.events],
                               "reconnects": sum(c.reconnects for c in clients)}, indent=2))
    print("\n" + "\n".join(json.dumps(r) for r in reports))
    print(f"reconnects: {sum(c.reconnects for c in clients)}, probe turns: {len(probes)}; details in {out}")
    return clients + [p for _, _, p in probes], reports


async def check_invariants(cluster: Cluster, clients: list[TimedClient]) -> list[str]:
    """Every guarantee, per session, against the durable history (through HAProxy and in Postgres
    directly); the failures as text (empty: all held)."""
    failures = []
    async with aiohttp.ClientSession() as http:
        for c in clients:
            try:
                await check(c, http)  # acked => durable at its seq; client text == history; seq gap-free
                for ack in c.acks:  # exactly one turn_end per turn, and its text is the client's
                    view = invariants.check_turns(c.events)[ack.turn_id]
                    if len(view.ends) != 1 or view.ends[0].text != view.text:
                        raise invariants.InvariantError(f"turn {ack.turn_id}: {len(view.ends)} turn_end")
            except (invariants.InvariantError, KeyError) as e:
                failures.append(f"{c.session_id}: {e}")
    conn = await asyncpg.connect(cluster.postgres_dsn)
    try:
        for c in clients:
            for ack in c.acks:
                t = await conn.fetchrow("SELECT text FROM turns WHERE turn_id=$1", ack.turn_id)
                stored = await conn.fetch("SELECT payload FROM events WHERE session_id=$1 AND turn_id=$2"
                                          " AND type='delta' ORDER BY seq", c.session_id, ack.turn_id)
                text = "".join(client.event_decoder.decode(r["payload"]).text for r in stored)
                if t is None or text != t["text"]:
                    failures.append(f"{c.session_id}: stored deltas of {ack.turn_id} differ from turns.text")
        n_turns = await conn.fetchval("SELECT count(*) FROM turns WHERE session_id = ANY($1)",
                                      [c.session_id for c in clients])
        sent = sum(c.turns for c in clients)
        if n_turns != sent:
            failures.append(f"{n_turns} turns stored for {sent} sent: a turn ran twice or not at all")
    finally:
        await conn.close()
    return failures


@pytest.mark.slow
@pytest.mark.timeout(480)
async def test_cluster_loses_nothing_when_a_gateway_orchestrator_nats_node_redis_and_postgres_primaries_die(
        cluster: Cluster) -> None:
    clients, reports = await run_drill(cluster, FAULTS)
    failures = await check_invariants(cluster, clients)
    assert not failures, "\n".join(failures[:20])
    assert [r["fault"] for r in reports] == FAULTS and all(r["heal_s"] is not None for r in reports)
    assert all(r["streaming_clients"] > 0 for r in reports), "a fault hit no streaming client"
    assert sum(c.reconnects for c in clients) > 0, "the faults never reached a client"
    assert cluster.pg_primary == "pg-b" and cluster.stream_replicas()["TW_TURNS"]["replicas"] == 3
    if "redis-primary" in FAULTS:
        assert cluster.redis_primary() == "redis-b"
