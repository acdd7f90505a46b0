"""Observability on the real stack: one trace per turn across processes, and metrics that move.

Every process of this module's stack writes its spans to its own JSON-lines file
(`TIDEWIRE_TRACE_EXPORTER=file:…/spans-{service}-{pid}.jsonl`), so a test can join them by trace id.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from proto import client
from shared import logs, telemetry
from tests.integration.conftest import make_token, scrape, stack_env
from tests.integration.wsclient import WsTestClient
from tests.waits import eventually, frames_tail
from tidewire import top
from tidewire.dev.infra import Infrastructure
from tidewire.dev.stack import Stack, free_port, wait_http

SLOW = "/sim tokens=300 rate=60\n"


@pytest.fixture(scope="module")
def traced(infra: Infrastructure, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Stack, Path]]:
    """One gateway, one orchestrator and one tool worker with a health port, all tracing to files."""
    log_dir = tmp_path_factory.mktemp("traced-stack")
    spans = log_dir / "spans"
    spans.mkdir()
    s = Stack(
        infra_env=stack_env(infra),
        log_dir=log_dir,
        orchestrators=1,
        tool_workers=0,
        extra_env={"TIDEWIRE_TRACE_EXPORTER": f"file:{spans}/spans-{{service}}-{{pid}}.jsonl"},
    )
    s.start()
    try:
        port = free_port()
        worker = s.service("tool-worker-1", "tool_workers", {"TIDEWIRE_HEALTH_PORT": str(port)})
        worker.env["port"] = str(port)
        wait_http(f"http://127.0.0.1:{port}/readyz", proc=worker)
        yield s, spans
    finally:
        s.stop()


def _port(stack: Stack, module: str) -> str:
    return next(svc.env["port"] for svc in stack.services if svc.module == module and svc.alive())


def _spans(folder: Path) -> list[dict[str, Any]]:
    out = []
    for path in folder.glob("spans-*.jsonl"):
        for line in path.read_text().splitlines():
            if line.strip():
                out.append(json.loads(line))
    return out


async def _trace_of(folder: Path, turn_id: str, until: set[str], timeout: float = 20) -> list[dict[str, Any]]:
    """All spans of the trace whose `gateway.send` handled `turn_id`, once spans named `until` are in
    (each process exports in batches, a tenth of a second apart)."""
    deadline = time.monotonic() + timeout
    while True:
        spans = _spans(folder)
        roots = [
            s for s in spans if s["name"] == "gateway.send" and s["attributes"].get("turn_id") == turn_id
        ]
        if roots:
            trace = [s for s in spans if s["trace_id"] == roots[0]["trace_id"]]
            if until <= {s["name"] for s in trace}:
                return trace
        if time.monotonic() > deadline:
            names = sorted({s["name"] for s in spans})
            raise AssertionError(f"no complete trace for {turn_id} ({len(spans)} spans: {names})")
        await asyncio.sleep(0.2)


async def test_a_tool_turn_is_one_trace_across_gateway_orchestrator_and_tool_worker(traced) -> None:
    stack, folder = traced
    async with WsTestClient(stack.url, make_token("tracer")) as c:
        await c.connect()
        ack = await c.ack_for(await c.send_message("what time is it"))
        end = await c.until_turn_end(ack.turn_id)
    assert end.status == "completed"
    assert any(isinstance(e, client.ToolCall) and e.name == "clock" for e in c.events)
    trace = await _trace_of(
        folder, ack.turn_id, until={"tool.run", "orchestrator.turn", "gateway.first_byte"}
    )

    assert len({s["trace_id"] for s in trace}) == 1
    services = {s["service"] for s in trace}
    assert {"gateway", "orchestrator", "tool-worker"} <= services, services
    by_name: dict[str, list[dict[str, Any]]] = {}
    for s in sorted(trace, key=lambda s: s["start_ns"]):
        by_name.setdefault(s["name"], []).append(s)
    expected = [
        "gateway.send",
        "checkpoint.append_user",
        "eventlog.append_user",
        "bus.publish_turn",
        "orchestrator.pickup",
        "orchestrator.turn",
        "session.fetch",
        "context.pack",
        "retrieval",
        "model.queue",
        "upstream.first_token",
        "tool.call",
        "tool.run",
        "eventlog.append_turn",
        "gateway.first_byte",
    ]
    missing = [n for n in expected if n not in by_name]
    assert not missing, f"missing spans {missing}; have {sorted(by_name)}"

    def first(name: str) -> dict[str, Any]:
        return by_name[name][0]

    # The stages happen in this order (start times; one host, one clock).
    order = [
        "gateway.send",
        "checkpoint.append_user",
        "bus.publish_turn",
        "orchestrator.turn",
        "session.fetch",
        "context.pack",
        "retrieval",
        "model.queue",
        "upstream.first_token",
        "tool.call",
        "tool.run",
    ]
    starts = [first(n)["start_ns"] for n in order]
    assert starts == sorted(starts), list(zip(order, starts, strict=True))
    # After the tool: the second model call, then the first byte written to the client.
    second_call = by_name["upstream.first_token"][-1]
    assert len(by_name["upstream.first_token"]) >= 2
    assert first("tool.run")["end_ns"] <= second_call["start_ns"] + 5_000_000
    assert second_call["end_ns"] <= first("gateway.first_byte")["start_ns"] + 5_000_000

    # Parentage: the orchestrator and first-byte spans hang off the gateway's send; the tool run
    # off the orchestrator's tool call (context carried in NATS headers).
    send = first("gateway.send")
    assert send["parent_span_id"] is None
    assert first("orchestrator.turn")["parent_span_id"] == send["span_id"]
    assert first("orchestrator.pickup")["parent_span_id"] == send["span_id"]
    assert first("gateway.first_byte")["parent_span_id"] == send["span_id"]
    assert first("tool.run")["parent_span_id"] == first("tool.call")["span_id"]
    turn = first("orchestrator.turn")
    for name in (
        "session.fetch",
        "context.pack",
        "retrieval",
        "model.queue",
        "upstream.first_token",
        "tool.call",
    ):
        assert first(name)["parent_span_id"] in {
            s["span_id"] for s in trace if s["service"] == "orchestrator"
        }
    # Queue wait is measured from the gateway's receipt to the pickup.
    pickup = first("orchestrator.pickup")
    assert pickup["start_ns"] <= first("bus.publish_turn")["start_ns"]
    assert pickup["end_ns"] <= turn["start_ns"]
    assert pickup["attributes"]["queue_wait_s"] >= 0
    ttft = first("gateway.first_byte")["attributes"]["ttft_s"]
    assert 0 < ttft < (first("gateway.first_byte")["end_ns"] - send["start_ns"]) / 1e9 + 0.05


def _moved(before: dict[str, float], after: dict[str, float], name: str) -> float:
    assert name in after, f"{name} not exposed"
    return after[name] - before.get(name, 0.0)


async def _deltas(c: WsTestClient, turn_id: str, n: int, timeout: float = 30) -> None:
    """Reads until n deltas of `turn_id` arrived, or its turn_end (a reader that falls behind gets
    deltas merged, so fewer may come: the caller's assertions then say what is wrong)."""
    deadline = time.monotonic() + timeout
    while (got := sum(isinstance(e, client.Delta) and e.turn_id == turn_id for e in c.events)) < n:
        if any(isinstance(e, client.TurnEnd) and e.turn_id == turn_id for e in c.events):
            return
        f = await c.recv(
            timeout=max(deadline - time.monotonic(), 0.01), what=f"delta {got + 1} of {n} of {turn_id}"
        )
        assert f is not None, (
            f"closed ({c.close_code}) after {got} of {n} deltas; last: {frames_tail(c.frames)}"
        )


async def test_metrics_move_on_gateway_orchestrator_and_tool_worker(traced, infra) -> None:
    stack, _ = traced
    gw, orch, tw = stack.http_port, _port(stack, "orchestrator"), _port(stack, "tool_workers")
    g0, o0, t0 = scrape(gw), scrape(orch), scrape(tw)
    token = make_token("metrics")

    async def tool_timeout() -> None:  # slow_lookup's limit is 8 s
        async with WsTestClient(stack.url, token) as c:
            await c.connect()
            text = '/sim tool=slow_lookup args={"query":"q","seconds":9} tokens=5\nlook it up'
            ack = await c.ack_for(await c.send_message(text))
            await c.until_turn_end(ack.turn_id, timeout=40)

    slow_tool = asyncio.create_task(tool_timeout())
    async with WsTestClient(stack.url, token) as c:
        ready = await c.connect()
        sockets_live = scrape(gw)["tidewire_gateway_sockets"]
        ack = await c.ack_for(await c.send_message("what time is it"))
        await c.until_turn_end(ack.turn_id)
        ack = await c.ack_for(await c.send_message(SLOW + "stop me"))
        await _deltas(c, ack.turn_id, 3)
        await c.send({"type": "stop", "turn_id": ack.turn_id})
        end = await c.until_turn_end(ack.turn_id)
        assert end.status == "cancelled"
    assert sockets_live >= 1
    async with WsTestClient(stack.url, token) as c:  # a resume; batched delivery merges deltas
        await c.connect(session_id=ready.session_id, last_seen_seq=1, delivery="batched")
        ack = await c.ack_for(await c.send_message("/sim tokens=80 rate=200\nmerge these"))
        await c.until_turn_end(ack.turn_id)
    await slow_tool
    infra.kill("postgres")  # a store outage is answered `degraded`
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
            r = await http.get(
                f"{stack.url}/v1/sessions/{ready.session_id}", headers={"Authorization": f"Bearer {token}"}
            )
            assert r.status == 503, await r.text()
    finally:
        infra.restart("postgres")
    for port in (gw, orch):
        await asyncio.to_thread(wait_http, f"http://127.0.0.1:{port}/readyz", 60.0)
    gauges = (
        "tidewire_turn_queue_pending",
        "tidewire_turn_queue_waiting",
        "tidewire_turn_queue_ack_pending",
        "tidewire_dead_letter_messages",
    )
    # the queue gauges are sampled once a second: poll for them rather than sleep
    o1 = await eventually(
        lambda: asyncio.to_thread(scrape, orch),
        timeout=10,
        interval=0.5,
        ok=lambda m: all(g in m for g in gauges),
        what=f"the orchestrator's queue gauges {gauges} to be exposed",
    )
    g1, t1 = scrape(gw), scrape(tw)

    # gateway
    assert _moved(g0, g1, "tidewire_ttft_seconds_count") >= 3
    assert g1["tidewire_ttft_seconds_sum"] > g0.get("tidewire_ttft_seconds_sum", 0)
    assert 'tidewire_ttft_seconds_bucket{le="+Inf"}' in g1
    for stage in ("gateway_accept", "checkpoint_append_user", "eventlog_append", "publish"):
        assert _moved(g0, g1, f'tidewire_turn_stage_seconds_count{{stage="{stage}"}}') >= 3, stage
    assert "tidewire_gateway_sockets" in g1
    assert _moved(g0, g1, "tidewire_gateway_reconnects") >= 1
    assert _moved(g0, g1, "tidewire_gateway_resumes") >= 1
    assert _moved(g0, g1, "tidewire_gateway_cancel_requests") >= 1
    assert _moved(g0, g1, "tidewire_gateway_merged_deltas") >= 1
    assert _moved(g0, g1, "tidewire_gateway_degraded") >= 1
    assert _moved(g0, g1, "tidewire_gateway_sends") >= 4
    # orchestrator
    for stage in (
        "queue_wait",
        "session_fetch",
        "context_pack",
        "retrieval",
        "model_queue",
        "upstream_first_token",
    ):
        assert _moved(o0, o1, f'tidewire_turn_stage_seconds_count{{stage="{stage}"}}') >= 3, stage
    assert _moved(o0, o1, "tidewire_orchestrator_cancel_requests") >= 1
    assert _moved(o0, o1, "tidewire_orchestrator_cancel_success") >= 1
    assert _moved(o0, o1, "tidewire_upstream_started") >= 4
    assert _moved(o0, o1, "tidewire_upstream_aborted") >= 1
    assert o1["tidewire_upstream_orphaned"] == 0
    assert _moved(o0, o1, "tidewire_orchestrator_tool_timeouts") >= 1
    assert _moved(o0, o1, "tidewire_checkpoint_append_seconds_count") >= 5
    assert _moved(o0, o1, 'tidewire_turn_seconds_count{status="completed"}') >= 3
    assert _moved(o0, o1, 'tidewire_tool_call_seconds_count{outcome="ok",tool="clock"}') >= 1
    assert _moved(o0, o1, 'tidewire_tool_call_seconds_count{outcome="timeout",tool="slow_lookup"}') >= 1
    for name in (
        "tidewire_turn_queue_pending",
        "tidewire_turn_queue_waiting",
        "tidewire_turn_queue_ack_pending",
        "tidewire_dead_letter_messages",
        "tidewire_orchestrator_stale_rejections",
        "tidewire_orchestrator_lease_lost",
        "tidewire_orchestrator_sessions_owned",
    ):
        assert name in o1, name
    # tool worker
    assert _moved(t0, t1, 'tidewire_tool_jobs{outcome="ok",tool="clock"}') >= 1
    assert _moved(t0, t1, 'tidewire_tool_timeouts{tool="slow_lookup"}') >= 1
    assert _moved(t0, t1, 'tidewire_tool_run_seconds_count{outcome="ok",tool="clock"}') >= 1
    assert "tidewire_tool_worker_running" in t1


def test_logs_carry_the_trace_id_of_the_current_span() -> None:
    """shared.logs formats `trace_id` when the record has one; telemetry's filter provides it."""
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        logs.setup("test")
        stream = io.StringIO()
        root.handlers[0].setStream(stream)  # type: ignore[attr-defined]
        telemetry.setup("test")
        with telemetry.tracer.start_as_current_span("work") as span:
            logging.getLogger("tidewire.test").warning("inside a span")
        logging.getLogger("tidewire.test").warning("outside")
        lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)
    assert lines[0]["trace_id"] == telemetry.trace_id_of(span)
    assert "trace_id" not in lines[1]


