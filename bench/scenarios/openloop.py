"""Open loop: N open WebSocket sessions, Poisson arrivals at fixed rates, tidewire and the floor.

The closed-loop TTFT levels of `bench.run` measure a client that waits for each answer before it
sends again, so a slow server slows its own load down and hides its queueing (coordinated omission).
Users do not wait for each other: here the arrival schedule of every level is drawn in advance
(exponential gaps at the level's rate, a fixed seed) and each message is sent at its scheduled time
on an idle session (a busy one only when every session is busy). Every latency counts from the
**intended** send time, so a send that went out late still counts from when it should have.

One load-generator process per system (the floor first, then tidewire) opens the sessions once and
runs every level on them. Per level it asks the coordinator for a process snapshot (psutil CPU times
of every component: gateway, orchestrators, tool worker, nats-server, the Postgres process tree,
redis-server, the floor, the load generator itself) just before the first scheduled send and again
once every turn has ended or the drain (`drain_s` after the level's last scheduled instant) is over.
After each level, a canary: a fresh session, one short turn, answered (turn_end) within
`canary_timeout_s` of its send or reported. When tidewire's canary fails and levels remain, the
coordinator starts a fresh stack (new infrastructure state, new processes) and the remaining levels
run on it (`restart_on_canary_failure`), so one level's damage does not pollute the next.

Both halves live here: `scen_openloop` runs inside `python -m bench.loadgen openloop` (uvloop when it
is installed, see `run_loop`), `run_scenario` inside `bench.run`; `plot`, `render_table`,
`update_docs` and `write_outputs` turn the results into `bench/results/<date>-openloop.{json,png}` and
the "Open loop (headline)" table of docs/benchmarks.md.

    python -m bench.run --only openloop [--quick] [--set 'openloop={"drain_s": 20}']
    python -m bench.scenarios.openloop --render bench/results/<date>-openloop.json   # table + plot again
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import math
import os
import random
import sys
import time
import uuid
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import aiohttp

from proto import client

REPO = Path(__file__).resolve().parent.parent.parent
DOCS = REPO / "docs" / "benchmarks.md"
BEGIN, END = "<!-- openloop:begin -->", "<!-- openloop:end -->"

FULL_CFG: dict[str, Any] = {
    "sessions": 1000,
    "rates": [25, 50, 100, 200, 300, 400],  # short answers, msg/s offered (Poisson)
    "tokens": 8,  # short answer: /sim tokens=8 rate=0 ttft_ms=0
    "realistic": {"rate": 40, "tokens": 300, "tok_rate": 60},  # one more level (null: none)
    "realistic_after": 50,  # it runs after the short level of this rate (null: after the last one)
    "duration_s": 12,
    "drain_s": 30,
    "warmup_s": 3,
    "warmup_rate": 20,
    "idle_window_s": 3,
    "settle_s": 1,
    "canary_timeout_s": 2,
    "restart_on_canary_failure": True,
    "systems": ["floor", "tidewire"],
    "open_concurrency": 100,
    "seed": 18,
}
QUICK_CFG: dict[str, Any] = {
    **FULL_CFG,
    "sessions": 50,
    "rates": [10, 30],
    "realistic": {"rate": 10, "tokens": 30, "tok_rate": 60},
    "realistic_after": None,
    "duration_s": 2,
    "drain_s": 3,
    "warmup_s": 0.5,
    "idle_window_s": 0.5,
    "settle_s": 0.2,
    "restart_on_canary_failure": False,  # a smoke test: a fresh stack would double its time
}
TARGET = {
    "rate": 300,
    "ttft_p50_plus_ms": 2.0,
    "ttft_p99_x": 3.0,
    "errors": 0,
    "unfinished": 0,
    "cpu_ms_per_turn": 3.0,
}
TIDEWIRE_COMPS = ("gateway", "orchestrators", "tool_worker", "nats", "postgres", "redis")
FLOOR_COMPS = ("baseline",)


def level_specs(cfg: dict[str, Any]) -> list[dict[str, Any]]:
    """The levels in the order they run: the short ones by rate, the realistic one after the short
    level of rate `realistic_after` (or last)."""
    specs = [
        {
            "name": f"short@{r:g}",
            "kind": "short",
            "rate": float(r),
            "tokens": int(cfg["tokens"]),
            "tok_rate": 0.0,
            "duration_s": float(cfg["duration_s"]),
        }
        for r in cfg["rates"]
    ]
    real = cfg.get("realistic")
    if real:
        spec = {
            "name": f"realistic@{real['rate']:g}",
            "kind": "realistic",
            "rate": float(real["rate"]),
            "tokens": int(real["tokens"]),
            "tok_rate": float(real["tok_rate"]),
            "duration_s": float(real.get("duration_s", cfg["duration_s"])),
        }
        after = cfg.get("realistic_after")
        pos = next(
            (i + 1 for i, s in enumerate(specs) if after is not None and s["rate"] == float(after)),
            len(specs),
        )
        specs.insert(pos, spec)
    return specs


def sim_text(tokens_n: int, tok_rate: float, i: int) -> str:
    return f"/sim tokens={tokens_n} rate={tok_rate:g} ttft_ms=0\nopen-loop prompt {i}"


def run_loop(coro: Coroutine[Any, Any, int]) -> int:
    """The load generator's event loop: uvloop when installed (less CPU per frame), else asyncio."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    os.environ["BENCH_LOADGEN_LOOP"] = f"uvloop {getattr(uvloop, '__version__', '')}".strip()
    return uvloop.run(coro)


# =========================================================================== load-generator side


class Turn:
    __slots__ = (
        "level",
        "t_int",
        "t_sent",
        "cmid",
        "turn_id",
        "ack_rx",
        "first_rx",
        "end_rx",
        "error",
        "parts",
        "offset",
        "offsets_ok",
        "ok",
        "done",
        "conn",
        "waiter",
    )

    def __init__(self, level: Level | None, t_int: float, conn: Conn) -> None:
        self.level = level
        self.t_int = t_int
        self.t_sent: float | None = None
        self.cmid = uuid.uuid4().hex
        self.turn_id = ""
        self.ack_rx: float | None = None
        self.first_rx: float | None = None
        self.end_rx: float | None = None
        self.error: str | None = None
        self.parts: list[str] | None = []
        self.offset = 0
        self.offsets_ok = True
        self.ok = False
        self.done = False
        self.conn = conn
        self.waiter: asyncio.Future[None] | None = None


class Level:
    def __init__(self, spec: dict[str, Any]) -> None:
        self.spec = spec
        self.turns: list[Turn] = []
        self.outstanding = 0
        self.max_outstanding = 0
        self.sending_done = False
        self.closed = False
        self.late_finished = 0
        self.all_done = asyncio.Event()
        self.sent_while_busy = 0
        self.no_session = 0
        self.stray_errors: collections.Counter[str] = collections.Counter()


