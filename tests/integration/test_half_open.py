"""A client whose network silently vanishes — its namespace's link set down, so no FIN and no RST
ever reach the gateway — is found by the heartbeat: within the heartbeat timeout the gateway closes
its socket and releases its NATS subscription, its presence and its connection slot, and a
reconnect from another address resumes exactly where the vanished client's last frame ended.

Needs root and iproute2 (network namespaces); skipped, with the reason, where they are missing.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis

from proto import client
from shared.subjects import subject_key
from tests.integration.conftest import make_token, scrape, stack_env
from tests.integration.wsclient import WsTestClient
from tests.waits import eventually, within
from tidewire import invariants
from tidewire.dev import netns
from tidewire.dev.infra import Infrastructure
from tidewire.dev.stack import Stack

WHY_NOT = netns.unavailable()
pytestmark = pytest.mark.skipif(WHY_NOT is not None, reason=f"no network namespaces: {WHY_NOT}")

HEARTBEAT_S, HEARTBEAT_TIMEOUT_S = 0.5, 1.0
# the heartbeat fires within HEARTBEAT_S + HEARTBEAT_TIMEOUT_S of the last frame, plus one tick;
# the close handshake then waits at most the gateway's close timeout for a reply that never comes
RELEASE_BOUND_S = 2 * HEARTBEAT_S + HEARTBEAT_TIMEOUT_S + 6.0
CLIENT = Path(__file__).resolve().parents[1] / "netns" / "ws_client.py"


@pytest.fixture
def network() -> Iterator[netns.Network]:
    with netns.Network() as net:
        yield net


async def _nats_subscriptions(infra: Infrastructure, session_id: str) -> int:
    monitor = infra.nats_monitor_url
    assert monitor, "the NATS monitor is needed to count subscriptions"
    subject = f"tw.session.{session_id}"
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"{monitor}/subsz?subs=1&test={subject}", timeout=aiohttp.ClientTimeout(total=5)) as r,
    ):
        subs = json.loads(await r.text())
    return sum(1 for s in subs.get("subscriptions_list", []) if s.get("subject") == subject)


async def _redis(infra: Infrastructure, call: Any) -> Any:
    r = aioredis.Redis.from_url(infra.endpoints.redis_url)
    try:
        return await call(r)
    finally:
        await r.aclose()


async def _read_frames(proc: asyncio.subprocess.Process, frames: list[dict[str, Any]]) -> None:
    assert proc.stdout is not None
    while line := await proc.stdout.readline():
        frames.append(json.loads(line))


async def test_a_client_whose_network_vanishes_is_released_and_resumes_exactly_from_elsewhere(
    infra: Infrastructure, tmp_path: Path, network: netns.Network
) -> None:
    env = stack_env(
        infra,
        TIDEWIRE_HOST="0.0.0.0",  # the gateway is reached from the namespace through the bridge
        TIDEWIRE_WS_HEARTBEAT_S=str(HEARTBEAT_S),
        TIDEWIRE_WS_HEARTBEAT_TIMEOUT_S=str(HEARTBEAT_TIMEOUT_S),
    )
    stack = Stack(infra_env=env, log_dir=tmp_path / "logs", orchestrators=1, tool_workers=0).start()
    host = network.add_host("phone")
    subject = "half-open"
    token = make_token(subject)
    frames: list[dict[str, Any]] = []
    proc = await asyncio.create_subprocess_exec(
        *host.wrap(
            [
                sys.executable,
                str(CLIENT),
                "--url",
                f"ws://{network.gateway_address}:{stack.http_port}/v1/ws",
                "--token",
                token,
                "--text",
                "/sim tokens=400 rate=40\nkeep talking while my network vanishes",
            ]
        ),
        stdout=asyncio.subprocess.PIPE,
    )
    reader = asyncio.create_task(_read_frames(proc, frames))
    try:
        await eventually(
            lambda: sum(1 for f in frames if f.get("type") == "delta"),
            timeout=30,
            ok=lambda n: n >= 10,
            what="10 deltas at the client inside the namespace",
        )
        session_id = next(f["session_id"] for f in frames if f.get("type") == "ready")
        assert await _nats_subscriptions(infra, session_id) == 1, "the gateway never subscribed"
        gw_port = stack.http_port

        host.partition()  # the link goes down: from here on nothing the client sends arrives
        vanished = time.monotonic()
        proc.kill()  # its FIN is lost on the dead link: the gateway is never told
        await within(proc.wait(), timeout=10, what="the killed client process to exit")
        await within(reader, timeout=10, what="the killed client's stdout to close")
        seen = [client.server_frame_decoder.decode(json.dumps(f)) for f in frames]
        seen_events = [e for e in seen if isinstance(e, client.EVENT_TYPES)]
        assert seen_events, "the vanished client saw no event"

        await eventually(
            lambda: asyncio.to_thread(scrape, gw_port),
            timeout=RELEASE_BOUND_S,
            interval=0.1,
            ok=lambda m: m.get("tidewire_gateway_sockets", 1) == 0,
            what="the gateway to close the vanished client's socket (tidewire_gateway_sockets 0)",
        )
        released_s = time.monotonic() - vanished
        await eventually(
            lambda: _nats_subscriptions(infra, session_id),
            timeout=5,
            ok=lambda n: n == 0,
            what="the gateway to drop the session's NATS subscription",
        )
        watchers = await _redis(infra, lambda r: r.smembers(f"tw:{{{session_id}}}:watch"))
        assert not watchers, f"presence kept after the release: {watchers}"
        slots = await _redis(infra, lambda r: r.zcard(subject_key(subject, "conns")))
        assert slots == 0, f"{slots} connection slot(s) of {subject!r} still held"
        assert released_s <= RELEASE_BOUND_S
        print(f"half-open: released {released_s:.2f} s after the link went down")

        last = seen_events[-1].seq
        async with WsTestClient(stack.url, token) as again:  # from 127.0.0.1: a new address
            ready = await again.connect(session_id, last_seen_seq=last)
            assert not ready.reset, ready
            turn_id = next(e.turn_id for e in seen_events if isinstance(e, client.TurnStart))
            end = await again.until_turn_end(turn_id, timeout=60)
        combined = seen_events + again.events
        invariants.check_seqs(combined)  # gap-free and no event twice across the switch
        assert invariants.check_turns(combined)[turn_id].text == end.text
    finally:
        if proc.returncode is None:
            proc.kill()
            await within(proc.wait(), timeout=10, what="the client process to exit")
        reader.cancel()
        stack.stop()
