"""Tool workers against a real nats-server and real `python -m tool_workers` processes.

The dispatcher under test is the orchestrator's own `ToolDispatcher`; workers are spawned with
the test tools enabled (`TIDEWIRE_TEST_TOOLS=1`) and SIGKILLed where a test needs a crash.
"""

from __future__ import annotations

import asyncio
import json
import socket
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
import msgspec
import pytest
from aiohttp import web

from orchestrator.tools import ToolDispatcher, ToolDispatchSettings, ToolOutcome
from proto import bus as busproto
from proto.tools import CallRecord
from shared import subjects
from shared.bus import Bus
from shared.call_ledger import CallLedger
from shared.tool_catalogue import call_key
from tests.waits import within
from tidewire.dev.infra import Infrastructure
from tool_workers.registry import default_registry
from tool_workers.service import FETCH_WAIT_S
from tool_workers.settings import ToolWorkerSettings
from tool_workers.tools.send_email import SIDE_EFFECT_FILE

if TYPE_CHECKING:
    from tests.procs import ServiceProcess

READY = "tool worker ready"


@pytest.fixture
async def bus(infra: Infrastructure) -> AsyncIterator[Bus]:
    b = await Bus.connect(infra.endpoints.nats_url, name="test-tool-dispatch")
    await b.ensure_streams()
    yield b
    await b.close()


@pytest.fixture
async def dispatcher(bus: Bus) -> AsyncIterator[ToolDispatcher]:
    d = ToolDispatcher(
        bus,
        registry=default_registry(ToolWorkerSettings(test_tools=True)),
        settings=ToolDispatchSettings(extra_grace_seconds=2.0),
    )
    await d.start()
    yield d
    await d.close()


@pytest.fixture
def side_effects(tmp_path: Path) -> Path:
    path = tmp_path / "side-effects"
    path.mkdir()
    return path


@pytest.fixture
def start_worker(spawn: Callable[..., ServiceProcess], side_effects: Path) -> Callable[..., ServiceProcess]:
    def _start(name: str = "tool-worker", **env: str) -> ServiceProcess:
        full = {
            "TIDEWIRE_TEST_TOOLS": "1",
            "TIDEWIRE_TOOL_SIDE_EFFECT_DIR": str(side_effects),
            "TIDEWIRE_LOG_LEVEL": "INFO",
            **env,
        }
        return spawn("tool_workers", full, name=name)

    return _start


def new_turn() -> str:
    return "t" + uuid.uuid4().hex[:20]


async def started_on(workers: list[ServiceProcess], call_id: str) -> ServiceProcess:
    """The worker that logged the start of `call_id` (within 15 s)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 15.0
    while loop.time() < deadline:
        for w in workers:
            if f"started call {call_id}" in w.log_text():
                return w
        await asyncio.sleep(0.05)
    raise AssertionError(f"no worker started {call_id}: " + "\n".join(w.log_text()[-2000:] for w in workers))


def emails_sent(side_effects: Path, call_id: str) -> int:
    path = side_effects / SIDE_EFFECT_FILE
    if not path.exists():
        return 0
    return sum(1 for line in path.read_text().splitlines() if json.loads(line)["call_id"] == call_id)


async def test_concurrent_calls_overlap_in_time(dispatcher: ToolDispatcher, start_worker: Any) -> None:
    worker = start_worker()
    await worker.wait_for_log_async(READY)
    turn = new_turn()
    async with asyncio.TaskGroup() as tg:
        tasks = [
            tg.create_task(
                dispatcher.call("s1", turn, f"c{i}", "slow_lookup", {"query": f"q{i}", "seconds": 1.5})
            )
            for i in range(3)
        ]
    outcomes = [t.result() for t in tasks]
    assert all(o.ok for o in outcomes), outcomes
    runs = [json.loads(o.text) for o in outcomes]
    assert max(r["started_at"] for r in runs) < min(r["finished_at"] for r in runs)


async def test_a_tool_past_its_limit_yields_the_explicit_timeout_text(
    dispatcher: ToolDispatcher, start_worker: Any
) -> None:
    worker = start_worker()
    await worker.wait_for_log_async(READY)
    outcome = await dispatcher.call("s1", new_turn(), "late", "slow_lookup", {"query": "q", "seconds": 30})
    assert outcome == ToolOutcome(ok=False, text="slow_lookup timed out after 8 s", timed_out=True)
    await worker.wait_for_log_async("timed out call late")


async def test_cancelling_a_call_cancels_the_running_tool_on_the_worker(
    dispatcher: ToolDispatcher, start_worker: Any
) -> None:
    worker = start_worker()
    await worker.wait_for_log_async(READY)
    call = asyncio.create_task(
        dispatcher.call("s1", new_turn(), "stopme", "slow_lookup", {"query": "q", "seconds": 30})
    )
    await started_on([worker], "stopme")
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    await worker.wait_for_log_async("cancelled call stopme", timeout=5)


async def test_a_call_cancelled_because_its_owner_goes_keeps_running_for_the_next_owner(
    bus: Bus, dispatcher: ToolDispatcher, start_worker: Any
) -> None:
    """A turn cancelled by a lost lease or a shutdown is not a stop: the next owner re-issues the
    call under the same key and gets the run's real result, not "was cancelled"."""
    worker = start_worker()
    await worker.wait_for_log_async(READY)
    turn, args = new_turn(), {"query": "q", "seconds": 2}
    first = asyncio.create_task(
        dispatcher.call("s1", turn, "handover", "slow_lookup", args, abandon_on_cancel=lambda: False)
    )
    await started_on([worker], "handover")
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    successor = ToolDispatcher(bus, registry=default_registry(ToolWorkerSettings(test_tools=True)))
    await successor.start()
    try:
        outcome = await within(
            successor.call("s1", turn, "handover", "slow_lookup", args),
            timeout=12,
            what="the successor's call to join the run still in flight",
        )
    finally:
        await successor.close()
    assert outcome.ok, outcome
    assert json.loads(outcome.text)["query"] == "q"
    assert "cancelled call handover" not in worker.log_text()
    assert worker.log_text().count("started call handover") == 1, "the run was started twice"


