"""The load generator, run as its own process (`python -m bench.loadgen SCENARIO --params JSON`).

It never shares a process with the services it measures: `bench.run` starts one loadgen process per
scenario and talks to it over a line protocol. Every stdout line is one JSON object:

* `{"event": NAME, ...}` asks the coordinator for something (a process snapshot, SIGKILL the
  orchestrator owning a session, restart one...) and blocks until the coordinator writes one JSON
  line back on stdin;
* `{"result": {...}}` is the scenario's outcome (raw client-side samples in milliseconds included;
  `bench.run` reduces them to percentiles), `{"error": "..."}` a scenario that failed.

With `--standalone` every coordinator call returns `{}` at once, to try a scenario by hand.

Every network operation has a timeout. Times are `time.monotonic()` readings: CLOCK_MONOTONIC is
system-wide on Linux, so they compare with the coordinator's (the kill instant of the crash test).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import math
import random
import resource
import socket
import struct
import sys
import time
import traceback
import uuid
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import aiohttp

from proto import client
from shared import tokens

CONNECT_TIMEOUT_S = 10.0
SEND_TIMEOUT_S = 10.0


# --------------------------------------------------------------------------- small helpers


def raise_nofile_limit() -> int:
    """Soft RLIMIT_NOFILE up to the hard limit (thousands of sockets); returns the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1_048_576)
    if soft < target:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def percentile(sorted_values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default), `q` in 0..100."""
    if not sorted_values:
        return math.nan
    if len(sorted_values) == 1:
        return sorted_values[0]
    pos = (len(sorted_values) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def summarize(values: Iterable[float]) -> dict[str, float]:
    v = sorted(x for x in values if x is not None and math.isfinite(x))
    if not v:
        return {"n": 0}
    return {
        "n": len(v),
        "min": round(v[0], 3),
        "p50": round(percentile(v, 50), 3),
        "p90": round(percentile(v, 90), 3),
        "p99": round(percentile(v, 99), 3),
        "p99_9": round(percentile(v, 99.9), 3),
        "max": round(v[-1], 3),
        "mean": round(sum(v) / len(v), 3),
    }


async def gather_limited(factories: Iterable[Callable[[], Awaitable[Any]]], limit: int) -> list[Any]:
    """Run coroutine factories with at most `limit` in flight; exceptions are returned, not raised."""
    sem = asyncio.Semaphore(limit)

    async def one(f: Callable[[], Awaitable[Any]]) -> Any:
        async with sem:
            return await f()

    return await asyncio.gather(*(one(f) for f in factories), return_exceptions=True)


def sim_line(tokens_n: int, rate: float, ttft_ms: float = 0.0) -> str:
    return (
        f"/sim tokens={tokens_n} rate={rate:g} ttft_ms={ttft_ms:g}\nbenchmark prompt {uuid.uuid4().hex[:8]}"
    )


def new_http(limit_per_host: int = 0) -> aiohttp.ClientSession:
    connector = aiohttp.TCPConnector(
        limit=0, limit_per_host=limit_per_host, force_close=True, enable_cleanup_closed=False
    )
    return aiohttp.ClientSession(
        connector=connector, timeout=aiohttp.ClientTimeout(total=None, sock_connect=CONNECT_TIMEOUT_S)
    )


def errname(e: BaseException) -> str:
    return type(e).__name__ + (f": {e}" if str(e) else "")


# --------------------------------------------------------------------------- coordinator RPC


class Coordinator:
    """One request at a time over stdout/stdin; `standalone` answers `{}` without asking anyone."""

    def __init__(self, standalone: bool = False) -> None:
        self.standalone = standalone
        self._lock = asyncio.Lock()

    async def call(self, event: str, timeout: float = 300.0, **fields: Any) -> dict[str, Any]:
        if self.standalone:
            return {}
        async with self._lock:
            emit({"event": event, **fields})
            loop = asyncio.get_running_loop()
            async with asyncio.timeout(timeout):
                line = await loop.run_in_executor(None, sys.stdin.readline)
        if not line:
            raise RuntimeError("the coordinator closed stdin")
        reply = json.loads(line)
        if isinstance(reply, dict) and reply.get("error"):
            raise RuntimeError(f"coordinator: {reply['error']}")
        return reply if isinstance(reply, dict) else {}


def emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj, separators=(",", ":")) + "\n")
    sys.stdout.flush()


def log(msg: str) -> None:
    print(f"[loadgen {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- a minimal WS client


class Closed(ConnectionError):
    pass


class WsClient:
    """One WebSocket connection speaking PROTOCOL.md; frames are decoded with proto.client.

    Once `ready` is in, a reader task reads the socket all the time and queues the frames with their
    arrival time (`rx_t` of the last frame returned by `recv`): a client that is not reading cannot
    answer the server's heartbeat pings, and would be closed (4408) while it waits for its turn.
    """

    def __init__(self, http: aiohttp.ClientSession, base_url: str, token: str) -> None:
        self.http = http
        self.url = base_url.replace("http", "ws", 1) + f"/v1/ws?access_token={token}"
        self.ws: aiohttp.ClientWebSocketResponse | None = None
        self.ready: client.Ready | None = None
        self.reader: asyncio.Task[None] | None = None
        self.queue: asyncio.Queue[tuple[float, client.ServerFrame] | None] = asyncio.Queue()
        self.rx_t = 0.0
        self.delivery = "tokens"
        self.last_seq = 0
        self.seq_gaps = 0  # a non-delta event whose seq is not last+1 (merged deltas may skip): a loss
        self.seq_dups = 0  # an event whose seq was already seen

    @property
    def session_id(self) -> str:
        assert self.ready is not None
        return self.ready.session_id

    async def open(
        self,
        session_id: str | None = None,
        last_seen_seq: int | None = None,
        delivery: str = "tokens",
        timeout: float = CONNECT_TIMEOUT_S,
    ) -> client.Ready:
        self.delivery = delivery
        async with asyncio.timeout(timeout):
            self.ws = await self.http.ws_connect(
                self.url, autoping=True, max_msg_size=0, timeout=aiohttp.ClientWSTimeout(ws_close=3.0)
            )
            await self.send(
                {
                    "type": "hello",
                    "session_id": session_id,
                    "last_seen_seq": last_seen_seq,
                    "delivery": delivery,
                }
            )
            while True:
                frame = await self._read_one()
                if frame is None:
                    raise Closed(f"closed before ready ({self.ws.close_code})")
                if isinstance(frame, client.Ready):
                    self.ready = frame
                    self.last_seq = frame.last_seq if last_seen_seq is None or frame.reset else last_seen_seq
                    self.reader = asyncio.create_task(self._read_loop())
                    return frame
                if isinstance(frame, client.Error):
                    raise Closed(f"error before ready: {frame.code} {frame.message}")

    async def _read_one(self) -> client.ServerFrame | None:
        assert self.ws is not None
        while True:
            msg = await self.ws.receive()
            if msg.type == aiohttp.WSMsgType.TEXT:
                frame: client.ServerFrame = client.server_frame_decoder.decode(msg.data)
                return frame
            if msg.type in (
                aiohttp.WSMsgType.CLOSE,
                aiohttp.WSMsgType.CLOSED,
                aiohttp.WSMsgType.CLOSING,
                aiohttp.WSMsgType.ERROR,
            ):
                return None

    async def _read_loop(self) -> None:
        try:
            while True:
                frame = await self._read_one()
                if frame is None:
                    return
                seq = getattr(frame, "seq", None)
                if seq is not None and not isinstance(frame, client.Ack):
                    if seq <= self.last_seq:
                        self.seq_dups += 1
                    elif seq != self.last_seq + 1 and not isinstance(
                        frame, client.Delta
                    ):  # merged deltas skip
                        self.seq_gaps += 1
                    self.last_seq = max(self.last_seq, seq)
                self.queue.put_nowait((time.monotonic(), frame))
        except Exception:  # noqa: BLE001 - a broken connection ends the stream like a close
            return
        finally:
            self.queue.put_nowait(None)

    async def send(self, obj: dict[str, Any]) -> None:
        assert self.ws is not None
        async with asyncio.timeout(SEND_TIMEOUT_S):
            await self.ws.send_str(json.dumps(obj))

    async def recv(self, timeout: float = 30.0) -> client.ServerFrame | None:
        """The next frame (None once the connection is closed); TimeoutError after `timeout` s."""
        item = await asyncio.wait_for(self.queue.get(), timeout)
        if item is None:
            self.queue.put_nowait(None)  # closed stays closed for the next caller
            return None
        self.rx_t, frame = item
        return frame

    async def ping_rtt(self, timeout: float = 10.0) -> float:
        """Round trip of a protocol `ping` frame to its `pong`, in ms."""
        t0 = time.monotonic()
        await self.send({"type": "ping"})
        async with asyncio.timeout(timeout):
            while True:
                f = await self.recv(timeout)
                if f is None:
                    raise Closed("closed while waiting for pong")
                if isinstance(f, client.Pong):
                    return (self.rx_t - t0) * 1000

    @property
    def is_open(self) -> bool:
        if self.ws is None or self.ws.closed:
            return False
        return self.reader is not None and not self.reader.done()

    def abort(self) -> None:
        """Drop the connection abruptly (RST, no close frame), as a dying network would."""
        if self.ws is None:
            return
        sock = self.ws.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        with contextlib.suppress(Exception):
            self.ws._response.close()  # closes the transport: with SO_LINGER 0 that is a RST
        if self.reader is not None:
            self.reader.cancel()

    async def close(self) -> None:
        if self.ws is not None and not self.ws.closed:
            try:
                async with asyncio.timeout(5):
                    await self.ws.close()
            except Exception:  # noqa: BLE001
                self.abort()
        if self.reader is not None:
            self.reader.cancel()


class TurnOutcome:
    __slots__ = (
        "ttft_ms",
        "ack_ms",
        "total_ms",
        "deltas",
        "chars",
        "text_ok",
        "status",
        "error",
        "delta_times",
        "turn_id",
        "end_seq",
        "user_seq",
    )

    def __init__(self) -> None:
        self.ttft_ms: float | None = None
        self.ack_ms: float | None = None
        self.total_ms: float | None = None
        self.deltas = 0
        self.chars = 0
        self.text_ok = False
        self.status = ""
        self.error: str | None = None
        self.delta_times: list[float] = []
        self.turn_id = ""
        self.end_seq = 0
        self.user_seq = 0


async def run_turn(
    c: WsClient,
    text: str,
    timeout: float = 60.0,
    keep_times: bool = False,
    on_delta: Callable[[int], None] | None = None,
) -> TurnOutcome:
    """Send one message, read until its turn_end; check that the deltas rebuild turn_end.text exactly
    (offsets contiguous, nothing missing or repeated)."""
    out = TurnOutcome()
    cmid = uuid.uuid4().hex
    parts: list[str] = []
    expected_offset = 0
    offsets_ok = True
    t0 = time.monotonic()
    await c.send({"type": "send", "client_msg_id": cmid, "text": text})
    try:
        async with asyncio.timeout(timeout):
            while True:
                f = await c.recv(timeout)
                now = c.rx_t
                if f is None:
                    out.error = "connection closed"
                    return out
                if isinstance(f, client.Delta):
                    if out.ttft_ms is None:
                        out.ttft_ms = (now - t0) * 1000
                        out.turn_id = f.turn_id
                    if f.offset != expected_offset:
                        offsets_ok = False
                    expected_offset = f.offset + len(f.text)
                    parts.append(f.text)
                    out.deltas += 1
                    out.chars += len(f.text)
                    if keep_times:
                        out.delta_times.append(now)
                    if on_delta is not None:
                        on_delta(out.deltas)
                elif isinstance(f, client.Ack) and f.client_msg_id == cmid:
                    out.ack_ms = (now - t0) * 1000
                    out.user_seq = f.seq
                    out.turn_id = out.turn_id or f.turn_id
                elif isinstance(f, client.TurnEnd):
                    out.total_ms = (now - t0) * 1000
                    out.status = f.status
                    out.end_seq = f.seq
                    out.text_ok = offsets_ok and "".join(parts) == f.text and f.status == "completed"
                    if not out.text_ok:
                        out.error = (
                            f"text mismatch (status {f.status}, {len(''.join(parts))}/{len(f.text)} cp)"
                        )
                    return out
                elif isinstance(f, client.Error):
                    out.error = f"error frame {f.code}: {f.message}"
                    return out
    except TimeoutError:
        out.error = "timeout"
        return out


# --------------------------------------------------------------------------- scenarios


class Ctx:
    def __init__(self, p: dict[str, Any], coord: Coordinator) -> None:
        self.p = p
        self.coord = coord
        self.secret: str = p.get("secret", "")
        self.prefix: str = p.get("subject_prefix", "bench") + "-" + uuid.uuid4().hex[:6]
        self._n = 0

    def token(self) -> str:
        """A fresh subject per client: sessions-per-user limits never get in the way."""
        self._n += 1
        return tokens.mint(f"{self.prefix}-{self._n}", self.secret or "x", ttl_s=86_400)


async def open_clients(
    ctx: Ctx, http: aiohttp.ClientSession, base: str, n: int, delivery: str = "tokens", limit: int = 100
) -> tuple[list[WsClient], list[str]]:
    """Open n connections, each with a hello on a new session (and its reader task running)."""
    clients = [WsClient(http, base, ctx.token()) for _ in range(n)]

    async def one(c: WsClient) -> None:
        await c.open(delivery=delivery)

    res = await gather_limited([lambda c=c: one(c) for c in clients], limit)
    ok = [c for c, r in zip(clients, res, strict=True) if not isinstance(r, BaseException)]
    errors = [errname(r) for r in res if isinstance(r, BaseException)]
    return ok, errors


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
                    log(f"probe gives up: {o.error}")
                    break
            else:
                failed_in_a_row = 0
    except Exception as e:  # noqa: BLE001
        errors += 1
        log(f"probe failed: {errname(e)}")
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
        log(f"{len(clients)} idle websockets open in {out['ws_open_s']}s ({len(errors)} errors)")
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
        log(f"{len(streams)} idle SSE streams open in {out['sse_open_s']}s ({len(sse_errors)} errors)")
        await asyncio.sleep(settle)
        await ctx.coord.call("snapshot", tag=f"{tag}sse_open", cpu_window_s=float(p.get("cpu_window_s", 5)))
        if probe_turns:
            out["sse_probe"] = await probe_ttft(ctx, http, base, probe_turns)
        for resp in streams:
            resp.close()
    return out


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
            log(f"crash trial {trial}: {rec}")
            with contextlib.suppress(Exception):
                await ctx.coord.call("trial_done", timeout=120)
    return {"trials": results}


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
        log(f"storm: {len(ready)} clients on finished turns after {out['setup_s']}s")
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


async def scen_openloop(ctx: Ctx) -> dict[str, Any]:
    from bench.scenarios.openloop import scen_openloop as run

    return await run(ctx)


SCENARIOS: dict[str, Callable[[Ctx], Awaitable[dict[str, Any]]]] = {
    "ttft": scen_ttft,
    "idle": scen_idle,
    "throughput": scen_throughput,
    "crash": scen_crash,
    "storm": scen_storm,
    "openloop": scen_openloop,  # bench/scenarios/openloop.py
}


async def amain(args: argparse.Namespace) -> int:
    coord = Coordinator(standalone=args.standalone)
    params = json.loads(args.params)
    try:
        result = await SCENARIOS[args.scenario](Ctx(params, coord))
    except Exception as e:  # noqa: BLE001 - reported to the coordinator, which records it
        traceback.print_exc(file=sys.stderr)
        emit({"error": errname(e)[:500]})
        return 1
    emit({"result": result})
    return 0


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.loadgen")
    ap.add_argument("scenario", choices=sorted(SCENARIOS))
    ap.add_argument("--params", required=True, help="JSON object of scenario parameters")
    ap.add_argument("--standalone", action="store_true", help="no coordinator: every request answers {}")
    args = ap.parse_args(argv)
    raise_nofile_limit()
    if args.scenario == "openloop":  # uvloop when installed
        from bench.scenarios.openloop import run_loop

        sys.exit(run_loop(amain(args)))
    sys.exit(asyncio.run(amain(args)))


if __name__ == "__main__":
    main()
