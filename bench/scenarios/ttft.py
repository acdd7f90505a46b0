"""TTFT overhead: closed-loop sessions against tidewire and the floor, time from send to first delta.

Each level is N sessions, each sending, waiting for its turn_end and sending again; the model answers
at once (ttft_ms=0, rate=0), so what is measured is the pipeline's own cost. Beside the client figure:
the gateway's `tidewire_ttft_seconds` histogram between the load generator's two `mark` events, an
estimate (client figure minus a protocol ping round trip) and the orchestrators' turn_analytics rows
of the measured window.
"""

from __future__ import annotations

import asyncio
import collections
import datetime as dt
import math
import random
import time
import urllib.request
from typing import TYPE_CHECKING, Any

from bench.common import Rows, at_most, log, r3, ratio
from bench.loadgen import (
    Ctx,
    WsClient,
    errname,
    gather_limited,
    new_http,
    open_clients,
    run_turn,
    sim_line,
    summarize,
)
from shared import promtext

if TYPE_CHECKING:
    from bench.run import Bench

FULL: dict[str, Any] = {
    "ttft_levels": [(1, 1000), (100, 10), (500, 4)],  # (concurrent sessions, measured turns each)
    "ttft_tokens": 8,
}
QUICK: dict[str, Any] = {
    "ttft_levels": [(1, 30), (20, 3)],
    "ttft_tokens": 8,
}
TARGETS = {
    "ttft_p50_ms": 1.5,
    "ttft_p99_ms": 5.0,
}


# =========================================================================== load-generator side


async def scen_ttft(ctx: Ctx) -> dict[str, Any]:
    """N sessions, each in a closed loop: send, time to the first delta, wait for turn_end, again."""
    p = ctx.p
    base, n, turns = p["base_url"], int(p["sessions"]), int(p["turns"])
    text_tokens, rate = int(p.get("tokens", 8)), float(p.get("rate", 0))
    turn_timeout = float(p.get("turn_timeout", 30))
    async with new_http() as http:
        clients, open_errors = await open_clients(ctx, http, base, n)
        if not clients:
            raise RuntimeError(f"no connection opened: {open_errors[:3]}")
        # warm-up: one unmeasured turn per session (first-use costs: subscriptions, pools, caches)
        await gather_limited(
            [lambda c=c: run_turn(c, sim_line(text_tokens, rate), timeout=turn_timeout) for c in clients], 100
        )
        await ctx.coord.call("mark", tag="start")
        ttft: list[float] = []
        ack: list[float] = []
        total: list[float] = []
        rtt: list[float] = []
        errors: collections.Counter[str] = collections.Counter()
        mismatches = 0

        async def loop(c: WsClient) -> None:
            nonlocal mismatches
            await asyncio.sleep(random.uniform(0, 0.05))
            for _ in range(turns):
                try:
                    rtt.append(await c.ping_rtt())
                    o = await run_turn(c, sim_line(text_tokens, rate), timeout=turn_timeout)
                except Exception as e:  # noqa: BLE001
                    errors[errname(e)[:80]] += 1
                    return
                if o.ttft_ms is not None:
                    ttft.append(o.ttft_ms)
                if o.ack_ms is not None:
                    ack.append(o.ack_ms)
                if o.total_ms is not None:
                    total.append(o.total_ms)
                if o.error:
                    errors[o.error[:80]] += 1
                    if o.error.startswith("text mismatch"):
                        mismatches += 1
                    if o.error in ("connection closed", "timeout"):
                        return

        t0 = time.monotonic()
        await asyncio.gather(*(loop(c) for c in clients))
        wall = time.monotonic() - t0
        await ctx.coord.call("mark", tag="end")
        await gather_limited([lambda c=c: c.close() for c in clients], 200)
    return {
        "sessions": len(clients),
        "turns": len(ttft),
        "wall_s": round(wall, 3),
        "ttft_ms": ttft,
        "seq_gaps": sum(c.seq_gaps for c in clients),
        "seq_dups": sum(c.seq_dups for c in clients),
        "ack_ms": ack,
        "turn_ms": total,
        "ping_rtt_ms": rtt,
        "errors": sum(errors.values()) + len(open_errors),
        "error_kinds": dict(errors.most_common(5)),
        "open_errors": open_errors[:5],
        "text_mismatches": mismatches,
    }


# =========================================================================== coordinator side