class Conn:
    """One WebSocket session; a reader task dispatches every frame to its turn as it arrives (the
    socket is read all the time, so heartbeats are answered and nothing queues on our side)."""

    def __init__(self, pool: Pool, url: str) -> None:
        self.pool = pool
        self.url = url
        self.ws: aiohttp.ClientWebSocketResponse | None = None
        self.reader: asyncio.Task[None] | None = None
        self.by_cmid: dict[str, Turn] = {}
        self.by_tid: dict[str, Turn] = {}
        self.early: dict[str, list[tuple[float, Any]]] = {}
        self.inflight = 0
        self.alive = False
        self.in_idle = False

    async def open(self, timeout: float) -> None:
        async with asyncio.timeout(timeout):
            self.ws = await self.pool.http.ws_connect(
                self.url, autoping=True, max_msg_size=0, timeout=aiohttp.ClientWSTimeout(ws_close=3.0)
            )
            await self.ws.send_str('{"type":"hello","delivery":"tokens"}')
            while True:
                msg = await self.ws.receive()
                if msg.type != aiohttp.WSMsgType.TEXT:
                    raise ConnectionError(f"closed before ready ({self.ws.close_code})")
                f = client.server_frame_decoder.decode(msg.data)
                if isinstance(f, client.Ready):
                    break
                if isinstance(f, client.Error):
                    raise ConnectionError(f"error before ready: {f.code}")
        self.alive = True
        self.reader = asyncio.create_task(self._read_loop())

    async def _read_loop(self) -> None:
        assert self.ws is not None
        ws, decode, on = self.ws, client.server_frame_decoder.decode, self.on_frame
        text = aiohttp.WSMsgType.TEXT
        try:
            while True:
                msg = await ws.receive()
                if msg.type is text:
                    on(time.monotonic(), decode(msg.data))
                elif msg.type in (
                    aiohttp.WSMsgType.CLOSE,
                    aiohttp.WSMsgType.CLOSING,
                    aiohttp.WSMsgType.CLOSED,
                    aiohttp.WSMsgType.ERROR,
                ):
                    return
        except Exception:  # noqa: BLE001 - a broken connection ends like a close
            return
        finally:
            self.pool.conn_lost(self)

    def on_frame(self, now: float, f: Any) -> None:
        t = type(f)
        if t is client.Delta or t is client.TurnEnd:
            turn = self.by_tid.get(f.turn_id)
            if turn is None:  # before its ack / echo (or a turn we do not know): keep it for later
                self.early.setdefault(f.turn_id, []).append((now, f))
                return
            if t is client.Delta:
                if turn.first_rx is None:
                    turn.first_rx = now
                if f.offset != turn.offset:
                    turn.offsets_ok = False
                turn.offset = f.offset + len(f.text)
                if turn.parts is not None:
                    turn.parts.append(f.text)
            else:
                turn.end_rx = now
                text_ok = turn.offsets_ok and turn.parts is not None and "".join(turn.parts) == f.text
                turn.parts = None
                if f.status != "completed":
                    self.pool.finish(turn, f"turn_end {f.status}")
                elif not text_ok:
                    self.pool.finish(turn, "text mismatch")
                else:
                    self.pool.finish(turn, None)
        elif t is client.Ack:
            turn = self.by_cmid.pop(f.client_msg_id, None)
            if turn is not None:
                turn.ack_rx = now
                self._bind(turn, f.turn_id)
        elif t is client.Message:
            turn = self.by_cmid.get(f.client_msg_id)
            if turn is not None and not turn.turn_id:
                self._bind(turn, f.turn_id)
        elif t is client.Error:
            # error frames name no message: the oldest send on this connection still waiting for its ack
            for turn in self.by_cmid.values():
                self.pool.finish(turn, "degraded" if f.code == "degraded" else f"error {f.code}")
                break
            else:
                lvl = self.pool.level
                if lvl is not None:
                    lvl.stray_errors[f.code] += 1

    def _bind(self, turn: Turn, turn_id: str) -> None:
        if turn.done or turn_id in self.by_tid:
            return
        turn.turn_id = turn_id
        self.by_tid[turn_id] = turn
        for now, f in self.early.pop(turn_id, ()):
            self.on_frame(now, f)

    def abort(self) -> None:
        if self.ws is not None:
            with contextlib.suppress(Exception):
                self.ws._response.close()
        if self.reader is not None:
            self.reader.cancel()

    async def close(self) -> None:
        if self.ws is not None and not self.ws.closed:
            try:
                async with asyncio.timeout(5):
                    await self.ws.close()
            except Exception:  # noqa: BLE001
                with contextlib.suppress(Exception):
                    self.ws._response.close()
        if self.reader is not None:
            self.reader.cancel()


