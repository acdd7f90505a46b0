"""Idle connections: what N open, silent WebSockets (then N SSE streams on the same sessions) cost
one gateway, against N idle WebSockets on the floor.

RSS and fds per connection are process-level deltas between two snapshots divided by the number the
gateway itself counts as held; each phase starts on a fresh gateway process so it does not reuse
memory the previous phase freed. One active probe session next to the idle ones shows their effect
on TTFT.
"""

from __future__ import annotations

import asyncio
import collections
import math
import time
from typing import TYPE_CHECKING, Any

import aiohttp

from bench.common import Rows, at_most, dig, log, r3, ratio
from bench.loadgen import (
    CONNECT_TIMEOUT_S,
    Closed,
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
from bench.loadgen import log as loadgen_log

if TYPE_CHECKING:
    from bench.run import Bench

FULL: dict[str, Any] = {
    "idle_n": 10_000,
    "idle_probe_turns": 50,
    "idle_cpu_window_s": 5,
    "idle_settle_s": 2,
}
QUICK: dict[str, Any] = {
    "idle_n": 200,
    "idle_probe_turns": 10,
    "idle_cpu_window_s": 1,
    "idle_settle_s": 0.5,
}
TARGETS = {
    "idle_ws_kib": 16.0,
    "idle_ws_fds": 1.0,
    "idle_sse_kib": 14.0,
}


# =========================================================================== load-generator side


async def probe_ttft(
    ctx: Ctx, http: aiohttp.ClientSession, base: str, turns: int, text_tokens: int = 8
) -> dict[str, Any]:
    """One active session next to whatever else is open: its send->first-delta times."""
    c = WsClient(http, base, ctx.token())
    samples: list[float] = []
    errors = 0
    failed_in_a_row = 0
    try:
        await c.open()
        await run_turn(c, sim_line(text_tokens, 0), timeout=15)
        for _ in range(turns):
            o = await run_turn(c, sim_line(text_tokens, 0), timeout=15)
            if o.ttft_ms is not None:
                samples.append(o.ttft_ms)
            if o.error:
                errors += 1
                failed_in_a_row += 1
                if failed_in_a_row >= 3 or o.error in ("connection closed", "timeout"):
                    loadgen_log(f"probe gives up: {o.error}")
                    break
            else:
                failed_in_a_row = 0
    except Exception as e:  # noqa: BLE001
        errors += 1
        loadgen_log(f"probe failed: {errname(e)}")
    finally:
        await c.close()
    return {"ttft_ms": samples, "errors": errors, "turns": turns}


async def open_sse(http: aiohttp.ClientSession, base: str, sid: str, token: str) -> aiohttp.ClientResponse:
    url = f"{base}/v1/sessions/{sid}/events?after=0&access_token={token}"
    async with asyncio.timeout(CONNECT_TIMEOUT_S):
        resp = await http.get(url, timeout=aiohttp.ClientTimeout(total=None, sock_connect=CONNECT_TIMEOUT_S))
        try:
            if resp.status != 200:
                raise Closed(f"SSE status {resp.status}")
            while True:
                record = await resp.content.readuntil(b"\n\n")
                if not record:
                    raise Closed("SSE stream ended before ready")
                if b"event: ready" in record:
                    return resp
        except BaseException:
            resp.close()
            raise


async def scen_idle(ctx: Ctx) -> dict[str, Any]:
    """N idle WebSockets (then N idle SSE streams on the same sessions) held open on one server."""
    p = ctx.p
    base, n = p["base_url"], int(p["n"])
    sse = bool(p.get("sse", True))
    probe_turns = int(p.get("probe_turns", 50))
    tag = p.get("tag", "")
    limit = int(p.get("open_concurrency", 100))
    settle = float(p.get("settle_s", 2.0))
    out: dict[str, Any] = {"n": n}
    async with new_http() as http:
        warm, _ = await open_clients(ctx, http, base, min(20, n), limit=20)
        await gather_limited([lambda c=c: c.close() for c in warm], 20)
        await asyncio.sleep(settle / 2)
        await ctx.coord.call("snapshot", tag=f"{tag}before")
        t0 = time.monotonic()
        clients, errors = await open_clients(ctx, http, base, n, limit=limit)
        out["ws_open_s"] = round(time.monotonic() - t0, 3)
        out["ws_opened"] = len(clients)
        out["ws_open_errors"] = len(errors)
        out["ws_open_error_kinds"] = dict(collections.Counter(e[:80] for e in errors).most_common(3))
        loadgen_log(f"{len(clients)} idle websockets open in {out['ws_open_s']}s ({len(errors)} errors)")
        await asyncio.sleep(settle)
        out["ws_open_at_snapshot"] = sum(1 for c in clients if c.is_open)
        await ctx.coord.call("snapshot", tag=f"{tag}ws_open", cpu_window_s=float(p.get("cpu_window_s", 5)))
        if probe_turns:
            out["ws_probe"] = await probe_ttft(ctx, http, base, probe_turns)
        out["ws_still_open"] = sum(1 for c in clients if c.is_open)
        out["ws_closed_by_server"] = dict(
            collections.Counter(
                str(c.ws.close_code if c.ws is not None else None) for c in clients if not c.is_open
            ).most_common(5)
        )
        sessions = [(c.session_id, c) for c in clients]
        await gather_limited([lambda c=c: c.close() for c in clients], 500)
        if not sse:
            return out
        await asyncio.sleep(settle)
        await ctx.coord.call("snapshot", tag=f"{tag}ws_closed")
        # a fresh gateway process, so the SSE figure does not reuse memory the WebSockets left behind
        await ctx.coord.call("fresh_gateway", timeout=120)
        # SSE: the same sessions, each with the token of its owner
        tokens_by_sid = {sid: c.url.rsplit("access_token=", 1)[1] for sid, c in sessions}
        warm = await gather_limited(
            [lambda sid=sid: open_sse(http, base, sid, tokens_by_sid[sid]) for sid, _ in sessions[:20]], 20
        )
        for w in warm:
            if isinstance(w, aiohttp.ClientResponse):
                w.close()
        await asyncio.sleep(settle / 2)
        await ctx.coord.call("snapshot", tag=f"{tag}sse_before")
        t0 = time.monotonic()
        res = await gather_limited(
            [lambda sid=sid: open_sse(http, base, sid, tokens_by_sid[sid]) for sid, _ in sessions], limit
        )
        streams = [r for r in res if isinstance(r, aiohttp.ClientResponse)]
        sse_errors = [errname(r) for r in res if isinstance(r, BaseException)]
        out["sse_open_s"] = round(time.monotonic() - t0, 3)
        out["sse_opened"] = len(streams)
        out["sse_open_errors"] = len(sse_errors)
        out["sse_open_error_kinds"] = dict(collections.Counter(e[:80] for e in sse_errors).most_common(3))
        loadgen_log(
            f"{len(streams)} idle SSE streams open in {out['sse_open_s']}s ({len(sse_errors)} errors)"
        )
        await asyncio.sleep(settle)
        await ctx.coord.call("snapshot", tag=f"{tag}sse_open", cpu_window_s=float(p.get("cpu_window_s", 5)))
        if probe_turns:
            out["sse_probe"] = await probe_ttft(ctx, http, base, probe_turns)
        for resp in streams:
            resp.close()
    return out


# =========================================================================== coordinator side


async def run_scenario(bench: Bench) -> dict[str, Any]:
    """The coordinator side: WebSockets then SSE streams on a fresh gateway, then WebSockets on the floor."""
    n = bench.cfg["idle_n"]
    await asyncio.to_thread(bench.restart_gateway)
    snaps: dict[str, Any] = {}
    log(f"idle: {n} websockets then {n} SSE streams on one gateway")
    res = await bench.loadgen(
        "idle",
        {
            "base_url": bench.url,
            "n": n,
            "sse": True,
            "probe_turns": bench.cfg["idle_probe_turns"],
            "cpu_window_s": bench.cfg["idle_cpu_window_s"],
            "settle_s": bench.cfg["idle_settle_s"],
            "open_concurrency": 100,
        },
        bench.snapshot_handler(snaps),
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
    out["ws_kib_per_conn"], out["ws_fds_per_conn"] = per_conn("ws_open", "before", out["ws_held_by_gateway"])
    out["ws_gateway_rss_mib"] = r3(snaps.get("ws_open", {}).get("gateway", {}).get("rss", math.nan) / 2**20)
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
    bres = await bench.loadgen(
        "idle",
        {
            "base_url": bench.baseline_url,
            "n": n,
            "sse": False,
            "probe_turns": bench.cfg["idle_probe_turns"],
            "cpu_window_s": bench.cfg["idle_cpu_window_s"],
            "settle_s": bench.cfg["idle_settle_s"],
        },
        bench.snapshot_handler(bsnaps),
        timeout=900,
    )
    if "ws_open" in bsnaps and bres.get("ws_opened"):
        a, b = bsnaps["ws_open"]["baseline"], bsnaps["before"]["baseline"]
        out["baseline_ws_kib_per_conn"] = r3((a["rss"] - b["rss"]) / bres["ws_opened"] / 1024)
        out["baseline_ws_fds_per_conn"] = r3((a["fds"] - b["fds"]) / bres["ws_opened"])
        out["baseline_ws_idle_cpu_pct"] = r3(bsnaps.get("ws_open:cpu", {}).get("baseline", {}).get("cpu_pct"))
    if "ws_probe" in bres:
        out["baseline_ws_probe_ttft_ms"] = summarize(bres["ws_probe"]["ttft_ms"])
    out["ratio_ws_kib"] = ratio(out.get("ws_kib_per_conn"), out.get("baseline_ws_kib_per_conn"))
    return out


# --------------------------------------------------------------------------- summary rows, plot


def summary_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    s = results["scenarios"]
    rows = Rows()
    idle = s.get("idle", {})
    if isinstance(idle, dict) and "n" in idle:
        n = idle["n"]
        rows.add(
            f"Idle WebSocket: gateway RSS per connection ({n} open)",
            idle.get("ws_kib_per_conn"),
            "KiB",
            f"≤ {TARGETS['idle_ws_kib']:g} KiB",
            at_most(idle.get("ws_kib_per_conn"), TARGETS["idle_ws_kib"]),
            idle.get("baseline_ws_kib_per_conn"),
            f"{idle.get('ws_opened')} opened, {idle.get('ws_open_errors')} errors, {idle.get('ws_held_by_gateway')} "
            f"held by the gateway at the snapshot",
        )
        rows.add(
            "Idle WebSocket: file descriptors per connection",
            idle.get("ws_fds_per_conn"),
            "fd",
            "1",
            at_most(idle.get("ws_fds_per_conn"), 1.05),
            idle.get("baseline_ws_fds_per_conn"),
        )
        rows.add(
            f"Idle SSE stream: gateway RSS per stream ({n} open)",
            idle.get("sse_kib_per_conn"),
            "KiB",
            f"≤ {TARGETS['idle_sse_kib']:g} KiB",
            at_most(idle.get("sse_kib_per_conn"), TARGETS["idle_sse_kib"]),
            None,
            f"{idle.get('sse_opened')} opened, {idle.get('sse_open_errors')} errors, "
            f"{idle.get('sse_held_by_gateway')} held by the gateway at the snapshot",
        )
        rows.add(
            "Idle SSE stream: file descriptors per stream",
            idle.get("sse_fds_per_conn"),
            "fd",
            "1",
            at_most(idle.get("sse_fds_per_conn"), 1.05),
        )
        win = dig(results, "meta", "config", "idle_cpu_window_s")
        rows.add(
            f"Gateway CPU with {n} idle WebSockets ({win} s window)",
            dig(idle, "ws_idle_cpu_pct", "gateway"),
            "%",
            floor=idle.get("baseline_ws_idle_cpu_pct"),
        )
        rows.add(
            f"Gateway CPU with {n} idle SSE streams ({win} s window)",
            dig(idle, "sse_idle_cpu_pct", "gateway"),
            "%",
        )
        rows.add(
            f"TTFT p50 of an active session next to {n} idle WebSockets",
            dig(idle, "ws_probe_ttft_ms", "p50"),
            "ms",
            floor=dig(idle, "baseline_ws_probe_ttft_ms", "p50"),
            note=f"{dig(idle, 'ws_probe_ttft_ms', 'n')} turns, {idle.get('ws_probe_errors')} errors",
        )
        rows.add(
            f"TTFT p99 of an active session next to {n} idle WebSockets",
            dig(idle, "ws_probe_ttft_ms", "p99"),
            "ms",
            floor=dig(idle, "baseline_ws_probe_ttft_ms", "p99"),
        )
    return rows


def plot(plt: Any, s: dict[str, Any], samples: dict[str, Any]) -> Any:
    """Gateway RSS per idle connection, WebSocket and SSE, next to the floor's."""
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
    return fig
