"""The chaos drill over the production topology (tidewire.dev.cluster): 50 sessions stream long answers
through HAProxy with reconnecting clients (tidewire.drill) while, one after the other, a gateway, an
orchestrator, a NATS node, the Redis primary (Sentinel fails over) and the Postgres primary (the
supervisor promotes the synchronous standby) are SIGKILLed, and (with network namespaces: root and
iproute2) the busiest orchestrator is cut off the network for 5 s, longer than its lease, then healed. Afterwards every guarantee is checked
against the durable history: every acked message stored at its seq; every turn ended exactly once;
client text == turn_end.text == stored text; seqs gap-free. Per fault, the pause the streaming
clients saw and the errors they got are printed (and written to <state>/drill.json).

A gateway is also drained once (HAProxy `state drain`, then SIGTERM: a planned restart). A probe
session sends a short turn after another during the whole drill: its send→turn_end times show how
long each fault held up writes (Postgres, Redis, NATS), which the streaming clients cannot show.

Two faults the drill can only hit by chance have tests of their own that make them deterministic,
both `xfail` until the services change (docs/cluster.md, "What the services still need"): a gateway
that misses a turn_end while its NATS node is unreachable (it never re-reads the stores after the
reconnect), and a Redis failover with a lagging replica (asynchronous replication: seqs clients have
seen are issued again). `TIDEWIRE_CHAOS_NO_REDIS_FAILOVER=1` leaves the Redis fault out of the drill.
"""

from __future__ import annotations

import asyncio
import contextlib
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
from tidewire.dev import netns
from tidewire.dev.cluster import Cluster, FaultRecord, _http_json
from tidewire.drill import DrillClient, check

# Not in `make test`: the clustered topology takes minutes and its setup flaked on a loaded
# 2-core box (Sentinels not ready in 60 s); `make chaos-cluster` runs it.
pytestmark = pytest.mark.cluster

SESSIONS = 50
TURNS = 7
# ~10 s per answer at 40 tokens/s: every fault lands while most sessions are mid-answer, and the
# faults (4 s + 7 × 8 s + the 5 s partition) end before the 7 answers of a session do
TEXT = "/sim tokens=400 rate=40\ncluster drill turn {turn}"
FAULT_EVERY_S = 8.0
PAUSE_WINDOW_S = 12.0
MAX_PAUSE_S = 15.0  # a client stalled longer than this is a liveness failure (and is reported)
GAP_LEAD_S = 0.5  # a pause starts at the last event before the fault: at 40 tokens/s, well within this
PROBE_TEXT = "/sim tokens=4 rate=1000\nprobe {turn}"
FAULTS = ["gateway", "gateway-drain", "orchestrator", "nats", "redis-primary", "postgres-primary"]
# With network namespaces (root, iproute2) every orchestrator runs in one of its own and the drill also
# cuts one off the network for 2.5 leases (no kill, no FIN: its packets vanish), then heals it.
NO_NETNS = netns.unavailable()
PARTITION_S = 5.0
if NO_NETNS is None:
    FAULTS.insert(3, "orchestrator-partition")
if os.environ.get("TIDEWIRE_CHAOS_NO_REDIS_FAILOVER") == "1":
    FAULTS.remove("redis-primary")
# The gateway does not re-read the stores when its NATS connection comes back: a live event published
# while it was reconnecting is lost for its clients, and if it was the last of a turn (turn_end) they
# stall until they reconnect themselves. Until the gateway resyncs on reconnect, a stall after the NATS
# fault is an expected failure; set this to 1 once it does.
NATS_RESYNC_FIXED = os.environ.get("TIDEWIRE_CHAOS_NATS_RESYNC_FIXED", "1") == "1"
# The checkpoint store publishes an event as soon as the Redis primary has it; replication is
# asynchronous, so a failover can take back seqs clients have seen. Set to 1 once the appends wait for
# the replica (WAIT 1) before publishing.
REDIS_WAIT_FIXED = os.environ.get("TIDEWIRE_CHAOS_REDIS_WAIT_FIXED", "1") == "1"
REDIS_LAG_REASON = (
    "async Redis replication: events the primary accepted and the orchestrator published, "
    "but the replica never received, are lost on failover and their seqs re-issued"
)
NATS_STALL_REASON = (
    "gateway does not resync its sessions from the stores after a NATS reconnect: a live "
    "event lost while reconnecting (a turn_end) stalls the session until the client reconnects"
)


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


