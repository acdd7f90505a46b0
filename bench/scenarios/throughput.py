"""Throughput: many sessions streaming at once, CPU seconds of every component per token delivered.

Runs once per delivery mode (`tokens`, `batched`) and once against the floor; the CPU seconds come
from process snapshots the load generator asks for just before and after the streaming. `--profile`
adds an extra, unmeasured run with py-spy attached to the gateway and one orchestrator.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import re
import shutil
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench.common import Rows, dig, log, r3, ratio
from bench.loadgen import (
    Ctx,
    TurnOutcome,
    gather_limited,
    new_http,
    open_clients,
    run_turn,
    sim_line,
    summarize,
)

if TYPE_CHECKING:
    from bench.run import Bench

FULL: dict[str, Any] = {
    "throughput": {"sessions": 50, "tokens": 400, "rounds": 3},
}
QUICK: dict[str, Any] = {
    "throughput": {"sessions": 20, "tokens": 200, "rounds": 2},
}
TARGETS = {
    "tokens_per_cpu_s": 50_000.0,
}


# =========================================================================== load-generator side


async def scen_throughput(ctx: Ctx) -> dict[str, Any]:
    """Many sessions streaming at once; the coordinator snapshots CPU times around the streaming."""
    p = ctx.p
    base, n, rounds = p["base_url"], int(p["sessions"]), int(p.get("rounds", 1))
    text_tokens, delivery = int(p["tokens"]), p.get("delivery", "tokens")
    async with new_http() as http:
        clients, open_errors = await open_clients(ctx, http, base, n, delivery=delivery)
        if not clients:
            raise RuntimeError(f"no connection opened: {open_errors[:3]}")
        await gather_limited([lambda c=c: run_turn(c, sim_line(5, 0)) for c in clients], 100)
        await asyncio.sleep(0.5)
        await ctx.coord.call("snapshot", tag="start")
        outcomes: list[TurnOutcome] = []
        t0 = time.monotonic()
        for _ in range(rounds):
            res = await asyncio.gather(
                *(run_turn(c, sim_line(text_tokens, 0), timeout=60) for c in clients), return_exceptions=True
            )
            outcomes.extend(r for r in res if isinstance(r, TurnOutcome))
        wall = time.monotonic() - t0
        await ctx.coord.call("snapshot", tag="end")
        await gather_limited([lambda c=c: c.close() for c in clients], 200)
    ok = [o for o in outcomes if o.text_ok]
    errors = collections.Counter((o.error or "?")[:80] for o in outcomes if not o.text_ok)
    return {
        "sessions": len(clients),
        "rounds": rounds,
        "delivery": delivery,
        "tokens_per_turn": text_tokens,
        "turns_ok": len(ok),
        "turns_failed": len(outcomes) - len(ok) + (n * rounds - len(outcomes)),
        "tokens": len(ok) * text_tokens,
        "frames": sum(o.deltas for o in outcomes),
        "chars": sum(o.chars for o in ok),
        "wall_s": round(wall, 3),
        "tokens_per_s": round(len(ok) * text_tokens / wall, 1) if wall > 0 else None,
        "turn_ms": [o.total_ms for o in ok if o.total_ms is not None],
        "seq_gaps": sum(c.seq_gaps for c in clients),
        "seq_dups": sum(c.seq_dups for c in clients),
        "error_kinds": dict(errors.most_common(5)),
        "open_errors": len(open_errors),
    }


# =========================================================================== coordinator side


async def run_scenario(bench: Bench) -> dict[str, Any]:
    """The coordinator side: both delivery modes (and the py-spy run of `--profile`), then the floor."""
    comps = ["gateway", "orchestrators", "tool_worker", "nats", "postgres", "redis"]
    out: dict[str, Any] = {"model": "simulated, rate=0 (as fast as possible)", "cpu_components": comps}
    for delivery in ("tokens", "batched"):
        log(f"throughput: delivery={delivery}")
        out[delivery] = await measure(bench, bench.url, delivery, comps)
        if delivery == "tokens" and bench.args.profile:
            log("throughput: profiling (an extra, unmeasured run)")
            out["profile"] = await profile(bench, comps)
    log("throughput: bare relay")
    out["baseline"] = await measure(bench, bench.baseline_url, "tokens", ["baseline"])
    out["ratio_tokens_per_cpu_s"] = ratio(
        out["tokens"]["tokens_per_cpu_s"], out["baseline"]["tokens_per_cpu_s"]
    )
    return out


async def measure(bench: Bench, url: str, delivery: str, comps: list[str]) -> dict[str, Any]:
    """One run against `url`: CPU seconds of `comps` between the start and end snapshots, per token."""
    snaps: dict[str, Any] = {}
    t = bench.cfg["throughput"]
    res = await bench.loadgen(
        "throughput", {"base_url": url, "delivery": delivery, **t}, bench.snapshot_handler(snaps)
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


async def profile(bench: Bench, comps: list[str]) -> dict[str, Any]:
    """py-spy on the gateway and one orchestrator during an extra (unmeasured) throughput run."""
    pyspy = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which("py-spy")
    if not pyspy:
        return {"error": "py-spy is not installed (pip install py-spy)"}
    prof_dir = Path(bench.args.profile_dir or (bench.workdir / "profile"))
    await asyncio.to_thread(prof_dir.mkdir, parents=True, exist_ok=True)
    targets = {"gateway": bench.gateway().pid, "orchestrator": bench.orchestrators()[0].pid}
    duration = 10 if not bench.args.quick else 4
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
    t = dict(bench.cfg["throughput"])
    t["rounds"] = t["rounds"] * 4
    load = asyncio.create_task(
        bench.loadgen(
            "throughput", {"base_url": bench.url, "delivery": "tokens", **t}, bench.snapshot_handler({})
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


# --------------------------------------------------------------------------- summary rows, plot


def summary_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    s = results["scenarios"]
    rows = Rows()
    tp = s.get("throughput", {})
    if isinstance(tp, dict) and "tokens" in tp:
        floor = dig(tp, "baseline", "tokens_per_cpu_s")
        for mode in ("tokens", "batched"):
            m = tp.get(mode, {})
            rows.add(
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
            rows.add(
                f"Tokens per CPU-second, tidewire services only (delivery: {mode})",
                m.get("tokens_per_cpu_s_services_only"),
                "tok/CPU-s",
                floor=floor,
            )
            rows.add(
                f"Tokens/s delivered to clients (delivery: {mode})",
                m.get("tokens_per_s"),
                "tok/s",
                floor=dig(tp, "baseline", "tokens_per_s"),
            )
            for comp in ("gateway", "orchestrators"):
                rows.add(
                    f"CPU-ms per 1,000 tokens: {comp} (delivery: {mode})",
                    (lambda v: r3(v * 1000) if v is not None else None)(dig(m, "cpu_s_per_1k_tokens", comp)),
                    "ms",
                    floor=(lambda v: r3(v * 1000) if v is not None else None)(
                        dig(tp, "baseline", "cpu_s_per_1k_tokens", "baseline")
                    ),
                )
    return rows


def plot(plt: Any, s: dict[str, Any], samples: dict[str, Any]) -> Any:
    """CPU-ms per 1,000 tokens, stacked by component, per delivery mode and for the floor."""
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
    return fig
