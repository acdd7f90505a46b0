"""`tidewire dev` heals: a real `tidewire dev` process (its own embedded servers, two gateways, two
orchestrators, one tool worker) keeps streaming an answer while every orchestrator is SIGKILLed in
turn, restarts each one (counted in `dev-status.json`), keeps serving, and on SIGINT stops within a
bound leaving no process behind."""

from __future__ import annotations

import asyncio
import functools
import io
import itertools
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import openai
import psutil
import pytest

from proto import client
from shared import promtext
from tests.integration.wsclient import WsTestClient
from tests.waits import within
from tidewire import invariants
from tidewire.dev.stack import RestartPolicy, Stack, Supervisor

T = TypeVar("T")

UP_TIMEOUT_S = 150.0  # embedded Postgres/NATS/Redis from their wheels, then six services, on 2 shared cores
RESTART_TIMEOUT_S = 45.0  # seen 13 s from SIGKILL to ready at load average 11
STOP_TIMEOUT_S = 60.0


class DevProcess:
    """The `tidewire dev` child, its output file and every process it was ever seen to own."""

    def __init__(self, tmp_path: Path) -> None:
        self.state = tmp_path / "tw"
        self.out_path = tmp_path / "dev.out"
        env = {k: v for k, v in os.environ.items() if not k.startswith("TIDEWIRE_")}
        with open(self.out_path, "wb") as out:  # a file, not a pipe: nobody has to keep reading it
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "tidewire.cli",
                    "dev",
                    "--state-dir",
                    str(self.state),
                    "--gateways",
                    "2",
                    "--orchestrators",
                    "2",
                    "--tool-workers",
                    "1",
                ],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=tmp_path,
            )
        self.seen: dict[int, psutil.Process] = {}

    def output(self) -> str:
        return self.out_path.read_text(errors="replace")[-4000:]

    def status(self) -> dict[str, Any] | None:
        try:
            data = json.loads((self.state / "dev-status.json").read_text())
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def remember_children(self) -> None:
        """psutil.Process objects remember their start time, so a reused pid is never mistaken."""
        try:
            for child in psutil.Process(self.proc.pid).children(recursive=True):
                self.seen.setdefault(child.pid, child)
        except psutil.Error:
            pass

    async def eventually(
        self,
        what: str,
        timeout: float,
        probe: Callable[[], T | None],
        interval: float = 0.1,
        while_running: bool = True,
    ) -> T:
        try:
            async with asyncio.timeout(timeout):
                while True:
                    assert not while_running or self.proc.poll() is None, (
                        f"tidewire dev exited while awaiting {what}:\n{self.output()}"
                    )
                    value = probe()
                    if value is not None:
                        return value
                    await asyncio.sleep(interval)
        except TimeoutError:
            raise AssertionError(
                f"timed out after {timeout:.0f} s awaiting {what}\n"
                f"status: {self.status()}\noutput:\n{self.output()}"
            ) from None


def _ready(port: int) -> bool | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as r:
            return True if r.status == 200 else None
    except Exception:  # noqa: BLE001 - not up (yet)
        return None


def _all_running(status: dict[str, Any] | None, names: set[str]) -> dict[str, Any] | None:
    if status is None or set(status["services"]) != names:
        return None
    return status if all(s["state"] == "running" for s in status["services"].values()) else None


def _restarted(dev: DevProcess, name: str, before: dict[str, Any]) -> dict[str, Any] | None:
    status = dev.status()
    now = status["services"][name] if status is not None else None
    if now is None or now["pid"] == before["pid"] or now["state"] != "running":
        return None
    assert now["restarts"] == before["restarts"] + 1, (before, now)
    return now  # type: ignore[no-any-return]


def _owner(ports: dict[str, int]) -> str | None:
    """The one orchestrator whose /metrics says it runs a session (this test has one session live)."""
    owning = []
    for name, port in ports.items():
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=1) as r:
                text = r.read().decode()
        except Exception:  # noqa: BLE001 - not answering: not the owner
            continue
        if promtext.parse(text).value("tidewire_orchestrator_sessions_owned") >= 1:
            owning.append(name)
    return owning[0] if len(owning) == 1 else None