def pause_report(
    rec: FaultRecord, until: float, clients: list[TimedClient], probes: list[tuple[float, float, TimedClient]]
) -> dict[str, Any]:
    """For each client streaming when the fault hit (an event in the second before it): the longest
    gap between two of its events that started from just before the fault to just before the next one
    (`until`), so a pause is counted for the fault that caused it; and the longest send→turn_end of the
    probe turns that ran in that interval."""
    pauses = []
    errors: dict[str, int] = {}
    stalls = []
    for c in clients:
        times = c.events.times  # type: ignore[attr-defined]
        if not any(rec.at - 1.0 <= t < rec.at for t in times):
            continue
        gaps = [
            (b - a, a, i)
            for i, (a, b) in enumerate(zip(times, times[1:], strict=False))
            if rec.at - GAP_LEAD_S <= a < until - GAP_LEAD_S and b > rec.at
        ]
        if gaps:
            gap, start, i = max(gaps)
            pauses.append(gap)
            if gap > MAX_PAUSE_S:  # evidence: which session, which events, what ended the stall
                ended_by = next((e for t, e in c.errors if t >= start), None)
                stalls.append(
                    {
                        "session": c.session_id,
                        "after_fault_s": round(start - rec.at, 3),
                        "stall_s": round(gap, 3),
                        "last_event": type(c.events[i]).__name__,
                        "last_seq": c.events[i].seq,
                        "next_event": type(c.events[i + 1]).__name__,
                        "ended_by": ended_by,
                    }
                )
        for t, e in c.errors:
            if rec.at <= t < until:
                key = e.split(":", 1)[0] if "send refused" not in e else e
                errors[key] = errors.get(key, 0) + 1
    pauses.sort()
    probe_turns = [end - start for start, end, _ in probes if end > rec.at and start < until - GAP_LEAD_S]
    for start, _end, p in probes:
        for t, e in p.errors:
            if rec.at <= t < until and start <= t:
                errors["probe " + e[:60]] = errors.get("probe " + e[:60], 0) + 1
    return {
        "fault": rec.kind,
        "target": rec.target,
        "heal_s": rec.heal_seconds,
        **rec.detail,
        "streaming_clients": len(pauses),
        "pause_p50_ms": round(statistics.median(pauses) * 1000) if pauses else None,
        "pause_max_ms": round(pauses[-1] * 1000) if pauses else None,
        "probe_turn_max_ms": round(max(probe_turns) * 1000) if probe_turns else None,
        "client_errors": errors,
        "stalls": stalls,
    }


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
    c = Cluster(
        state / "state", service_env=env, jwt_secret=SECRET, restart_delay_s=0.5, netns=NO_NETNS is None
    )
    c.start()
    try:
        yield c
    finally:
        c.stop()
        if os.environ.get("TIDEWIRE_KEEP_CLUSTER") != "1":  # logs and drill.json stay with =1
            shutil.rmtree(state, ignore_errors=True)