async def test_a_call_cancelled_before_it_starts_never_runs(
    dispatcher: ToolDispatcher, start_worker: Any, side_effects: Path
) -> None:
    turn = new_turn()
    call = asyncio.create_task(
        dispatcher.call("s1", turn, "never", "send_email", {"to": "a@example.org", "subject": "hi"})
    )
    await asyncio.sleep(0.5)  # queued, no worker yet
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    worker = start_worker()
    await worker.wait_for_log_async("call never already done")
    assert emails_sent(side_effects, "never") == 0


async def test_idempotent_call_on_a_killed_worker_is_completed_by_another(
    dispatcher: ToolDispatcher, start_worker: Any
) -> None:
    workers = [start_worker("tool-worker-a"), start_worker("tool-worker-b")]
    for w in workers:
        await w.wait_for_log_async(READY)
    call = asyncio.create_task(
        dispatcher.call("s1", new_turn(), "crashy", "slow_lookup", {"query": "q", "seconds": 2.5})
    )
    victim = await started_on(workers, "crashy")
    victim.kill()
    survivor = next(w for w in workers if w is not victim)
    outcome = await call
    assert outcome.ok, outcome
    result = json.loads(outcome.text)
    assert result["worker_pid"] == survivor.pid
    assert result["attempt"] >= 2


async def test_non_idempotent_call_on_a_killed_worker_is_not_retried(
    dispatcher: ToolDispatcher, start_worker: Any, side_effects: Path
) -> None:
    workers = [start_worker("tool-worker-a"), start_worker("tool-worker-b")]
    for w in workers:
        await w.wait_for_log_async(READY)
    call = asyncio.create_task(
        dispatcher.call(
            "s1",
            new_turn(),
            "mail1",
            "send_email",
            {"to": "a@example.org", "subject": "hi", "delay_seconds": 5},
        )
    )
    victim = await started_on(workers, "mail1")
    victim.kill()
    outcome = await call
    assert outcome == ToolOutcome(
        ok=False, text="send_email was interrupted and was not retried because it is not idempotent"
    )
    assert emails_sent(side_effects, "mail1") == 1


async def test_non_idempotent_call_runs_once_and_a_repeat_gets_the_stored_result(
    dispatcher: ToolDispatcher, start_worker: Any, side_effects: Path
) -> None:
    worker = start_worker()
    await worker.wait_for_log_async(READY)
    turn = new_turn()
    args = {"to": "a@example.org", "subject": "hi"}
    first = await dispatcher.call("s1", turn, "mail2", "send_email", args)
    again = await dispatcher.call(
        "s1", turn, "mail2", "send_email", args
    )  # e.g. the turn re-run after a crash
    assert first == again == ToolOutcome(ok=True, text="email to a@example.org sent")
    assert emails_sent(side_effects, "mail2") == 1


async def test_transient_failures_of_an_idempotent_tool_are_retried(
    dispatcher: ToolDispatcher, start_worker: Any
) -> None:
    worker = start_worker()
    await worker.wait_for_log_async(READY)
    outcome = await dispatcher.call("s1", new_turn(), "fl", "flaky", {"failures": 2})
    assert outcome == ToolOutcome(ok=True, text="flaky succeeded on run 3 after 2 transient failures")


