"""Reconnect storm: N clients on sessions with a finished turn are dropped at once (RST), then all
resume with full-jitter backoff and their last_seen_seq; the time until every one of them has its
answer replayed, and the errors on the way.
"""

from __future__ import annotations

import asyncio
import collections
import random
import time
from typing import TYPE_CHECKING, Any

from bench.common import Rows, at_most, dig, log, r3
from bench.loadgen import (
    Closed,
    Ctx,
    TurnOutcome,
    WsClient,
    errname,
    gather_limited,
    new_http,
    open_clients,
    run_turn,
    sim_line,
    summarize,
)
from bench.loadgen import log as loadgen_log
from proto import client

if TYPE_CHECKING:
    from bench.run import Bench

FULL: dict[str, Any] = {
    "storm_n": 2000,
}
QUICK: dict[str, Any] = {
    "storm_n": 50,
}
TARGETS = {
    "storm_s": 10.0,
    "storm_n": 2000,
    "storm_errors": 0,
}


# =========================================================================== load-generator side


async def scen_storm(ctx: Ctx) -> dict[str, Any]:
    """N clients on sessions with a finished turn are dropped at once, then all resume with full-jitter
    backoff and their last_seen_seq (set before the answer, so each one gets the answer replayed)."""
    p = ctx.p
    base, n = p["base_url"], int(p["n"])
    base_s, cap_s = float(p.get("backoff_base_ms", 250)) / 1000, float(p.get("backoff_cap_ms", 30_000)) / 1000
    deadline_s = float(p.get("deadline_s", 120))
    out: dict[str, Any] = {"n": n}
    async with new_http() as http:
        t0 = time.monotonic()
        clients, open_errors = await open_clients(ctx, http, base, n)
        outcomes = await gather_limited(
            [lambda c=c: run_turn(c, sim_line(int(p.get("tokens", 20)), 0)) for c in clients],
            int(p.get("setup_concurrency", 100)),
        )
        ready: list[tuple[WsClient, TurnOutcome]] = [
            (c, o) for c, o in zip(clients, outcomes, strict=True) if isinstance(o, TurnOutcome) and o.text_ok
        ]
        out["setup_s"] = round(time.monotonic() - t0, 3)
        out["clients"] = len(ready)
        out["setup_errors"] = len(open_errors) + (len(clients) - len(ready))
        loadgen_log(f"storm: {len(ready)} clients on finished turns after {out['setup_s']}s")
        await asyncio.sleep(2.0)
        await ctx.coord.call("snapshot", tag="before")
        t_drop = time.monotonic()
        for c, _ in ready:
            c.abort()
        done_at: list[float] = []
        attempts: collections.Counter[str] = collections.Counter()
        failed = 0
        mismatches = 0
        retries = 0

        async def resume(c: WsClient, o: TurnOutcome) -> None:
            nonlocal failed, mismatches, retries
            sid = c.session_id
            token = c.url.rsplit("access_token=", 1)[1]
            attempt = 0
            while time.monotonic() - t_drop < deadline_s:
                await asyncio.sleep(random.uniform(0, min(cap_s, base_s * 2**attempt)))
                r = WsClient(http, base, token)
                try:
                    ready_frame = await r.open(session_id=sid, last_seen_seq=o.user_seq)
                    if ready_frame.reset or ready_frame.last_seq < o.end_seq:
                        raise RuntimeError(f"unexpected ready {ready_frame}")
                    expect = o.user_seq + 1
                    parts: list[str] = []
                    async with asyncio.timeout(30):
                        while expect <= ready_frame.last_seq:
                            f = await r.recv(30)
                            if f is None:
                                raise Closed("closed during replay")
                            seq = getattr(f, "seq", None)
                            if isinstance(f, client.Error):
                                raise RuntimeError(f"error frame {f.code}")
                            if seq is None:
                                continue
                            if seq != expect:
                                raise RuntimeError(f"replay gap: got seq {seq}, expected {expect}")
                            expect += 1
                            if isinstance(f, client.Delta):
                                parts.append(f.text)
                            elif isinstance(f, client.TurnEnd) and "".join(parts) != f.text:
                                mismatches += 1
                    done_at.append(time.monotonic() - t_drop)
                    await r.close()
                    return
                except Exception as e:  # noqa: BLE001 - a failed attempt: back off and retry
                    attempts[errname(e)[:80]] += 1
                    retries += 1
                    attempt += 1
                    r.abort()
            failed += 1

        await asyncio.gather(*(resume(c, o) for c, o in ready))
        out["all_resumed_s"] = round(max(done_at), 3) if done_at and not failed else None
        out["resume_s"] = done_at
        out["resumed"] = len(done_at)
        out["failed"] = failed
        out["failed_attempts"] = retries
        out["replay_mismatches"] = mismatches
        out["error_kinds"] = dict(attempts.most_common(5))
        out["errors"] = retries + failed + mismatches
        await ctx.coord.call("snapshot", tag="after")
    return out


