"""The metrics the docs promise are the metrics the processes serve, and the reverse.

Every `tidewire_…` name in README.md and docs/*.md must be served on the `/metrics` page of some
process of a running stack (gateway, orchestrators, tool worker) after one ordinary turn, a turn
that calls a tool and one whose tool times out; and every `tidewire_…` metric a process serves must
be documented somewhere. Names are read with the plain pattern `tidewire_[a-z0-9_]+`, so the docs
write them in full (a fragment such as `tidewire_upstream_{a,b}` can be neither checked nor grepped).

The last test is the breaker half of load shedding: the breaker state orchestrators publish is what
the gateway sheds on, counted in `tidewire_gateway_shed_sends`.
"""

from __future__ import annotations

import asyncio
import re
import urllib.request
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from proto import client
from shared import promtext
from tests.integration.conftest import make_token
from tests.integration.wsclient import WsTestClient
from tidewire.dev.stack import Stack

REPO_ROOT = Path(__file__).resolve().parents[2]
DOCUMENTS = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]
METRIC = re.compile(r"(?<![A-Za-z0-9_./-])tidewire_[a-z0-9_]+")


def documented() -> dict[str, list[str]]:
    """name -> where it is mentioned ("docs/operations.md:81")."""
    out: dict[str, list[str]] = {}
    for path in DOCUMENTS:
        for lineno, line in enumerate(path.read_text().splitlines(), 1):
            for name in METRIC.findall(line):
                out.setdefault(name, []).append(f"{path.relative_to(REPO_ROOT)}:{lineno}")
    return out


def _page(port: str | int) -> promtext.Exposition:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        return promtext.parse(r.read().decode())  # strict: a malformed page fails here


async def _pages(stack: Stack) -> dict[str, promtext.Exposition]:
    ports = {"gateway": stack.http_port}
    ports.update(
        {
            svc.name: svc.env["port"]
            for svc in stack.services
            if svc.module in ("orchestrator", "tool_workers") and svc.alive()
        }
    )
    assert any(n.startswith("orch") for n in ports) and any(n.startswith("tool") for n in ports), ports
    return {name: await asyncio.to_thread(_page, port) for name, port in ports.items()}


@pytest.fixture(scope="module")
async def served(stack: Stack) -> dict[str, set[str]]:
    """metric (family and sample names) -> the processes serving it, after traffic that makes every
    lazily created instrument appear: a turn, a tool call and a tool timeout (slow_lookup's limit is 8 s)."""
    token = make_token("metrics-docs")
    async with WsTestClient(stack.url, token) as c:
        await c.connect()
        ack = await c.ack_for(await c.send_message("what time is it"))
        await c.until_turn_end(ack.turn_id)
        text = '/sim tool=slow_lookup args={"query":"q","seconds":9} tokens=5\nlook it up'
        ack = await c.ack_for(await c.send_message(text))
        await c.until_turn_end(ack.turn_id, timeout=60)
        results = [e for e in c.events if isinstance(e, client.ToolResult) and e.turn_id == ack.turn_id]
        assert results and "timed out" in results[-1].text, (
            f"the slow_lookup call was meant to time out on the worker; its results: {results}"
        )
    await asyncio.sleep(1.5)  # queue gauges are sampled once a second
    out: dict[str, set[str]] = {}
    for process, page in (await _pages(stack)).items():
        for name in page.families() | {s.name for s in page.samples}:
            out.setdefault(name, set()).add(process)
    return out


def test_docs_write_metric_names_in_full() -> None:
    fragments = {name: where for name, where in documented().items() if name.endswith("_")}
    assert not fragments, "metric names written as fragments (write each name in full): " + "; ".join(
        f"{name} at {', '.join(where)}" for name, where in sorted(fragments.items())
    )


async def test_every_documented_metric_is_served(served: dict[str, set[str]]) -> None:
    missing = {
        name: where for name, where in documented().items() if name not in served and not name.endswith("_")
    }
    assert not missing, "documented but served by no process: " + "; ".join(
        f"{name} ({', '.join(where)})" for name, where in sorted(missing.items())
    )


