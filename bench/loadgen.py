"""The load generator, run as its own process (`python -m bench.loadgen SCENARIO --params JSON`).

It never shares a process with the services it measures: `bench.run` starts one loadgen process per
scenario and talks to it over a line protocol. Every stdout line is one JSON object:

* `{"event": NAME, ...}` asks the coordinator for something (a process snapshot, SIGKILL the
  orchestrator owning a session, restart one...) and blocks until the coordinator writes one JSON
  line back on stdin;
* `{"result": {...}}` is the scenario's outcome (raw client-side samples in milliseconds included;
  `bench.run` reduces them to percentiles), `{"error": "..."}` a scenario that failed.

With `--standalone` every coordinator call returns `{}` at once, to try a scenario by hand.

Each scenario's own client code is `scen_<name>` in bench/scenarios/<name>.py, next to its coordinator
side; this module holds what they share (a WebSocket client speaking PROTOCOL.md, one checked turn,
the coordinator RPC, percentiles) and the entry point that dispatches to them.

Every network operation has a timeout. Times are `time.monotonic()` readings: CLOCK_MONOTONIC is
system-wide on Linux, so they compare with the coordinator's (the kill instant of the crash test).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import json
import math
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

from bench.scenarios import ORDER
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


# --------------------------------------------------------------------------- what every scenario gets


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


# --------------------------------------------------------------------------- dispatch


def scenario(name: str) -> Callable[[Ctx], Awaitable[dict[str, Any]]]:
    """`scen_<name>` of bench/scenarios/<name>.py, imported only now: those modules import this one."""
    fn: Callable[[Ctx], Awaitable[dict[str, Any]]] = getattr(
        importlib.import_module(f"bench.scenarios.{name}"), f"scen_{name}"
    )
    return fn


async def amain(args: argparse.Namespace) -> int:
    coord = Coordinator(standalone=args.standalone)
    params = json.loads(args.params)
    try:
        result = await scenario(args.scenario)(Ctx(params, coord))
    except Exception as e:  # noqa: BLE001 - reported to the coordinator, which records it
        traceback.print_exc(file=sys.stderr)
        emit({"error": errname(e)[:500]})
        return 1
    emit({"result": result})
    return 0


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.loadgen")
    ap.add_argument("scenario", choices=sorted(ORDER))
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