class Pool:
    """The open sessions of one system, and the bookkeeping of the turns sent on them."""

    def __init__(self, ctx: Any, http: aiohttp.ClientSession, base_url: str, rng: random.Random) -> None:
        self.ctx = ctx
        self.http = http
        self.base_url = base_url
        self.rng = rng
        self.conns: list[Conn] = []
        self.alive: list[Conn] = []
        self.idle: list[Conn] = []
        self.level: Level | None = None
        self.closing = False
        self.lost = 0
        self.lost_codes: collections.Counter[str] = collections.Counter()
        self.send_tasks: set[asyncio.Task[None]] = set()

    def _url(self) -> str:
        return self.base_url.replace("http", "ws", 1) + f"/v1/ws?access_token={self.ctx.token()}"

    async def open(self, n: int, concurrency: int) -> dict[str, Any]:
        from bench.loadgen import errname, gather_limited

        t0 = time.monotonic()
        conns = [Conn(self, self._url()) for _ in range(n)]
        res = await gather_limited([lambda c=c: c.open(10.0) for c in conns], concurrency)
        errors = collections.Counter(errname(r)[:80] for r in res if isinstance(r, BaseException))
        for c, r in zip(conns, res, strict=True):
            if not isinstance(r, BaseException):
                self.conns.append(c)
                self.alive.append(c)
                self.idle.append(c)
                c.in_idle = True
        return {
            "opened": len(self.conns),
            "open_s": round(time.monotonic() - t0, 3),
            "open_errors": sum(errors.values()),
            "open_error_kinds": dict(errors.most_common(3)),
        }

    async def close_all(self, abort: bool = False) -> None:
        """Close every session (`abort`: drop the TCP connections at once, for a stack that may no
        longer answer a close handshake)."""
        from bench.loadgen import gather_limited

        self.closing = True
        if abort:
            for c in self.conns:
                c.abort()
        else:
            await gather_limited([lambda c=c: c.close() for c in self.conns], 200)
        for t in list(self.send_tasks):
            t.cancel()

    def pick(self) -> tuple[Conn | None, bool]:
        """A random idle session; a random busy one when every session is busy."""
        idle, rng = self.idle, self.rng
        while idle:
            i = rng.randrange(len(idle))
            c = idle[i]
            idle[i] = idle[-1]
            idle.pop()
            c.in_idle = False
            if c.alive and c.inflight == 0:
                return c, False
        return (rng.choice(self.alive), True) if self.alive else (None, False)

    def start_turn(self, conn: Conn, level: Level | None, t_int: float, text: str) -> Turn:
        turn = Turn(level, t_int, conn)
        conn.inflight += 1
        conn.by_cmid[turn.cmid] = turn
        if level is not None:
            level.turns.append(turn)
            level.outstanding += 1
            if level.outstanding > level.max_outstanding:
                level.max_outstanding = level.outstanding
        data = json.dumps({"type": "send", "client_msg_id": turn.cmid, "text": text})
        task = asyncio.create_task(self._send(conn, turn, data))
        self.send_tasks.add(task)
        task.add_done_callback(self.send_tasks.discard)
        return turn

    async def _send(self, conn: Conn, turn: Turn, data: str) -> None:
        turn.t_sent = time.monotonic()
        try:
            assert conn.ws is not None
            async with asyncio.timeout(10):
                await conn.ws.send_str(data)
        except Exception as e:  # noqa: BLE001
            self.finish(turn, f"send failed: {type(e).__name__}")

    def finish(self, turn: Turn, error: str | None) -> None:
        if turn.done:
            return
        turn.done = True
        turn.error = error
        turn.ok = error is None
        conn = turn.conn
        conn.by_cmid.pop(turn.cmid, None)
        if turn.turn_id and conn.by_tid.get(turn.turn_id) is turn:
            del conn.by_tid[turn.turn_id]
        conn.inflight -= 1
        if conn.inflight == 0 and conn.alive and not conn.in_idle:
            conn.in_idle = True
            self.idle.append(conn)
        lvl = turn.level
        if lvl is not None:
            lvl.outstanding -= 1
            if lvl.closed:
                lvl.late_finished += 1
            elif lvl.outstanding == 0 and lvl.sending_done:
                lvl.all_done.set()
        if turn.waiter is not None and not turn.waiter.done():
            turn.waiter.set_result(None)

    def conn_lost(self, conn: Conn) -> None:
        if not conn.alive:
            return
        conn.alive = False
        with contextlib.suppress(ValueError):
            self.alive.remove(conn)
        if self.closing:
            return
        self.lost += 1
        code = conn.ws.close_code if conn.ws is not None else None
        self.lost_codes[str(code)] += 1
        for turn in {*conn.by_cmid.values(), *conn.by_tid.values()}:
            self.finish(turn, f"connection closed ({code})")

    async def run_level(self, spec: dict[str, Any], idx: int, drain_s: float, seed: int) -> dict[str, Any]:
        """Send on the fixed schedule, then wait for every turn to end (at most `drain_s` after the
        level's last scheduled instant); the raw per-turn figures in ms from the intended send time."""
        rate, duration, tokens_n, tok_rate = (
            spec["rate"],
            spec["duration_s"],
            spec["tokens"],
            spec["tok_rate"],
        )
        rng = random.Random(seed * 1000 + idx)
        offsets: list[float] = []
        t = rng.expovariate(rate)
        while t < duration:
            offsets.append(t)
            t += rng.expovariate(rate)
        lvl = Level(spec)
        self.level = lvl
        cpu0 = time.process_time()
        start = time.monotonic() + 0.05
        end = start + duration
        sleep, mono = asyncio.sleep, time.monotonic
        for i, off in enumerate(offsets):
            t_int = start + off
            d = t_int - mono()
            if d > 0:
                await sleep(d)
            conn, busy = self.pick()
            if conn is None:
                lvl.no_session += 1
                continue
            if busy:
                lvl.sent_while_busy += 1
            self.start_turn(conn, lvl, t_int, sim_text(tokens_n, tok_rate, i))
        lvl.sending_done = True
        if lvl.outstanding == 0:
            lvl.all_done.set()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(lvl.all_done.wait(), max(0.0, end + drain_s - mono()))
        drain_end = mono()
        lvl.closed = True
        cpu1 = time.process_time()

        def ms(a: float | None, b: float | None) -> float | None:
            return None if a is None or b is None else round((a - b) * 1000, 3)

        # latencies count from the intended send time, or from the actual send when that was earlier
        # (uvloop's millisecond timers can wake a fraction of a millisecond early)
        origin = {id(t): max(t.t_int, t.t_sent) if t.t_sent is not None else t.t_int for t in lvl.turns}

        turns = lvl.turns
        errors = collections.Counter(t.error for t in turns if t.done and t.error)
        unfinished = [t for t in turns if not t.done]
        missing_ttft = [t for t in unfinished if t.first_rx is None]
        missing_ack = [t for t in unfinished if t.ack_rx is None]
        return {
            **spec,
            "scheduled": len(offsets),
            "sent": sum(1 for t in turns if t.t_sent is not None),
            "sent_in_window": sum(1 for t in turns if t.t_sent is not None and t.t_sent <= end),
            "sent_while_busy": lvl.sent_while_busy,
            "no_session": lvl.no_session,
            "completed": sum(1 for t in turns if t.ok),
            "completed_in_window": sum(1 for t in turns if t.ok and t.end_rx is not None and t.end_rx <= end),
            # answered: first delta inside the level's window and turn_end completed (by the drain's end)
            "answered_in_window": sum(
                1 for t in turns if t.ok and t.first_rx is not None and t.first_rx <= end
            ),
            "errors_by_code": dict(errors.most_common()),
            "errors": sum(errors.values()) + lvl.no_session,
            "degraded": errors.get("degraded", 0),
            "unfinished": len(unfinished),
            "stray_error_frames": dict(lvl.stray_errors),
            "ttft_ms": [v for t in turns if (v := ms(t.first_rx, origin[id(t)])) is not None],
            "ttft_from_send_ms": [v for t in turns if (v := ms(t.first_rx, t.t_sent)) is not None],
            "ttft_missing": len(missing_ttft),
            "ttft_missing_lower_bound_ms": min((drain_end - t.t_int) * 1000 for t in missing_ttft)
            if missing_ttft
            else None,
            "ack_ms": [v for t in turns if (v := ms(t.ack_rx, origin[id(t)])) is not None],
            "ack_missing": len(missing_ack),
            "ack_missing_lower_bound_ms": min((drain_end - t.t_int) * 1000 for t in missing_ack)
            if missing_ack
            else None,
            "turn_ms": [v for t in turns if t.ok and (v := ms(t.end_rx, origin[id(t)])) is not None],
            "lateness_ms": [v for t in turns if (v := ms(t.t_sent, t.t_int)) is not None],
            "max_in_flight": lvl.max_outstanding,
            "drain_used_s": round(max(0.0, drain_end - end), 3),
            "wall_s": round(drain_end - start, 3),
            "loadgen_process_cpu_s": round(cpu1 - cpu0, 3),
            "sessions_alive": sum(1 for c in self.conns if c.alive),
        }