async def run_drill(cluster: Cluster, faults: list[str]) -> tuple[list[TimedClient], list[dict[str, Any]]]:
    clients = [
        TimedClient(cluster.url, make_token(f"cluster-{i}"), turns=TURNS, text=TEXT, events=TimedEvents())
        for i in range(SESSIONS)
    ]
    work = asyncio.gather(*(c.run() for c in clients))
    probes: list[tuple[float, float, TimedClient]] = []
    stop_probes = asyncio.Event()
    prober = asyncio.create_task(probe_loop(cluster.url, stop_probes, probes))
    records: list[FaultRecord] = []
    rng = random.Random(16)
    await asyncio.sleep(4.0)
    for kind in faults:
        if work.done():
            break
        if kind == "gateway":
            rec = await asyncio.to_thread(cluster.kill_gateway, cluster.busiest_gateway())
        elif kind == "gateway-drain":
            rec = await asyncio.to_thread(cluster.drain_gateway, cluster.busiest_gateway())
        elif kind == "orchestrator":
            rec = await asyncio.to_thread(
                cluster.kill_orchestrator, rng.choice(cluster.nodes("orchestrator")).name
            )
        elif kind == "orchestrator-partition":
            rec = await asyncio.to_thread(
                cluster.partition_orchestrator,
                await asyncio.to_thread(cluster.busiest_orchestrator),
                PARTITION_S,
            )
        elif kind == "nats":
            rec = await asyncio.to_thread(cluster.kill_nats, await asyncio.to_thread(cluster.busiest_nats))
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
    reports = [
        pause_report(rec, min(until, rec.at + PAUSE_WINDOW_S), clients, probes)
        for rec, until in zip(records, ends, strict=True)
    ]
    out = cluster.state_dir / "drill.json"
    out.write_text(
        json.dumps(
            {
                "faults": reports,
                "supervisor": [(round(t, 2), e) for t, e in cluster.events],
                "reconnects": sum(c.reconnects for c in clients),
            },
            indent=2,
        )
    )
    print("\n" + "\n".join(json.dumps(r) for r in reports))
    print(f"reconnects: {sum(c.reconnects for c in clients)}, probe turns: {len(probes)}; details in {out}")
    return clients + [p for _, _, p in probes], reports


async def dump_session(cluster: Cluster, c: TimedClient, why: str) -> None:
    """Evidence for a failed session: what the client received (seq, type, arrival time), its errors,
    and what Redis and Postgres hold, into <state>/failed-<sid>.json."""
    from shared import redis_connect

    t0 = cluster.faults[0].at if cluster.faults else 0.0
    received = [
        (e.seq, type(e).__name__, round(t - t0, 3), getattr(e, "turn_id", None))
        for e, t in zip(c.events, c.events.times, strict=False)
    ]  # type: ignore[attr-defined]
    r = redis_connect.client(cluster.redis_url, timeout_s=2)
    try:
        log = [
            (k.decode(), v[b"e"][:80].decode(errors="replace"))
            for k, v in await r.xrange(f"tw:{{{c.session_id}}}:log")
        ]
        seq = await r.get(f"tw:{{{c.session_id}}}:seq")
    finally:
        await r.aclose()
    conn = await asyncpg.connect(cluster.postgres_dsn)
    try:
        rows = [
            (x["seq"], x["first_seq"], x["type"])
            for x in await conn.fetch(
                "SELECT seq, first_seq, type FROM events WHERE session_id=$1 ORDER BY seq", c.session_id
            )
        ]
    finally:
        await conn.close()
    (cluster.state_dir / f"failed-{c.session_id}.json").write_text(
        json.dumps(
            {
                "why": why,
                "received": received,
                "errors": [(round(t - t0, 3), e) for t, e in c.errors],
                "faults": [(f.kind, f.target, round(f.at - t0, 3)) for f in cluster.faults],
                "redis_seq": seq.decode() if seq else None,
                "redis_log": log,
                "postgres_events": rows,
            },
            indent=1,
        )
    )


async def _check_without_seqs(c: TimedClient, http: aiohttp.ClientSession) -> None:
    """tidewire.drill.check without its strict seq check (the caller checked seqs, merging allowed)."""
    if len(c.acks) != c.turns:
        raise invariants.InvariantError(f"{len(c.acks)} of {c.turns} messages acknowledged")
    turns = invariants.check_turns(c.events)
    async with http.get(
        f"{c.url}/v1/sessions/{c.session_id}", headers={"Authorization": f"Bearer {c.token}"}
    ) as r:
        body = await r.json()
    by_turn = {(m["role"], m["turn_id"]): m for m in body["messages"]}
    for ack in c.acks:
        user = by_turn.get(("user", ack.turn_id))
        if user is None or user["seq"] != ack.seq:
            raise invariants.InvariantError(
                f"acknowledged message {ack.client_msg_id} is not durable at {ack.seq}"
            )
        view, stored = turns[ack.turn_id], by_turn.get(("assistant", ack.turn_id))
        if not view.ends or view.ends[0].status != "completed":
            raise invariants.InvariantError(f"turn {ack.turn_id} did not complete")
        if stored is None or stored["text"] != view.text:
            raise invariants.InvariantError(
                f"turn {ack.turn_id}: client text differs from the durable history"
            )


