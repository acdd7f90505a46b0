"""The happy path over WebSocket on real servers, and the guarantees it already gives."""

from __future__ import annotations

import asyncio

import asyncpg

from tests.integration.conftest import make_token
from tests.integration.wsclient import WsTestClient
from tests.waits import eventually_sync, run_process, wait_process
from tidewire import invariants


async def test_answer_streams_and_deltas_concatenate_to_turn_end(stack, infra) -> None:
    async with WsTestClient(stack.url, make_token()) as c:
        ready = await c.connect()
        assert ready.last_seq == 0
        cmid = await c.send_message("hello there, tell me something")
        ack = await c.ack_for(cmid)
        assert not ack.duplicate
        end = await c.until_turn_end(ack.turn_id)
        assert end.status == "completed" and end.text
        invariants.check_seqs(c.events)
        turns = invariants.check_turns(c.events)
        assert turns[ack.turn_id].text == end.text
        assert [type(e).__name__ for e in c.events][:2] == ["Message", "TurnStart"]
        assert c.events[0].seq == ack.seq == 1
    conn = await asyncpg.connect(infra.endpoints.postgres_dsn)
    try:
        row = await conn.fetchrow("SELECT text, status FROM turns WHERE turn_id = $1", ack.turn_id)
        assert row["text"] == end.text and row["status"] == "completed"
        user = await conn.fetchval(
            "SELECT count(*) FROM events WHERE session_id = $1 AND client_msg_id = $2", ready.session_id, cmid
        )
        assert user == 1
    finally:
        await conn.close()


async def test_user_message_row_exists_before_ack(stack, infra) -> None:
    """Polls Postgres from the moment the ack arrives: the row must already be there."""
    conn = await asyncpg.connect(infra.endpoints.postgres_dsn)
    try:
        async with WsTestClient(stack.url, make_token()) as c:
            ready = await c.connect()
            for i in range(5):
                cmid = await c.send_message(f"message {i}")
                ack = await c.ack_for(cmid)
                seq = await conn.fetchval(
                    "SELECT seq FROM events WHERE session_id = $1 AND client_msg_id = $2",
                    ready.session_id,
                    cmid,
                )
                assert seq == ack.seq
                await c.until_turn_end(ack.turn_id)
            invariants.check_seqs(c.events)
            invariants.check_turns(c.events)
    finally:
        await conn.close()


async def test_two_orchestrators_share_the_work(stack) -> None:
    from tests.integration.conftest import scrape

    orchestrators = [s for s in stack.services if s.module == "orchestrator" and s.alive()]
    before = {
        o.name: scrape(o.env["port"]).get("tidewire_orchestrator_turns_completed", 0) for o in orchestrators
    }

    async def one(i: int) -> str:
        async with WsTestClient(stack.url, make_token(f"user{i}")) as c:
            await c.connect()
            ack = await c.ack_for(await c.send_message("/sim tokens=30 rate=100\nwork please"))
            await c.until_turn_end(ack.turn_id)
            return ack.turn_id

    turn_ids = await asyncio.gather(*(one(i) for i in range(16)))
    assert len(set(turn_ids)) == 16
    after = {
        o.name: scrape(o.env["port"]).get("tidewire_orchestrator_turns_completed", 0) for o in orchestrators
    }
    done = {name: after[name] - before[name] for name in after}
    assert sum(done.values()) >= 16
    assert all(n > 0 for n in done.values()), f"one orchestrator did all the work: {done}"


def test_tidewire_chat_streams_an_answer_from_piped_input(stack, infra) -> None:
    import sys

    token = make_token("chatter")
    out = run_process(
        [sys.executable, "-m", "tidewire.cli", "chat", "--url", stack.url, "--token", token],
        input="/sim tokens=25\nhello from the terminal\n",
        capture_output=True,
        text=True,
        timeout=60,
        what="tidewire chat answering one piped message and exiting at EOF",
    )
    assert out.returncode == 0, out.stderr
    answer = out.stdout.strip()
    assert answer

    async def stored() -> str:
        conn = await asyncpg.connect(infra.endpoints.postgres_dsn)
        try:
            return await conn.fetchval(
                "SELECT t.text FROM turns t JOIN sessions s USING (session_id) WHERE s.subject = 'chatter'"
            )
        finally:
            await conn.close()

    assert answer == asyncio.run(stored()).strip()


def test_stopping_tidewire_dev_leaves_no_process_behind(tmp_path) -> None:
    import json
    import os
    import signal
    import subprocess
    import sys

    import psutil

    env = {k: v for k, v in os.environ.items() if not k.startswith("TIDEWIRE_")}
    log = tmp_path / "dev.log"  # a file, not a pipe nobody reads while waiting (a full pipe blocks the child)
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tidewire.cli", "dev", "--state-dir", str(tmp_path / "tw")],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=tmp_path,
        )
    try:
        dev_json = tmp_path / "tw" / "dev.json"

        def up() -> bool:
            assert proc.poll() is None, f"tidewire dev exited {proc.returncode}:\n{log.read_text()[-3000:]}"
            return dev_json.exists()

        eventually_sync(up, timeout=90, interval=0.2, what=f"tidewire dev writing {dev_json} (log: {log})")
        info = json.loads(dev_json.read_text())
        assert info["url"].startswith("http://") and info["token"]
        children = psutil.Process(proc.pid).children(recursive=True)
        names = " ".join(" ".join(c.cmdline()) for c in children)
        for expected in ("-m gateway", "-m orchestrator", "-m tool_workers", "nats-server", "redis-server"):
            assert expected in names
        assert sum("-m orchestrator" in " ".join(c.cmdline()) for c in children) == 2
        proc.send_signal(signal.SIGINT)
        wait_process(proc, timeout=40, what="tidewire dev exiting after Ctrl-C", log=log)
    finally:
        if proc.poll() is None:
            proc.kill()

    def left_behind() -> list[str]:
        alive = []
        for c in children:
            try:
                if c.is_running() and c.status() != psutil.STATUS_ZOMBIE:
                    alive.append(" ".join(c.cmdline()))
            except psutil.NoSuchProcess:
                pass
        return alive

    eventually_sync(
        left_behind,
        timeout=10,
        interval=0.1,
        ok=lambda alive: not alive,
        what="every process tidewire dev started to be gone after it exited",
    )