async def test_invalid_args_give_a_validation_message(
    dispatcher: ToolDispatcher, bus: Bus, start_worker: Any
) -> None:
    missing = await dispatcher.call("s1", new_turn(), "bad1", "slow_lookup", {"seconds": 1})
    assert not missing.ok
    assert missing.text == "invalid arguments for slow_lookup: Object missing required field `query`"
    wrong = await dispatcher.call("s1", new_turn(), "bad2", "calculator", {"expression": 42})
    assert not wrong.ok and "Expected `str`, got `int` - at `$.expression`" in wrong.text
    unknown = await dispatcher.call("s1", new_turn(), "bad3", "rm_rf", {})
    assert not unknown.ok and unknown.text.startswith("unknown tool 'rm_rf'")

    # The worker validates too: a job published around the dispatcher is refused, not run.
    worker = start_worker()
    await worker.wait_for_log_async(READY)
    turn = new_turn()
    inbox = await bus.nc.subscribe(subjects.tool_result_subject(turn))
    job = busproto.ToolJob(
        session_id="s1",
        turn_id=turn,
        call_id="raw",
        name="slow_lookup",
        args={"query": "q", "bogus": 1},
        deadline_ms=2**53,
        reply_subject=subjects.tool_result_subject(turn),
    )
    await bus.js.publish(subjects.tool_subject("slow"), busproto.bus_encoder.encode(job))
    msg = await within(
        inbox.next_msg(timeout=None),
        timeout=10,
        what="the worker's reply to a job with an unknown argument (it should refuse it)",
        seen=lambda: worker.log_text()[-1500:],
    )
    reply = msgspec.msgpack.decode(msg.data, type=busproto.ToolResultMsg)
    await inbox.unsubscribe()
    assert not reply.ok
    assert reply.text == "invalid arguments for slow_lookup: Object contains unknown field `bogus`"


async def test_call_ledger_starts_a_call_once_and_a_forestalled_call_never(bus: Bus) -> None:
    """The one ledger both sides use (shared/call_ledger.py), against the real KV bucket: the first
    `mark_started` wins, a forestalled ("done" before any start) call can never be started, and
    `get` returns what was stored."""
    ledger = await CallLedger.open(bus, ttl_s=600)
    assert await CallLedger.existing(bus) is not None
    started, forestalled = call_key(new_turn(), "c1"), call_key(new_turn(), "c2")
    assert await ledger.get(started) is None
    assert await ledger.mark_started(started, name="send_email", attempt=1)
    assert not await ledger.mark_started(started, name="send_email", attempt=2)
    assert not await ledger.forestall(started, CallRecord(state="done", name="send_email", text="cancelled"))
    assert await ledger.get(started) == CallRecord(state="started", name="send_email", attempt=1)
    done = CallRecord(state="done", name="send_email", ok=True, text="sent", attempt=1)
    await ledger.mark_done(started, done)
    assert await ledger.get(started) == done

    cancelled = CallRecord(state="done", name="send_email", text="send_email was cancelled")
    assert await ledger.forestall(forestalled, cancelled)
    assert not await ledger.mark_started(forestalled, name="send_email", attempt=1)
    assert await ledger.get(forestalled) == cancelled


async def test_calculator_rejects_code_and_huge_exponents(
    dispatcher: ToolDispatcher, start_worker: Any
) -> None:
    worker = start_worker()
    await worker.wait_for_log_async(READY)
    turn = new_turn()

    async def calc(call_id: str, expression: str) -> ToolOutcome:
        return await dispatcher.call("s1", turn, call_id, "calculator", {"expression": expression})

    assert await calc("ok", "(2 + 3) * 4 - 2 ** 3") == ToolOutcome(ok=True, text="12")
    code = await calc("code", "__import__('os').system('true')")
    assert not code.ok and "function calls" in code.text
    huge = await calc("huge", "9 ** 999999")
    assert not huge.ok and "too large" in huge.text


async def test_sigterm_lets_a_running_tool_finish(dispatcher: ToolDispatcher, start_worker: Any) -> None:
    worker = start_worker()
    await worker.wait_for_log_async(READY)
    call = asyncio.create_task(
        dispatcher.call("s1", new_turn(), "graceful", "slow_lookup", {"query": "q", "seconds": 1.5})
    )
    await started_on([worker], "graceful")
    code = await asyncio.to_thread(worker.terminate, 15.0)
    outcome = await call
    assert outcome.ok, outcome
    assert code == 0
    assert "tool worker stopped" in worker.log_text()