async def check_allowing_merges(c: TimedClient, http: aiohttp.ClientSession) -> str | None:
    """`tidewire.drill.check` (acked => durable at its seq; client text == history; seq gap-free),
    except that a seq jump landing on a delta is allowed: PROTOCOL.md merges contiguous deltas for a
    client that falls 32 frames behind, the merged one carrying its last member's seq, and the text
    still covers every offset (check_turns). Returns the jump, if there was one; anything else fails."""
    try:
        await check(c, http)
        return None
    except invariants.InvariantError as e:
        if "seq gap" not in str(e) or "(Delta)" not in str(e):
            raise
        invariants.check_seqs(c.events)
        await _check_without_seqs(c, http)
        return str(e)


async def check_invariants(
    cluster: Cluster, clients: list[TimedClient], merged: list[str] | None = None
) -> list[str]:
    """Every guarantee, per session, against the durable history (through HAProxy and in Postgres
    directly); the failures as text (empty: all held). Seq jumps that are merged deltas (a client
    that fell behind) go to `merged`."""
    merged = [] if merged is None else merged
    failures = []
    async with aiohttp.ClientSession() as http:
        for c in clients:
            try:
                jump = await check_allowing_merges(c, http)
                if jump is not None:
                    merged.append(f"{c.session_id}: {jump}")
                for ack in c.acks:  # exactly one turn_end per turn, and its text is the client's
                    view = invariants.check_turns(c.events)[ack.turn_id]
                    if len(view.ends) != 1 or view.ends[0].text != view.text:
                        raise invariants.InvariantError(f"turn {ack.turn_id}: {len(view.ends)} turn_end")
            except (invariants.InvariantError, KeyError) as e:
                failures.append(f"{c.session_id}: {e}")
                await dump_session(cluster, c, str(e))
    conn = await asyncpg.connect(cluster.postgres_dsn)
    try:
        for c in clients:
            for ack in c.acks:
                t = await conn.fetchrow("SELECT text FROM turns WHERE turn_id=$1", ack.turn_id)
                stored = await conn.fetch(
                    "SELECT payload FROM events WHERE session_id=$1 AND turn_id=$2"
                    " AND type='delta' ORDER BY seq",
                    c.session_id,
                    ack.turn_id,
                )
                text = "".join(client.event_decoder.decode(r["payload"]).text for r in stored)
                if t is None or text != t["text"]:
                    failures.append(f"{c.session_id}: stored deltas of {ack.turn_id} differ from turns.text")
        n_turns = await conn.fetchval(
            "SELECT count(*) FROM turns WHERE session_id = ANY($1)", [c.session_id for c in clients]
        )
        sent = sum(c.turns for c in clients)
        if n_turns != sent:
            failures.append(f"{n_turns} turns stored for {sent} sent: a turn ran twice or not at all")
    finally:
        await conn.close()
    return failures


