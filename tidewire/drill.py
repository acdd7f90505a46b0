"""The chaos drill: a load client with invariant checks, run while something kills pods.

`DrillClient` drives one session: it sends turns, reconnects with full-jitter backoff and its
`last_seen_seq`, resends an unacknowledged message with the same `client_msg_id`, and records every
event it receives. `check` then holds it to the guarantees (tidewire.invariants) and compares each
turn with the durable history (`GET /v1/sessions/{sid}`). The local chaos test kills processes;
`python -m tidewire.drill --kubectl-context CTX` deletes pods of each component at random.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field

import aiohttp

from proto import client
from tidewire import invariants


@dataclass
class DrillClient:
    url: str
    token: str
    turns: int = 3
    text: str = "/sim tokens=100 rate=40\nchaos drill turn {turn}"
    session_id: str | None = None
    events: list[client.Event] = field(default_factory=list)
    acks: list[client.Ack] = field(default_factory=list)
    reconnects: int = 0
    _ack: client.Ack | None = None

    async def run(self) -> None:
        async with aiohttp.ClientSession() as http:
            for turn in range(self.turns):
                await self._turn(http, self.text.format(turn=turn), uuid.uuid4().hex)

    async def _turn(self, http: aiohttp.ClientSession, text: str, cmid: str) -> None:
        self._ack = None  # survives reconnects: once acked, a message is never sent again
        attempt = 0
        while True:
            try:
                await self._connection(http, text, cmid)
                return
            except (ConnectionError, TimeoutError, aiohttp.ClientError):
                self.reconnects += 1
                attempt += 1
                await asyncio.sleep(random.uniform(0, min(2.0, 0.1 * 2**attempt)))

    def _ended(self, turn_id: str) -> bool:
        return any(isinstance(e, client.TurnEnd) and e.turn_id == turn_id for e in self.events)

    async def _connection(self, http: aiohttp.ClientSession, text: str, cmid: str) -> None:
        url = self.url.replace("http", "ws", 1) + f"/v1/ws?access_token={self.token}"
        async with http.ws_connect(url, timeout=aiohttp.ClientWSTimeout(ws_close=5)) as ws:
            last = self.events[-1].seq if self.events else None
            await ws.send_str(
                json.dumps({"type": "hello", "session_id": self.session_id, "last_seen_seq": last})
            )
            if self._ack is None:
                await ws.send_str(json.dumps({"type": "send", "client_msg_id": cmid, "text": text}))
            async with asyncio.timeout(90):
                async for msg in ws:
                    if msg.type != aiohttp.WSMsgType.TEXT:
                        break
                    frame = client.server_frame_decoder.decode(msg.data)
                    if isinstance(frame, client.Ready):
                        self.session_id = frame.session_id
                    elif isinstance(frame, client.Ack) and frame.client_msg_id == cmid and self._ack is None:
                        self._ack = frame
                        self.acks.append(frame)
                        if self._ended(frame.turn_id):  # replayed before the (duplicate) ack arrived
                            return
                    elif isinstance(frame, client.Error) and self._ack is None:
                        raise ConnectionError(f"send refused: {frame.code}")
                    elif isinstance(frame, client.EVENT_TYPES):
                        self.events.append(frame)  # type: ignore[arg-type]
                        if (
                            self._ack is not None
                            and isinstance(frame, client.TurnEnd)
                            and frame.turn_id == self._ack.turn_id
                        ):
                            return
        raise ConnectionError("connection closed mid-turn")


async def check(c: DrillClient, http: aiohttp.ClientSession) -> None:
    """Every acked message durable with its seq; every turn completed once, with exact text that equals
    the durable history; seqs strictly increasing and gap-free."""
    if len(c.acks) != c.turns:
        raise invariants.InvariantError(f"{len(c.acks)} of {c.turns} messages acknowledged")
    invariants.check_seqs(c.events)
    turns = invariants.check_turns(c.events)
    async with http.get(
        f"{c.url}/v1/sessions/{c.session_id}", headers={"Authorization": f"Bearer {c.token}"}
    ) as r:
        body = await r.json()
    by_turn = {(m["role"], m["turn_id"]): m for m in body["messages"]}
    for ack in c.acks:
        user = by_turn.get(("user", ack.turn_id))
        if user is None or user["seq"] != ack.seq:
            raise invariants.InvariantError(
                f"acknowledged message {ack.client_msg_id} is not durable at {ack.seq}"
            )
        view = turns[ack.turn_id]
        stored = by_turn.get(("assistant", ack.turn_id))
        if not view.ends or view.ends[0].status != "completed":
            raise invariants.InvariantError(f"turn {ack.turn_id} did not complete")
        if stored is None or stored["text"] != view.text:
            raise invariants.InvariantError(
                f"turn {ack.turn_id}: client text differs from the durable history"
            )


def _kubectl(ctx: str, ns: str, *args: str) -> str:
    return subprocess.run(
        ["kubectl", "--context", ctx, "-n", ns, *args], check=True, capture_output=True, text=True, timeout=30
    ).stdout


async def _delete_pods(ctx: str, ns: str, every_s: float, stop: asyncio.Event) -> int:
    """Deletes a random pod of a random component every `every_s` seconds (force, no grace)."""
    deleted = 0
    while not stop.is_set():
        await asyncio.sleep(every_s)
        component = random.choice(["gateway", "orchestrator", "tool-workers"])
        pods = (
            await asyncio.to_thread(
                _kubectl,
                ctx,
                ns,
                "get",
                "pods",
                "-l",
                f"app.kubernetes.io/component={component}",
                "-o",
                "jsonpath={.items[*].metadata.name}",
            )
        ).split()
        if pods:
            await asyncio.to_thread(
                _kubectl,
                ctx,
                ns,
                "delete",
                "pod",
                random.choice(pods),
                "--grace-period=0",
                "--force",
                "--wait=false",
            )
            deleted += 1
    return deleted


async def drill(
    url: str, secret: str, sessions: int, turns: int, ctx: str | None, ns: str, every_s: float
) -> int:
    from shared.tokens import mint

    clients = [DrillClient(url, mint(f"drill-{i}", secret), turns=turns) for i in range(sessions)]
    stop = asyncio.Event()
    killer = asyncio.create_task(_delete_pods(ctx, ns, every_s, stop)) if ctx else None
    t0 = time.monotonic()
    await asyncio.gather(*(c.run() for c in clients))
    stop.set()
    deleted = await killer if killer else 0
    failures = 0
    async with aiohttp.ClientSession() as http:
        for c in clients:
            try:
                await check(c, http)
            except invariants.InvariantError as e:
                failures += 1
                print(f"FAIL {c.session_id}: {e}", file=sys.stderr)
    print(
        json.dumps(
            {
                "sessions": sessions,
                "turns": turns,
                "pods_deleted": deleted,
                "failures": failures,
                "reconnects": sum(c.reconnects for c in clients),
                "seconds": round(time.monotonic() - t0, 1),
            }
        )
    )
    return 1 if failures else 0


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m tidewire.drill", description=__doc__)
    p.add_argument("--url", required=True, help="the gateway (e.g. through the Ingress)")
    p.add_argument(
        "--secret", required=True, help="the JWT secret (TIDEWIRE_JWT_SECRET) to mint drill tokens"
    )
    p.add_argument("--sessions", type=int, default=50)
    p.add_argument("--turns", type=int, default=3)
    p.add_argument("--kubectl-context", default=None, help="delete pods in this context while the load runs")
    p.add_argument("--namespace", default="tidewire")
    p.add_argument("--every", type=float, default=5.0, help="seconds between pod deletions")
    a = p.parse_args(argv)
    sys.exit(
        asyncio.run(drill(a.url, a.secret, a.sessions, a.turns, a.kubectl_context, a.namespace, a.every))
    )


if __name__ == "__main__":
    main()