SERVICES = {"gateway", "gateway-2", "orchestrator-1", "orchestrator-2", "tool-worker-1"}


@pytest.mark.timeout(420)
async def test_tidewire_dev_restarts_killed_orchestrators_and_the_answer_completes_exactly(
    tmp_path: Path,
) -> None:
    dev = DevProcess(tmp_path)
    try:
        await _heal_under_fire(dev)
        t_int = time.monotonic()
        dev.remember_children()
        dev.proc.send_signal(signal.SIGINT)
        await dev.eventually(
            "tidewire dev to exit after SIGINT",
            STOP_TIMEOUT_S,
            lambda: True if dev.proc.poll() is not None else None,
            while_running=False,
        )
        stop_s = time.monotonic() - t_int
        assert dev.proc.returncode == 0, dev.output()
        print(f"stopped {stop_s:.1f} s after SIGINT")
    finally:
        if dev.proc.poll() is None:
            dev.proc.kill()
            dev.proc.wait(10)
    final = dev.status()
    assert final is not None and final["state"] == "stopped", final
    assert "stopped." in dev.output()
    deadline = time.monotonic() + 5
    while True:  # children are reaped by dev; give the kernel a moment to finish tearing them down
        alive = [p for p in dev.seen.values() if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        if not alive or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.2)
    assert not alive, f"left behind: {[p.cmdline() for p in alive]}"
    strays = []
    for p in psutil.process_iter(["cmdline"]):
        try:  # e.g. an infra server or a restarted service forked after our last look
            if str(dev.state) in " ".join(p.info["cmdline"] or []) and p.status() != psutil.STATUS_ZOMBIE:
                strays.append(p.info["cmdline"])
        except psutil.Error:
            pass
    assert not strays, f"processes still using the state dir: {strays}"