async def check_sse_and_poll_through_haproxy(cluster: Cluster) -> dict[str, float]:
    """SSE and long-poll pass through HAProxy unbuffered: the deltas of a ~1.5 s answer arrive spread
    over its duration (not in one burst at the end), their text is turn_end's, and a poll returns it."""
    token = make_token("cluster-sse")
    auth = {"Authorization": f"Bearer {token}"}
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{cluster.url}/v1/sessions", headers=auth) as r:
            sid = (await r.json())["session_id"]
        deltas: list[tuple[float, str]] = []
        end_text: list[str] = []

        async def read_sse() -> None:
            async with http.get(
                f"{cluster.url}/v1/sessions/{sid}/events?after=0",
                headers=auth,
                timeout=aiohttp.ClientTimeout(total=60),
            ) as resp:
                assert resp.status == 200
                kind = ""
                async for raw in resp.content:
                    line = raw.decode().rstrip("\n")
                    if line.startswith("event: "):
                        kind = line[7:]
                    elif line.startswith("data: ") and kind == "delta":
                        deltas.append((time.monotonic(), json.loads(line[6:])["text"]))
                    elif line.startswith("data: ") and kind == "turn_end":
                        end_text.append(json.loads(line[6:])["text"])
                        return

        reader = asyncio.create_task(read_sse())
        await asyncio.sleep(0.5)
        async with http.post(
            f"{cluster.url}/v1/sessions/{sid}/messages",
            headers=auth,
            json={"client_msg_id": "sse-1", "text": "/sim tokens=60 rate=40\nsse"},
        ) as r:
            assert r.status == 200, await r.text()
        await asyncio.wait_for(reader, 60)
        async with http.get(f"{cluster.url}/v1/sessions/{sid}/poll?after=0&wait_s=1", headers=auth) as r:
            polled = await r.json()
    spread = deltas[-1][0] - deltas[0][0]
    assert end_text and "".join(t for _, t in deltas) == end_text[0]
    assert spread > 0.8, f"SSE deltas arrived within {spread:.2f} s: buffered by the proxy?"
    assert any(e.get("type") == "turn_end" for e in polled["events"])
    return {"sse_deltas": len(deltas), "sse_spread_s": round(spread, 2)}


@pytest.mark.slow
@pytest.mark.timeout(480)
async def test_cluster_loses_nothing_when_a_gateway_orchestrator_nats_node_redis_and_postgres_primaries_die(
    cluster: Cluster,
) -> None:
    clients, reports = await run_drill(cluster, FAULTS)
    merged: list[str] = []
    failures = await check_invariants(cluster, clients, merged)
    if merged:
        print(f"{len(merged)} session(s) got merged deltas (client behind): {merged[:3]}")
    assert not failures, "\n".join(failures[:20])
    print("SSE and long-poll through HAProxy:", await check_sse_and_poll_through_haproxy(cluster))
    assert [r["fault"] for r in reports] == FAULTS and all(r["heal_s"] is not None for r in reports)
    assert all(r["streaming_clients"] > 0 for r in reports), "a fault hit no streaming client"
    assert sum(c.reconnects for c in clients) > 0, "the faults never reached a client"
    assert cluster.pg_primary == "pg-b" and cluster.stream_replicas()["TW_TURNS"]["replicas"] == 3
    if "redis-primary" in FAULTS:
        assert cluster.redis_primary() == "redis-b"
    stalled = {r["fault"]: r["stalls"] for r in reports if r["stalls"]}
    nats_stalls = stalled.pop("nats", None)
    assert not stalled, f"clients stalled > {MAX_PAUSE_S} s: {stalled}"
    if nats_stalls and not NATS_RESYNC_FIXED:
        pytest.xfail(f"{NATS_STALL_REASON}; evidence: {nats_stalls}")
    assert not nats_stalls, f"clients stalled > {MAX_PAUSE_S} s after the NATS fault: {nats_stalls}"


async def _watch(
    url: str,
    token: str,
    session_id: str | None,
    events: list[client.Event],
    ready: asyncio.Future[str] | None = None,
    send: str | None = None,
) -> None:
    """One WebSocket watching a session (replay from seq 1, then live) until it is cancelled."""
    async with (
        aiohttp.ClientSession() as http,
        http.ws_connect(url.replace("http", "ws", 1) + f"/v1/ws?access_token={token}") as ws,
    ):
        await ws.send_str(json.dumps({"type": "hello", "session_id": session_id, "last_seen_seq": None}))
        async for msg in ws:
            if msg.type != aiohttp.WSMsgType.TEXT:
                return
            frame = client.server_frame_decoder.decode(msg.data)
            if isinstance(frame, client.Ready):
                if ready is not None and not ready.done():
                    ready.set_result(frame.session_id)
                if send is not None:
                    await ws.send_str(json.dumps({"type": "send", "client_msg_id": "stall-1", "text": send}))
                    send = None
            elif isinstance(frame, client.EVENT_TYPES):
                events.append(frame)  # type: ignore[arg-type]