async def test_sigterm_hands_a_tool_that_outlives_the_grace_period_to_another_worker(
    dispatcher: ToolDispatcher, start_worker: Any
) -> None:
    leaving = start_worker("tool-worker-leaving", TIDEWIRE_SHUTDOWN_GRACE_SECONDS="0.3")
    staying = start_worker("tool-worker-staying")
    await leaving.wait_for_log_async(READY)
    await staying.wait_for_log_async(READY)
    # The worker that takes over is started before the call (a start-up slower than the 2 s tool on a
    # loaded machine would let the call finish before SIGTERM), but frozen past its last pull request's
    # expiry, so the call can only land on `leaving`.
    staying.stop()
    await asyncio.sleep(FETCH_WAIT_S + 0.5)
    call = asyncio.create_task(
        dispatcher.call("s1", new_turn(), "handoff", "slow_lookup", {"query": "q", "seconds": 2})
    )
    await started_on([leaving], "handoff")
    staying.cont()
    assert await asyncio.to_thread(leaving.terminate, 15.0) == 0
    assert "call handoff interrupted by shutdown: handed back" in leaving.log_text()
    outcome = await call
    assert outcome.ok, outcome
    assert json.loads(outcome.text)["worker_pid"] == staying.pid


async def test_concurrency_is_capped_per_pool(dispatcher: ToolDispatcher, start_worker: Any) -> None:
    worker = start_worker(TIDEWIRE_CONCURRENCY="1")
    await worker.wait_for_log_async(READY)
    turn = new_turn()
    async with asyncio.TaskGroup() as tg:
        slow = [
            tg.create_task(
                dispatcher.call("s1", turn, f"one{i}", "slow_lookup", {"query": "q", "seconds": 0.5})
            )
            for i in range(2)
        ]
        fast = tg.create_task(dispatcher.call("s1", turn, "calc", "calculator", {"expression": "1+1"}))
    runs = sorted((json.loads(t.result().text) for t in slow), key=lambda r: r["started_at"])
    assert runs[0]["finished_at"] <= runs[1]["started_at"]  # one slot in the slow pool...
    assert fast.result() == ToolOutcome(ok=True, text="2")  # ...and the fast pool has its own


async def test_health_endpoint_reports_a_ready_worker(start_worker: Any) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    worker = start_worker(TIDEWIRE_HEALTH_PORT=str(port))
    await worker.wait_for_log_async(READY)
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http,
        http.get(f"http://127.0.0.1:{port}/readyz") as resp,
    ):
        assert resp.status == 200, await resp.text()
        body = await resp.json()
    assert body["ok"] is True and set(body["pools"]) == {"fast", "slow"}, body
    assert body["checks"] == {"fetching": True, "nats": True}, body


async def test_http_get_reaches_only_allowlisted_hosts_within_its_limits(bus: Bus, start_worker: Any) -> None:
    async def page(_: web.Request) -> web.Response:
        return web.Response(text="hello from the page")

    async def big(_: web.Request) -> web.Response:
        return web.Response(text="x" * 500_000)

    async def hop(request: web.Request) -> web.Response:
        raise web.HTTPFound(f"http://localhost:{request.url.port}/page")

    app = web.Application()
    app.router.add_get("/page", page)
    app.router.add_get("/big", big)
    app.router.add_get("/hop", hop)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    settings = ToolWorkerSettings(http_get_enabled=True, http_get_allowlist=("127.0.0.1",))
    d = ToolDispatcher(bus, registry=default_registry(settings))
    await d.start()
    try:
        worker = start_worker(
            TIDEWIRE_HTTP_GET_ENABLED="1",
            TIDEWIRE_HTTP_GET_ALLOWLIST="127.0.0.1",
            TIDEWIRE_HTTP_GET_MAX_BYTES="1000",
        )
        await worker.wait_for_log_async(READY)
        turn = new_turn()

        async def get(call_id: str, url: str) -> ToolOutcome:
            return await d.call("s1", turn, call_id, "http_get", {"url": url})

        ok = await get("h1", f"http://127.0.0.1:{port}/page")
        assert ok.ok and ok.text.endswith("\nhello from the page")
        truncated = await get("h2", f"http://127.0.0.1:{port}/big")
        assert (
            truncated.ok
            and "(truncated)" in truncated.text
            and truncated.text.split("\n", 1)[1] == "x" * 1000
        )
        elsewhere = await get("h3", f"http://localhost:{port}/page")
        assert elsewhere == ToolOutcome(ok=False, text="http_get: host 'localhost' is not on the allowlist")
        redirected = await get("h4", f"http://127.0.0.1:{port}/hop")
        assert redirected == ToolOutcome(ok=False, text="http_get: host 'localhost' is not on the allowlist")
        scheme = await get("h5", "file:///etc/passwd")
        assert scheme == ToolOutcome(ok=False, text="http_get: only http and https URLs are allowed")
    finally:
        await d.close()
        await runner.cleanup()