# =========================================================================== coordinator side


async def run_scenario(bench: Bench) -> dict[str, Any]:
    """The coordinator side: one storm against tidewire, the gateway's CPU seconds from the drop on."""
    n = bench.cfg["storm_n"]
    snaps: dict[str, Any] = {}
    log(f"storm: {n} clients dropped at once, then resume with full-jitter backoff")
    res = await bench.loadgen(
        "storm",
        {
            "base_url": bench.url,
            "n": n,
            "backoff_base_ms": 250,
            "backoff_cap_ms": 30_000,
            "deadline_s": 120,
        },
        bench.snapshot_handler(snaps),
        timeout=1200,
    )
    bench.samples["storm"] = res["resume_s"]
    out = {k: v for k, v in res.items() if k != "resume_s"}
    out["resume_s"] = summarize(res["resume_s"])
    if "before" in snaps and "after" in snaps:
        out["gateway_cpu_s"] = r3(snaps["after"]["gateway"]["cpu_s"] - snaps["before"]["gateway"]["cpu_s"])
    return out


# --------------------------------------------------------------------------- summary rows, plot


def summary_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    s = results["scenarios"]
    rows = Rows()
    st = s.get("storm", {})
    if isinstance(st, dict) and "n" in st:
        n = st["n"]
        full = n >= TARGETS["storm_n"]
        rows.add(
            f"Reconnect storm: {n} clients dropped at once, all resumed (ready + replay) after",
            st.get("all_resumed_s"),
            "s",
            f"≤ {TARGETS['storm_s']:g} s for {TARGETS['storm_n']:,}",
            at_most(st.get("all_resumed_s"), TARGETS["storm_s"]) if full else None,
            note=f"p50 {dig(st, 'resume_s', 'p50')} s, p99 {dig(st, 'resume_s', 'p99')} s",
        )
        rows.add(
            "Reconnect storm: errors (failed attempts + clients never resumed + bad replays)",
            st.get("errors"),
            "",
            "0",
            st.get("errors") == 0 if full else None,
            note=", ".join(f"{k} ×{v}" for k, v in (st.get("error_kinds") or {}).items())[:160],
        )
    return rows


def plot(plt: Any, s: dict[str, Any], samples: dict[str, Any]) -> Any:
    """Clients resumed against the time since the drop."""
    times = sorted(samples.get("storm") or [])
    if times:
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(times, [(i + 1) for i in range(len(times))], color="tab:blue")
        ax.axvline(TARGETS["storm_s"], color="red", ls="--", lw=1, label="target (10 s)")
        ax.set_xlabel("seconds since all connections dropped")
        ax.set_ylabel("clients resumed (ready + replay)")
        ax.set_title(f"Reconnect storm ({s['storm']['n']:,} clients)")
        ax.legend(fontsize=7)
        return fig
    return None
