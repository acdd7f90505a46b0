"""Orchestrator crash: stream a long answer, SIGKILL the orchestrator producing it, measure the pause.

The load generator waits for `kill_after` deltas, asks the coordinator to kill the session's owner
(found by its lease in Redis, else by the one orchestrator owning sessions) and times the gap between
the last delta before the kill and the first after it; the text must still be exact. Three
orchestrators run during the scenario so two stay alive while one is dead.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
import urllib.request
from typing import TYPE_CHECKING, Any

from bench.common import Rows, at_most, dig, log
from bench.loadgen import (
    Ctx,
    WsClient,
    errname,
    new_http,
    run_turn,
    sim_line,
    summarize,
)
from bench.loadgen import log as loadgen_log
from shared import promtext

if TYPE_CHECKING:
    from bench.run import Bench

FULL: dict[str, Any] = {
    "crash": {"trials": 30, "tokens": 150, "rate": 50, "kill_after": 20},
}
QUICK: dict[str, Any] = {
    "crash": {"trials": 3, "tokens": 100, "rate": 50, "kill_after": 20},
}
TARGETS = {
    "crash_p50_ms": 300.0,
    "crash_p99_ms": 500.0,
}


# =========================================================================== load-generator side


async def scen_crash(ctx: Ctx) -> dict[str, Any]:
    """Stream a long answer, SIGKILL the orchestrator producing it, measure the client-side pause."""
    p = ctx.p
    base, trials = p["base_url"], int(p["trials"])
    text_tokens, rate, kill_after = (
        int(p.get("tokens", 250)),
        float(p.get("rate", 50)),
        int(p.get("kill_after", 25)),
    )
    results: list[dict[str, Any]] = []
    async with new_http() as http:
        for trial in range(trials):
            rec: dict[str, Any] = {"trial": trial}
            c = WsClient(http, base, ctx.token())
            try:
                await c.open()
                reached = asyncio.Event()

                def on_delta(k: int, reached: asyncio.Event = reached) -> None:
                    if k >= kill_after:
                        reached.set()

                turn = asyncio.create_task(
                    run_turn(c, sim_line(text_tokens, rate), timeout=120, keep_times=True, on_delta=on_delta)
                )
                async with asyncio.timeout(30):
                    await asyncio.wait(
                        [turn, asyncio.ensure_future(reached.wait())], return_when=asyncio.FIRST_COMPLETED
                    )
                if turn.done():
                    raise RuntimeError(f"turn ended before the kill: {turn.result().error}")
                reply = await ctx.coord.call("kill_owner", session_id=c.session_id, timeout=30)
                o = await turn
                rec.update(
                    killed=reply.get("killed"),
                    how=reply.get("how"),
                    exact=o.text_ok,
                    status=o.status,
                    error=o.error,
                    deltas=o.deltas,
                )
                times = o.delta_times
                gaps = [(b - a) * 1000 for a, b in zip(times, times[1:], strict=False)]
                rec["max_gap_ms"] = round(max(gaps), 2) if gaps else None
                t_kill = reply.get("t_kill")
                if t_kill is not None and times:
                    before = [t for t in times if t <= t_kill]
                    after = [t for t in times if t > t_kill]
                    if before and after:
                        rec["gap_ms"] = round((after[0] - before[-1]) * 1000, 2)
                        rec["kill_to_next_ms"] = round((after[0] - t_kill) * 1000, 2)
                    rec["normal_gap_ms"] = round(1000 / rate, 2) if rate else None
            except Exception as e:  # noqa: BLE001 - one failed trial is a data point, not the end
                rec["error"] = errname(e)[:200]
                rec["exact"] = False
            finally:
                await c.close()
            results.append(rec)
            loadgen_log(f"crash trial {trial}: {rec}")
            with contextlib.suppress(Exception):
                await ctx.coord.call("trial_done", timeout=120)
    return {"trials": results}


# =========================================================================== coordinator side


async def run_scenario(bench: Bench) -> dict[str, Any]:
    """The coordinator side: a third orchestrator for the scenario; answers `kill_owner` and `trial_done`."""
    from shared.checkpoints import CheckpointStore

    c = bench.cfg["crash"]
    cp = CheckpointStore.connect(bench.env["TIDEWIRE_REDIS_URL"])
    bench.add_orchestrator()  # three, so two stay alive while one is dead
    replacements = 0

    async def owner_by_metrics() -> list[Any]:
        owners = []
        for svc in bench.orchestrators():
            port = svc.env.get("health_port")
            if not port:
                continue
            with contextlib.suppress(Exception):
                text = await asyncio.to_thread(
                    lambda port=port: (
                        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read().decode()
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
                    (s for s in bench.orchestrators() if owner == s.name or owner.startswith(s.name + "/")),
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
            while len(bench.orchestrators()) < 3:
                await asyncio.to_thread(bench.add_orchestrator)
                replacements += 1
            return {"ok": True}
        raise ValueError(msg["event"])

    try:
        log(f"crash: {c['trials']} trials, {c['tokens']} tokens at {c['rate']} tok/s, SIGKILL of the owner")
        res = await bench.loadgen("crash", {"base_url": bench.url, **c}, handle, timeout=1800)
    finally:
        await cp.close()
        extra = bench.orchestrators()[2:]
        for svc in extra:  # back to two for the following scenarios
            await asyncio.to_thread(svc.terminate)
    trials = res["trials"]
    killed = [t for t in trials if t.get("killed") and t.get("gap_ms") is not None]
    bench.samples["crash"] = [t["gap_ms"] for t in killed]
    gaps = summarize(t["gap_ms"] for t in killed)
    return {
        "trials": len(trials),
        "killed_trials": len(killed),
        "stream_rate_tok_s": c["rate"],
        "normal_gap_ms": round(1000 / c["rate"], 1),
        "pause_ms": gaps,
        "kill_to_next_delta_ms": summarize(t["kill_to_next_ms"] for t in killed if "kill_to_next_ms" in t),
        "max_gap_ms": summarize(t["max_gap_ms"] for t in trials if t.get("max_gap_ms") is not None),
        "exact_text_failures": sum(1 for t in trials if not t.get("exact")),
        "trial_errors": [t.get("error") for t in trials if t.get("error")][:5],
        "replacement_orchestrators": replacements,
        "owner_found_by": sorted({t.get("how", "") for t in trials}),
    }


# --------------------------------------------------------------------------- summary rows, plot


def summary_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    s = results["scenarios"]
    rows = Rows()
    cr = s.get("crash", {})
    if isinstance(cr, dict) and "pause_ms" in cr:
        note = f"{cr.get('killed_trials')}/{cr.get('trials')} trials; normal gap {cr.get('normal_gap_ms')} ms"
        rows.add(
            "Crash pause p50 (SIGKILL of the owning orchestrator; last delta → next delta)",
            dig(cr, "pause_ms", "p50"),
            "ms",
            f"≤ {TARGETS['crash_p50_ms']:g} ms",
            at_most(dig(cr, "pause_ms", "p50"), TARGETS["crash_p50_ms"]),
            note=note,
        )
        rows.add(
            "Crash pause p99",
            dig(cr, "pause_ms", "p99"),
            "ms",
            f"≤ {TARGETS['crash_p99_ms']:g} ms",
            at_most(dig(cr, "pause_ms", "p99"), TARGETS["crash_p99_ms"]),
        )
        rows.add(
            "Crash trials whose text was not exact (deltas ≠ turn_end.text)",
            cr.get("exact_text_failures"),
            "",
            "0",
            cr.get("exact_text_failures") == 0,
        )
    return rows


def plot(plt: Any, s: dict[str, Any], samples: dict[str, Any]) -> Any:
    """The pause of every trial against the targets."""
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
        return fig
    return None