async def canary(ctx: Any, http: aiohttp.ClientSession, base_url: str, timeout_s: float) -> dict[str, Any]:
    """A fresh session, one short turn: answered (turn_end, exact) within `timeout_s` of its send?
    Waits up to 3 s longer to say how late it was."""
    from bench.loadgen import errname

    pool = Pool(ctx, http, base_url, random.Random(0))
    c = Conn(pool, pool._url())
    out: dict[str, Any] = {"timeout_s": timeout_s}
    t0 = time.monotonic()
    try:
        await c.open(5.0)
        out["open_ms"] = round((time.monotonic() - t0) * 1000, 2)
        pool.conns.append(c)
        turn = pool.start_turn(c, None, time.monotonic(), sim_text(8, 0, 0))
        turn.waiter = asyncio.get_running_loop().create_future()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(turn.waiter), timeout_s + 3)
        if turn.end_rx is not None and turn.t_sent is not None:
            out["answer_ms"] = round((turn.end_rx - turn.t_sent) * 1000, 2)
        if turn.first_rx is not None and turn.t_sent is not None:
            out["ttft_ms"] = round((turn.first_rx - turn.t_sent) * 1000, 2)
        out["ok"] = bool(
            turn.ok and out.get("answer_ms") is not None and out["answer_ms"] <= timeout_s * 1000
        )
        if not out["ok"]:
            out["error"] = turn.error or (
                "answered late" if turn.ok else f"no turn_end within {timeout_s + 3:g} s"
            )
    except Exception as e:  # noqa: BLE001
        out.update(ok=False, error=f"open failed: {errname(e)}"[:200])
    finally:
        pool.closing = True
        await c.close()
    return out


def _loopback_only(url: str) -> None:
    """This load generator offers hundreds of messages a second: it only ever targets this machine."""
    from urllib.parse import urlsplit

    host = urlsplit(url).hostname
    if host not in ("127.0.0.1", "localhost", "::1"):
        raise ValueError(f"the open-loop load generator only targets 127.0.0.1, not {host!r}")


async def scen_openloop(ctx: Any) -> dict[str, Any]:
    """The load-generator side: one system (`system`: floor or tidewire), every level in order."""
    from bench.loadgen import log, new_http

    p = ctx.p
    system, base = p["system"], p["base_url"]
    _loopback_only(base)
    n, seed, drain = int(p["sessions"]), int(p.get("seed", 18)), float(p["drain_s"])
    specs = p["levels"]
    out: dict[str, Any] = {
        "system": system,
        "sessions": n,
        "loop": os.environ.get("BENCH_LOADGEN_LOOP", "asyncio"),
        "levels": [],
        "restarts": 0,
    }
    async with new_http() as http:
        pool = Pool(ctx, http, base, random.Random(seed))
        out["open"] = await pool.open(n, int(p.get("open_concurrency", 100)))
        log(f"openloop {system}: {out['open']}")
        if not pool.conns:
            raise RuntimeError(f"no session opened: {out['open']}")
        if float(p.get("warmup_s", 0)) > 0:
            w = await pool.run_level(
                {
                    "name": "warmup",
                    "kind": "warmup",
                    "rate": float(p["warmup_rate"]),
                    "tokens": int(p["tokens"]),
                    "tok_rate": 0.0,
                    "duration_s": float(p["warmup_s"]),
                },
                999,
                10.0,
                seed,
            )
            out["warmup"] = {
                k: w[k] for k in ("scheduled", "completed", "errors", "unfinished", "errors_by_code")
            }
        if float(p.get("idle_window_s", 0)) > 0:
            await asyncio.sleep(float(p.get("settle_s", 1)))
            await ctx.coord.call("snapshot", tag="idle:start")
            await asyncio.sleep(float(p["idle_window_s"]))
            await ctx.coord.call("snapshot", tag="idle:end")
        for i, spec in enumerate(specs):
            await asyncio.sleep(float(p.get("settle_s", 1)))
            await ctx.coord.call("snapshot", tag=f"L{i}:start")
            res = await pool.run_level(spec, i, drain, seed)
            await ctx.coord.call("snapshot", tag=f"L{i}:end")
            res["canary"] = await canary(ctx, http, base, float(p.get("canary_timeout_s", 2)))
            res["sessions_lost_so_far"] = pool.lost
            log(
                f"openloop {system} {spec['name']}: sent {res['sent']}/{res['scheduled']}, completed "
                f"{res['completed']}, errors {res['errors']}, unfinished {res['unfinished']}, "
                f"canary {res['canary']}"
            )
            if (
                not res["canary"]["ok"]
                and system == "tidewire"
                and p.get("restart_on_canary_failure", True)
                and i < len(specs) - 1
            ):
                log("openloop: the canary failed, asking for a fresh stack")
                await pool.close_all(abort=True)
                reply = await ctx.coord.call("fresh_stack", timeout=300)
                base = reply.get("base_url", base)
                _loopback_only(base)
                out["restarts"] += 1
                res["stack_restarted_after"] = True
                pool = Pool(ctx, http, base, random.Random(seed + i))
                res["reopen"] = await pool.open(n, int(p.get("open_concurrency", 100)))
            out["levels"].append(res)
        out["lost_close_codes"] = dict(pool.lost_codes)
        await pool.close_all(abort=bool(out["levels"]) and not out["levels"][-1]["canary"]["ok"])
    return out


# =========================================================================== coordinator side


def _censored(values: list[float], missing: int, bound: float | None) -> dict[str, Any]:
    """Percentiles of `values` plus `missing` samples known only to exceed `bound` (turns still without
    a first delta at the end of the drain): a percentile that falls among those is reported as
    null with `<q>_gt` = bound."""
    from bench.loadgen import summarize

    out: dict[str, Any] = summarize(values)
    out["n"] = len(values)
    out["missing"] = missing
    if not missing:
        return out
    v = sorted(values)
    total = len(v) + missing
    for label, q in (("p50", 50.0), ("p90", 90.0), ("p99", 99.0), ("p99_9", 99.9)):
        pos = (total - 1) * q / 100.0
        if math.ceil(pos) >= len(v):
            out[label] = None
            out[f"{label}_gt"] = round(bound, 1) if bound is not None else None
        else:
            out[label] = round(_rank(v, pos), 3)
    out.pop("max", None)
    out.pop("mean", None)
    return out


def _rank(v: list[float], pos: float) -> float:
    lo = math.floor(pos)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


def _cpu(snaps: dict[str, Any], a: str, b: str, comps: tuple[str, ...]) -> dict[str, float] | None:
    if a not in snaps or b not in snaps:
        return None
    return {
        c: round(snaps[b][c]["cpu_s"] - snaps[a][c]["cpu_s"], 3)
        for c in (*comps, "loadgen")
        if c in snaps[a] and c in snaps[b]
    }


def _busy(snaps: dict[str, Any], a: str, b: str) -> float | None:
    if a not in snaps or b not in snaps:
        return None
    (i0, t0), (i1, t1) = snaps[a]["_machine"], snaps[b]["_machine"]
    return round(100 * (1 - (i1 - i0) / (t1 - t0)), 1) if t1 > t0 else None


