"""The local stack as processes: the embedded servers, gateways, orchestrators and tool workers.

Used by `tidewire dev`, the benchmarks and the tests, so that everything runs the same way: each
service is its own `python -m <service>` process configured only by `TIDEWIRE_*` variables, and
each dies with its parent (PR_SET_PDEATHSIG), so stopping the stack leaves no orphan behind.

A `Stack` on its own never restarts anything: tests kill services on purpose and need them to stay
dead. `tidewire dev` wraps its stack in a `Supervisor`, which restarts whatever exits (with
exponential backoff) until it is told to stop, and keeps `.tidewire/dev-status.json` up to date.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Protocol


class Stoppable(Protocol):
    """What `Supervisor.run` waits on: a `threading.Event`, or `tidewire.dev.stopflag.StopFlag` when a
    signal handler sets it."""

    def is_set(self) -> bool: ...

    def wait(self, timeout: float | None = None) -> bool: ...


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _die_with_parent() -> Callable[[], None] | None:
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(None, use_errno=True)
    parent = os.getpid()

    def preexec() -> None:
        libc.prctl(1, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != parent:
            os._exit(1)

    return preexec


@dataclass
class Service:
    name: str
    module: str
    env: dict[str, str]
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    # In a process group of its own, a terminal's Ctrl-C reaches only the parent, which then stops
    # the services in order (gateways drain first) instead of all of them at once.
    own_process_group: bool = False
    # A prefix for the command line, e.g. `ip netns exec <ns>` (tidewire.dev.netns.Host.wrap)
    wrap: Callable[[list[str]], list[str]] | None = None
    started_at: float = 0.0  # time.monotonic() of the last start
    started_wall: float = 0.0  # time.time() of the last start

    def start(self) -> None:
        """Starts (or restarts) the process. The parent-death signal is tied to the calling *thread*:
        call this from a thread that lives as long as the service should (the main thread)."""
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child
        argv = [sys.executable, "-m", self.module]
        self.proc = subprocess.Popen(
            self.wrap(argv) if self.wrap is not None else argv,
            env={**os.environ, **self.env},
            stdout=log,
            stderr=subprocess.STDOUT,
            preexec_fn=_die_with_parent(),
            process_group=0 if self.own_process_group else None,
        )
        log.close()
        self.started_at, self.started_wall = time.monotonic(), time.time()

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        if self.alive():
            assert self.proc is not None
            self.proc.kill()
            self.proc.wait(5)

    def terminate(self, timeout: float = 15.0) -> None:
        if not self.alive():
            return
        assert self.proc is not None
        self.proc.terminate()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


# Gateways first (they close their sockets with "server restarting" while the rest still works),
# then the orchestrators (their turns are checkpointed and resumable), then the tool workers.
STOP_ORDER = ("gateway", "orchestrator", "tool_workers")


@dataclass
class Stack:
    infra_env: dict[str, str]
    log_dir: Path
    orchestrators: int = 2
    tool_workers: int = 1
    extra_env: dict[str, str] = field(default_factory=dict)
    http_port: int = 0
    services: list[Service] = field(default_factory=list)
    gateways: int = 1  # the first is "gateway" on http_port; the others "gateway-2"… on ports of their own
    own_process_groups: bool = False

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def gateway_urls(self) -> list[str]:
        """Every gateway that was started, the first (`url`) first."""
        latest = {s.name: s for s in self.services if s.module == "gateway"}
        return [f"http://127.0.0.1:{s.env['port']}" for s in latest.values()]

    def service(
        self,
        name: str,
        module: str,
        env: dict[str, str] | None = None,
        wrap: Callable[[list[str]], list[str]] | None = None,
    ) -> Service:
        svc = Service(
            name,
            module,
            {**self.infra_env, **self.extra_env, **(env or {})},
            self.log_dir / f"{name}.log",
            own_process_group=self.own_process_groups,
            wrap=wrap,
        )
        self.services.append(svc)
        svc.start()
        return svc

    def add_gateway(self, name: str = "gateway", port: int | None = None) -> Service:
        port = port or free_port()
        svc = self.service(name, "gateway", {"TIDEWIRE_HTTP_PORT": str(port), "TIDEWIRE_GATEWAY_ID": name})
        svc.env["port"] = str(port)
        wait_http(f"http://127.0.0.1:{port}/readyz", proc=svc)
        return svc

    def add_orchestrator(
        self,
        name: str,
        *,
        address: str = "127.0.0.1",
        wrap: Callable[[list[str]], list[str]] | None = None,
        env: dict[str, str] | None = None,
    ) -> Service:
        """`env` is added to its environment; `address` is where its health port listens and what it advertises to its peers (an
        address on a namespace bridge, with `wrap` running it inside that namespace)."""
        port = free_port()
        env = {**(env or {}), "TIDEWIRE_ORCHESTRATOR_ID": name, "TIDEWIRE_HEALTH_PORT": str(port)}
        if address != "127.0.0.1":
            env.update(TIDEWIRE_HOST=address, TIDEWIRE_ADVERTISE_URL=f"http://{address}:{port}")
        svc = self.service(name, "orchestrator", env, wrap=wrap)
        svc.env["port"] = str(port)
        svc.env["address"] = address
        wait_http(f"http://{address}:{port}/readyz", proc=svc)
        return svc

    def add_tool_worker(self, name: str) -> Service:
        port = free_port()
        svc = self.service(name, "tool_workers", {"TIDEWIRE_HEALTH_PORT": str(port)})
        svc.env["port"] = str(port)
        wait_http(f"http://127.0.0.1:{port}/readyz", proc=svc)
        return svc

    def by_name(self, name: str) -> Service:
        return next(s for s in reversed(self.services) if s.name == name)

    def start(self) -> Stack:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.http_port = self.http_port or free_port()
        self.add_gateway("gateway", self.http_port)
        for i in range(1, self.gateways):
            self.add_gateway(f"gateway-{i + 1}")
        for i in range(self.orchestrators):
            self.add_orchestrator(f"orchestrator-{i + 1}")
        for i in range(self.tool_workers):
            self.add_tool_worker(f"tool-worker-{i + 1}")
        return self

    def stop(self, *, ordered: bool = False, timeout: float = 15.0) -> None:
        """SIGTERM, then SIGKILL whatever is still running after `timeout`. `ordered` stops one
        tier at a time (STOP_ORDER, then any other module), each with its own `timeout`."""
        if not ordered:
            self._stop_tier(self.services, timeout)
            return
        tiers = [[s for s in self.services if s.module == m] for m in STOP_ORDER]
        tiers.append([s for s in self.services if s.module not in STOP_ORDER])
        for tier in tiers:
            self._stop_tier(tier, timeout)

    @staticmethod
    def _stop_tier(services: list[Service], timeout: float) -> None:
        for svc in services:
            if svc.alive():
                assert svc.proc is not None
                svc.proc.terminate()
        deadline = time.monotonic() + timeout
        for svc in services:
            if svc.proc is not None:
                try:
                    svc.proc.wait(max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    svc.proc.kill()
                    svc.proc.wait(5)


@dataclass(frozen=True, kw_only=True)
class RestartPolicy:
    """Exponential backoff between restarts of one service, like a kubelet's CrashLoopBackOff
    (with a shorter cap: this is a laptop). A service that stayed up `reset_after_s` starts over."""

    initial_s: float = 0.2
    cap_s: float = 10.0
    reset_after_s: float = 30.0


def describe_exit(returncode: int) -> str:
    if returncode < 0:
        try:
            return signal.Signals(-returncode).name
        except ValueError:
            return f"signal {-returncode}"
    return f"exit code {returncode}"


class _Watch:
    """What the supervisor knows about one service name (one per name: memory is bounded)."""

    __slots__ = ("svc", "restarts", "backoff_s", "restart_at", "last_exit", "last_exit_at")

    def __init__(self, svc: Service, initial_s: float) -> None:
        self.svc = svc
        self.restarts = 0
        self.backoff_s = initial_s
        self.restart_at: float | None = None  # monotonic; set while waiting out a backoff
        self.last_exit: str | None = None
        self.last_exit_at: float | None = None  # wall clock


class Supervisor:
    """Keeps every service of a started `Stack` running until told to stop.

    A service that exits, for any reason (SIGKILL included), is started again with the same name,
    environment and port after a backoff (`RestartPolicy`); each exit and restart is printed and
    counted. `run()` must be called from the main thread: the services' parent-death signal fires
    when the thread that started them ends. It wakes at most every `poll_s` (or when a restart is
    due), so an idle stack costs a few `waitpid` calls a second. The status file is rewritten
    (atomically) when something changes and at least every `heartbeat_s`.
    """

    def __init__(
        self,
        stack: Stack,
        *,
        policy: RestartPolicy | None = None,
        status_path: Path | None = None,
        poll_s: float = 0.5,
        heartbeat_s: float = 2.0,
        out: IO[str] | None = None,
    ) -> None:
        self.stack = stack
        self.policy = policy or RestartPolicy()
        self.status_path = status_path
        self.poll_s = poll_s
        self.heartbeat_s = heartbeat_s
        self.out = out or sys.stderr
        self.state = "running"
        self._watches: dict[str, _Watch] = {}
        self._written_at = -float("inf")

    def run(self, stop: Stoppable) -> None:
        """Supervises until `stop` is set; does not stop the services (see `stop()`)."""
        self.check()
        while not stop.is_set():
            now = time.monotonic()
            due = [w.restart_at for w in self._watches.values() if w.restart_at is not None]
            wait = min([self.poll_s, *(max(0.0, t - now) for t in due)])
            if stop.wait(wait):
                break
            self.check()

    def check(self) -> None:
        """One pass: notices exits, schedules and performs due restarts, refreshes the status file."""
        now = time.monotonic()
        changed = self._sync_services()
        for w in self._watches.values():
            svc = w.svc
            if w.restart_at is None and svc.proc is not None and svc.proc.poll() is not None:
                changed = True
                self._on_exit(w, svc.proc.returncode, now)
            if w.restart_at is not None and w.restart_at <= now:
                changed = True
                self._restart(w)
        if changed or now - self._written_at >= self.heartbeat_s:
            self.write_status()

    def stop(self) -> None:
        """Stops every service in order (gateways first) and records that in the status file."""
        self.state = "stopping"
        self.write_status()
        self.stack.stop(ordered=True)
        self.state = "stopped"
        self.write_status()

    def _sync_services(self) -> bool:
        latest = {s.name: s for s in self.stack.services}  # the last service started under each name
        changed = latest.keys() != self._watches.keys()
        for name in self._watches.keys() - latest.keys():
            del self._watches[name]
        for name, svc in latest.items():
            w = self._watches.get(name)
            if w is None:
                self._watches[name] = _Watch(svc, self.policy.initial_s)
            elif w.svc is not svc:  # someone replaced it (e.g. stack.add_orchestrator with that name)
                w.svc, w.restart_at, changed = svc, None, True
        return changed

    def _on_exit(self, w: _Watch, returncode: int, now: float) -> None:
        up_for = now - w.svc.started_at
        if up_for >= self.policy.reset_after_s:
            w.backoff_s = self.policy.initial_s
        delay = w.backoff_s
        w.backoff_s = min(self.policy.cap_s, delay * 2)
        w.restart_at = now + delay
        w.last_exit, w.last_exit_at = describe_exit(returncode), time.time()
        print(
            f"{w.svc.name} (pid {w.svc.pid}) exited: {w.last_exit} after {up_for:.1f} s up; "
            f"restart #{w.restarts + 1} in {delay:.1f} s (log: {w.svc.log_path})",
            file=self.out,
            flush=True,
        )

    def _restart(self, w: _Watch) -> None:
        w.restart_at = None
        with open(w.svc.log_path, "ab") as log:
            log.write(f"--- tidewire dev: restarting after {w.last_exit} ---\n".encode())
        try:
            w.svc.start()
        except (OSError, subprocess.SubprocessError) as e:  # e.g. out of processes: retry after a backoff
            print(f"{w.svc.name}: restart failed: {e}", file=self.out, flush=True)
            w.restart_at = time.monotonic() + w.backoff_s
            w.backoff_s = min(self.policy.cap_s, w.backoff_s * 2)
            return
        w.restarts += 1
        print(f"{w.svc.name} restarted (pid {w.svc.pid}, restart #{w.restarts})", file=self.out, flush=True)

    def status(self) -> dict[str, Any]:
        services: dict[str, dict[str, Any]] = {}
        now = time.monotonic()
        for name, w in self._watches.items():
            svc = w.svc
            if w.restart_at is not None:
                state = "backoff"
            elif svc.alive():
                state = "running"
            else:
                state = "exited"
            services[name] = {
                "module": svc.module,
                "pid": svc.proc.pid if svc.proc is not None else None,
                "state": state,
                "port": int(svc.env["port"]) if "port" in svc.env else None,
                "restarts": w.restarts,
                "last_exit": w.last_exit,
                "last_exit_at": w.last_exit_at,
                "up_since": svc.started_wall if state == "running" else None,
                "next_restart_in_s": round(max(0.0, w.restart_at - now), 3)
                if w.restart_at is not None
                else None,
            }
        return {
            "supervisor_pid": os.getpid(),
            "state": self.state,
            "updated_at": time.time(),
            "services": services,
        }

    def write_status(self) -> None:
        self._written_at = time.monotonic()
        if self.status_path is None:
            return
        tmp = self.status_path.with_name(self.status_path.name + ".tmp")
        tmp.write_text(json.dumps(self.status(), indent=2))
        os.replace(tmp, self.status_path)  # readers never see half a file


def wait_http(url: str, timeout: float = 60.0, proc: Service | None = None) -> None:
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if proc is not None and not proc.alive():
            raise RuntimeError(f"{proc.name} exited: {proc.log_path.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except Exception as e:  # noqa: BLE001 - not up yet
            last = e
        time.sleep(0.1)
    raise TimeoutError(f"{url} not ready: {last}")