def _nats_node_of(cluster: Cluster, connection_name: str) -> str | None:
    """The NATS node a process's main connection (named after the process) is on."""
    for p in cluster.nodes("nats"):
        if p.alive():
            with contextlib.suppress(Exception):
                connz = _http_json(f"http://{cluster.address}:{p.extra['monitor']}/connz?limit=1024")
                if any(c.get("name") == connection_name for c in connz.get("connections") or []):
                    return p.name
    return None


def _ended(events: list[client.Event]) -> bool:
    return any(isinstance(e, client.TurnEnd) for e in events)


@pytest.mark.slow
@pytest.mark.timeout(240)
# not strict: 7 runs of 8 stalled; in one the stalled gateways delivered turn_end 3 s after the
# reconnect (cause not identified; no resync path exists in the gateway)
@pytest.mark.xfail(not NATS_RESYNC_FIXED, strict=False, reason=NATS_STALL_REASON)
async def test_a_gateway_delivers_the_turn_end_it_missed_while_its_nats_node_was_unreachable(
    cluster: Cluster,
) -> None:
    """Deterministic version of the drill's NATS stall. One session is watched through each of the
    three gateways; mid-turn, the NATS node of a gateway that is not on the turn's orchestrator's node
    is frozen (SIGSTOP) until the turn has ended (the other gateways deliver turn_end: the control),
    then killed: that gateway reconnects to another node at once. Its client must get turn_end from
    the stores within 10 s; today it does not (nothing re-reads them after the reconnect)."""
    import os
    import signal

    from shared import redis_connect

    token = make_token("stall")
    gateways = cluster.nodes("gateway")
    views: dict[str, list[client.Event]] = {g.name: [] for g in gateways}
    ready: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    first = gateways[0]
    tasks = [
        asyncio.create_task(
            _watch(
                f"http://127.0.0.1:{first.port}",
                token,
                None,
                views[first.name],
                ready,
                send="/sim tokens=160 rate=40\nstall",
            )
        )
    ]
    sid = await asyncio.wait_for(ready, 30)
    tasks += [
        asyncio.create_task(_watch(f"http://127.0.0.1:{g.port}", token, sid, views[g.name]))
        for g in gateways[1:]
    ]
    try:
        deadline = time.monotonic() + 30
        while not all(sum(isinstance(e, client.Delta) for e in v) >= 3 for v in views.values()):
            assert time.monotonic() < deadline, "the turn did not stream to every gateway"
            await asyncio.sleep(0.05)
        r = redis_connect.client(cluster.redis_url, timeout_s=2)
        try:
            lease = (await r.get(f"tw:{{{sid}}}:lease") or b"").decode()
        finally:
            await r.aclose()
        owner = lease.rsplit(":", 1)[0]  # the orchestrator's id, "<name>/<hex>", also its NATS name
        owner_node = await asyncio.to_thread(_nats_node_of, cluster, owner)
        gw_nodes = {g.name: await asyncio.to_thread(_nats_node_of, cluster, g.name) for g in gateways}
        victims = [g for g, n in gw_nodes.items() if n is not None and n != owner_node]
        if not owner_node or not victims:
            pytest.skip(
                f"every gateway shares the NATS node of the turn's orchestrator: {gw_nodes}, {owner_node}"
            )
        node = gw_nodes[victims[0]]
        assert node is not None
        stalled = [g for g, n in gw_nodes.items() if n == node]
        controls = [g for g in views if g not in stalled]
        nats_proc = cluster.procs[node]
        os.kill(nats_proc.pid, signal.SIGSTOP)
        try:
            deadline = time.monotonic() + 30
            while not all(_ended(views[g]) for g in controls):
                assert time.monotonic() < deadline, "the turn did not end through the other gateways"
                await asyncio.sleep(0.05)
            assert not any(_ended(views[g]) for g in stalled)
        finally:
            await asyncio.to_thread(cluster.kill, node)  # SIGKILL works on a stopped process
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if all(_ended(views[g]) for g in stalled):
                break
            await asyncio.sleep(0.1)
        missing = [g for g in stalled if not _ended(views[g])]
        print(
            f"\nowner {owner} on {owner_node}; gateways {gw_nodes}; froze {node}; stalled {stalled}; "
            f"after the kill: {[(g, views[g][-1].seq) for g in views]}"
        )
        assert not missing, (
            f"{missing} (on {node}) never delivered turn_end after reconnecting; last seq "
            f"{[views[g][-1].seq for g in missing]} vs {views[controls[0]][-1].seq} on {controls[0]}"
        )
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