def summarize_level(
    raw: dict[str, Any], snaps: dict[str, Any], i: int, comps: tuple[str, ...]
) -> dict[str, Any]:
    from bench.loadgen import summarize

    dur = raw["duration_s"]
    s: dict[str, Any] = {
        k: raw[k]
        for k in (
            "scheduled",
            "sent",
            "sent_in_window",
            "sent_while_busy",
            "no_session",
            "completed",
            "completed_in_window",
            "answered_in_window",
            "sessions_lost_so_far",
            "errors",
            "errors_by_code",
            "degraded",
            "unfinished",
            "stray_error_frames",
            "max_in_flight",
            "drain_used_s",
            "wall_s",
            "sessions_alive",
            "canary",
        )
        if k in raw
    }
    s["offered_rate"] = raw["rate"]
    s["scheduled_rate"] = round(raw["scheduled"] / dur, 2)
    s["sent_rate"] = round(raw["sent_in_window"] / dur, 2)
    s["achieved_rate"] = round(raw.get("answered_in_window", raw["completed_in_window"]) / dur, 2)
    s["ttft_ms"] = _censored(raw["ttft_ms"], raw["ttft_missing"], raw["ttft_missing_lower_bound_ms"])
    s["ack_ms"] = _censored(raw["ack_ms"], raw["ack_missing"], raw["ack_missing_lower_bound_ms"])
    s["ttft_from_send_ms"] = summarize(raw["ttft_from_send_ms"])
    s["turn_ms"] = summarize(raw["turn_ms"])
    s["lateness_ms"] = summarize(raw["lateness_ms"])
    if raw.get("stack_restarted_after"):
        s["stack_restarted_after"] = True
        s["reopen"] = raw.get("reopen")
    cpu = _cpu(snaps, f"L{i}:start", f"L{i}:end", comps)
    if cpu is not None:
        s["cpu_s"] = cpu
        done = raw["completed"]
        per = {c: (round(1000 * v / done, 3) if done else None) for c, v in cpu.items()}
        total = sum(cpu[c] for c in comps if c in cpu)
        per["total"] = round(1000 * total / done, 3) if done else None
        s["cpu_ms_per_turn"] = per
        wall = raw["wall_s"]
        s["loadgen_cpu_pct_of_core"] = round(100 * cpu.get("loadgen", 0) / wall, 1) if wall > 0 else None
        s["services_cpu_cores"] = round(total / wall, 2) if wall > 0 else None
    s["loadgen_self_cpu_s"] = raw["loadgen_process_cpu_s"]
    s["machine_busy_pct"] = _busy(snaps, f"L{i}:start", f"L{i}:end")
    return s


