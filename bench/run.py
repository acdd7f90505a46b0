"""`make bench` / `make bench-quick`: the whole benchmark suite against a real local stack.

    python -m bench.run [--quick] [--out DIR] [--only ttft,idle,...] [--docs PATH | --no-docs] [--profile]

Starts its own embedded NATS/Postgres/Redis (a temporary state folder), a stack of 1 gateway,
2 orchestrators and 1 tool worker, and the bare relay of `bench.baseline` (the floor), then runs the
scenarios, each from a separate load-generator process (`bench.loadgen`) that asks this coordinator
for process snapshots, kills and restarts over a line protocol. Writes
`bench/results/<YYYY-MM-DD>.json` (quick: `<date>-quick.json`; `--out DIR`: into DIR) with PNG plots
next to it, and regenerates the results table of docs/benchmarks.md (full runs only, unless `--docs`).

A scenario that raises is recorded as `{"error": ...}` and the others still run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import math
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import urllib.request
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import psutil

from bench.loadgen import raise_nofile_limit, summarize
from bench.scenarios import openloop
from shared import promtext

REPO = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO / "bench" / "results"
DOCS = REPO / "docs" / "benchmarks.md"
BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"
SECRET = "bench-secret-0123456789abcdef0123456789"
SCENARIO_ORDER = ("ttft", "idle", "throughput", "crash", "storm", "openloop")
SRC_PACKAGES = ("proto", "shared", "gateway", "orchestrator", "tool_workers", "tidewire", "bench")

TARGETS = {
    "ttft_p50_ms": 1.5,
    "ttft_p99_ms": 5.0,
    "idle_ws_kib": 16.0,
    "idle_ws_fds": 1.0,
    "idle_sse_kib": 14.0,
    "tokens_per_cpu_s": 50_000.0,
    "crash_p50_ms": 300.0,
    "crash_p99_ms": 500.0,
    "storm_s": 10.0,
    "storm_n": 2000,
    "storm_errors": 0,
}

FULL: dict[str, Any] = {
    "ttft_levels": [(1, 1000), (100, 10), (500, 4)],  # (concurrent sessions, measured turns each)
    "ttft_tokens": 8,
    "idle_n": 10_000,
    "idle_probe_turns": 50,
    "idle_cpu_window_s": 5,
    "idle_settle_s": 2,
    "throughput": {"sessions": 50, "tokens": 400, "rounds": 3},
    "crash": {"trials": 30, "tokens": 150, "rate": 50, "kill_after": 20},
    "storm_n": 2000,
    "openloop": dict(openloop.FULL_CFG),  # see bench/scenarios/openloop.py
}
QUICK: dict[str, Any] = {
    "ttft_levels": [(1, 30), (20, 3)],
    "ttft_tokens": 8,
    "idle_n": 200,
    "idle_probe_turns": 10,
    "idle_cpu_window_s": 1,
    "idle_settle_s": 0.5,
    "throughput": {"sessions": 20, "tokens": 200, "rounds": 2},
    "crash": {"trials": 3, "tokens": 100, "rate": 50, "kill_after": 20},
    "storm_n": 50,
    "openloop": dict(openloop.QUICK_CFG),
}


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def r3(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else round(x, 3)


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or not math.isfinite(a) or not math.isfinite(b) or b <= 0:
        return None
    return round(a / b, 2)


# --------------------------------------------------------------------------- process accounting


def _cpu_s(p: psutil.Process) -> float:
    t = p.cpu_times()
    return t.user + t.system


def proc_stats(pid: int | None, tree: bool = False) -> dict[str, float] | None:
    """RSS and fds of the process, CPU seconds of it (and, with `tree`, of every descendant, live or
    reaped: postgres runs a process per connection)."""
    if not pid:
        return None
    try:
        p = psutil.Process(pid)
        with p.oneshot():
            t = p.cpu_times()
            cpu = t.user + t.system
            if tree:
                cpu += t.children_user + t.children_system
            rss = p.memory_info().rss
            fds = p.num_fds()
        if tree:
            for child in p.children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    cpu += _cpu_s(child)
        return {"rss": float(rss), "fds": float(fds), "cpu_s": cpu}
    except psutil.Error:
        return None


class Bench:
    """Owns the infra, the stack and the floor; scenarios call into it."""

    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        self.cfg = QUICK if args.quick else FULL
        self.workdir = workdir
        self.log_dir = workdir / "logs"
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.infra: Any = None
        self.stack: Any = None
        self.baseline: Any = None
        self.baseline_url = ""
        self.env: dict[str, str] = {}
        self.orch_seq = 0
        self.samples: dict[str, Any] = {}  # raw samples for the plots (not written to the JSON)
        self.src = REPO
        self.generation = 0

    # ---- life cycle ----------------------------------------------------------------------------
    def snapshot_source(self) -> Path:
        """Copy the packages as they are now: the services (and the replacements started mid-run) then
        all run the same code even while someone edits the working tree."""
        src = self.workdir / "src"
        for pkg in SRC_PACKAGES:
            if (REPO / pkg).is_dir():
                shutil.copytree(
                    REPO / pkg, src / pkg, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "results")
                )
        return src

    def start(self) -> None:
        import shared.checkpoints  # noqa: F401 - imported now, before anyone edits the tree mid-run
        from tidewire.dev.infra import EmbeddedInfra
        from tidewire.dev.stack import Stack, free_port, wait_http

        if self.src == REPO:
            self.src = self.snapshot_source()
            os.chdir(self.src)  # `python -m service` puts the cwd first on sys.path
        self.generation += 1
        if self.generation > 1:  # a fresh stack: new state, new logs
            self.log_dir = self.workdir / f"logs-{self.generation}"
            self.log_dir.mkdir(parents=True, exist_ok=True)
            self.orch_seq = 0

        log(f"starting embedded NATS/Postgres/Redis in {self.workdir}")
        self.infra = EmbeddedInfra(self.workdir / f"infra-{self.generation}")
        endpoints = self.infra.start()
        self.env = {
            **endpoints.as_env(),
            "TIDEWIRE_JWT_SECRET": SECRET,
            "TIDEWIRE_LOG_LEVEL": "INFO",
            # a benchmark measures the pipeline, not the abuse limits
            "TIDEWIRE_MSG_RATE_PER_S": "1000000",
            "TIDEWIRE_MSG_BURST": "1000000",
            "TIDEWIRE_MAX_SESSIONS_PER_SUBJECT": "1000000",
            "TIDEWIRE_FRAME_RATE_PER_S": "1000000",
            "TIDEWIRE_FRAME_BURST": "1000000",
            "TIDEWIRE_SUBJECT_MSG_RATE_PER_S": "1000000",
            "TIDEWIRE_SUBJECT_MSG_BURST": "1000000",
            "TIDEWIRE_MAX_CONNECTIONS_PER_SUBJECT": "1000000",
            "TIDEWIRE_TURN_QUEUE_SHED_THRESHOLD": "-1",
            "TIDEWIRE_SIM_RATE": "0",
            "TIDEWIRE_SIM_TTFT_MS": "0",
            "PYTHONPATH": str(self.src),
        }
        self.stack = Stack(infra_env=self.env, log_dir=self.log_dir, orchestrators=0, tool_workers=1)
        log("starting 1 gateway, 2 orchestrators, 1 tool worker and the bare relay")
        self.stack.start()
        self.add_orchestrator()
        self.add_orchestrator()
        port = free_port()
        self.baseline = self.stack.service("baseline", "bench.baseline", {"BENCH_BASELINE_PORT": str(port)})
        self.baseline_url = f"http://127.0.0.1:{port}"
        wait_http(self.baseline_url + "/healthz", proc=self.baseline)

    def stop(self) -> None:
        if self.stack is not None:
            with contextlib.suppress(Exception):
                self.stack.stop()
        if self.infra is not None:
            with contextlib.suppress(Exception):
                self.infra.stop()
        self.stack = self.infra = None

    async def canary(self) -> dict[str, Any]:
        """One session, three short turns: does the stack still answer after the last scenario?"""
        try:
            res = await self.loadgen(
                "ttft",
                {"base_url": self.url, "sessions": 1, "turns": 3, "tokens": 8, "rate": 0, "turn_timeout": 15},
                timeout=120,
            )
        except Exception as e:  # noqa: BLE001
            return {"ok": False, "error": f"{type(e).__name__}: {e}"[:300]}
        ok = res["turns"] == 3 and res["errors"] == 0
        return {
            "ok": ok,
            "ttft_p50_ms": summarize(res["ttft_ms"]).get("p50"),
            "errors": res["errors"],
            "error_kinds": res["error_kinds"],
        }

    @property
    def url(self) -> str:
        return str(self.stack.url)

    def gateway(self) -> Any:
        return next(s for s in reversed(self.stack.services) if s.name == "gateway" and s.alive())

    def orchestrators(self) -> list[Any]:
        return [s for s in self.stack.services if s.module == "orchestrator" and s.alive()]

    def add_orchestrator(self) -> Any:
        from tidewire.dev.stack import free_port, wait_http

        self.orch_seq += 1
        name = f"orchestrator-{self.orch_seq}"
        port = free_port()
        svc = self.stack.service(
            name, "orchestrator", {"TIDEWIRE_ORCHESTRATOR_ID": name, "TIDEWIRE_HEALTH_PORT": str(port)}
        )
        svc.env["health_port"] = str(port)
        wait_http(f"http://127.0.0.1:{port}/readyz", proc=svc)
        return svc

    def restart_gateway(self) -> None:
        """A fresh gateway process on the same port: memory figures then start from a clean heap."""
        old = self.gateway()
        old.kill()  # SIGKILL: no clients are connected, and a graceful drain may wait drain_seconds
        self.stack.services.remove(old)
        self.stack.add_gateway("gateway", self.stack.http_port)

    def gateway_gauges(self) -> dict[str, float]:
        """The gateway's own count of open sockets and SSE streams (cross-checks the client side)."""
        out: dict[str, float] = {}
        with contextlib.suppress(Exception):
            with urllib.request.urlopen(self.url + "/metrics", timeout=5) as r:
                page = promtext.parse(r.read().decode(), strict=False)
                for key in ("sockets", "sse_streams"):
                    if any(page.select(f"tidewire_gateway_{key}")):
                        out[key] = page.value(f"tidewire_gateway_{key}")
        return out

    def components(self) -> dict[str, list[tuple[int, bool]]]:
        """Component -> [(pid, count the process tree)]."""
        pids = self.infra.pids()
        gateways = [s for s in self.stack.services if s.name == "gateway" and s.alive()]
        comps: dict[str, list[tuple[int, bool]]] = {
            "gateway": [(s.pid, False) for s in gateways],
            "orchestrators": [(s.pid, False) for s in self.orchestrators()],
            "tool_worker": [
                (s.pid, False) for s in self.stack.services if s.module == "tool_workers" and s.alive()
            ],
            "nats": [(pids["nats"], True)] if "nats" in pids else [],
            "postgres": [(pids["postgres"], True)] if "postgres" in pids else [],
            "redis": [(pids["redis"], True)] if "redis" in pids else [],
            "baseline": [(self.baseline.pid, False)],
        }
        return comps

    def snapshot(self, extra: dict[str, int] | None = None) -> dict[str, dict[str, float]]:
        snap: dict[str, dict[str, float]] = {"_t": {"mono": time.monotonic()}}
        comps = self.components()
        for name, pid in (extra or {}).items():
            comps[name] = [(pid, False)]
        for name, procs in comps.items():
            total = {"rss": 0.0, "fds": 0.0, "cpu_s": 0.0}
            for pid, tree in procs:
                st = proc_stats(pid, tree)
                if st:
                    for k in total:
                        total[k] += st[k]
            snap[name] = total
        return snap

    # ---- driving a load-generator process --------------------------------------------------------
    async def loadgen(
        self,
        scenario: str,
        params: dict[str, Any],
        handler: Callable[[dict[str, Any], int], Awaitable[dict[str, Any]]] | None = None,
        timeout: float = 900.0,
    ) -> dict[str, Any]:
        params = {"secret": SECRET, **params}
        err_path = self.log_dir / f"loadgen-{scenario}-{int(time.time() * 1000)}.log"
        with err_path.open("wb") as err:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "bench.loadgen",
                scenario,
                "--params",
                json.dumps(params),
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=err,
                cwd=str(self.src),
                env={**os.environ, "PYTHONPATH": str(self.src)},
                limit=256 * 1024 * 1024,
            )
        assert proc.stdin is not None and proc.stdout is not None
        try:
            async with asyncio.timeout(timeout):
                while True:
                    line = await proc.stdout.readline()
                    if not line:
                        await proc.wait()
                        raise RuntimeError(
                            f"loadgen {scenario} exited ({proc.returncode}) without a result: "
                            f"{err_path.read_text(errors='replace')[-1500:]}"
                        )
                    msg = json.loads(line)
                    if "event" in msg:
                        try:
                            reply = await handler(msg, proc.pid) if handler else {}
                        except Exception as e:  # noqa: BLE001 - the loadgen records it
                            traceback.print_exc()
                            reply = {"error": f"{type(e).__name__}: {e}"}
                        proc.stdin.write(json.dumps(reply).encode() + b"\n")
                        await proc.stdin.drain()
                    elif "result" in msg:
                        return dict(msg["result"])
                    elif "error" in msg:
                        raise RuntimeError(f"loadgen {scenario}: {msg['error']}")
        finally:
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.stdin.close()
                try:
                    await asyncio.wait_for(proc.wait(), 10)
                except TimeoutError:
                    proc.kill()
                    await proc.wait()

    def snapshot_handler(
        self, store: dict[str, Any]
    ) -> Callable[[dict[str, Any], int], Awaitable[dict[str, Any]]]:
        async def handle(msg: dict[str, Any], loadgen_pid: int) -> dict[str, Any]:
            if msg["event"] == "snapshot":
                tag = msg.get("tag", "")
                snap = self.snapshot({"loadgen": loadgen_pid})
                snap["_gateway_metrics"] = await asyncio.to_thread(self.gateway_gauges)
                store[tag] = snap
                window = float(msg.get("cpu_window_s") or 0)
                if window > 0:
                    await asyncio.sleep(window)
                    later = self.snapshot({"loadgen": loadgen_pid})
                    store[tag + ":cpu"] = {
                        k: {"cpu_pct": 100 * (later[k]["cpu_s"] - snap[k]["cpu_s"]) / window}
                        for k in later
                        if k != "_t" and k in snap
                    }
                return {"ok": True}
            if msg["event"] == "fresh_gateway":
                await asyncio.to_thread(self.restart_gateway)
                return {"ok": True}
            raise ValueError(f"unexpected event {msg['event']}")

        return handle

    # ---- scenarios ------------------------------------------------------------------------------
    async def scen_ttft(self) -> dict[str, Any]:
        levels = []
        for sessions, turns in self.cfg["ttft_levels"]:
            row: dict[str, Any] = {"sessions": sessions, "turns_each": turns}
            for who, url in (("tidewire", self.url), ("baseline", self.baseline_url)):
                log(f"ttft: {sessions} sessions x {turns} turns against {who}")
                marks: dict[str, Any] = {}

                async def mark(
                    msg: dict[str, Any], _: int, who: str = who, marks: dict[str, Any] = marks
                ) -> dict[str, Any]:
                    marks[msg.get("tag", "")] = {
                        "wall": dt.datetime.now(dt.UTC),
                        "hist": await asyncio.to_thread(
                            scrape_histogram, self.url + "/metrics", "tidewire_ttft_seconds"
                        )
                        if who == "tidewire"
                        else None,
                    }
                    return {"ok": True}

                res = await self.loadgen(
                    "ttft",
                    {
                        "base_url": url,
                        "sessions": sessions,
                        "turns": turns,
                        "tokens": self.cfg["ttft_tokens"],
                        "rate": 0,
                    },
                    mark,
                )
                if who == "tidewire" and "start" in marks and "end" in marks:
                    row["server_side_ttft_ms"] = hist_summary(marks["start"]["hist"], marks["end"]["hist"])
                    row["_window"] = (marks["start"]["wall"], marks["end"]["wall"])
                self.samples[f"ttft/{who}/{sessions}"] = res["ttft_ms"]
                row[who] = {
                    "ttft_ms": summarize(res["ttft_ms"]),
                    "ack_ms": summarize(res["ack_ms"]),
                    "turn_ms": summarize(res["turn_ms"]),
                    "ping_rtt_ms": summarize(res["ping_rtt_ms"]),
                    "turns": res["turns"],
                    "errors": res["errors"],
                    "error_kinds": res["error_kinds"],
                    "text_mismatches": res["text_mismatches"],
                    "seq_gaps": res["seq_gaps"],
                    "seq_dups": res["seq_dups"],
                    "wall_s": res["wall_s"],
                }
            tw, bl = row["tidewire"], row["baseline"]
            for q in ("p50", "p99", "p99_9"):
                row[f"ratio_{q}"] = ratio(tw["ttft_ms"].get(q), bl["ttft_ms"].get(q))
            # The gateway's own receipt-of-send -> first-delta-written: the client figure minus one
            # protocol ping round trip on the same connections (loopback, client and frame handling).
            t50, r50 = tw["ttft_ms"].get("p50"), tw["ping_rtt_ms"].get("p50")
            row["server_side_est_p50_ms"] = r3(t50 - r50) if t50 is not None and r50 is not None else None
            t99 = tw["ttft_ms"].get("p99")
            row["server_side_est_p99_ms"] = r3(t99 - r50) if t99 is not None and r50 is not None else None
            levels.append(row)
        out: dict[str, Any] = {
            "levels": levels,
            "model": "simulated, ttft_ms=0, rate=0 (as fast as possible), "
            f"{self.cfg['ttft_tokens']} tokens per answer; closed loop per session",
            "measure": "client send -> first delta (upper bound of the server-side figure)",
        }
        await asyncio.sleep(2)  # analytics are written asynchronously
        for row in levels:
            window = row.pop("_window", None)
            row["orchestrator_analytics_ttft_ms"] = (
                await self._analytics_ttft(*window) if window else "no measurement window"
            )
        return out

    async def _analytics_ttft(self, start: dt.datetime, end: dt.datetime) -> dict[str, Any] | str:
        """The orchestrators' own TTFT (gateway receipt of send -> first model token), if this build
        records turn analytics; only the turns recorded within the measured window."""
        try:
            import asyncpg

            conn = await asyncpg.connect(self.env["TIDEWIRE_POSTGRES_DSN"], timeout=5)
            try:
                rows = await conn.fetch(
                    "SELECT ttft_ms FROM turn_analytics WHERE ttft_ms IS NOT NULL"
                    " AND recorded_at BETWEEN $1 AND $2",
                    start,
                    end + dt.timedelta(seconds=2),
                    timeout=10,
                )
            finally:
                await conn.close()
        except Exception as e:  # noqa: BLE001
            return f"unavailable: {type(e).__name__}"
        if not rows:
            return "not recorded by this build (no turn_analytics rows)"
        return summarize(float(r["ttft_ms"]) for r in rows)

    async def scen_idle(self) -> dict[str, Any]:
        n = self.cfg["idle_n"]
        await asyncio.to_thread(self.restart_gateway)
        snaps: dict[str, Any] = {}
        log(f"idle: {n} websockets then {n} SSE streams on one gateway")
        res = await self.loadgen(
            "idle",
            {
                "base_url": self.url,
                "n": n,
                "sse": True,
                "probe_turns": self.cfg["idle_probe_turns"],
                "cpu_window_s": self.cfg["idle_cpu_window_s"],
                "settle_s": self.cfg["idle_settle_s"],
                "open_concurrency": 100,
            },
            self.snapshot_handler(snaps),
            timeout=1200,
        )
        out: dict[str, Any] = {"n": n}

        def held(after: str, before: str, gauge: str, opened: int) -> int:
            """Connections the gateway itself counts as open (it may have closed some the client opened)."""
            a = snaps.get(after, {}).get("_gateway_metrics", {}).get(gauge)
            b = snaps.get(before, {}).get("_gateway_metrics", {}).get(gauge)
            return int(a - b) if a is not None and b is not None and a - b > 0 else opened

        def consistent(client_open: int | None, held_n: int) -> bool:
            return bool(client_open) and abs(held_n - client_open) <= 0.02 * client_open

        def per_conn(after: str, before: str, opened: int, comp: str = "gateway") -> tuple[float | None, ...]:
            if after not in snaps or before not in snaps or not opened:
                return None, None
            a, b = snaps[after][comp], snaps[before][comp]
            return r3((a["rss"] - b["rss"]) / opened / 1024), r3((a["fds"] - b["fds"]) / opened)

        out["ws_opened"] = res.get("ws_opened")
        out["ws_open_s"] = res.get("ws_open_s")
        out["ws_open_errors"] = res.get("ws_open_errors")
        out["ws_still_open_after_probe"] = res.get("ws_still_open")
        out["ws_open_at_snapshot"] = res.get("ws_open_at_snapshot")
        out["ws_closed_by_server"] = res.get("ws_closed_by_server")
        out["ws_held_by_gateway"] = held("ws_open", "before", "sockets", res.get("ws_opened", 0))
        out["ws_counts_consistent"] = consistent(res.get("ws_open_at_snapshot"), out["ws_held_by_gateway"])
        out["ws_kib_per_conn"], out["ws_fds_per_conn"] = per_conn(
            "ws_open", "before", out["ws_held_by_gateway"]
        )
        out["ws_gateway_rss_mib"] = r3(
            snaps.get("ws_open", {}).get("gateway", {}).get("rss", math.nan) / 2**20
        )
        out["ws_idle_cpu_pct"] = {k: r3(v["cpu_pct"]) for k, v in snaps.get("ws_open:cpu", {}).items()}
        if "ws_probe" in res:
            out["ws_probe_ttft_ms"] = summarize(res["ws_probe"]["ttft_ms"])
            out["ws_probe_errors"] = res["ws_probe"]["errors"]
        out["sse_opened"] = res.get("sse_opened")
        out["sse_open_s"] = res.get("sse_open_s")
        out["sse_open_errors"] = res.get("sse_open_errors")
        out["sse_held_by_gateway"] = held("sse_open", "sse_before", "sse_streams", res.get("sse_opened", 0))
        out["sse_kib_per_conn"], out["sse_fds_per_conn"] = per_conn(
            "sse_open", "sse_before", out["sse_held_by_gateway"]
        )
        out["sse_idle_cpu_pct"] = {k: r3(v["cpu_pct"]) for k, v in snaps.get("sse_open:cpu", {}).items()}
        if "sse_probe" in res:
            out["sse_probe_ttft_ms"] = summarize(res["sse_probe"]["ttft_ms"])
            out["sse_probe_errors"] = res["sse_probe"]["errors"]
        out["error_kinds"] = {**res.get("ws_open_error_kinds", {}), **res.get("sse_open_error_kinds", {})}
        out["gateway_snapshots"] = {
            tag: {
                "rss_mib": r3(v["gateway"]["rss"] / 2**20),
                "fds": v["gateway"]["fds"],
                **{f"metrics_{k}": g for k, g in v.get("_gateway_metrics", {}).items()},
            }
            for tag, v in snaps.items()
            if not tag.endswith(":cpu") and "gateway" in v
        }

        log(f"idle: {n} websockets on the bare relay")
        bsnaps: dict[str, Any] = {}
        bres = await self.loadgen(
            "idle",
            {
                "base_url": self.baseline_url,
                "n": n,
                "sse": False,
                "probe_turns": self.cfg["idle_probe_turns"],
                "cpu_window_s": self.cfg["idle_cpu_window_s"],
                "settle_s": self.cfg["idle_settle_s"],
            },
            self.snapshot_handler(bsnaps),
            timeout=900,
        )
        if "ws_open" in bsnaps and bres.get("ws_opened"):
            a, b = bsnaps["ws_open"]["baseline"], bsnaps["before"]["baseline"]
            out["baseline_ws_kib_per_conn"] = r3((a["rss"] - b["rss"]) / bres["ws_opened"] / 1024)
            out["baseline_ws_fds_per_conn"] = r3((a["fds"] - b["fds"]) / bres["ws_opened"])
            out["baseline_ws_idle_cpu_pct"] = r3(
                bsnaps.get("ws_open:cpu", {}).get("baseline", {}).get("cpu_pct")
            )
        if "ws_probe" in bres:
            out["baseline_ws_probe_ttft_ms"] = summarize(bres["ws_probe"]["ttft_ms"])
        out["ratio_ws_kib"] = ratio(out.get("ws_kib_per_conn"), out.get("baseline_ws_kib_per_conn"))
        return out

    async def _throughput_run(self, url: str, delivery: str, comps: list[str]) -> dict[str, Any]:
        snaps: dict[str, Any] = {}
        t = self.cfg["throughput"]
        res = await self.loadgen(
            "throughput", {"base_url": url, "delivery": delivery, **t}, self.snapshot_handler(snaps)
        )
        start, end = snaps["start"], snaps["end"]
        cpu = {c: end[c]["cpu_s"] - start[c]["cpu_s"] for c in comps if c in start and c in end}
        tokens = res["tokens"]
        total = sum(cpu.values())
        out = {
            k: res[k]
            for k in (
                "sessions",
                "rounds",
                "delivery",
                "tokens_per_turn",
                "turns_ok",
                "turns_failed",
                "tokens",
                "frames",
                "wall_s",
                "tokens_per_s",
                "error_kinds",
                "seq_gaps",
                "seq_dups",
            )
        }
        out["cpu_s"] = {c: r3(v) for c, v in cpu.items()}
        out["cpu_s_per_1k_tokens"] = {c: r3(1000 * v / tokens) if tokens else None for c, v in cpu.items()}
        out["tokens_per_cpu_s"] = round(tokens / total) if total > 0 else None
        app = sum(v for c, v in cpu.items() if c in ("gateway", "orchestrators", "tool_worker", "baseline"))
        out["tokens_per_cpu_s_services_only"] = round(tokens / app) if app > 0 else None
        out["loadgen_cpu_s"] = r3(end["loadgen"]["cpu_s"] - start["loadgen"]["cpu_s"])
        out["turn_ms"] = summarize(res["turn_ms"])
        return out

    async def scen_throughput(self) -> dict[str, Any]:
        comps = ["gateway", "orchestrators", "tool_worker", "nats", "postgres", "redis"]
        out: dict[str, Any] = {"model": "simulated, rate=0 (as fast as possible)", "cpu_components": comps}
        for delivery in ("tokens", "batched"):
            log(f"throughput: delivery={delivery}")
            out[delivery] = await self._throughput_run(self.url, delivery, comps)
            if delivery == "tokens" and self.args.profile:
                log("throughput: profiling (an extra, unmeasured run)")
                out["profile"] = await self.profile(comps)
        log("throughput: bare relay")
        out["baseline"] = await self._throughput_run(self.baseline_url, "tokens", ["baseline"])
        out["ratio_tokens_per_cpu_s"] = ratio(
            out["tokens"]["tokens_per_cpu_s"], out["baseline"]["tokens_per_cpu_s"]
        )
        return out

    async def profile(self, comps: list[str]) -> dict[str, Any]:
        """py-spy on the gateway and one orchestrator during an extra (unmeasured) throughput run."""
        pyspy = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which("py-spy")
        if not pyspy:
            return {"error": "py-spy is not installed (pip install py-spy)"}
        prof_dir = Path(self.args.profile_dir or (self.workdir / "profile"))
        await asyncio.to_thread(prof_dir.mkdir, parents=True, exist_ok=True)
        targets = {"gateway": self.gateway().pid, "orchestrator": self.orchestrators()[0].pid}
        duration = 10 if not self.args.quick else 4
        procs = {}
        for name, pid in targets.items():
            for fmt, ext in (("raw", "txt"), ("flamegraph", "svg")):
                procs[(name, fmt)] = await asyncio.create_subprocess_exec(
                    pyspy,
                    "record",
                    "--pid",
                    str(pid),
                    "--duration",
                    str(duration),
                    "--rate",
                    "200",
                    "--format",
                    fmt,
                    "--output",
                    str(prof_dir / f"{name}.{ext}"),
                    "--nonblocking",
                    stdout=asyncio.subprocess.DEVNULL,
                    stderr=asyncio.subprocess.PIPE,
                )
        t = dict(self.cfg["throughput"])
        t["rounds"] = t["rounds"] * 4
        load = asyncio.create_task(
            self.loadgen(
                "throughput", {"base_url": self.url, "delivery": "tokens", **t}, self.snapshot_handler({})
            )
        )
        out: dict[str, Any] = {"dir": str(prof_dir), "duration_s": duration}
        for (name, fmt), p in procs.items():
            try:
                _, stderr = await asyncio.wait_for(p.communicate(), duration + 60)
            except TimeoutError:
                p.kill()
                stderr = b"timeout"
            if p.returncode != 0:
                out[f"{name}_{fmt}_error"] = stderr.decode(errors="replace")[-500:]
        with contextlib.suppress(Exception):
            await load
        for name in targets:
            raw = prof_dir / f"{name}.txt"
            if raw.exists():
                out[name] = hot_spots(raw.read_text())
                # py-spy samples only non-idle threads: samples / (rate x duration) ~ how busy it was
                out[name]["on_cpu_pct_of_window"] = round(100 * out[name]["samples"] / (200 * duration), 1)
        return out

    async def scen_crash(self) -> dict[str, Any]:
        from shared.checkpoints import CheckpointStore

        c = self.cfg["crash"]
        cp = CheckpointStore.connect(self.env["TIDEWIRE_REDIS_URL"])
        self.add_orchestrator()  # three, so two stay alive while one is dead
        replacements = 0

        async def owner_by_metrics() -> list[Any]:
            owners = []
            for svc in self.orchestrators():
                port = svc.env.get("health_port")
                if not port:
                    continue
                with contextlib.suppress(Exception):
                    text = await asyncio.to_thread(
                        lambda port=port: (
                            urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2)
                            .read()
                            .decode()
                        )
                    )
                    if promtext.parse(text, strict=False).value("tidewire_orchestrator_sessions_owned") > 0:
                        owners.append(svc)
            return owners

        async def handle(msg: dict[str, Any], _: int) -> dict[str, Any]:
            nonlocal replacements
            if msg["event"] == "kill_owner":
                holder = await cp.lease_holder(msg["session_id"])
                victim, how = None, ""
                if holder:
                    owner = holder.rsplit(":", 1)[0]  # "<id>:<epoch>"; the id may be "<name>/<instance>"
                    victim = next(
                        (
                            s
                            for s in self.orchestrators()
                            if owner == s.name or owner.startswith(s.name + "/")
                        ),
                        None,
                    )
                    how = "lease"
                if victim is None:
                    owners = await owner_by_metrics()
                    if len(owners) == 1:
                        victim, how = owners[0], "metrics"
                if victim is None:
                    return {"killed": None, "how": "owner not found"}
                t_kill = time.monotonic()
                os.kill(victim.pid, signal.SIGKILL)
                await asyncio.to_thread(victim.proc.wait, 5)
                return {"killed": victim.name, "t_kill": t_kill, "how": how}
            if msg["event"] == "trial_done":
                while len(self.orchestrators()) < 3:
                    await asyncio.to_thread(self.add_orchestrator)
                    replacements += 1
                return {"ok": True}
            raise ValueError(msg["event"])

        try:
            log(
                f"crash: {c['trials']} trials, {c['tokens']} tokens at {c['rate']} tok/s, SIGKILL of the owner"
            )
            res = await self.loadgen("crash", {"base_url": self.url, **c}, handle, timeout=1800)
        finally:
            await cp.close()
            extra = self.orchestrators()[2:]
            for svc in extra:  # back to two for the following scenarios
                await asyncio.to_thread(svc.terminate)
        trials = res["trials"]
        killed = [t for t in trials if t.get("killed") and t.get("gap_ms") is not None]
        self.samples["crash"] = [t["gap_ms"] for t in killed]
        gaps = summarize(t["gap_ms"] for t in killed)
        return {
            "trials": len(trials),
            "killed_trials": len(killed),
            "stream_rate_tok_s": c["rate"],
            "normal_gap_ms": round(1000 / c["rate"], 1),
            "pause_ms": gaps,
            "kill_to_next_delta_ms": summarize(
                t["kill_to_next_ms"] for t in killed if "kill_to_next_ms" in t
            ),
            "max_gap_ms": summarize(t["max_gap_ms"] for t in trials if t.get("max_gap_ms") is not None),
            "exact_text_failures": sum(1 for t in trials if not t.get("exact")),
            "trial_errors": [t.get("error") for t in trials if t.get("error")][:5],
            "replacement_orchestrators": replacements,
            "owner_found_by": sorted({t.get("how", "") for t in trials}),
        }

    async def scen_storm(self) -> dict[str, Any]:
        n = self.cfg["storm_n"]
        snaps: dict[str, Any] = {}
        log(f"storm: {n} clients dropped at once, then resume with full-jitter backoff")
        res = await self.loadgen(
            "storm",
            {
                "base_url": self.url,
                "n": n,
                "backoff_base_ms": 250,
                "backoff_cap_ms": 30_000,
                "deadline_s": 120,
            },
            self.snapshot_handler(snaps),
            timeout=1200,
        )
        self.samples["storm"] = res["resume_s"]
        out = {k: v for k, v in res.items() if k != "resume_s"}
        out["resume_s"] = summarize(res["resume_s"])
        if "before" in snaps and "after" in snaps:
            out["gateway_cpu_s"] = r3(
                snaps["after"]["gateway"]["cpu_s"] - snaps["before"]["gateway"]["cpu_s"]
            )
        return out


