"""The local stack as processes: the embedded servers, one gateway, orchestrators and a tool worker.

Used by `tidewire dev`, the benchmarks and the tests, so that everything runs the same way: each
service is its own `python -m <service>` process configured only by `TIDEWIRE_*` variables, and
each dies with its parent (PR_SET_PDEATHSIG), so stopping the stack leaves no orphan behind.
"""

from __future__ import annotations

import ctypes
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

    def start(self) -> None:
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child
        self.proc = subprocess.Popen([sys.executable, "-m", self.module], env={**os.environ, **self.env},
                                     stdout=log, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent())
        log.close()

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


@dataclass
class Stack:
    infra_env: dict[str, str]
    log_dir: Path
    orchestrators: int = 2
    tool_workers: int = 1
    extra_env: dict[str, str] = field(default_factory=dict)
    http_port: int = 0
    services: list[Service] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def service(self, name: str, module: str, env: dict[str, str] | None = None) -> Service:
        svc = Service(name, module, {**self.infra_env, **self.extra_env, **(env or {})},
                      self.log_dir / f"{name}.log")
        self.services.append(svc)
        svc.start()
        return svc

    def add_gateway(self, name: str = "gateway", port: int | None = None) -> Service:
        port = port or free_port()
        svc = self.service(name, "gateway", {"TIDEWIRE_HTTP_PORT": str(port), "TIDEWIRE_GATEWAY_ID": name})
        svc.env["port"] = str(port)
        wait_http(f"http://127.0.0.1:{port}/readyz", proc=svc)
        return svc

    def add_orchestrator(self, name: str) -> Service:
        port = free_port()
        svc = self.service(name, "orchestrator", {"TIDEWIRE_ORCHESTRATOR_ID": name,
                                                  "TIDEWIRE_HEALTH_PORT": str(port)})
        svc.env["port"] = str(port)
        wait_http(f"http://127.0.0.1:{port}/readyz", proc=svc)
        return svc

    def by_name(self, name: str) -> Service:
        return next(s for s in reversed(self.services) if s.name == name)

    def start(self) -> Stack:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.http_port = self.http_port or free_port()
        self.add_gateway("gateway", self.http_port)
        for i in range(self.orchestrators):
            self.add_orchestrator(f"orchestrator-{i + 1}")
        for i in range(self.tool_workers):
            self.service(f"tool-worker-{i + 1}", "tool_workers")
        return self

    def stop(self) -> None:
        for svc in self.services:
            if svc.alive():
                assert svc.proc is not None
                svc.proc.terminate()
        deadline = time.monotonic() + 15
        for svc in self.services:
            if svc.proc is not None:
                try:
                    svc.proc.wait(max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    svc.proc.kill()
                    svc.proc.wait(5)


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