def evaluate(levels: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The issue's targets at 300 msg/s (short answers), as ratios to the floor of the same run."""
    lvl = next((lv for lv in levels if lv["kind"] == "short" and lv["offered_rate"] == TARGET["rate"]), None)
    if lvl is None or "tidewire" not in lvl or "floor" not in lvl:
        return []
    tw, fl = lvl["tidewire"], lvl["floor"]
    rows: list[dict[str, Any]] = []

    def add(metric: str, target: str, value: Any, floor: Any, met: bool | None, note: str = "") -> None:
        rows.append(
            {"metric": metric, "target": target, "value": value, "floor": floor, "met": met, "note": note}
        )

    t50, f50 = tw["ttft_ms"].get("p50"), fl["ttft_ms"].get("p50")
    add(
        "TTFT p50 (from the intended send time)",
        f"≤ floor p50 + {TARGET['ttft_p50_plus_ms']:g} ms",
        t50 if t50 is not None else _gt(tw["ttft_ms"], "p50"),
        f50,
        None if f50 is None else (t50 is not None and t50 <= f50 + TARGET["ttft_p50_plus_ms"]),
        f"tidewire − floor = {t50 - f50:.2f} ms" if t50 is not None and f50 is not None else "",
    )
    t99, f99 = tw["ttft_ms"].get("p99"), fl["ttft_ms"].get("p99")
    add(
        "TTFT p99 (from the intended send time)",
        f"≤ {TARGET['ttft_p99_x']:g}× floor p99",
        t99 if t99 is not None else _gt(tw["ttft_ms"], "p99"),
        f99,
        None if f99 is None else (t99 is not None and t99 <= TARGET["ttft_p99_x"] * f99),
        f"{t99 / f99:.1f}× floor" if t99 is not None and f99 else "",
    )
    add(
        "Errors (error frames incl. degraded, failed turns, inexact texts, lost connections)",
        "0",
        tw["errors"],
        fl["errors"],
        tw["errors"] == 0,
        ", ".join(f"{k} ×{v}" for k, v in list(tw["errors_by_code"].items())[:4]),
    )
    add(
        "Turns unfinished at the end of the drain",
        "0",
        tw["unfinished"],
        fl["unfinished"],
        tw["unfinished"] == 0,
        f"drain {lvl.get('drain_s')} s after the level",
    )
    cpu = (tw.get("cpu_ms_per_turn") or {}).get("total")
    add(
        "CPU per short turn, every tidewire process (gateway, orchestrators, tool worker, NATS, Postgres "
        "tree, Redis)",
        f"≤ {TARGET['cpu_ms_per_turn']:g} ms",
        cpu,
        (fl.get("cpu_ms_per_turn") or {}).get("total"),
        None if cpu is None else cpu <= TARGET["cpu_ms_per_turn"],
        "raw: the idle burn of the open sessions is included"
        + (
            f" (without it, estimated: {_f((tw.get('cpu_ms_per_turn') or {}).get('total_minus_idle'))} ms)"
            if (tw.get("cpu_ms_per_turn") or {}).get("total_minus_idle") is not None
            else ""
        ),
    )
    return rows


def _gt(stats: dict[str, Any], q: str) -> str | None:
    b = stats.get(f"{q}_gt")
    return f"> {b:,.0f}" if b is not None else None


async def run_scenario(bench: Any) -> dict[str, Any]:
    """The coordinator side, called by `bench.run` (scenario `openloop`)."""
    import psutil

    cfg = bench.cfg["openloop"]
    specs = level_specs(cfg)
    per_system: dict[str, Any] = {}
    restarts: list[dict[str, Any]] = []
    for system in cfg["systems"]:
        snaps: dict[str, Any] = {}
        comps = FLOOR_COMPS if system == "floor" else TIDEWIRE_COMPS

        async def handle(
            msg: dict[str, Any], loadgen_pid: int, snaps: dict[str, Any] = snaps, system: str = system
        ) -> dict[str, Any]:
            if msg["event"] == "snapshot":
                snap = bench.snapshot({"loadgen": loadgen_pid})
                ct = psutil.cpu_times()
                snap["_machine"] = (ct.idle + getattr(ct, "iowait", 0.0), sum(ct))
                snaps[msg.get("tag", "")] = snap
                return {"ok": True}
            if msg["event"] == "fresh_stack":
                t0 = time.monotonic()
                for svc in list(bench.stack.services):  # a stack being thrown away: no graceful drain
                    with contextlib.suppress(Exception):
                        await asyncio.to_thread(svc.kill)
                await asyncio.to_thread(bench.stop)
                await asyncio.to_thread(bench.start)
                restarts.append({"system": system, "took_s": round(time.monotonic() - t0, 1)})
                return {"ok": True, "base_url": bench.url if system == "tidewire" else bench.baseline_url}
            raise ValueError(f"unexpected event {msg['event']}")

        url = bench.baseline_url if system == "floor" else bench.url
        budget = sum(s["duration_s"] + cfg["drain_s"] + 10 + cfg["settle_s"] for s in specs) + 600
        _log(
            f"openloop: {cfg['sessions']} sessions against {system}, levels "
            + ", ".join(s["name"] for s in specs)
        )
        raw = await bench.loadgen(
            "openloop", {"base_url": url, "system": system, **cfg, "levels": specs}, handle, timeout=budget
        )
        idle = _cpu(snaps, "idle:start", "idle:end", comps)
        win = float(cfg.get("idle_window_s") or 0)
        idle_ms_s = {c: round(1000 * v / win, 1) for c, v in idle.items()} if idle and win else None
        rows = [summarize_level(r, snaps, i, comps) for i, r in enumerate(raw["levels"])]
        if idle_ms_s:  # the same figure without the idle burn of the open sessions (an estimate)
            burn = sum(v for c, v in idle_ms_s.items() if c in comps)
            for r in rows:
                per = r.get("cpu_ms_per_turn") or {}
                if per.get("total") is not None and r.get("completed"):
                    per["total_minus_idle"] = round(per["total"] - burn * r["wall_s"] / r["completed"], 3)
        per_system[system] = {
            "open": raw.get("open"),
            "warmup": raw.get("warmup"),
            "loop": raw.get("loop"),
            "restarts": raw.get("restarts"),
            "lost_close_codes": raw.get("lost_close_codes"),
            "idle_cpu_ms_per_s": idle_ms_s,
            "levels": rows,
        }
        bench.samples[f"openloop/{system}"] = {r["name"]: r["ttft_ms"] for r in raw["levels"]}
    levels: list[dict[str, Any]] = []
    for i, spec in enumerate(specs):
        row: dict[str, Any] = {
            "name": spec["name"],
            "kind": spec["kind"],
            "offered_rate": spec["rate"],
            "tokens": spec["tokens"],
            "tok_rate": spec["tok_rate"],
            "duration_s": spec["duration_s"],
            "drain_s": cfg["drain_s"],
        }
        for system, res in per_system.items():
            if i < len(res["levels"]):
                row[system] = res["levels"][i]
        if "tidewire" in row and "floor" in row:
            tw, fl = row["tidewire"]["ttft_ms"], row["floor"]["ttft_ms"]
            for q in ("p50", "p99", "p99_9"):
                a, b = tw.get(q), fl.get(q)
                row[f"ttft_ratio_{q}"] = round(a / b, 2) if a is not None and b else None
            row["ttft_p50_minus_floor_ms"] = (
                round(tw["p50"] - fl["p50"], 3)
                if tw.get("p50") is not None and fl.get("p50") is not None
                else None
            )
        levels.append(row)
    return {
        "model": f"simulated: short = /sim tokens={cfg['tokens']} rate=0 ttft_ms=0; realistic = "
        + (
            f"/sim tokens={cfg['realistic']['tokens']} rate={cfg['realistic']['tok_rate']:g}"
            if cfg.get("realistic")
            else "none"
        ),
        "method": "open loop: Poisson arrivals drawn in advance per level, each sent at its scheduled time on a "
        "random idle session (a busy one only when none is idle); latencies from the intended send "
        "time; CPU from psutil snapshots just before the level and after its drain",
        "config": cfg,
        "systems": {k: {kk: vv for kk, vv in v.items() if kk != "levels"} for k, v in per_system.items()},
        "levels": levels,
        "targets": evaluate(levels),
        "stack_restarts": restarts,
        "loadgen_check": loadgen_check(levels),
    }


def loadgen_check(levels: list[dict[str, Any]]) -> dict[str, Any]:
    """Was the load generator the bottleneck? Its own CPU and how late it sent, at the heaviest level."""
    out: dict[str, Any] = {}
    for system in ("floor", "tidewire"):
        rows = [lv for lv in levels if system in lv and lv["kind"] == "short"]
        if not rows:
            continue
        top = max(rows, key=lambda lv: lv["offered_rate"])
        s = top[system]
        late = s["lateness_ms"]
        out[system] = {
            "level": top["name"],
            "loadgen_cpu_pct_of_core": s.get("loadgen_cpu_pct_of_core"),
            "loadgen_cpu_ms_per_turn": (s.get("cpu_ms_per_turn") or {}).get("loadgen"),
            "send_lateness_p50_ms": late.get("p50"),
            "send_lateness_p99_ms": late.get("p99"),
            "send_lateness_max_ms": late.get("max"),
            "sent_rate": s.get("sent_rate"),
            "scheduled_rate": s.get("scheduled_rate"),
        }
        out[system]["ok"] = bool((s.get("loadgen_cpu_pct_of_core") or 0) < 80 and (late.get("p99") or 0) < 5)
        busiest = max(
            (lv for lv in levels if system in lv),
            key=lambda lv: lv[system].get("loadgen_cpu_pct_of_core") or 0,
        )
        out[system]["busiest_level"] = busiest["name"]
        out[system]["busiest_loadgen_cpu_pct_of_core"] = busiest[system].get("loadgen_cpu_pct_of_core")
    return out


def _log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- table, plot, docs


def _f(v: Any) -> str:
    if v is None:
        return "—"
    if isinstance(v, str):
        return v
    if isinstance(v, int):
        return f"{v:,}"
    a = abs(v)
    return f"{v:,.0f}" if a >= 100 else f"{v:.1f}" if a >= 10 else f"{v:.2f}"


def _q(stats: dict[str, Any] | None, q: str) -> str:
    if not stats:
        return "—"
    if stats.get(q) is None and stats.get(f"{q}_gt") is not None:
        return f"> {stats[f'{q}_gt'] / 1000:,.0f} s"
    return _f(stats.get(q))


def _pair(row: dict[str, Any], fn: Any) -> str:
    tw = fn(row["tidewire"]) if "tidewire" in row else "—"
    fl = fn(row["floor"]) if "floor" in row else "—"
    return f"{tw} / {fl}"


def _canary(s: dict[str, Any] | None) -> str:
    c = (s or {}).get("canary") or {}
    if not c:
        return "—"
    if c.get("ok"):
        return f"✅ {_f(c.get('answer_ms'))} ms"
    txt = f"❌ {c.get('error', '')}"
    if c.get("answer_ms") is not None:
        txt += f" ({_f(c['answer_ms'])} ms)"
    if (s or {}).get("stack_restarted_after"):
        txt += "; fresh stack"
    return txt


def render_table(ol: dict[str, Any], meta: dict[str, Any], json_rel: str | None, png_rel: str | None) -> str:
    cfg = ol["config"]
    mc = meta.get("machine", {})
    lines = [
        f"Last run: **{meta.get('date')}** ({meta.get('mode')} mode), commit `{mc.get('git_commit')}`, "
        f"{mc.get('cpu_model')}, {mc.get('logical_cores')} logical cores shared by everything. "
        f"{cfg['sessions']:,} open WebSocket sessions per system; each level {cfg['duration_s']:g} s of Poisson "
        f"arrivals, then at most {cfg['drain_s']:g} s of drain. {ol['model']}. Cells are **tidewire / floor**; "
        "latencies in ms from the intended send time.",
        "",
        "| Level | Offered msg/s | Achieved msg/s | TTFT p50 | TTFT p99 | TTFT p99.9 | Ack p50 | Ack p99 | Errors "
        "| Degraded | Unfinished | CPU ms/turn: gateway | orch. | tool w. | NATS | Postgres | Redis | **Σ tidewire** "
        "| floor | load gen. | Load gen. % core | Canary (tidewire) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in ol["levels"]:
        tw = row.get("tidewire") or {}
        cpu = tw.get("cpu_ms_per_turn") or {}
        fcpu = (row.get("floor") or {}).get("cpu_ms_per_turn") or {}
        label = (
            row["name"]
            if row["kind"] == "short"
            else (f"{row['name']} ({row['tokens']} tok at {row['tok_rate']:g}/s)")
        )
        lines.append(
            f"| {label} | {_f(row['offered_rate'])} | {_pair(row, lambda s: _f(s.get('achieved_rate')))} "
            f"| {_pair(row, lambda s: _q(s.get('ttft_ms'), 'p50'))} | {_pair(row, lambda s: _q(s.get('ttft_ms'), 'p99'))} "
            f"| {_pair(row, lambda s: _q(s.get('ttft_ms'), 'p99_9'))} | {_pair(row, lambda s: _q(s.get('ack_ms'), 'p50'))} "
            f"| {_pair(row, lambda s: _q(s.get('ack_ms'), 'p99'))} | {_pair(row, lambda s: _f(s.get('errors')))} "
            f"| {_pair(row, lambda s: _f(s.get('degraded')))} | {_pair(row, lambda s: _f(s.get('unfinished')))} "
            f"| {_f(cpu.get('gateway'))} | {_f(cpu.get('orchestrators'))} | {_f(cpu.get('tool_worker'))} "
            f"| {_f(cpu.get('nats'))} | {_f(cpu.get('postgres'))} | {_f(cpu.get('redis'))} | **{_f(cpu.get('total'))}** "
            f"| {_f(fcpu.get('total'))} | {_pair(row, lambda s: _f((s.get('cpu_ms_per_turn') or {}).get('loadgen')))} "
            f"| {_pair(row, lambda s: _f(s.get('loadgen_cpu_pct_of_core')))} | {_canary(tw)} |"
        )
    notes: list[str] = []
    for row in ol["levels"]:
        for system in ("tidewire", "floor"):
            s = row.get(system)
            if s and s.get("errors_by_code"):
                notes.append(
                    f"{row['name']} {system}: "
                    + ", ".join(f"`{k}` ×{v}" for k, v in s["errors_by_code"].items())
                )
    if ol.get("targets"):
        lines += [
            "",
            f"Targets of issue 18 at {TARGET['rate']} msg/s (short answers), against the floor of this run:",
            "",
            "| Metric | Target | tidewire | floor | Met? | Notes |",
            "|---|---|---|---|---|---|",
        ]
        for r in ol["targets"]:
            met = {True: "✅ met", False: "❌ not met", None: ""}[r["met"]]
            unit = " ms" if r["metric"].startswith(("TTFT", "CPU")) else ""
            lines.append(
                f"| {r['metric']} | {r['target']} | {_f(r['value'])}{unit if r['value'] is not None else ''} "
                f"| {_f(r['floor'])}{unit if r['floor'] is not None else ''} | {met} | {r['note']} |"
            )
    lg = ol.get("loadgen_check") or {}
    if lg:
        parts = [
            f"{system} at {v['level']}: {_f(v['loadgen_cpu_pct_of_core'])} % of a core, "
            f"{_f(v['loadgen_cpu_ms_per_turn'])} ms CPU per turn, scheduled {_f(v['scheduled_rate'])} msg/s and "
            f"sent {_f(v['sent_rate'])} msg/s, send lateness p50 {_f(v['send_lateness_p50_ms'])} / p99 "
            f"{_f(v['send_lateness_p99_ms'])} / max {_f(v['send_lateness_max_ms'])} ms"
            f" ({'kept its schedule' if v['ok'] else 'CHECK: it fell behind its schedule or used > 80 % of a core'})"
            f"; its busiest level against {system}: {v.get('busiest_level')}, "
            f"{_f(v.get('busiest_loadgen_cpu_pct_of_core'))} % of a core"
            for system, v in lg.items()
        ]
        lines += [
            "",
            "Load generator (one process, " + str(_sys_get(ol, "loop")) + "): " + "; ".join(parts) + ".",
        ]
    idle = {
        k: v.get("idle_cpu_ms_per_s")
        for k, v in (ol.get("systems") or {}).items()
        if v.get("idle_cpu_ms_per_s")
    }
    if idle.get("tidewire"):
        tot = sum(v for k, v in idle["tidewire"].items() if k in TIDEWIRE_COMPS)
        lines += [
            "",
            f"Idle burn with the {cfg['sessions']:,} sessions open and no traffic (included in the CPU "
            f"per turn above): tidewire {tot:,.0f} ms/s ("
            + ", ".join(f"{k} {v:,.0f}" for k, v in idle["tidewire"].items() if k in TIDEWIRE_COMPS)
            + "), floor "
            + _f((idle.get("floor") or {}).get("baseline"))
            + " ms/s.",
        ]
    busy = [f"{row['name']} {_pair(row, lambda s: _f(s.get('machine_busy_pct')))}" for row in ol["levels"]]
    lines += [
        "",
        "Machine-wide CPU busy % during each level (every process on the box, tidewire / floor): "
        + ", ".join(busy)
        + ".",
    ]
    if notes:
        lines += ["", "Errors by code: " + "; ".join(notes) + "."]
    for r in ol.get("stack_restarts") or []:
        lines += ["", f"A fresh stack was started after a failed canary ({r['took_s']} s)."]
        break
    if json_rel:
        lines += ["", f"Raw results: [`{json_rel}`]({json_rel})."]
    if png_rel:
        lines += ["", f"![open-loop latency–throughput]({png_rel})"]
    return "\n".join(lines)


def _sys_get(ol: dict[str, Any], key: str) -> Any:
    for v in (ol.get("systems") or {}).values():
        if v.get(key):
            return v[key]
    return None


def plot(ol: dict[str, Any] | None, out_dir: Path, stem: str) -> list[Path]:
    """TTFT p50 and p99 against the achieved rate, tidewire and the floor; CPU per turn beside it."""
    if not isinstance(ol, dict) or not ol.get("levels"):
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4.6), gridspec_kw={"width_ratios": [3, 2]})
    short = [lv for lv in ol["levels"] if lv["kind"] == "short"]
    real = [lv for lv in ol["levels"] if lv["kind"] == "realistic"]
    top = 1.0
    for system, color in (("tidewire", "tab:blue"), ("floor", "tab:gray")):
        for q, ls, mk in (("p50", "-", "o"), ("p99", "--", "s")):
            xs, ys, cx = [], [], []
            for lv in short:
                s = lv.get(system)
                if not s:
                    continue
                v = s["ttft_ms"].get(q)
                if v is None and s["ttft_ms"].get(f"{q}_gt") is not None:
                    cx.append((s["achieved_rate"], s["ttft_ms"][f"{q}_gt"]))
                elif v is not None:
                    xs.append(s["achieved_rate"])
                    ys.append(max(v, 0.01))
                    top = max(top, v)
            ax.plot(xs, ys, ls, marker=mk, color=color, label=f"{system} TTFT {q}")
            for x, y in cx:
                ax.plot([x], [y], "^", color=color, ms=9)
                ax.annotate(
                    f"> {y / 1000:.0f} s",
                    (x, y),
                    fontsize=7,
                    color=color,
                    xytext=(3, 3),
                    textcoords="offset points",
                )
            for lv in short:
                s = lv.get(system)
                if s and system == "tidewire" and q == "p50":
                    ax.annotate(
                        f"{lv['offered_rate']:g}",
                        (
                            s["achieved_rate"],
                            max(s["ttft_ms"].get("p50") or s["ttft_ms"].get("p50_gt") or 0.01, 0.01),
                        ),
                        fontsize=7,
                        color="tab:blue",
                        xytext=(-4, -11),
                        textcoords="offset points",
                    )
        for lv in real:
            s = lv.get(system)
            if s and s["ttft_ms"].get("p50") is not None:
                ax.plot(
                    [s["achieved_rate"]],
                    [max(s["ttft_ms"]["p50"], 0.01)],
                    "*",
                    color=color,
                    ms=12,
                    label=f"{system} p50, realistic ({lv['tokens']} tok at {lv['tok_rate']:g}/s)",
                )
    ax.set_yscale("log")
    ax.set_xlabel(
        "achieved rate (turns answered per second: first delta inside the level's window, completed)"
    )
    ax.set_ylabel("TTFT from the intended send time (ms)")
    ax.set_title(
        f"Open loop, {ol['config']['sessions']:,} sessions: latency vs throughput "
        "(labels: offered msg/s; ▲ = censored)"
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    names = [lv["name"] for lv in ol["levels"]]
    comps = [c for c in TIDEWIRE_COMPS]
    bottoms = [0.0] * len(names)
    for c in comps:
        vals = [((lv.get("tidewire") or {}).get("cpu_ms_per_turn") or {}).get(c) or 0 for lv in ol["levels"]]
        ax2.bar(range(len(names)), vals, 0.4, bottom=bottoms, label=c)
        bottoms = [b + v for b, v in zip(bottoms, vals, strict=True)]
    fvals = [((lv.get("floor") or {}).get("cpu_ms_per_turn") or {}).get("total") or 0 for lv in ol["levels"]]
    ax2.bar([i + 0.42 for i in range(len(names))], fvals, 0.4, color="tab:gray", label="floor")
    ax2.axhline(TARGET["cpu_ms_per_turn"], color="red", ls="--", lw=1, label="target 3 ms (short)")
    ax2.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=7)
    for i, b in enumerate(bottoms):
        if b:
            ax2.annotate(f"{b:.1f}", (i, b), ha="center", va="bottom", fontsize=7)
    ax2.set_ylabel("CPU ms per completed turn (all processes)")
    ax2.set_title("CPU per turn (idle burn included)")
    ax2.legend(fontsize=6)
    fig.tight_layout()
    path = out_dir / f"{stem}-openloop.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


