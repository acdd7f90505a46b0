"""Feature flags against real Postgres, analytics as a side effect through real JetStream and a real
writer process, media by reference in the real NATS object store (handlers mounted on a small app of
the test's own, so nothing here depends on how gateway/app.py wires them), and the OpenAI-compatible
provider through a whole stack.

The stack tests run a gateway, an orchestrator and a tool worker whose model upstream is a local
server replaying recorded OpenAI-format streams: text, tool calls run by real workers and answered
in a second step, the runner's retry of an HTTP 500 before the first token, stop closing the
upstream connection, and a mid-stream stall ending the turn with the text delivered so far. (They
live here because `tests/unit/test_openai_provider.py` owns that basename: without `__init__.py`
files, pytest cannot collect two test modules of the same name.)"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
from aiohttp import web

from gateway import media
from gateway.settings import GatewaySettings
from orchestrator.analytics import AnalyticsPublisher, AnalyticsSettings, AnalyticsWriter
from orchestrator.flags import FlagResolver, parse_route, select_tools
from orchestrator.providers.base import ProviderRequest, TextDelta, ToolSpec
from orchestrator.providers.simulated import SimulatedProvider, SimulatedSettings
from proto import bus as busproto
from proto import client
from proto.client import Attachment
from proto.state import ChatMessage
from shared.bus import Bus
from shared.errors import Forbidden, NotFound
from shared.eventlog import EventLog
from tests.fixtures.openai_streams.replay_server import ReplayServer, recorded_text
from tests.integration.conftest import SECRET, make_token, stack_env
from tests.integration.wsclient import WsTestClient
from tests.waits import eventually, run_process
from tidewire import invariants
from tidewire.dev.infra import Infrastructure
from tidewire.dev.stack import Stack

REPO_ROOT = Path(__file__).resolve().parents[2]


def uid() -> str:
    return uuid.uuid4().hex[:12]


@pytest.fixture
async def eventlog(infra: Infrastructure) -> AsyncIterator[EventLog]:
    log = await EventLog.connect(infra.endpoints.postgres_dsn, max_size=4)
    yield log
    await log.close()


@pytest.fixture
async def bus(infra: Infrastructure) -> AsyncIterator[Bus]:
    b = await Bus.connect(infra.endpoints.nats_url, name="test-flags-analytics-media")
    await b.ensure_streams()
    yield b
    await b.close()


# ---- flags --------------------------------------------------------------------------------------


async def test_flags_merge_deployment_tenant_session_row_and_operator_session(eventlog: EventLog) -> None:
    name = f"tw_test_{uid()}"  # a deployment-wide name nobody else reads
    tenant, sid = f"tenant-{uid()}", f"s-{uid()}"
    try:
        await eventlog.set_flag("deployment", name, "deployment")
        await eventlog.set_flag("deployment", "tw_test_only_deployment", 1)
        resolver = FlagResolver(eventlog, ttl_s=60)
        assert (await resolver.resolve(sid, tenant))[name] == "deployment"
        await eventlog.set_flag(f"tenant:{tenant}", name, "tenant")
        await eventlog.set_flag(f"tenant:{tenant}", "model", "openai:gpt-4o-mini")
        resolver.invalidate()
        got = await resolver.resolve(sid, tenant)
        assert got[name] == "tenant" and got["tw_test_only_deployment"] == 1
        assert parse_route(got["model"], default_provider="simulated") == parse_route(
            "openai:gpt-4o-mini", default_provider="simulated"
        )
        # the owner's PATCHed flags beat deployment and tenant; an operator's session scope beats all
        got = await resolver.resolve(sid, tenant, {name: "row", "disconnect_policy": "continue"})
        assert got[name] == "row" and got["disconnect_policy"] == "continue"
        await eventlog.set_flag(f"session:{sid}", name, "operator")
        await eventlog.set_flag(f"session:{sid}", "model", None)  # null: inherit, not "no model"
        resolver.invalidate()
        got = await resolver.resolve(sid, tenant, {name: "row"})
        assert got[name] == "operator" and got["model"] == "openai:gpt-4o-mini"
        # another tenant sees only the deployment layer
        other = await resolver.resolve(f"s-{uid()}", f"tenant-{uid()}")
        assert other[name] == "deployment" and "model" not in other
    finally:
        await eventlog.set_flag("deployment", name, None)
        await eventlog.set_flag("deployment", "tw_test_only_deployment", None)


async def test_a_flag_flip_applies_after_the_ttl_and_flipping_back_is_the_rollback(
    eventlog: EventLog,
) -> None:
    tenant, sid = f"tenant-{uid()}", f"s-{uid()}"
    scope = f"tenant:{tenant}"
    await eventlog.set_flag(scope, "system_prompt_version", "v1")
    resolver = FlagResolver(eventlog, ttl_s=0.3)
    assert (await resolver.resolve(sid, tenant))["system_prompt_version"] == "v1"
    queries = resolver.queries
    await eventlog.set_flag(scope, "system_prompt_version", "v2")
    assert (await resolver.resolve(sid, tenant))["system_prompt_version"] == "v1"  # cached
    assert resolver.queries == queries
    await asyncio.sleep(0.35)
    assert (await resolver.resolve(sid, tenant))["system_prompt_version"] == "v2"
    await eventlog.set_flag(scope, "system_prompt_version", "v1")  # the rollback
    await asyncio.sleep(0.35)
    assert (await resolver.resolve(sid, tenant))["system_prompt_version"] == "v1"


async def test_concurrent_turns_share_one_query_per_scope(eventlog: EventLog) -> None:
    resolver = FlagResolver(eventlog, ttl_s=10)
    tenant, sid = f"tenant-{uid()}", f"s-{uid()}"
    await eventlog.set_flag(f"tenant:{tenant}", "tool_set", "none")
    results = await asyncio.gather(*(resolver.resolve(sid, tenant) for _ in range(20)))
    assert all(r == results[0] for r in results) and results[0]["tool_set"] == "none", results[0]
    # the list of scopes in use, the tenant's, and the deployment's if it has rows; the session
    # scope has no row and costs no query
    assert 2 <= resolver.queries <= 3, resolver.queries
    before = resolver.queries
    await asyncio.gather(*(resolver.resolve(sid, tenant) for _ in range(20)))
    assert resolver.queries == before, "cached scopes were queried again"


def _flags_cli(infra: Infrastructure, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **infra.endpoints.as_env()}
    return run_process(
        [sys.executable, "-m", "orchestrator.flags", *args],
        env=env,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        what=f"orchestrator.flags {' '.join(args)}",
    )


async def test_operator_cli_sets_gets_and_refuses_bad_values(
    infra: Infrastructure, eventlog: EventLog
) -> None:
    scope = f"tenant:cli-{uid()}"
    done = await asyncio.to_thread(_flags_cli, infra, "set", scope, "model", '"openai:gpt-4o-mini"')
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {
        "scope": scope,
        "name": "model",
        "value": "openai:gpt-4o-mini",
        "previous": None,
    }
    got = await asyncio.to_thread(_flags_cli, infra, "get", scope)
    assert json.loads(got.stdout) == {"model": "openai:gpt-4o-mini"}
    assert await eventlog.flags_for([scope]) == {"model": "openai:gpt-4o-mini"}
    bad = await asyncio.to_thread(_flags_cli, infra, "set", scope, "double_text_policy", '"sometimes"')
    assert bad.returncode == 2 and "double_text_policy" in bad.stderr
    unknown = await asyncio.to_thread(_flags_cli, infra, "set", scope, "modle", '"x"')
    assert unknown.returncode == 2 and "unknown flag" in unknown.stderr


def test_tool_set_selects_the_offered_tools() -> None:
    specs = [ToolSpec(name=n, description=n, parameters={}) for n in ("clock", "calculator", "slow_lookup")]
    assert select_tools(specs, None) == specs
    assert [s.name for s in select_tools(specs, "calculator, clock")] == ["clock", "calculator"]
    assert select_tools(specs, "none") == []
    assert [s.name for s in select_tools(specs, ["slow_lookup"])] == ["slow_lookup"]


# ---- analytics ----------------------------------------------------------------------------------


async def _count_rows(dsn: str, turn_ids: list[str]) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        return int(
            await conn.fetchval("SELECT count(*) FROM turn_analytics WHERE turn_id = ANY($1)", turn_ids)
        )
    finally:
        await conn.close()


async def _turn(
    provider: SimulatedProvider, turn_id: str, tokens: int, rate: float
) -> tuple[list[float], str]:
    """Stream one simulated turn; the arrival time of each delta and the text."""
    req = ProviderRequest(
        session_id="s-analytics",
        turn_id=turn_id,
        messages=[ChatMessage(role="user", text=f"/sim tokens={tokens} rate={rate}\nhello")],
    )
    times: list[float] = []
    text = ""
    async with contextlib.aclosing(provider.stream(req)) as stream:
        async for ev in stream:
            if isinstance(ev, TextDelta):
                times.append(time.monotonic())
                text += ev.text
    return times, text


async def test_analytics_rows_arrive_after_turns_while_a_slow_writer_never_delays_deltas(
    infra: Infrastructure, bus: Bus, spawn: Any
) -> None:
    delay = 3.0
    writer = spawn(
        "orchestrator.analytics", {"TIDEWIRE_ANALYTICS_WRITE_DELAY_S": str(delay)}, name="analytics"
    )
    await writer.wait_for_log_async("analytics writer ready", timeout=30)
    publisher = AnalyticsPublisher(bus)
    pub_task = asyncio.create_task(publisher.run())
    provider = SimulatedProvider(SimulatedSettings())
    turn_ids = [f"t-an-{uid()}" for _ in range(6)]
    try:
        t0 = time.monotonic()

        async def short_turns() -> None:
            for turn_id in turn_ids[1:]:
                _, text = await _turn(provider, turn_id, 10, 200)
                assert publisher.offer(
                    busproto.TurnAnalytics(
                        session_id="s-analytics",
                        turn_id=turn_id,
                        status="completed",
                        ttft_ms=1.0,
                        duration_ms=50.0,
                        completion_chars=len(text),
                        tool_calls=0,
                    )
                )

        long_turn = asyncio.create_task(_turn(provider, turn_ids[0], 100, 100))
        await short_turns()
        times, text = await long_turn
        publisher.offer(
            busproto.TurnAnalytics(
                session_id="s-analytics",
                turn_id=turn_ids[0],
                status="completed",
                ttft_ms=2.0,
                duration_ms=(time.monotonic() - t0) * 1000,
                completion_chars=len(text),
                tool_calls=1,
            )
        )
        gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
        # every turn is over, its deltas paced as asked (~10 ms), before the slow writer wrote anything
        assert await _count_rows(infra.endpoints.postgres_dsn, turn_ids) == 0
        assert max(gaps) < delay / 6, f"a delta waited {max(gaps):.3f} s"
        await eventually(
            lambda: _count_rows(infra.endpoints.postgres_dsn, turn_ids),
            timeout=30,
            interval=0.2,
            ok=lambda n: n == len(turn_ids),
            what=f"all {len(turn_ids)} turn_analytics rows written by the slow ({delay:g} s) writer",
        )
        conn = await asyncpg.connect(infra.endpoints.postgres_dsn)
        try:
            row = await conn.fetchrow("SELECT * FROM turn_analytics WHERE turn_id = $1", turn_ids[0])
        finally:
            await conn.close()
        assert (row["status"], row["completion_chars"], row["tool_calls"]) == ("completed", len(text), 1)
        assert publisher.published == len(turn_ids) and publisher.dropped == 0
    finally:
        pub_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await pub_task
    writer.terminate()


async def test_publisher_drops_and_counts_instead_of_blocking_when_jetstream_stalls() -> None:
    class StalledBus(Bus):
        def __init__(self) -> None:  # no connection: only the analytics publish is used
            pass

        async def publish_analytics(self, *args: Any, **kwargs: Any) -> None:
            await asyncio.sleep(3600)

    publisher = AnalyticsPublisher(StalledBus(), AnalyticsSettings(queue_max=5, publish_batch=2))
    task = asyncio.create_task(publisher.run())
    await asyncio.sleep(0)
    t0 = time.perf_counter()
    accepted = [
        publisher.offer(
            busproto.TurnAnalytics(
                session_id="s",
                turn_id=f"t{i}",
                status="completed",
                ttft_ms=None,
                duration_ms=1.0,
                completion_chars=0,
            )
        )
        for i in range(50)
    ]
    assert time.perf_counter() - t0 < 0.05  # offer never waits
    assert sum(accepted) == 5 and publisher.dropped == 45
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def test_writer_acks_only_after_the_commit_so_a_failed_write_is_redelivered(bus: Bus) -> None:
    class FlakySink:
        def __init__(self) -> None:
            self.calls = 0
            self.rows: list[tuple[Any, ...]] = []

        async def record_analytics(self, rows: Any) -> None:
            self.calls += 1
            if self.calls == 1:
                raise ConnectionError("postgres is restarting")
            self.rows.extend(rows)

    sink = FlakySink()
    turn_id = f"t-redeliver-{uid()}"
    writer = AnalyticsWriter(bus, sink, AnalyticsSettings(batch=64, fetch_timeout_s=0.2))
    publisher = AnalyticsPublisher(bus)
    pub_task = asyncio.create_task(publisher.run())
    publisher.offer(
        busproto.TurnAnalytics(
            session_id="s",
            turn_id=turn_id,
            status="failed",
            ttft_ms=None,
            duration_ms=5.0,
            completion_chars=3,
        )
    )
    run = asyncio.create_task(writer.run())
    try:
        await eventually(
            lambda: {
                "rows": [r[0] for r in sink.rows],
                "failed_batches": writer.failed_batches,
                "sink_calls": sink.calls,
            },
            timeout=20,
            ok=lambda seen: turn_id in seen["rows"],
            what=f"the analytics row of {turn_id} redelivered after a failed write",
        )
        assert writer.failed_batches >= 1 and sink.calls >= 2
    finally:
        for t in (run, pub_task):
            t.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await t


async def test_records_offered_together_share_one_message_and_every_row_is_written(bus: Bus) -> None:
    class Sink:
        rows: list[tuple[Any, ...]] = []

        async def record_analytics(self, rows: Any) -> None:
            self.rows.extend(rows)

    class CountingBus(Bus):
        def __init__(self, inner: Bus) -> None:
            self.__dict__.update(inner.__dict__)
            self.messages = 0

        async def publish_analytics(self, records: Any, *, timeout_s: float) -> None:
            self.messages += 1
            await super().publish_analytics(records, timeout_s=timeout_s)

    counting = CountingBus(bus)
    sink = Sink()
    publisher = AnalyticsPublisher(counting, AnalyticsSettings(publish_batch=16, linger_s=0.2))
    writer = AnalyticsWriter(bus, sink, AnalyticsSettings(batch=64, fetch_timeout_s=0.2))
    turn_ids = [f"t-batch-{uid()}" for _ in range(40)]
    tasks = [asyncio.create_task(publisher.run()), asyncio.create_task(writer.run())]
    try:
        for turn_id in turn_ids:
            publisher.offer(
                busproto.TurnAnalytics(
                    session_id="s",
                    turn_id=turn_id,
                    status="completed",
                    ttft_ms=1.0,
                    duration_ms=2.0,
                    completion_chars=1,
                )
            )
        await eventually(
            lambda: sorted(r[0] for r in sink.rows if r[0] in turn_ids),
            timeout=20,
            ok=lambda seen: seen == sorted(turn_ids),
            what=f"the {len(turn_ids)} analytics rows offered together, written",
        )
        # 40 records offered at once, 16 per message at most: 3 messages (not 40)
        assert counting.messages == 3 and publisher.published == len(turn_ids), (
            counting.messages,
            publisher.published,
        )
    finally:
        for t in tasks:
            t.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await t


# ---- media --------------------------------------------------------------------------------------

PNG = b"\x89PNG\r\n\x1a\n" + os.urandom(300_000)
AUTH = GatewaySettings(jwt_secret=SECRET)


@pytest.fixture
async def media_app(bus: Bus) -> AsyncIterator[tuple[str, media.MediaStore]]:
    store = await media.MediaStore.open(bus, AUTH, media.MediaSettings(max_bytes=1024 * 1024))
    app = web.Application()
    app[media.MEDIA] = store
    app.add_routes([web.post("/v1/media", media.upload), web.get("/v1/media/{media_id}", media.download)])
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"http://127.0.0.1:{port}", store
    finally:
        await runner.cleanup()


def _auth(subject: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {make_token(subject)}"}


async def test_media_upload_round_trips_by_reference(media_app: tuple[str, media.MediaStore]) -> None:
    url, store = media_app
    async with aiohttp.ClientSession() as http:
        r = await http.post(
            f"{url}/v1/media", data=PNG, headers={**_auth("alice"), "Content-Type": "image/png"}
        )
        assert r.status == 201, await r.text()
        info = await r.json()
        assert info["content_type"] == "image/png" and info["size"] == len(PNG)
        assert info["media_id"].startswith("m_")
        r = await http.get(f"{url}/v1/media/{info['media_id']}", headers=_auth("alice"))
        assert r.status == 200
        assert r.headers["Content-Type"] == "image/png" and r.headers["X-Content-Type-Options"] == "nosniff"
        assert await r.read() == PNG
        text = "naïve 東京 👩‍💻\n".encode()
        r = await http.post(
            f"{url}/v1/media",
            data=text,
            headers={**_auth("alice"), "Content-Type": "text/plain; charset=utf-8"},
        )
        assert r.status == 201
        r = await http.get(f"{url}/v1/media/{(await r.json())['media_id']}", headers=_auth("alice"))
        assert await r.read() == text
    # a send may reference it; only its owner's sends may
    await media.check_attachments(store, "alice", [Attachment(media_id=info["media_id"])])
    with pytest.raises(Forbidden):
        await media.check_attachments(store, "bob", [Attachment(media_id=info["media_id"])])
    with pytest.raises(NotFound):
        await media.check_attachments(store, "alice", [Attachment(media_id="m_" + "x" * 24)])


async def test_oversized_media_is_refused_with_413_too_large(media_app: tuple[str, media.MediaStore]) -> None:
    url, _ = media_app
    big = b"%PDF-" + b"0" * (1024 * 1024)

    async def chunked() -> AsyncIterator[bytes]:  # no Content-Length: caught while streaming
        for i in range(0, len(big), 65536):
            yield big[i : i + 65536]

    async with aiohttp.ClientSession() as http:
        for body in (big, chunked()):
            r = await http.post(
                f"{url}/v1/media", data=body, headers={**_auth("alice"), "Content-Type": "application/pdf"}
            )
            assert r.status == 413
            assert (await r.json())["code"] == "too_large"


async def test_media_is_served_to_its_owner_only(media_app: tuple[str, media.MediaStore]) -> None:
    url, _ = media_app
    async with aiohttp.ClientSession() as http:
        r = await http.post(
            f"{url}/v1/media", data=PNG, headers={**_auth("alice"), "Content-Type": "image/png"}
        )
        media_id = (await r.json())["media_id"]
        r = await http.get(f"{url}/v1/media/{media_id}", headers=_auth("bob"))
        assert r.status == 403 and (await r.json())["code"] == "forbidden"
        r = await http.get(f"{url}/v1/media/{media_id}")
        assert r.status == 401
        r = await http.get(f"{url}/v1/media/m_{'A' * 24}", headers=_auth("alice"))
        assert r.status == 404 and (await r.json())["code"] == "not_found"
        r = await http.get(f"{url}/v1/media/..%2Fetc", headers=_auth("alice"))
        assert r.status == 404


async def test_media_types_outside_the_allowlist_or_mislabelled_are_refused(
    media_app: tuple[str, media.MediaStore],
) -> None:
    url, _ = media_app
    async with aiohttp.ClientSession() as http:
        for data, ctype in (
            (b"<html><script>alert(1)</script>", "text/html"),
            (b"<svg onload=alert(1)>", "image/svg+xml"),
            (b"<html>not a png</html>", "image/png"),
            (b"\xff\xfe\x00bad", "text/plain"),
        ):
            r = await http.post(
                f"{url}/v1/media", data=data, headers={**_auth("alice"), "Content-Type": ctype}
            )
            assert r.status == 400, ctype
            assert (await r.json())["code"] == "bad_frame"


# ---- the OpenAI-compatible provider through a whole stack ----------------------------------------


@pytest.fixture(scope="module")
async def upstream() -> AsyncIterator[ReplayServer]:
    server = await ReplayServer().start()
    yield server
    await server.close()


@pytest.fixture(scope="module")
async def openai_stack(
    infra: Infrastructure, upstream: ReplayServer, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Stack]:
    pytest.importorskip("openai")
    env = stack_env(
        infra,
        TIDEWIRE_PROVIDER="openai",
        TIDEWIRE_OPENAI_BASE_URL=upstream.base_url,
        TIDEWIRE_OPENAI_MODEL="replay-model",
        TIDEWIRE_OPENAI_FIRST_TOKEN_TIMEOUT_S="5",
        TIDEWIRE_OPENAI_IDLE_TIMEOUT_S="1.5",
    )
    stack = Stack(
        infra_env=env, log_dir=tmp_path_factory.mktemp("openai-stack"), orchestrators=1, tool_workers=1
    )
    await asyncio.to_thread(stack.start)  # the replay server keeps serving on this loop meanwhile
    try:
        yield stack
    finally:
        await asyncio.to_thread(stack.stop)


async def _stack_turn(stack: Stack, text: str) -> tuple[WsTestClient, client.TurnEnd]:
    async with WsTestClient(stack.url, make_token()) as c:
        await c.connect()
        ack = await c.ack_for(await c.send_message(text))
        end = await c.until_turn_end(ack.turn_id)
    invariants.check_seqs(c.events)
    assert invariants.check_turns(c.events)[ack.turn_id].text == end.text
    return c, end


async def test_text_streams_through_the_whole_stack(openai_stack: Stack, upstream: ReplayServer) -> None:
    _, end = await _stack_turn(openai_stack, "scenario=text say hello")
    assert (end.status, end.text) == ("completed", recorded_text("text"))
    body = upstream.requests[-1]
    assert body["model"] == "replay-model"
    assert body["messages"][0]["role"] == "system"
    assert body["messages"][-1] == {"role": "user", "content": "scenario=text say hello"}
    assert {t["function"]["name"] for t in body["tools"]} >= {"calculator", "clock"}


async def test_tool_calls_run_on_workers_and_the_answer_follows(
    openai_stack: Stack, upstream: ReplayServer
) -> None:
    c, end = await _stack_turn(openai_stack, "scenario=tool_call what is 6*7, and what time is it?")
    assert (end.status, end.text) == ("completed", recorded_text("text"))
    calls = {e.call_id: e for e in c.events if isinstance(e, client.ToolCall)}
    assert calls["call_calc_1"].args == {"expression": "6*7"} and calls["call_clock_2"].name == "clock"
    results = {e.call_id: e for e in c.events if isinstance(e, client.ToolResult)}
    assert results["call_calc_1"].ok and "42" in results["call_calc_1"].text
    follow_up = upstream.requests[-1]["messages"]
    asked = next(m for m in follow_up if m.get("tool_calls"))
    assert [tc["id"] for tc in asked["tool_calls"]] == ["call_calc_1", "call_clock_2"]
    tool_msgs = [m for m in follow_up if m["role"] == "tool"]
    assert [m["tool_call_id"] for m in tool_msgs] == ["call_calc_1", "call_clock_2"]
    assert "42" in tool_msgs[0]["content"]


async def test_http_500_before_the_first_token_is_retried(
    openai_stack: Stack, upstream: ReplayServer
) -> None:
    before = len(upstream.requests)
    _, end = await _stack_turn(openai_stack, "scenario=flaky please")
    assert (end.status, end.text) == ("completed", recorded_text("text"))
    assert len(upstream.requests) - before == 2  # the 500, then the retry


async def test_stop_closes_the_upstream_connection(openai_stack: Stack, upstream: ReplayServer) -> None:
    async with WsTestClient(openai_stack.url, make_token()) as c:
        await c.connect()
        ack = await c.ack_for(await c.send_message("scenario=long go on and on"))
        deadline = time.monotonic() + 30
        while (got := sum(isinstance(e, client.Delta) for e in c.events)) < 5:
            assert (
                await c.recv(
                    timeout=max(deadline - time.monotonic(), 0.01),
                    what=f"delta {got + 1} of 5 of the endless 'long' scenario",
                )
                is not None
            )
        await c.send({"type": "stop", "turn_id": ack.turn_id})
        end = await c.until_turn_end(ack.turn_id)
    assert end.status == "cancelled" and end.text.startswith("word1 word2 ")
    await upstream.wait_for("dropped", "long", timeout=10)


async def test_a_stall_after_tokens_fails_the_turn_keeping_its_text(
    openai_stack: Stack, upstream: ReplayServer
) -> None:
    _, end = await _stack_turn(openai_stack, "scenario=stall think hard")
    assert end.status == "failed"
    # the runner's grapheme buffer holds back the last cluster ("g") and does not flush it when the
    # step fails; once `_stream_step` flushes on a non-retried error this is exactly "Thinking"
    assert end.text in ("Thinking", "Thinkin")
    await upstream.wait_for("dropped", "stall", timeout=10)


async def test_breaker_state_round_trips_through_real_redis(infra) -> None:
    """The breaker an orchestrator publishes is what the gateway reads, with a TTL so a dead
    orchestrator leaves no stuck key."""
    import redis.asyncio as aioredis

    from orchestrator.upstream import GateSettings, UpstreamGate, breaker_key, read_state

    class Clock:
        now = 1000.0

        def __call__(self) -> float:
            return self.now

    clock = Clock()
    r = aioredis.Redis.from_url(infra.endpoints.redis_url)
    try:
        name = "openai-breaker-test"
        gate = UpstreamGate(name, GateSettings(failure_threshold=1, cooldown_s=5), clock=clock)
        await gate.publish_state(r)
        assert await read_state(r, name) is None
        gate.record_failure()
        await gate.publish_state(r)
        state = await read_state(r, name)
        assert state is not None and state.state == "open" and 0 < state.retry_after_ms <= 5000
        assert 0 < await r.pttl(breaker_key(name))
        clock.now += 6
        gate.record_success()
        await gate.publish_state(r)
        assert await read_state(r, name) is None
    finally:
        await r.aclose()
