"""The per-turn ledger of one session's turn path: what one short turn costs, counted on the servers.

`python -m bench.ledger [--turns 150]` starts a fresh embedded stack (1 gateway, 2 orchestrators,
no tool worker), plays N turns of `/sim tokens=8 rate=0 ttft_ms=0` on one WebSocket session with a
short think time (so every turn takes the cold path: JetStream delivery, claim, first token), and
reports, per turn: TTFT and ack (p50/p99), Redis commands (by command, Lua-internal ones included,
from INFO commandstats) and calls, Postgres transactions (pg_stat_database), NATS messages
(/varz), and CPU milliseconds of every process (services and servers, psutil), idle-corrected by a
quiet window of the same length measured first. Prints JSON; `--markdown` prints the table for
docs/benchmarks.md. A benchmark, not a test: it asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import psutil

TEXT = "/sim tokens=8 rate=0 ttft_ms=0\nhello"


def _pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))]


def _cpu(pids: dict[str, list[int]]) -> dict[str, float]:
    out: dict[str, float] = {}
    for name, group in pids.items():
        total = 0.0
        for pid in group:
            try:
                p = psutil.Process(pid)
                procs = [p, *p.children(recursive=True)]
            except psutil.NoSuchProcess:
                continue
            for q in procs:
                try:
                    t = q.cpu_times()
                    total += t.user + t.system
                except psutil.NoSuchProcess:
                    pass
        out[name] = total
    return out


async def _counters(redis_url: str, pg_dsn: str, nats_monitor: str | None) -> dict[str, Any]:
    import asyncpg
    import redis.asyncio as aioredis

    r = aioredis.Redis.from_url(redis_url)
    try:
        stats = await r.info("commandstats")
        info = await r.info("stats")
    finally:
        await r.aclose()
    conn = await asyncpg.connect(pg_dsn)
    try:
        row = await conn.fetchrow("SELECT sum(xact_commit) AS c FROM pg_stat_database")
    finally:
        await conn.close()
    nats: dict[str, Any] = {}
    if nats_monitor:

        def varz() -> dict[str, Any]:
            with urllib.request.urlopen(f"{nats_monitor}/varz", timeout=5) as resp:
                return dict(json.loads(resp.read()))

        nats = await asyncio.to_thread(varz)
    return {
        "redis_cmds": {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in stats.items()},
        "redis_total": int(info["total_commands_processed"]),
        "pg_xact": int(row["c"] or 0),
        "nats_in": int(nats.get("in_msgs", 0)),
        "nats_out": int(nats.get("out_msgs", 0)),
    }


def _delta(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    cmds = {k: b["redis_cmds"].get(k, 0) - a["redis_cmds"].get(k, 0) for k in b["redis_cmds"]}
    return {
        "redis_cmds": {k: v for k, v in cmds.items() if v},
        **{k: b[k] - a[k] for k in b if k != "redis_cmds"},
    }


async def _turns(url: str, token: str, n: int, think_s: float) -> tuple[list[float], list[float]]:
    import aiohttp

    from proto import client

    ttft: list[float] = []
    ack: list[float] = []
    async with (
        aiohttp.ClientSession() as http,
        http.ws_connect(url.replace("http", "ws", 1) + f"/v1/ws?access_token={token}") as ws,
    ):
        await ws.send_str(json.dumps({"type": "hello"}))
        await ws.receive(timeout=10)
        for _ in range(n):
            cmid = uuid.uuid4().hex
            t0 = time.perf_counter()
            await ws.send_str(json.dumps({"type": "send", "client_msg_id": cmid, "text": TEXT}))
            got_ack = got_first = False
            seen: list[str] = []
            try:
                async with asyncio.timeout(30):
                    while not (got_ack and got_first):
                        f = client.server_frame_decoder.decode((await ws.receive()).data)
                        seen.append(f"{type(f).__name__}:{getattr(f, 'seq', '')}")
                        if isinstance(f, client.Ack) and f.client_msg_id == cmid:
                            ack.append((time.perf_counter() - t0) * 1000)
                            got_ack = True
                        elif isinstance(f, client.Delta) and not got_first:
                            ttft.append((time.perf_counter() - t0) * 1000)
                            got_first = True
                    while not isinstance(f, client.TurnEnd):
                        f = client.server_frame_decoder.decode((await ws.receive()).data)
                        seen.append(f"{type(f).__name__}:{getattr(f, 'seq', '')}")
            except TimeoutError:
                raise RuntimeError(f"turn {len(ttft)} of {n} stalled; frames seen: {seen[-20:]}") from None
            await asyncio.sleep(think_s)
    return ttft, ack


def run(turns: int, think_s: float) -> dict[str, Any]:
    from shared import tokens
    from tidewire.dev.infra import EmbeddedInfra
    from tidewire.dev.stack import Stack

    work = Path(tempfile.mkdtemp(prefix="tw-ledger-"))
    infra = EmbeddedInfra(work / "infra")
    endpoints = infra.start()
    secret = "ledger-secret-0123456789abcdef0123456789"
    generous = {
        "TIDEWIRE_MSG_RATE_PER_S": "1000",
        "TIDEWIRE_MSG_BURST": "1000",
        "TIDEWIRE_SUBJECT_MSG_RATE_PER_S": "1000",
        "TIDEWIRE_SUBJECT_MSG_BURST": "1000",
    }  # one session sends fast: the rate limits are not measured here
    stack = Stack(
        infra_env={**endpoints.as_env(), **generous, "TIDEWIRE_JWT_SECRET": secret},
        log_dir=work / "logs",
        orchestrators=2,
        tool_workers=0,
    )
    try:
        stack.start()
        token = tokens.mint("ledger", secret)
        pids = {s.name: [s.pid] for s in stack.services}
        pids.update({name: [pid] for name, pid in infra.pids().items()})
        monitor = infra.nats_monitor_url
        monitor = monitor() if callable(monitor) else monitor
        asyncio.run(_turns(stack.url, token, 10, think_s))  # warm-up
        window = turns * (think_s + 0.02)
        c0, q0, t0 = (
            _cpu(pids),
            asyncio.run(_counters(endpoints.redis_url, endpoints.postgres_dsn, monitor)),
            time.time(),
        )
        time.sleep(window)
        c1, q1, t1 = (
            _cpu(pids),
            asyncio.run(_counters(endpoints.redis_url, endpoints.postgres_dsn, monitor)),
            time.time(),
        )
        ttft, ack = asyncio.run(_turns(stack.url, token, turns, think_s))
        c2, q2, t2 = (
            _cpu(pids),
            asyncio.run(_counters(endpoints.redis_url, endpoints.postgres_dsn, monitor)),
            time.time(),
        )
    finally:
        stack.stop()
        infra.stop()
    idle_s, busy_s = t1 - t0, t2 - t1
    idle, busy = _delta(q0, q1), _delta(q1, q2)
    scale = busy_s / idle_s
    cpu_ms = {k: round(1000 * ((c2[k] - c1[k]) - (c1[k] - c0[k]) * scale) / turns, 2) for k in c2}
    per_turn = {
        k: round((busy[k] - idle[k] * scale) / turns, 2)
        for k in ("redis_total", "pg_xact", "nats_in", "nats_out")
    }
    cmds = {
        k: round((v - idle["redis_cmds"].get(k, 0) * scale) / turns, 2) for k, v in busy["redis_cmds"].items()
    }
    return {
        "turns": turns,
        "think_s": think_s,
        "ttft_ms": {"p50": round(statistics.median(ttft), 2), "p99": round(_pct(ttft, 0.99), 2)},
        "ack_ms": {"p50": round(statistics.median(ack), 2), "p99": round(_pct(ack, 0.99), 2)},
        "per_turn": per_turn,
        "redis_commands_per_turn": dict(sorted(cmds.items(), key=lambda kv: -kv[1])),
        "cpu_ms_per_turn": {**cpu_ms, "all": round(sum(cpu_ms.values()), 2)},
        "idle_cpu_ms_per_s": {k: round(1000 * (c1[k] - c0[k]) / idle_s, 1) for k in c1},
    }


def markdown(r: dict[str, Any]) -> str:
    rows = [
        f"| TTFT p50 / p99 | {r['ttft_ms']['p50']} / {r['ttft_ms']['p99']} ms |",
        f"| ack p50 / p99 | {r['ack_ms']['p50']} / {r['ack_ms']['p99']} ms |",
        f"| Redis commands per turn (incl. inside Lua) | {r['per_turn']['redis_total']} |",
        "| Redis top commands | "
        + ", ".join(f"{k} {v}" for k, v in list(r["redis_commands_per_turn"].items())[:8])
        + " |",
        f"| Postgres transactions per turn | {r['per_turn']['pg_xact']} |",
        f"| NATS messages in / out per turn | {r['per_turn']['nats_in']} / {r['per_turn']['nats_out']} |",
        "| CPU ms per turn | " + ", ".join(f"{k} {v}" for k, v in r["cpu_ms_per_turn"].items()) + " |",
        "| idle CPU ms/s | " + ", ".join(f"{k} {v}" for k, v in r["idle_cpu_ms_per_s"].items()) + " |",
    ]
    return "| per turn (one session) | value |\n|---|---|\n" + "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--turns", type=int, default=150)
    ap.add_argument("--think", type=float, default=0.1, help="seconds between turns")
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args(argv)
    r = run(args.turns, args.think)
    print(json.dumps(r, indent=1))
    if args.markdown:
        print(markdown(r), file=sys.stderr)


if __name__ == "__main__":
    main()