async def _heal_under_fire(dev: DevProcess) -> None:
    # dev-status.json is first written after dev.json is complete
    status = await dev.eventually(
        "every service running in dev-status.json",
        UP_TIMEOUT_S,
        lambda: _all_running(dev.status(), SERVICES),
        interval=0.3,
    )
    info = json.loads((dev.state / "dev.json").read_text())
    dev.remember_children()
    assert info["url"] == info["gateways"][0] and len(info["gateways"]) == 2
    assert len(set(info["gateways"])) == 2, info["gateways"]
    assert len(info["metrics"]) == 5, info["metrics"]  # 2 gateways + 2 orchestrators + 1 tool worker
    assert all(s["restarts"] == 0 for s in status["services"].values()), status
    supervisor = psutil.Process(dev.proc.pid)
    cpu_before, t0 = sum(supervisor.cpu_times()[:2]), time.monotonic()
    await asyncio.sleep(3)
    idle_cpu = sum(supervisor.cpu_times()[:2]) - cpu_before
    print(f"supervisor CPU while idle: {idle_cpu:.2f} s in {time.monotonic() - t0:.1f} s")
    assert idle_cpu < 0.3, f"the supervision loop burns CPU: {idle_cpu:.2f} s in 3 s"

    async with WsTestClient(info["url"], info["token"]) as c:
        await c.connect()
        # ~19 s of answer at 80 tokens/s: long enough for both kills and restarts on a busy machine
        cmid = await c.send_message("/sim tokens=1500 rate=80 ttft_ms=0\ntell me a long story")
        ack = await c.ack_for(cmid)
        reader = asyncio.create_task(c.until_turn_end(ack.turn_id, timeout=150))
        try:
            await dev.eventually(
                "the first deltas",
                30,
                lambda: True if sum(isinstance(e, client.Delta) for e in c.events) >= 10 else None,
            )
            ports = {n: s["port"] for n, s in status["services"].items() if s["module"] == "orchestrator"}
            owner = await dev.eventually(
                "one orchestrator to report owning the session", 15, lambda: _owner(ports), interval=0.2
            )
            # the owner first: it dies mid-answer for sure; the other, which took the turn over, next
            victims = [owner, *(n for n in sorted(ports) if n != owner)]
            restart_s: dict[str, float] = {}
            streaming_at_kill: dict[str, bool] = {}
            for name in victims:
                before = dev.status()["services"][name]  # type: ignore[index]
                streaming_at_kill[name] = not reader.done()
                os.kill(before["pid"], signal.SIGKILL)
                t_kill = time.monotonic()
                after = await dev.eventually(
                    f"{name} (pid {before['pid']}) to be restarted",
                    RESTART_TIMEOUT_S,
                    functools.partial(_restarted, dev, name, before),
                )
                assert after["last_exit"] == "SIGKILL", after
                dev.remember_children()
                await dev.eventually(
                    f"restarted {name} ready on :{after['port']}",
                    RESTART_TIMEOUT_S,
                    functools.partial(_ready, after["port"]),
                    interval=0.2,
                )
                restart_s[name] = time.monotonic() - t_kill
            async with asyncio.timeout(150):
                end = await reader
        finally:
            reader.cancel()
        print(f"kill → ready: {restart_s}; answer streaming at each kill: {streaming_at_kill}")
        assert streaming_at_kill[owner], "the owner was not killed mid-answer: nothing was tested"
        assert end.status == "completed", end
        invariants.check_seqs(c.events)
        assert invariants.check_turns(c.events)[ack.turn_id].text == end.text

        ack2 = await c.ack_for(await c.send_message("/sim tokens=20\nare you still there?"))
        end2 = await c.until_turn_end(ack2.turn_id, timeout=30)
        assert end2.status == "completed" and end2.text

    async with WsTestClient(info["gateways"][1], info["token"]) as c2:  # the second gateway serves too
        await c2.connect()
        ack3 = await c2.ack_for(await c2.send_message("/sim tokens=20\nhello via gateway-2"))
        end3 = await c2.until_turn_end(ack3.turn_id, timeout=30)
        assert end3.status == "completed" and end3.text

    # what `make run` starts serves the facades too, to the real client, with the printed token
    oa = openai.AsyncOpenAI(base_url=info["url"] + "/v1", api_key=info["token"], max_retries=0, timeout=30)
    done = await within(
        oa.chat.completions.create(
            model="tidewire", messages=[{"role": "user", "content": "/sim tokens=8\nhello, openai client"}]
        ),
        timeout=30,
        what="a chat completion from the dev stack",
    )
    assert done.choices[0].finish_reason == "stop" and done.choices[0].message.content
    response = await within(
        oa.responses.create(model="tidewire", input="/sim tokens=8\nhi"),
        timeout=30,
        what="a response from the dev stack",
    )
    assert response.status == "completed" and response.output_text

    final = dev.status()
    assert final is not None
    restarts = {name: s["restarts"] for name, s in final["services"].items()}
    logs = {n: (dev.state / "logs" / f"{n}.log").read_text(errors="replace")[-3000:] for n in restarts}
    assert restarts == {
        "gateway": 0,
        "gateway-2": 0,
        "orchestrator-1": 1,
        "orchestrator-2": 1,
        "tool-worker-1": 0,
    }, f"{restarts}\n{dev.output()}\n{logs}"
    out = dev.output()
    for name in ("orchestrator-1", "orchestrator-2"):
        assert f"{name} restarted (pid {final['services'][name]['pid']}, restart #1)" in out, out
    shown = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "tidewire.cli", "dev", "status", "--state-dir", str(dev.state)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert shown.returncode == 0, shown.stderr
    assert "orchestrator-1" in shown.stdout and "SIGKILL" in shown.stdout, shown.stdout


# --------------------------------------------------------------------------------------------------
# The supervisor's policy and the ordered stop, on stand-in processes (no servers needed)
# --------------------------------------------------------------------------------------------------

STAND_IN = """
import os, signal, sys, time
from pathlib import Path
record = Path(os.environ["STAND_IN_RECORD"])
def on_term(*_):
    with record.open("a") as f:
        f.write(f"{os.environ['STAND_IN_NAME']} {time.monotonic()}\\n")
    time.sleep(float(os.environ.get("STAND_IN_DRAIN_S", "0")))
    sys.exit(0)
signal.signal(signal.SIGTERM, on_term)
with record.open("a") as f:
    f.write(f"{os.environ['STAND_IN_NAME']} ready\\n")
time.sleep(float(os.environ.get("STAND_IN_LIFE_S", "3600")))
sys.exit(int(os.environ.get("STAND_IN_EXIT", "0")))
"""