def scrape_histogram(url: str, name: str) -> promtext.Histogram | None:
    """A histogram from a /metrics page, summed over its label sets; None when the page does not
    have it (or does not answer)."""
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            text = r.read().decode()
    except Exception:  # noqa: BLE001
        return None
    return promtext.parse(text, strict=False).histogram(name)


def hist_summary(before: promtext.Histogram | None, after: promtext.Histogram | None) -> dict[str, Any] | str:
    """Percentiles (ms) of what a histogram recorded between two scrapes."""
    if after is None:
        return "not exposed by this build (no tidewire_ttft_seconds on the gateway's /metrics)"
    window = after.since(before)
    if window.count <= 0:
        return "no observation in the window"
    out: dict[str, Any] = {"n": int(window.count), "mean": r3(1000 * window.mean)}
    for label, q in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99), ("p99_9", 0.999)):
        v = window.quantile(q)
        out[label] = None if math.isnan(v) else r3(1000 * v)
    out["method"] = "interpolated within the gateway's histogram buckets (1, 2.5, 5, 10, 25 ms...)"
    return out


def busy_pct(a: Any, b: Any) -> float | None:
    """Machine-wide CPU busy % between two psutil.cpu_times() (everything on the box, not only us)."""
    idle = (b.idle - a.idle) + (getattr(b, "iowait", 0) - getattr(a, "iowait", 0))
    total = sum(b) - sum(a)
    return round(100 * (1 - idle / total), 1) if total > 0 else None