def update_docs(path: Path, table: str) -> None:
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    if BEGIN not in text or END not in text:
        text = text.rstrip() + f"\n\n## Open loop (headline)\n\n{BEGIN}\n{END}\n"
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    path.write_text(f"{head}{BEGIN}\n{table}\n{END}{tail}")


def write_outputs(
    results: dict[str, Any], out_dir: Path, stem: str, *, quick: bool, docs: Path | None, plots: list[Path]
) -> Path | None:
    """After a run that included `openloop`: `<date>-openloop.json` (not in quick mode: the quick JSON
    already holds it) and the docs section (when `docs` is given)."""
    ol = results.get("scenarios", {}).get("openloop")
    if not isinstance(ol, dict) or "levels" not in ol:
        return None
    json_path = None
    if not quick:
        json_path = out_dir / f"{stem}-openloop.json"
        doc = {"meta": results.get("meta", {}), "targets": TARGET, "openloop": ol}
        json_path.write_text(json.dumps(doc, indent=2, ensure_ascii=False, default=lambda o: None) + "\n")
    png = next((p for p in plots if p.name.endswith("-openloop.png")), None)
    if docs is not None:
        rel = lambda p: os.path.relpath(p, docs.parent) if p else None  # noqa: E731
        update_docs(docs, render_table(ol, results.get("meta", {}), rel(json_path), rel(png)))
        _log(f"updated the open-loop section of {docs}")
    return json_path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.scenarios.openloop")
    ap.add_argument(
        "--render",
        required=True,
        metavar="JSON",
        help="a <date>-openloop.json: redraw its plot and rewrite the docs section from it",
    )
    ap.add_argument("--docs", help=f"markdown file (default {DOCS})")
    ap.add_argument("--no-docs", action="store_true")
    args = ap.parse_args(argv)
    path = Path(args.render).resolve()
    doc = json.loads(path.read_text())
    ol = doc["openloop"]
    ol["targets"] = evaluate(ol["levels"])
    ol["loadgen_check"] = loadgen_check(ol["levels"])
    stem = path.name.removesuffix("-openloop.json")
    plots = plot(ol, path.parent, stem)
    path.write_text(json.dumps(doc, indent=2, ensure_ascii=False, default=lambda o: None) + "\n")
    if not args.no_docs:
        docs = Path(args.docs).resolve() if args.docs else DOCS
        rel = lambda p: os.path.relpath(p, docs.parent)  # noqa: E731
        update_docs(docs, render_table(ol, doc.get("meta", {}), rel(path), rel(plots[0]) if plots else None))
        print(f"rewrote {docs}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