def _stand_in_stack(tmp_path: Path, services: dict[str, tuple[str | None, dict[str, str]]]) -> Stack:
    """A Stack whose services run `python -m stand_in` (on PYTHONPATH=tmp_path), relabelled as
    `module` when one is given (the stop order goes by it; a restart would run the real module)."""
    (tmp_path / "stand_in.py").write_text(STAND_IN)
    record = tmp_path / "record.txt"
    stack = Stack(infra_env={"PYTHONPATH": str(tmp_path), "STAND_IN_RECORD": str(record)}, log_dir=tmp_path)
    for name, (module, env) in services.items():
        svc = stack.service(name, "stand_in", {"STAND_IN_NAME": name, **env})
        if module is not None:
            svc.module = module
    deadline = time.monotonic() + 30
    while sum(line.endswith(" ready") for line in _lines(record)) < len(services):
        assert time.monotonic() < deadline, f"stand-ins not started: {_lines(record)}"
        time.sleep(0.05)
    return stack


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def test_supervisor_backoff_doubles_to_its_cap_and_resets_after_a_long_run(tmp_path: Path) -> None:
    stack = _stand_in_stack(
        tmp_path,
        {
            "crasher": (None, {"STAND_IN_LIFE_S": "0", "STAND_IN_EXIT": "3"}),
            "long-runner": (None, {"STAND_IN_LIFE_S": "1.2", "STAND_IN_EXIT": "1"}),
            "steady": (None, {}),
        },
    )
    out = io.StringIO()
    policy = RestartPolicy(initial_s=0.1, cap_s=0.4, reset_after_s=1.0)
    supervisor = Supervisor(stack, policy=policy, status_path=tmp_path / "status.json", poll_s=0.02, out=out)
    stop = threading.Event()
    timer = threading.Timer(4.0, stop.set)
    timer.start()
    try:
        supervisor.run(stop)  # in this (main) thread: the stand-ins' parent-death signal is tied to it
        status = json.loads((tmp_path / "status.json").read_text())
    finally:
        timer.cancel()
        supervisor.stop()
    text = out.getvalue()

    def delays(name: str) -> list[str]:
        return re.findall(rf"^{name} \(pid \d+\) exited: .* in ([\d.]+) s", text, re.M)

    assert delays("crasher")[:5] == ["0.1", "0.2", "0.4", "0.4", "0.4"], text
    assert "crasher (pid" in text and "exit code 3" in text
    assert set(delays("long-runner")) == {"0.1"} and len(delays("long-runner")) >= 2, text
    services = status["services"]
    assert services["crasher"]["restarts"] >= 5 and services["crasher"]["last_exit"] == "exit code 3", (
        services
    )
    assert services["steady"]["restarts"] == 0 and services["steady"]["state"] == "running", services
    assert json.loads((tmp_path / "status.json").read_text())["state"] == "stopped"
    assert all(not svc.alive() for svc in stack.services)


def test_ordered_stop_terminates_gateways_then_orchestrators_then_tool_workers(tmp_path: Path) -> None:
    drain = {"STAND_IN_DRAIN_S": "0.3"}
    stack = _stand_in_stack(
        tmp_path,
        {
            "tool-worker-1": ("tool_workers", drain),
            "orchestrator-1": ("orchestrator", drain),
            "gateway": ("gateway", drain),
            "orchestrator-2": ("orchestrator", drain),
            "gateway-2": ("gateway", drain),
        },
    )
    stack.stop(ordered=True)
    assert all(not svc.alive() for svc in stack.services)
    term = {
        name: float(t)
        for name, t in (line.split() for line in _lines(tmp_path / "record.txt"))
        if t != "ready"
    }
    assert set(term) == {s.name for s in stack.services}, term
    tiers = [["gateway", "gateway-2"], ["orchestrator-1", "orchestrator-2"], ["tool-worker-1"]]
    for earlier, later in itertools.pairwise(tiers):
        # the next tier is signalled only once the previous one has exited (after its 0.3 s drain)
        assert max(term[n] for n in earlier) + 0.25 < min(term[n] for n in later), term