def clean(o: Any) -> Any:
    """JSON-safe: non-finite floats become null, tuples lists, keys strings."""
    if isinstance(o, float):
        return o if math.isfinite(o) else None
    if isinstance(o, dict):
        return {str(k): clean(v) for k, v in o.items()}
    if isinstance(o, list | tuple):
        return [clean(v) for v in o]
    return o


def hot_spots(raw: str, top: int = 15) -> dict[str, Any]:
    """py-spy `raw` (collapsed stacks: `frame;frame;... count`) -> top functions by own and total time."""
    own: dict[str, int] = {}
    total: dict[str, int] = {}
    samples = 0
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        k = int(count)
        samples += k
        frames = [re.sub(r":\d+\)$", ")", f) for f in stack.split(";")]
        frames = [f for f in frames if not f.startswith("process ") and not f.startswith("thread ")]
        if not frames:
            continue
        own[frames[-1]] = own.get(frames[-1], 0) + k
        for f in set(frames):
            total[f] = total.get(f, 0) + k

    def pct(d: dict[str, int]) -> list[list[Any]]:
        return [[f, round(100 * c / samples, 1)] for f, c in sorted(d.items(), key=lambda x: -x[1])[:top]]

    return {"samples": samples, "self_pct": pct(own), "total_pct": pct(total)}