async def run_scenario(bench: Bench) -> dict[str, Any]:
    """The coordinator side: every level against tidewire, then the floor; tidewire's server-side figures."""
    levels = []
    for sessions, turns in bench.cfg["ttft_levels"]:
        row: dict[str, Any] = {"sessions": sessions, "turns_each": turns}
        for who, url in (("tidewire", bench.url), ("baseline", bench.baseline_url)):
            log(f"ttft: {sessions} sessions x {turns} turns against {who}")
            marks: dict[str, Any] = {}

            async def mark(
                msg: dict[str, Any], _: int, who: str = who, marks: dict[str, Any] = marks
            ) -> dict[str, Any]:
                marks[msg.get("tag", "")] = {
                    "wall": dt.datetime.now(dt.UTC),
                    "hist": await asyncio.to_thread(
                        scrape_histogram, bench.url + "/metrics", "tidewire_ttft_seconds"
                    )
                    if who == "tidewire"
                    else None,
                }
                return {"ok": True}

            res = await bench.loadgen(
                "ttft",
                {
                    "base_url": url,
                    "sessions": sessions,
                    "turns": turns,
                    "tokens": bench.cfg["ttft_tokens"],
                    "rate": 0,
                },
                mark,
            )
            if who == "tidewire" and "start" in marks and "end" in marks:
                row["server_side_ttft_ms"] = hist_summary(marks["start"]["hist"], marks["end"]["hist"])
                row["_window"] = (marks["start"]["wall"], marks["end"]["wall"])
            bench.samples[f"ttft/{who}/{sessions}"] = res["ttft_ms"]
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
        f"{bench.cfg['ttft_tokens']} tokens per answer; closed loop per session",
        "measure": "client send -> first delta (upper bound of the server-side figure)",
    }
    await asyncio.sleep(2)  # analytics are written asynchronously
    for row in levels:
        window = row.pop("_window", None)
        row["orchestrator_analytics_ttft_ms"] = (
            await analytics_ttft(bench, *window) if window else "no measurement window"
        )
    return out


async def analytics_ttft(bench: Bench, start: dt.datetime, end: dt.datetime) -> dict[str, Any] | str:
    """The orchestrators' own TTFT (gateway receipt of send -> first model token), if this build
    records turn analytics; only the turns recorded within the measured window."""
    try:
        import asyncpg

        conn = await asyncpg.connect(bench.env["TIDEWIRE_POSTGRES_DSN"], timeout=5)
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


# --------------------------------------------------------------------------- summary rows, plot


def summary_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    s = results["scenarios"]
    rows = Rows()
    ttft = s.get("ttft", {})
    for lvl in ttft.get("levels", []) if isinstance(ttft, dict) else []:
        n = lvl["sessions"]
        tw, bl = lvl["tidewire"]["ttft_ms"], lvl["baseline"]["ttft_ms"]
        for q, label, tgt in (
            ("p50", "p50", TARGETS["ttft_p50_ms"]),
            ("p99", "p99", TARGETS["ttft_p99_ms"]),
            ("p99_9", "p99.9", None),
        ):
            rows.add(
                f"TTFT overhead {label}, {n} active session{'s' if n > 1 else ''} (client send → first delta)",
                tw.get(q),
                "ms",
                f"≤ {tgt:g} ms" if tgt else "",
                at_most(tw.get(q), tgt) if tgt else None,
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
                rows.add(
                    f"TTFT server-side {label}, {n} session{'s' if n > 1 else ''} (gateway: receipt of send → "
                    "first delta written; histogram)",
                    hist.get(q),
                    "ms",
                    f"≤ {tgt:g} ms",
                    at_most(hist.get(q), tgt),
                    note=f"mean {hist.get('mean')} ms, n={hist.get('n')}" if q == "p50" else "",
                )
        else:
            rows.add(
                f"TTFT server-side estimate p50, {n} session{'s' if n > 1 else ''} (client figure − ping RTT)",
                lvl.get("server_side_est_p50_ms"),
                "ms",
                f"≤ {TARGETS['ttft_p50_ms']:g} ms",
                at_most(lvl.get("server_side_est_p50_ms"), TARGETS["ttft_p50_ms"]),
            )
    return rows


def plot(plt: Any, s: dict[str, Any], samples: dict[str, Any]) -> Any:
    """p50/p99 per level against the targets; the distribution of every level beside it."""
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
    return fig
