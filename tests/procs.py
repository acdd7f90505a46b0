"""`ServiceProcess`: one tidewire service (`python -m <module>`) run by a test, in its own process group."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path

import psutil

_TAIL_CHARS = 4000


class ServiceProcess:
    """A spawned service. Its stdout and stderr go to `log_path`. It leads its own session and process
    group (start_new_session=True), so kill()/stop()/cont() reach everything it forked."""

    def __init__(self, name: str, popen: subprocess.Popen[bytes], log_path: Path) -> None:
        self.name = name
        self.popen = popen
        self.log_path = log_path

    def __repr__(self) -> str:
        return f"ServiceProcess({self.name!r}, pid={self.pid}, returncode={self.returncode})"

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def returncode(self) -> int | None:
        return self.popen.poll()

    @property
    def alive(self) -> bool:
        return self.popen.poll() is None

    def _signal_group(self, sig: int) -> None:
        # pgid == pid because of start_new_session; works even after the leader exited, while members remain
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, sig)

    def kill(self) -> None:
        """SIGKILL the whole process group (a crash), then reap the leader."""
        self._signal_group(signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout=10)

    def terminate(self, timeout: float = 10.0) -> int:
        """SIGTERM the service (as an orchestrator does), wait up to `timeout` seconds for it to exit,
        SIGKILL the group if it did not; anything left in its group is killed too. Returns the exit code."""
        if self.alive:
            self._signal_group(signal.SIGCONT)  # a stopped process cannot handle SIGTERM
            with contextlib.suppress(ProcessLookupError):
                self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self._signal_group(signal.SIGKILL)
                self.popen.wait(timeout=10)
        self._signal_group(signal.SIGKILL)
        return self.popen.returncode

    def stop(self) -> None:
        """SIGSTOP the group: the service freezes (a GC pause, a hung VM) without closing its sockets.
        Returns once the leader is actually stopped."""
        self._signal_group(signal.SIGSTOP)
        self._await_state(stopped=True)

    def cont(self) -> None:
        """SIGCONT the group after stop(); returns once the leader runs again."""
        self._signal_group(signal.SIGCONT)
        self._await_state(stopped=False)

    def _await_state(self, *, stopped: bool, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        status = "unknown"
        while self.alive:
            try:
                status = psutil.Process(self.pid).status()
            except psutil.NoSuchProcess:
                return
            if (status == psutil.STATUS_STOPPED) == stopped or status == psutil.STATUS_ZOMBIE:
                return
            if time.monotonic() >= deadline:
                raise AssertionError(
                    f"{self.name} (pid {self.pid}) not {'stopped' if stopped else 'running again'} "
                    f"{timeout:g} s after SIG{'STOP' if stopped else 'CONT'}; status: {status}"
                )
            time.sleep(0.005)

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def _check_log(self, substring: str, deadline: float, timeout: float) -> bool:
        if substring in self.log_text():
            return True
        exited = not self.alive
        if exited and substring in self.log_text():  # written just before exiting
            return True
        if exited or time.monotonic() >= deadline:
            why = f"exited with code {self.returncode}" if exited else f"still running after {timeout:.1f}s"
            raise AssertionError(
                f"{self.name} (pid {self.pid}) {why} without logging {substring!r}; "
                f"log {self.log_path} ends with:\n{self.log_text()[-_TAIL_CHARS:]}"
            )
        return False

    def wait_for_log(self, substring: str, timeout: float = 15.0) -> str:
        """Blocks until `substring` appears in the log; fails early if the process exits. Returns the log."""
        deadline = time.monotonic() + timeout
        while not self._check_log(substring, deadline, timeout):
            time.sleep(0.05)
        return self.log_text()

    async def wait_for_log_async(self, substring: str, timeout: float = 15.0) -> str:  # noqa: ASYNC109
        """wait_for_log() for async tests: does not block the event loop (polls the log file)."""
        deadline = time.monotonic() + timeout
        while True:
            if self._check_log(substring, deadline, timeout):
                return self.log_text()
            await asyncio.sleep(0.05)