# --------------------------------------------------------------------------- summary, plots, docs


def machine() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    commit = ""
    with contextlib.suppress(Exception):
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=5
        ).stdout.strip()
        if subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip():
            commit += "+dirty"
    import aiohttp

    return {
        "cpu_model": model or platform.processor(),
        "logical_cores": os.cpu_count(),
        "physical_cores": psutil.cpu_count(logical=False),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "aiohttp": aiohttp.__version__,
        "git_commit": commit,
    }


def _get(d: Any, *path: Any) -> Any:
    for p in path:
        if isinstance(d, dict):
            d = d.get(p)
        elif isinstance(d, list) and isinstance(p, int) and -len(d) <= p < len(d):
            d = d[p]
        else:
            return None
    return d


def build_summary(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The rows of the docs table: metric, target, tidewire, floor, ratio, met."""
    s = results["scenarios"]
    rows: list[dict[str, Any]] = []

    def row(
        metric: str,
        value: Any,
        unit: str,
        target: str = "",
        met: bool | None = None,
        floor: Any = None,
        note: str = "",
    ) -> None:
        rows.append(
            {
                "metric": metric,
                "value": value,
                "unit": unit,
                "target": target,
                "met": met,
                "floor": floor,
                "ratio": ratio(value, floor) if isinstance(value, int | float) else None,
                "note": note,
            }
        )

    def le(v: Any, t: float) -> bool | None:
        return None if not isinstance(v, int | float) else v <= t

    ttft = s.get("ttft", {})
    for lvl in ttft.get("levels", []) if isinstance(ttft, dict) else []:
        n = lvl["sessions"]
        tw, bl = lvl["tidewire"]["ttft_ms"], lvl["baseline"]["ttft_ms"]
        for q, label, tgt in (
            ("p50", "p50", TARGETS["ttft_p50_ms"]),
            ("p99", "p99", TARGETS["ttft_p99_ms"]),
            ("p99_9", "p99.9", None),
        ):
            row(
                f"TTFT overhead {label}, {n} active session{'s' if n > 1 else ''} (client send → first delta)",
                tw.get(q),
                "ms",
                f"≤ {tgt:g} ms" if tgt else "",
                le(tw.get(q), tgt) if tgt else None,
                bl.get(q),
                (
                    f"{lvl['tidewire']['turns']} turns, {lvl['tidewire']['errors']} errors, "
                    f"{lvl['tidewire']['text_mismatches']} inexact texts, {lvl['tidewire'].get('seq_gaps', 0)} seq gaps"
                    if q == "p50"
                    else ""
                ),
            )
        hist = lvl.get("server_side_ttft_ms")
        if isinstance(hist, dict):
            for q, label, tgt in (
                ("p50", "p50", TARGETS["ttft_p50_ms"]),
                ("p99", "p99", TARGETS["ttft_p99_ms"]),
            ):
                row(
                    f"TTFT server-side {label}, {n} session{'s' if n > 1 else ''} (gateway: receipt of send → "
                    "first delta written; histogram)",
                    hist.get(q),
                    "ms",
                    f"≤ {tgt:g} ms",
                    le(hist.get(q), tgt),
                    note=f"mean {hist.get('mean')} ms, n={hist.get('n')}" if q == "p50" else "",
                )
        else:
            row(
                f"TTFT server-side estimate p50, {n} session{'s' if n > 1 else ''} (client figure − ping RTT)",
                lvl.get("server_side_est_p50_ms"),
                "ms",
                f"≤ {TARGETS['ttft_p50_ms']:g} ms",
                le(lvl.get("server_side_est_p50_ms"), TARGETS["ttft_p50_ms"]),
            )
    idle = s.get("idle", {})
    if isinstance(idle, dict) and "n" in idle:
        n = idle["n"]
        row(
            f"Idle WebSocket: gateway RSS per connection ({n} open)",
            idle.get("ws_kib_per_conn"),
            "KiB",
            f"≤ {TARGETS['idle_ws_kib']:g} KiB",
            le(idle.get("ws_kib_per_conn"), TARGETS["idle_ws_kib"]),
            idle.get("baseline_ws_kib_per_conn"),
            f"{idle.get('ws_opened')} opened, {idle.get('ws_open_errors')} errors, {idle.get('ws_held_by_gateway')} "
            f"held by the gateway at the snapshot",
        )
        row(
            "Idle WebSocket: file descriptors per connection",
            idle.get("ws_fds_per_conn"),
            "fd",
            "1",
            le(idle.get("ws_fds_per_conn"), 1.05),
            idle.get("baseline_ws_fds_per_conn"),
        )
        row(
            f"Idle SSE stream: gateway RSS per stream ({n} open)",
            idle.get("sse_kib_per_conn"),
            "KiB",
            f"≤ {TARGETS['idle_sse_kib']:g} KiB",
            le(idle.get("sse_kib_per_conn"), TARGETS["idle_sse_kib"]),
            None,
            f"{idle.get('sse_opened')} opened, {idle.get('sse_open_errors')} errors, "
            f"{idle.get('sse_held_by_gateway')} held by the gateway at the snapshot",
        )
        row(
            "Idle SSE stream: file descriptors per stream",
            idle.get("sse_fds_per_conn"),
            "fd",
            "1",
            le(idle.get("sse_fds_per_conn"), 1.05),
        )
        win = _get(results, "meta", "config", "idle_cpu_window_s")
        row(
            f"Gateway CPU with {n} idle WebSockets ({win} s window)",
            _get(idle, "ws_idle_cpu_pct", "gateway"),
            "%",
            floor=idle.get("baseline_ws_idle_cpu_pct"),
        )
        row(
            f"Gateway CPU with {n} idle SSE streams ({win} s window)",
            _get(idle, "sse_idle_cpu_pct", "gateway"),
            "%",
        )
        row(
            f"TTFT p50 of an active session next to {n} idle WebSockets",
            _get(idle, "ws_probe_ttft_ms", "p50"),
            "ms",
            floor=_get(idle, "baseline_ws_probe_ttft_ms", "p50"),
            note=f"{_get(idle, 'ws_probe_ttft_ms', 'n')} turns, {idle.get('ws_probe_errors')} errors",
        )
        row(
            f"TTFT p99 of an active session next to {n} idle WebSockets",
            _get(idle, "ws_probe_ttft_ms", "p99"),
            "ms",
            floor=_get(idle, "baseline_ws_probe_ttft_ms", "p99"),
        )
    tp = s.get("throughput", {})
    if isinstance(tp, dict) and "tokens" in tp:
        floor = _get(tp, "baseline", "tokens_per_cpu_s")
        for mode in ("tokens", "batched"):
            m = tp.get(mode, {})
            row(
                f"Tokens per CPU-second, all components incl. NATS/Postgres/Redis (delivery: {mode})",
                m.get("tokens_per_cpu_s"),
                "tok/CPU-s",
                f"≥ {TARGETS['tokens_per_cpu_s']:,.0f}",
                None
                if m.get("tokens_per_cpu_s") is None
                else m["tokens_per_cpu_s"] >= TARGETS["tokens_per_cpu_s"],
                floor,
                f"{m.get('sessions')} sessions × {m.get('tokens_per_turn')} tokens × {m.get('rounds')} rounds; "
                f"{m.get('turns_ok')} turns ok, {m.get('turns_failed')} failed or inexact",
            )
            row(
                f"Tokens per CPU-second, tidewire services only (delivery: {mode})",
                m.get("tokens_per_cpu_s_services_only"),
                "tok/CPU-s",
                floor=floor,
            )
            row(
                f"Tokens/s delivered to clients (delivery: {mode})",
                m.get("tokens_per_s"),
                "tok/s",
                floor=_get(tp, "baseline", "tokens_per_s"),
            )
            for comp in ("gateway", "orchestrators"):
                row(
                    f"CPU-ms per 1,000 tokens: {comp} (delivery: {mode})",
                    (lambda v: r3(v * 1000) if v is not None else None)(_get(m, "cpu_s_per_1k_tokens", comp)),
                    "ms",
                    floor=(lambda v: r3(v * 1000) if v is not None else None)(
                        _get(tp, "baseline", "cpu_s_per_1k_tokens", "baseline")
                    ),
                )
    cr = s.get("crash", {})
    if isinstance(cr, dict) and "pause_ms" in cr:
        note = f"{cr.get('killed_trials')}/{cr.get('trials')} trials; normal gap {cr.get('normal_gap_ms')} ms"
        row(
            "Crash pause p50 (SIGKILL of the owning orchestrator; last delta → next delta)",
            _get(cr, "pause_ms", "p50"),
            "ms",
            f"≤ {TARGETS['crash_p50_ms']:g} ms",
            le(_get(cr, "pause_ms", "p50"), TARGETS["crash_p50_ms"]),
            note=note,
        )
        row(
            "Crash pause p99",
            _get(cr, "pause_ms", "p99"),
            "ms",
            f"≤ {TARGETS['crash_p99_ms']:g} ms",
            le(_get(cr, "pause_ms", "p99"), TARGETS["crash_p99_ms"]),
        )
        row(
            "Crash trials whose text was not exact (deltas ≠ turn_end.text)",
            cr.get("exact_text_failures"),
            "",
            "0",
            cr.get("exact_text_failures") == 0,
        )
    for name in SCENARIO_ORDER:
        sc = s.get(name)
        canary = sc.get("canary_after") if isinstance(sc, dict) else None
        if isinstance(canary, dict) and not canary.get("ok"):
            row(
                f"Stack still serving turns after the {name} scenario (1 session, 3 turns, 15 s timeout)",
                "no",
                "",
                "yes",
                False,
                note="a fresh stack (new infra state, new processes) ran the next scenario; "
                + ", ".join(f"{k} ×{v}" for k, v in (canary.get("error_kinds") or {}).items()),
            )
    st = s.get("storm", {})
    if isinstance(st, dict) and "n" in st:
        n = st["n"]
        full = n >= TARGETS["storm_n"]
        row(
            f"Reconnect storm: {n} clients dropped at once, all resumed (ready + replay) after",
            st.get("all_resumed_s"),
            "s",
            f"≤ {TARGETS['storm_s']:g} s for {TARGETS['storm_n']:,}",
            le(st.get("all_resumed_s"), TARGETS["storm_s"]) if full else None,
            note=f"p50 {_get(st, 'resume_s', 'p50')} s, p99 {_get(st, 'resume_s', 'p99')} s",
        )
        row(
            "Reconnect storm: errors (failed attempts + clients never resumed + bad replays)",
            st.get("errors"),
            "",
            "0",
            st.get("errors") == 0 if full else None,
            note=", ".join(f"{k} ×{v}" for k, v in (st.get("error_kinds") or {}).items())[:160],
        )
    return rows


def fmt(v: Any, unit: str = "") -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        if abs(v) >= 1000:
            s = f"{v:,.0f}"
        elif abs(v) >= 100:
            s = f"{v:.0f}"
        elif abs(v) >= 10:
            s = f"{v:.1f}"
        else:
            s = f"{v:.2f}"
    elif isinstance(v, int):
        s = f"{v:,}"
    else:
        s = str(v)
    return f"{s} {unit}".strip() if unit and unit not in ("%",) else (s + unit if unit else s)


def render_table(results: dict[str, Any], json_rel: str, plots_rel: list[str]) -> str:
    m = results["meta"]
    mc = m["machine"]
    lines = [
        f"Last run: **{m['date']}** ({m['mode']} mode, {m['duration_s']:.0f} s), commit `{mc['git_commit']}`. "
        f"Machine: {mc['cpu_model']}, {mc['logical_cores']} logical cores, {mc['memory_gib']} GiB RAM, "
        f"{mc['os']}, {mc['implementation']} {mc['python']}, aiohttp {mc['aiohttp']}. Everything (load generator, "
        "gateway, orchestrators, tool worker, NATS, Postgres, Redis, the floor) shares this machine.",
        "",
        "| Metric | Target | tidewire | Floor (bare relay) | × floor | Met? | Notes |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results["summary"]:
        met = {True: "✅", False: "❌", None: ""}[r["met"]]
        lines.append(
            f"| {r['metric']} | {r['target']} | {fmt(r['value'], r['unit'])} | "
            f"{fmt(r['floor'], r['unit']) if r['floor'] is not None else ''} | "
            f"{fmt(r['ratio']) + '×' if r['ratio'] is not None else ''} | {met} | {r['note']} |"
        )
    busy = [
        f"{k} {v['machine_busy_pct']:.0f}%"
        for k, v in results["scenarios"].items()
        if isinstance(v, dict) and isinstance(v.get("machine_busy_pct"), int | float)
    ]
    if busy:
        lines += [
            "",
            "Machine-wide CPU busy during each scenario (every process on the box, ours or not): "
            + ", ".join(busy)
            + ".",
        ]
    errors = {k: v["error"] for k, v in results["scenarios"].items() if isinstance(v, dict) and "error" in v}
    if errors:
        lines += [
            "",
            "Scenarios that failed in this run: "
            + "; ".join(f"**{k}**: `{v[:200]}`" for k, v in errors.items()),
        ]
    lines += ["", f"Raw results: [`{json_rel}`]({json_rel})."]
    if plots_rel:
        lines += ["", " ".join(f"![{Path(p).stem}]({p})" for p in plots_rel)]
    return "\n".join(lines)


def update_docs(path: Path, table: str) -> None:
    text = path.read_text() if path.exists() else f"# Benchmarks\n\n{BEGIN}\n{END}\n"
    if BEGIN not in text or END not in text:
        text = text.rstrip() + f"\n\n## Results\n\n{BEGIN}\n{END}\n"
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    path.write_text(f"{head}{BEGIN}\n{table}\n{END}{tail}")


def plot(results: dict[str, Any], samples: dict[str, Any], out_dir: Path, stem: str) -> list[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib is not installed: no plots (pip install matplotlib)")
        return []
    written: list[Path] = []
    s = results["scenarios"]

    def save(fig: Any, name: str) -> None:
        path = out_dir / f"{stem}-{name}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

    with contextlib.suppress(Exception):
        levels = s["ttft"]["levels"]
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
        xs = range(len(levels))
        for i, (who, color) in enumerate((("tidewire", "tab:blue"), ("baseline", "tab:gray"))):
            p50 = [lv[who]["ttft_ms"].get("p50", 0) for lv in levels]
            p99 = [lv[who]["ttft_ms"].get("p99", 0) for lv in levels]
            ax1.bar([x + i * 0.4 for x in xs], p99, 0.38, color=color, alpha=0.35, label=f"{who} p99")
            ax1.bar([x + i * 0.4 for x in xs], p50, 0.38, color=color, label=f"{who} p50")
        ax1.axhline(TARGETS["ttft_p50_ms"], color="green", ls="--", lw=1, label="target p50")
        ax1.axhline(TARGETS["ttft_p99_ms"], color="red", ls="--", lw=1, label="target p99")
        ax1.set_xticks(
            [x + 0.2 for x in xs],
            [f"{lv['sessions']} session{'s' if lv['sessions'] > 1 else ''}" for lv in levels],
        )
        ax1.set_yscale("log")
        ax1.set_ylabel("send → first delta (ms)")
        ax1.set_title("TTFT overhead (model TTFT = 0)")
        ax1.legend(fontsize=7)
        for key, v in samples.items():
            if key.startswith("ttft/") and v:
                _, who, n = key.split("/")
                xs2 = sorted(v)
                ax2.plot(
                    xs2,
                    [(i + 1) / len(xs2) for i in range(len(xs2))],
                    label=f"{who}, {n} sessions",
                    ls="-" if who == "tidewire" else ":",
                )
        ax2.set_xscale("log")
        ax2.set_xlabel("send → first delta (ms)")
        ax2.set_ylabel("fraction of turns")
        ax2.set_title("TTFT distribution")
        ax2.legend(fontsize=7)
        save(fig, "ttft")
    with contextlib.suppress(Exception):
        idle = s["idle"]
        labels = ["tidewire WS", "tidewire SSE", "bare relay WS"]
        vals = [
            idle.get("ws_kib_per_conn") or 0,
            idle.get("sse_kib_per_conn") or 0,
            idle.get("baseline_ws_kib_per_conn") or 0,
        ]
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.bar(labels, vals, color=["tab:blue", "tab:cyan", "tab:gray"])
        ax.axhline(TARGETS["idle_ws_kib"], color="red", ls="--", lw=1, label="target WS (16 KiB)")
        ax.axhline(TARGETS["idle_sse_kib"], color="orange", ls="--", lw=1, label="target SSE (14 KiB)")
        for i, v in enumerate(vals):
            ax.text(i, v, f"{v:.1f}", ha="center", va="bottom")
        ax.set_ylabel("gateway RSS per idle connection (KiB)")
        ax.set_title(f"Idle connections ({idle['n']:,} open)")
        ax.legend(fontsize=7)
        save(fig, "idle")
    with contextlib.suppress(Exception):
        tp = s["throughput"]
        comps = tp["cpu_components"]
        cases = [("tokens", tp["tokens"]), ("batched", tp["batched"])]
        fig, ax = plt.subplots(figsize=(7, 4))
        bottoms = [0.0, 0.0, 0.0]
        for comp in comps:
            vals = [1000 * (c["cpu_s_per_1k_tokens"].get(comp) or 0) for _, c in cases] + [0.0]
            ax.bar(["delivery: tokens", "delivery: batched", "bare relay"], vals, bottom=bottoms, label=comp)
            bottoms = [b + v for b, v in zip(bottoms, vals, strict=True)]
        bv = 1000 * (tp["baseline"]["cpu_s_per_1k_tokens"].get("baseline") or 0)
        ax.bar(["bare relay"], [bv], bottom=[0], label="bare relay", color="tab:gray")
        ax.axhline(
            1000 * 1000 / TARGETS["tokens_per_cpu_s"],
            color="red",
            ls="--",
            lw=1,
            label="target (50k tok/CPU-s)",
        )
        ax.set_ylabel("CPU-ms per 1,000 tokens")
        ax.set_title("Token throughput cost per component")
        ax.legend(fontsize=7)
        save(fig, "throughput")
    with contextlib.suppress(Exception):
        gaps = samples.get("crash") or []
        if gaps:
            fig, ax = plt.subplots(figsize=(6, 4))
            ax.plot(range(1, len(gaps) + 1), gaps, "o", color="tab:blue")
            ax.axhline(TARGETS["crash_p50_ms"], color="green", ls="--", lw=1, label="target p50")
            ax.axhline(TARGETS["crash_p99_ms"], color="red", ls="--", lw=1, label="target p99")
            ax.set_xlabel("trial")
            ax.set_ylabel("stream pause around the SIGKILL (ms)")
            ax.set_title("Orchestrator crash: client-side pause")
            ax.legend(fontsize=7)
            save(fig, "crash")
    with contextlib.suppress(Exception):
        times = sorted(samples.get("storm") or [])
        if times:
            fig, ax = plt.subplots(figsize=(6, 4))
            ax.plot(times, [(i + 1) for i in range(len(times))], color="tab:blue")
            ax.axvline(TARGETS["storm_s"], color="red", ls="--", lw=1, label="target (10 s)")
            ax.set_xlabel("seconds since all connections dropped")
            ax.set_ylabel("clients resumed (ready + replay)")
            ax.set_title(f"Reconnect storm ({s['storm']['n']:,} clients)")
            ax.legend(fontsize=7)
            save(fig, "storm")
    with contextlib.suppress(Exception):
        written += openloop.plot(s.get("openloop"), out_dir, stem)
    return written


# --------------------------------------------------------------------------- main


async def run_all(bench: Bench, only: list[str]) -> dict[str, Any]:
    scenarios: dict[str, Any] = {}
    fns = {
        "ttft": bench.scen_ttft,
        "idle": bench.scen_idle,
        "throughput": bench.scen_throughput,
        "crash": bench.scen_crash,
        "storm": bench.scen_storm,
        "openloop": lambda: openloop.run_scenario(bench),
    }
    for name in only:
        t0 = time.monotonic()
        cpu0 = psutil.cpu_times()
        try:
            scenarios[name] = await fns[name]()
        except Exception as e:  # noqa: BLE001 - record it and go on with the others
            traceback.print_exc()
            scenarios[name] = {"error": f"{type(e).__name__}: {e}"[:2000]}
        if isinstance(scenarios[name], dict):
            scenarios[name]["elapsed_s"] = round(time.monotonic() - t0, 1)
            scenarios[name]["machine_busy_pct"] = busy_pct(cpu0, psutil.cpu_times())
            scenarios[name]["loadavg_1m_at_end"] = round(os.getloadavg()[0], 2)
        log(f"{name}: done in {time.monotonic() - t0:.1f}s")
        # a scenario may have left a service dead: put the stack back for the next one
        with contextlib.suppress(Exception):
            if not any(s.name == "gateway" and s.alive() for s in bench.stack.services):
                await asyncio.to_thread(bench.restart_gateway)
            while len(bench.orchestrators()) < 2:
                await asyncio.to_thread(bench.add_orchestrator)
        if name == only[-1]:
            break
        # ...or alive but wedged: the next scenario must not be measured on a broken stack
        canary = await bench.canary()
        if isinstance(scenarios[name], dict):
            scenarios[name]["canary_after"] = canary
        if not canary["ok"]:
            log(f"{name}: the stack no longer answers ({canary}); starting a fresh one for the next scenario")
            if isinstance(scenarios[name], dict):
                scenarios[name]["stack_restarted_after"] = True
            await asyncio.to_thread(bench.stop)
            await asyncio.to_thread(bench.start)
    return scenarios


def render_only(json_path: Path, docs: Path) -> int:
    results = json.loads(json_path.read_text())
    results["summary"] = build_summary(results)
    json_path.write_text(json.dumps(clean(results), indent=2, ensure_ascii=False) + "\n")
    plots = sorted(p for p in json_path.parent.glob(f"{json_path.stem}-*.png"))
    order = {name: i for i, name in enumerate(SCENARIO_ORDER)}
    plots.sort(key=lambda p: order.get(p.stem.rsplit("-", 1)[-1], 99))
    rel = lambda p: os.path.relpath(p, docs.parent)  # noqa: E731
    update_docs(docs, render_table(results, rel(json_path), [rel(p) for p in plots]))
    log(f"rewrote the summary of {json_path} and the table of {docs}")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes, a few seconds per scenario")
    ap.add_argument("--out", help="directory for the JSON and the plots (default bench/results)")
    ap.add_argument("--only", help=f"comma-separated subset of {','.join(SCENARIO_ORDER)}")
    ap.add_argument(
        "--docs",
        help="regenerate the table in this markdown file (default: docs/benchmarks.md, full runs only)",
    )
    ap.add_argument("--no-docs", action="store_true", help="do not touch the docs")
    ap.add_argument(
        "--profile",
        action="store_true",
        help="py-spy the gateway and an orchestrator during an extra throughput run",
    )
    ap.add_argument("--profile-dir", help="where py-spy writes (default: the temporary work dir)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary work dir (logs)")
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=JSON",
        help="override a size, e.g. --set idle_n=3000 --set 'crash={\"trials\": 5}'",
    )
    ap.add_argument(
        "--render",
        metavar="JSON",
        help="no run: rebuild the summary of an existing results file "
        "and the docs table from it (plots found next to it)",
    )
    args = ap.parse_args(argv)
    if args.render:
        return render_only(Path(args.render).resolve(), Path(args.docs).resolve() if args.docs else DOCS)
    base_cfg = QUICK if args.quick else FULL
    for item in args.set:
        key, _, raw = item.partition("=")
        if key not in base_cfg:
            ap.error(f"--set: unknown key {key!r} (one of {', '.join(base_cfg)})")
        value = json.loads(raw)
        base_cfg[key] = {**base_cfg[key], **value} if isinstance(base_cfg[key], dict) else value
    only = [x.strip() for x in args.only.split(",")] if args.only else list(SCENARIO_ORDER)
    unknown = set(only) - set(SCENARIO_ORDER)
    if unknown:
        ap.error(f"unknown scenarios: {', '.join(sorted(unknown))}")

    nofile = raise_nofile_limit()  # inherited by the stack's processes, started after this
    log(f"RLIMIT_NOFILE soft limit {nofile}")
    date = dt.date.today().isoformat()
    out_dir = Path(args.out).resolve() if args.out else RESULTS_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = date + ("-quick" if args.quick and not args.out else "")
    workdir = Path(tempfile.mkdtemp(prefix="tidewire-bench-"))
    bench = Bench(args, workdir)
    t0 = time.monotonic()
    results: dict[str, Any] = {
        "meta": {
            "date": date,
            "started_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "mode": "quick" if args.quick else "full",
            "machine": machine(),
            "nofile_limit": nofile,
            "config": {k: v for k, v in (QUICK if args.quick else FULL).items()},
            "source": "a copy of the working tree taken when the run started (git_commit; +dirty: "
            "with uncommitted changes)",
            "stack": "1 gateway, 2 orchestrators (3 during the crash scenario), 1 tool worker; "
            "embedded NATS JetStream (fsync always), Postgres (synchronous_commit on), Redis (AOF)",
        },
        "targets": TARGETS,
    }
    interrupted = False
    try:
        bench.start()
        results["scenarios"] = asyncio.run(run_all(bench, only))
    except KeyboardInterrupt:
        interrupted = True
        results.setdefault("scenarios", {})["interrupted"] = {"error": "interrupted"}
    except Exception as e:  # noqa: BLE001 - e.g. the stack did not start: still write what we have
        traceback.print_exc()
        results.setdefault("scenarios", {})["setup"] = {"error": f"{type(e).__name__}: {e}"[:2000]}
    finally:
        bench.stop()
    results["meta"]["duration_s"] = round(time.monotonic() - t0, 1)
    results["meta"]["logs"] = str(workdir / "logs") if args.keep else None
    results["summary"] = build_summary(results)

    results = clean(results)
    json_path = out_dir / f"{stem}.json"
    json_path.write_text(
        json.dumps(results, indent=2, ensure_ascii=False, allow_nan=False, default=lambda o: None) + "\n"
    )
    plots = plot(results, bench.samples, out_dir, stem)
    log(f"wrote {json_path} and {len(plots)} plots")
    # only a canonical run (full sizes, every scenario, default output) rewrites the docs by default
    canonical = not (args.quick or args.out or args.only or args.set or args.profile)
    docs = Path(args.docs).resolve() if args.docs else (DOCS if canonical else None)
    if docs is not None and not args.no_docs:
        rel = lambda p: os.path.relpath(p, docs.parent)  # noqa: E731
        update_docs(docs, render_table(results, rel(json_path), [rel(p) for p in plots]))
        log(f"updated {docs}")
    # the open-loop section of the docs: by any full-size run that included it (default output), or --docs
    ol_docs = Path(args.docs).resolve() if args.docs else (DOCS if not (args.quick or args.out) else None)
    openloop.write_outputs(
        results,
        out_dir,
        stem,
        quick=args.quick,
        plots=plots,
        docs=None if args.no_docs or "openloop" not in only else ol_docs,
    )
    if not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)
    print(
        json.dumps({"results": str(json_path), "summary": results["summary"]}, indent=1, ensure_ascii=False)
    )
    return 130 if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