def test_prometheus_rendering_of_histograms_and_observed_values() -> None:
    telemetry.observe("tidewire_test_gauge", lambda: [({"k": 'a"b'}, 2)])
    telemetry.observe_stage("test_stage", 0.02)
    text = telemetry.render_prometheus([("tidewire_test_extra", "untyped", 7)])
    assert "# TYPE tidewire_test_gauge gauge" in text
    assert 'tidewire_test_gauge{k="a\\"b"} 2' in text
    assert 'tidewire_turn_stage_seconds_bucket{stage="test_stage",le="0.01"} 0' in text
    assert 'tidewire_turn_stage_seconds_bucket{stage="test_stage",le="0.025"} 1' in text
    assert 'tidewire_turn_stage_seconds_bucket{stage="test_stage",le="+Inf"} 1' in text
    assert 'tidewire_turn_stage_seconds_count{stage="test_stage"} 1' in text
    assert "tidewire_test_extra 7" in text


def test_top_shows_ttft_quantiles_sockets_and_queue_of_the_live_stack(traced, capsys) -> None:
    stack, _ = traced
    urls = [
        f"{stack.url}/metrics",
        f"http://127.0.0.1:{_port(stack, 'orchestrator')}/metrics",
        f"http://127.0.0.1:{_port(stack, 'tool_workers')}/metrics",
    ]
    top.main([*(a for u in urls for a in ("--metrics", u)), "--once", "--interval", "0.2"])
    view = capsys.readouterr().out
    assert "3/3 endpoints up" in view
    p50 = view.split("TTFT")[1].split("p50")[1].split()[0]
    assert p50 != "—"  # the earlier tests measured turns
    assert "turn queue" in view and "sockets" in view and "upstream_first_token" in view