@pytest.mark.slow
@pytest.mark.timeout(240)
@pytest.mark.xfail(not REDIS_WAIT_FIXED, strict=False, reason=REDIS_LAG_REASON)
async def test_a_redis_failover_with_a_lagging_replica_reissues_no_seq_a_client_saw(cluster: Cluster) -> None:
    """The replication hazard at the level of a session, made deterministic: mid-answer, the replica
    stops receiving (SIGSTOP, its link closed by the primary) for 1 s while the orchestrator keeps
    appending and publishing; then the primary dies and the replica is promoted without those
    events. The guarantee: no seq a client has seen is ever issued again, so the promoted primary's
    counter must not be behind the client. Today it is (by ~200 seqs), and the turn re-issues them.
    (The deterministic simulator, one token per event at this rate, re-issues identical events, so
    the client's text still matches; a real model's continuation would not.)"""
    import os
    import signal

    import redis.asyncio as aioredis

    from shared import redis_connect

    c = TimedClient(
        cluster.url,
        make_token("lag"),
        turns=1,
        text="/sim tokens=2000 rate=200\nlagging replica",
        events=TimedEvents(),
    )
    task = asyncio.create_task(c.run())
    deadline = time.monotonic() + 30
    while sum(isinstance(e, client.Delta) for e in c.events) < 20:
        assert time.monotonic() < deadline and not task.done(), "the turn did not stream"
        await asyncio.sleep(0.05)
    primary = cluster.procs[cluster.redis_primary() or ""]
    replica = next(p for p in cluster.nodes("redis") if p.name != primary.name)
    direct = aioredis.Redis(host=cluster.address, port=primary.port)
    os.kill(replica.pid, signal.SIGSTOP)
    try:
        await direct.execute_command("CLIENT", "KILL", "TYPE", "replica")
        seen_at_cut = c.events[-1].seq
        await asyncio.sleep(1.0)
        seen_before_kill = c.events[-1].seq
        primary_seq = int(await direct.get(f"tw:{{{c.session_id}}}:seq") or 0)
        fault = await asyncio.to_thread(cluster.kill_redis_primary)
    finally:
        os.kill(replica.pid, signal.SIGCONT)
        await direct.aclose()
    await asyncio.to_thread(cluster.wait_healed, fault, 30)
    r = redis_connect.client(cluster.redis_url, timeout_s=2)
    try:
        promoted_seq = int(await r.get(f"tw:{{{c.session_id}}}:seq") or 0)
    finally:
        await r.aclose()
    await asyncio.wait_for(task, 120)
    print(
        f"\nclient had seen seq {seen_at_cut} when replication stopped and {seen_before_kill} when the primary"
        f" died (primary's counter {primary_seq}); the promoted replica's counter: {promoted_seq}"
    )
    async with aiohttp.ClientSession() as http:
        # holds with the simulator (identical re-issued events): see the docstring; a failover's burst
        # can put the client 32 frames behind, and then its deltas are merged (allowed)
        await check_allowing_merges(c, http)
    assert promoted_seq >= seen_before_kill, (
        f"the promoted primary's seq counter ({promoted_seq}) is behind what the client had seen "
        f"({seen_before_kill}): seqs {promoted_seq + 1}..{seen_before_kill} were issued a second time"
    )