async def test_every_served_metric_is_documented(served: dict[str, set[str]]) -> None:
    docs = documented()
    families = {name for name in served if name.startswith("tidewire_")}
    undocumented = {
        name
        for name in families
        if name not in docs
        and not any(name == base + suffix for base in docs for suffix in ("_bucket", "_sum", "_count"))
    }
    assert not undocumented, "served but documented nowhere in README.md or docs/: " + "; ".join(
        f"{name} (on {', '.join(sorted(served[name]))})" for name in sorted(undocumented)
    )


# ---- load shedding on the orchestrators' breakers -----------------------------------------------


@pytest.fixture
async def redis_client(infra) -> AsyncIterator[aioredis.Redis]:
    r = aioredis.Redis.from_url(infra.endpoints.redis_url)
    try:
        yield r
    finally:
        await r.aclose()


async def _answer(c: WsTestClient, text: str, cmid: str) -> client.Ack | client.Error:
    await c.send_message(text, cmid)
    f = await c.until(
        lambda f: (isinstance(f, client.Ack) and f.client_msg_id == cmid) or isinstance(f, client.Error),
        15,
        f"the answer to {cmid}",
    )
    assert isinstance(f, client.Ack | client.Error)
    return f


async def _until_answer(
    c: WsTestClient, text: str, want: type, timeout: float = 10
) -> client.Ack | client.Error:
    """Resends one message (same client_msg_id) until the gateway answers it with `want`."""
    cmid = uuid.uuid4().hex
    async with asyncio.timeout(timeout):
        while True:
            f = await _answer(c, text, cmid)
            if isinstance(f, want):
                return f
            await asyncio.sleep(0.2)


async def test_sends_are_shed_while_every_upstreams_breaker_is_open(stack: Stack, redis_client) -> None:
    """An orchestrator's open breaker, published as orchestrators publish it, makes the gateway answer
    new sends `degraded` (retry after the breaker's remaining cooldown) while it is the only upstream
    listed; one listed upstream with a closed breaker is enough for sends to be accepted again."""
    from orchestrator.providers.simulated import SimulatedProvider, SimulatedSettings
    from orchestrator.upstream import GateSettings, UpstreamRouter, breaker_key

    def no_other_provider(name: str) -> Any:
        raise ValueError(f"{name}: this router only publishes breaker state")

    cooldown_s = 20.0
    router = UpstreamRouter(
        SimulatedProvider(SimulatedSettings(rate=0, tokens=1)),
        factory=no_other_provider,
        settings_for=lambda n: GateSettings(failure_threshold=1, cooldown_s=cooldown_s),
    )
    gate = router.gate("simulated")  # the stack's only route, so it is every route
    shed_before = (await asyncio.to_thread(_page, stack.http_port)).value("tidewire_gateway_shed_sends")
    try:
        gate.record_failure()
        assert gate.is_open
        await router.publish_once(redis_client)
        async with WsTestClient(stack.url, make_token("breakers")) as c:
            await c.connect()
            refused = await _until_answer(c, "hello", client.Error)
            assert isinstance(refused, client.Error) and refused.code == "degraded", refused
            assert "upstream" in refused.message
            assert refused.retry_after_ms is not None and 0 < refused.retry_after_ms <= cooldown_s * 1000

            router.gate("metrics-docs-healthy")  # a second upstream, its breaker closed
            await router.publish_once(redis_client)
            accepted = await _until_answer(c, "hello again", client.Ack)
            assert isinstance(accepted, client.Ack)
            assert await redis_client.pttl(breaker_key("simulated")) > 0  # still open, yet not every route
            await c.until_turn_end(accepted.turn_id)
        shed_after = (await asyncio.to_thread(_page, stack.http_port)).value("tidewire_gateway_shed_sends")
        assert shed_after - shed_before >= 1
    finally:
        await redis_client.delete(breaker_key("simulated"))
        await redis_client.zrem("tw:breakers", "metrics-docs-healthy")
