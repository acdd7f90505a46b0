"""`make bench` / `make bench-quick`: the whole benchmark suite against a real local stack.

    python -m bench.run [--quick] [--out DIR] [--only ttft,idle,...] [--docs PATH | --no-docs] [--profile]

Starts its own embedded NATS/Postgres/Redis (a temporary state folder), a stack of 1 gateway,
2 orchestrators and 1 tool worker, and the bare relay of `bench.baseline` (the floor), then runs the
scenarios, each from a separate load-generator process (`bench.loadgen`) that asks this coordinator
for process snapshots, kills and restarts over a line protocol. Writes
`bench/results/<YYYY-MM-DD>.json` (quick: `<date>-quick.json`; `--out DIR`: into DIR) with PNG plots
next to it, and regenerates the results table of docs/benchmarks.md (full runs only, unless `--docs`).

A scenario that raises is recorded as `{"error": ...}` and the others still run.

This module is the stack and process management (`Bench`), the run and the command line; each
scenario's coordinator side is `run_scenario(bench)` in bench/scenarios/<name>.py, the summary, docs
table and plots are assembled in `bench.report`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import platform
import shutil
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

from bench.common import log
from bench.loadgen import raise_nofile_limit, summarize
from bench.report import DOCS, build_summary, clean, plot, render_only, render_table, update_docs
from bench.scenarios import ORDER as SCENARIO_ORDER
from bench.scenarios import crash, idle, openloop, storm, throughput, ttft
from shared import promtext

REPO = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO / "bench" / "results"
SECRET = "bench-secret-0123456789abcdef0123456789"
SRC_PACKAGES = ("proto", "shared", "gateway", "orchestrator", "tool_workers", "tidewire", "bench")
SCENARIOS = {
    "ttft": ttft,
    "idle": idle,
    "throughput": throughput,
    "crash": crash,
    "storm": storm,
    "openloop": openloop,
}

# each scenario's sizes and targets are in its module; `--set KEY=JSON` overrides one of these keys
TARGETS = {**ttft.TARGETS, **idle.TARGETS, **throughput.TARGETS, **crash.TARGETS, **storm.TARGETS}
FULL: dict[str, Any] = {
    **ttft.FULL,
    **idle.FULL,
    **throughput.FULL,
    **crash.FULL,
    **storm.FULL,
    "openloop": dict(openloop.FULL_CFG),
}
QUICK: dict[str, Any] = {
    **ttft.QUICK,
    **idle.QUICK,
    **throughput.QUICK,
    **crash.QUICK,
    **storm.QUICK,
    "openloop": dict(openloop.QUICK_CFG),
}


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


def busy_pct(a: Any, b: Any) -> float | None:
    """Machine-wide CPU busy % between two psutil.cpu_times() (everything on the box, not only us)."""
    idle = (b.idle - a.idle) + (getattr(b, "iowait", 0) - getattr(a, "iowait", 0))
    total = sum(b) - sum(a)
    return round(100 * (1 - idle / total), 1) if total > 0 else None


# --------------------------------------------------------------------------- the run


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


async def run_all(bench: Bench, only: list[str]) -> dict[str, Any]:
    scenarios: dict[str, Any] = {}
    for name in only:
        t0 = time.monotonic()
        cpu0 = psutil.cpu_times()
        try:
            scenarios[name] = await SCENARIOS[name].run_scenario(bench)
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
        docs = None if args.no_docs else Path(args.docs).resolve() if args.docs else DOCS
        return render_only(Path(args.render).resolve(), docs)
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
