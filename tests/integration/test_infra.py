"""The infrastructure launcher (tidewire/dev/infra.py) and the `spawn` fixture, against real servers."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import stat
import tempfile
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import nats
import psutil
import pytest
import redis.asyncio as aioredis

from tidewire.dev.infra import EmbeddedInfra, Endpoints, InfraError, Infrastructure

STREAM = "INFRA_PROBE"


def _gone(pid: int) -> bool:
    """Exited; a zombie counts (this machine's init does not reap re-parented orphans)."""
    try:
        return bool(psutil.Process(pid).status() == psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return True


def _tree(pids: dict[str, int]) -> list[int]:
    """The servers' pids and those of every process they forked (postgres backends...)."""
    found = list(pids.values())
    for pid in pids.values():
        found += [child.pid for child in psutil.Process(pid).children(recursive=True)]
    return found


@pytest.fixture(scope="module")
def own(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedInfra]:
    """An EmbeddedInfra of this module's own, which its tests may kill and restart at will."""
    servers = EmbeddedInfra(tmp_path_factory.mktemp("own-infra"), use_env=False)
    servers.start()
    yield servers
    servers.stop()


async def _write_probe_data(ep: Endpoints) -> None:
    nc = await nats.connect(ep.nats_url)
    try:
        js = nc.jetstream()
        await js.add_stream(name=STREAM, subjects=["infra.probe"])
        ack = await js.publish("infra.probe", b"kept")
        assert ack.stream == STREAM
    finally:
        await nc.close()
    conn = await asyncpg.connect(ep.postgres_dsn)
    try:
        await conn.execute("create table infra_probe (id int primary key, v text not null)")
        await conn.execute("insert into infra_probe values (1, 'kept')")
        await conn.execute("checkpoint")  # writes through the data dir's absolute path
    finally:
        await conn.close()
    r = aioredis.from_url(ep.redis_url)
    try:
        await r.set("infra:probe", "kept")
    finally:
        await r.aclose()


async def _assert_probe_data(ep: Endpoints) -> None:
    nc = await nats.connect(ep.nats_url)
    try:
        js = nc.jetstream()
        info = await js.stream_info(STREAM)
        assert info.state.messages == 1
        msg = await js.get_msg(STREAM, 1)
        assert msg.data == b"kept"
    finally:
        await nc.close()
    conn = await asyncpg.connect(ep.postgres_dsn)
    try:
        assert await conn.fetchval("select v from infra_probe where id = 1") == "kept"
    finally:
        await conn.close()
    r = aioredis.from_url(ep.redis_url)
    try:
        assert await r.get("infra:probe") == b"kept"
    finally:
        await r.aclose()


async def test_servers_answer(infra: Infrastructure) -> None:
    ep = infra.endpoints
    nc = await nats.connect(ep.nats_url)
    try:
        account = await nc.jetstream().account_info()  # raises unless JetStream is enabled
        assert account.limits is not None
        assert nc.max_payload == 8 * 1024 * 1024
    finally:
        await nc.close()

    conn = await asyncpg.connect(ep.postgres_dsn)
    try:
        assert await conn.fetchval("select 1") == 1
        assert await conn.fetchval("show synchronous_commit") == "on"
        assert await conn.fetchval("show fsync") == "on"
        assert await conn.fetchval("show max_connections") == "200"
        assert await conn.fetchval("select current_database()") == "tidewire"
    finally:
        await conn.close()

    r = aioredis.from_url(ep.redis_url)
    try:
        assert await r.ping() is True
        assert await r.config_get("appendonly") == {"appendonly": "yes"}
        assert await r.config_get("appendfsync") == {"appendfsync": "always"}
    finally:
        await r.aclose()


def test_embedded_layout_and_nats_durability(own: EmbeddedInfra) -> None:
    state = own.state_dir
    for name in ("nats", "postgres", "redis"):
        assert (state / name).is_dir()
        assert own.log_path(name).is_file()
    assert (state / "postgres" / "data" / "PG_VERSION").is_file()
    assert (state / "redis" / "appendonly.aof").exists()
    ports = json.loads((state / "ports.json").read_text())
    ep = own.endpoints
    assert ep.nats_url == f"nats://127.0.0.1:{ports['nats']}"
    assert ep.postgres_dsn == f"postgresql://postgres@127.0.0.1:{ports['postgres']}/tidewire"
    assert ep.redis_url == f"redis://127.0.0.1:{ports['redis']}/0"
    assert own.nats_monitor_url == f"http://127.0.0.1:{ports['nats_monitor']}"

    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(f"{own.nats_monitor_url}/varz", timeout=5) as resp:
        varz = json.load(resp)
    assert varz["jetstream"]["config"]["sync_always"] is True
    assert varz["jetstream"]["config"]["store_dir"].startswith(str(state / "nats"))
    assert varz["max_payload"] == 8 * 1024 * 1024


async def test_data_survives_kill_and_restart(own: EmbeddedInfra) -> None:
    ep = own.endpoints
    await _write_probe_data(ep)
    before = own.pids()
    assert set(before) == {"nats", "postgres", "redis"}
    tree = _tree(before)

    for name in ("nats", "postgres", "redis"):
        await asyncio.to_thread(own.kill, name)  # restart() below then forks from a worker thread
    assert own.pids() == {}
    assert all(_gone(pid) for pid in tree)

    for name in ("nats", "postgres", "redis"):
        await asyncio.to_thread(own.restart, name)
    after = own.pids()
    assert own.endpoints == ep  # same ports
    assert set(after) == set(before) and not set(after.values()) & set(before.values())
    await _assert_probe_data(ep)


async def test_restart_failure_reports_the_server_log(own: EmbeddedInfra) -> None:
    port = int(own.endpoints.redis_url.rsplit(":", 1)[1].split("/")[0])
    own.kill("redis")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as squatter:
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        squatter.bind(("127.0.0.1", port))
        squatter.listen()
        with pytest.raises(InfraError, match=r"(?s)redis exited .*Log tail:.*Address already in use"):
            own.restart("redis")
    assert "redis" not in own.pids()
    await asyncio.to_thread(own.restart, "redis")
    r = aioredis.from_url(own.endpoints.redis_url)
    try:
        assert await r.ping() is True
    finally:
        await r.aclose()


def test_one_launcher_per_state_dir(own: EmbeddedInfra) -> None:
    with pytest.raises(InfraError, match="in use by another launcher"):
        EmbeddedInfra(own.state_dir, use_env=False).start()
    assert set(own.pids()) == {"nats", "postgres", "redis"}  # the refused one touched nothing


def test_env_overrides_are_used_instead_of_servers(
    own: EmbeddedInfra, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for var, value in own.endpoints.as_env().items():
        monkeypatch.setenv(var, value)
    servers = EmbeddedInfra(tmp_path / "unused")
    try:
        assert servers.start() == own.endpoints
        assert servers.pids() == {}
        assert servers.managed == ()
        assert servers.nats_monitor_url is None
        with pytest.raises(InfraError, match="TIDEWIRE_REDIS_URL"):
            servers.kill("redis")
    finally:
        servers.stop()
    assert set(own.pids()) == {"nats", "postgres", "redis"}


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A folder every user can traverse (unlike pytest's tmp dirs, below a 0700 /tmp/pytest-of-<user>)."""
    path = Path(tempfile.mkdtemp(prefix="tidewire-infra-test-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


async def test_postgres_in_a_folder_its_user_cannot_traverse(own: EmbeddedInfra) -> None:
    """pytest keeps /tmp/pytest-of-root at 0700 and resets it at every session start, so postgres (run
    as an unprivileged user when we are root) must work without traversing it, checkpoints included."""
    blocked = [p for p in own.state_dir.parents if not p.stat().st_mode & stat.S_IXOTH]
    if os.geteuid() != 0 or not blocked:
        pytest.skip(reason="only relevant as root below a folder closed to other users")
    mode = blocked[0].stat().st_mode
    conn = await asyncpg.connect(own.endpoints.postgres_dsn)
    try:
        assert await conn.fetchval("show data_directory") == "/proc/self/cwd"
        await conn.execute("create table if not exists infra_blocked (x int)")
        await conn.execute("checkpoint")
        assert await conn.fetchval("select pg_current_wal_flush_lsn() is not null") is True
    finally:
        await conn.close()
    assert blocked[0].stat().st_mode == mode  # we did not open it up
    assert (own.state_dir / "postgres" / "data" / "PG_VERSION").is_file()


async def test_stop_leaves_nothing_and_next_start_reuses_data(open_dir: Path, tmp_path: Path) -> None:
    state = open_dir / "state"
    first = EmbeddedInfra(state, use_env=False, log_dir=tmp_path / "logs")
    ep = await asyncio.to_thread(first.start)
    await _write_probe_data(ep)
    conn = await asyncpg.connect(ep.postgres_dsn)  # a client still connected does not delay stop()
    assert await conn.fetchval("show data_directory") == str(state / "postgres" / "data")
    conn = await asyncpg.connect(ep.postgres_dsn)  # a client still connected does not delay stop()
    tree = _tree(first.pids())
    assert len(tree) > 3  # postgres has its helper processes
    await asyncio.to_thread(first.stop)
    await conn.close(timeout=1)
    assert [pid for pid in tree if psutil.pid_exists(pid)] == []
    assert first.pids() == {}
    assert (tmp_path / "logs" / "postgres.log").is_file()

    # Next run: same data; remembered ports reused, except one that something else has taken meanwhile.
    old_redis_port = json.loads((state / "ports.json").read_text())["redis"]
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as squatter:
        squatter.bind(("127.0.0.1", old_redis_port))
        squatter.listen()
        second = EmbeddedInfra(state, use_env=False)
        try:
            ep2 = await asyncio.to_thread(second.start)
            assert (ep2.nats_url, ep2.postgres_dsn) == (ep.nats_url, ep.postgres_dsn)
            assert ep2.redis_url != ep.redis_url
            assert json.loads((state / "ports.json").read_text())["redis"] != old_redis_port
            await _assert_probe_data(ep2)
            tree = _tree(second.pids())
        finally:
            await asyncio.to_thread(second.stop)
    assert [pid for pid in tree if psutil.pid_exists(pid)] == []


def test_spawn_runs_a_module_with_the_infra_env(spawn: Callable[..., Any], infra: Infrastructure) -> None:
    proc = spawn("http.server", {"TIDEWIRE_PROBE": "1"}, name="web", args=["0", "--bind", "127.0.0.1"])
    proc.wait_for_log("Serving HTTP on 127.0.0.1")
    env = psutil.Process(proc.pid).environ()
    assert env["TIDEWIRE_PROBE"] == "1"
    assert env["TIDEWIRE_NATS_URL"] == infra.endpoints.nats_url
    assert env["TIDEWIRE_POSTGRES_DSN"] == infra.endpoints.postgres_dsn

    proc.stop()
    assert psutil.Process(proc.pid).status() == psutil.STATUS_STOPPED
    proc.cont()
    assert psutil.Process(proc.pid).status() != psutil.STATUS_STOPPED
    assert proc.terminate(timeout=5) is not None
    assert not proc.alive

    again = spawn("http.server", {}, name="web", args=["0", "--bind", "127.0.0.1"])
    assert again.log_path.name == "web.2.log"
    again.wait_for_log("Serving HTTP")
    again.kill()
    assert not again.alive
    with pytest.raises(AssertionError, match="exited with code"):
        again.wait_for_log("never printed", timeout=5)