def test_top_quantiles_follow_prometheus_interpolation() -> None:
    text = "\n".join(
        [
            "# TYPE h histogram",
            'h_bucket{le="0.1"} 50',
            'h_bucket{le="0.2"} 90',
            'h_bucket{le="1"} 100',
            'h_bucket{le="+Inf"} 100',
            "h_count 100",
            'g{a="x"} 2',
            'g{a="y"} 3',
        ]
    )
    samples = top.parse(text + "\nthis line is junk")  # a live view skips what it cannot read
    assert top.total(samples, "g") == 5 and top.total(samples, "g", a="y") == 3
    assert top.quantile(0.5, samples, None, "h") == pytest.approx(0.1)
    assert top.quantile(0.7, samples, None, "h") == pytest.approx(0.15)
    assert top.quantile(0.99, samples, None, "h") == pytest.approx(0.2 + 0.8 * 0.9)
    assert top.quantile(0.5, samples, None, "missing") is None
    # the window since an earlier scrape: 10 more observations, all in the (0.1, 0.2] bucket
    later = top.parse(
        text.replace('le="0.2"} 90', 'le="0.2"} 100')
        .replace('le="1"} 100', 'le="1"} 110')
        .replace('le="+Inf"} 100', 'le="+Inf"} 110')
        .replace("h_count 100", "h_count 110")
    )
    assert top.quantile(0.5, later, samples, "h") == pytest.approx(0.15)
    assert top.targets_from({"url": "http://g:1", "metrics": ["http://o:2/metrics"]}) == [
        "http://o:2/metrics"
    ]
    assert top.targets_from({"url": "http://g:1/"}) == ["http://g:1/metrics"]
