"""The container image, built with podman from a base made on this machine, runs the real services.

`deploy/image/build.sh` makes `localhost/tidewire-base:bookworm` when missing (debootstrap) and builds
`tidewire:0.1.0` (cached layers: quick when only sources changed). The gateway, one orchestrator and
one tool worker then run as containers of that image (`--network host`, as uid 10001), against the
suite's real servers (`infra`), and one turn is checked end to end: the ack, the streamed deltas
that make up `turn_end.text`, and the same text in `GET /v1/sessions/{sid}`.

Skipped, with the reason, where podman is missing or cannot start a container (`make image` first
gives the build's own message). Run it alone with `pytest -m image tests/image`.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from proto import client
from tests.integration.conftest import make_token, stack_env
from tests.integration.wsclient import WsTestClient
from tests.waits import eventually_sync, run_process
from tidewire.dev.infra import Infrastructure
from tidewire.dev.stack import free_port

pytestmark = [pytest.mark.image, pytest.mark.slow]

REPO_ROOT = Path(__file__).resolve().parents[2]
BUILD_SH = REPO_ROOT / "deploy" / "image" / "build.sh"
IMAGE = os.environ.get("TIDEWIRE_IMAGE", "tidewire:0.1.0")
BASE_IMAGE = os.environ.get("TIDEWIRE_BASE_IMAGE", "localhost/tidewire-base:bookworm")
BUILD_TIMEOUT = 900.0  # a cold build (debootstrap + pip from PyPI) took 90 s on an idle 2-core machine
READY_TIMEOUT = 90.0


def _podman(*args: str, timeout: float = 60.0, what: str) -> subprocess.CompletedProcess[str]:
    return run_process(["podman", *args], timeout=timeout, what=what, capture_output=True, text=True)


@pytest.fixture(scope="module")
def run_flags() -> list[str]:
    """Builds the image (or finds it up to date) and returns the `podman run` flags this machine
    needs; skips where podman cannot build or run containers here."""
    if shutil.which("podman") is None:
        pytest.skip(
            reason="podman is not installed (apt-get install -y podman runc; see deploy/image/build.sh)"
        )
    info = _podman("info", "--format", "{{.Host.OCIRuntime.Name}}", what="podman info")
    if info.returncode != 0:
        pytest.skip(reason=f"podman does not work here: {info.stderr.strip()[-500:]}")
    base = _podman("image", "exists", BASE_IMAGE, what="podman image exists")
    if base.returncode != 0 and (os.geteuid() != 0 or shutil.which("debootstrap") is None):
        pytest.skip(reason=f"{BASE_IMAGE} is missing and making it needs root and debootstrap")
    made = run_process(
        ["bash", str(BUILD_SH), "--base-only"],
        timeout=BUILD_TIMEOUT,
        what="making the base image",
        capture_output=True,
        text=True,
    )
    assert made.returncode == 0, f"build.sh --base-only failed:\n{made.stderr[-3000:]}"
    probe = run_process(
        ["bash", str(BUILD_SH), "--print-run-flags"],
        timeout=60,
        what="probing podman's run flags",
        capture_output=True,
        text=True,
    )
    if probe.returncode != 0:
        pytest.skip(reason=f"podman cannot start a container here: {probe.stderr.strip()[-800:]}")
    built = run_process(
        ["bash", str(BUILD_SH)],
        timeout=BUILD_TIMEOUT,
        what="building the image",
        capture_output=True,
        text=True,
    )
    assert built.returncode == 0, f"build.sh failed:\n{built.stderr[-3000:]}"
    return shlex.split(probe.stdout)


class Containers:
    """Containers started by one test, each named uniquely; all removed by `remove_all`."""

    def __init__(self, flags: list[str], env: dict[str, str]) -> None:
        self.flags = flags
        self.env = env
        self.names: list[str] = []

    def run(self, role: str, env: dict[str, str], *command: str) -> str:
        name = f"tidewire-test-{role}-{uuid.uuid4().hex[:8]}"
        env_args = [arg for k, v in {**self.env, **env}.items() for arg in ("-e", f"{k}={v}")]
        self.names.append(name)
        started = _podman(
            "run",
            "-d",
            "--name",
            name,
            "--network",
            "host",
            *self.flags,
            *env_args,
            IMAGE,
            *command,
            what=f"starting the {role} container",
        )
        assert started.returncode == 0, f"podman run ({role}) failed: {started.stderr.strip()}"
        return name

    def logs(self, name: str) -> str:
        out = _podman("logs", "--tail", "30", name, what=f"podman logs {name}")
        return (out.stdout + out.stderr)[-3000:]

    def wait_ready(self, name: str, port: int) -> None:
        url = f"http://127.0.0.1:{port}/readyz"

        def ready() -> bool:
            state = _podman("inspect", "--format", "{{.State.Status}}", name, what=f"inspecting {name}")
            if state.stdout.strip() not in ("created", "running"):
                raise AssertionError(
                    f"{name} is {state.stdout.strip() or state.stderr.strip()}:\n{self.logs(name)}"
                )
            with urllib.request.urlopen(url, timeout=3) as r:
                return bool(r.status == 200)

        try:
            eventually_sync(
                ready,
                timeout=READY_TIMEOUT,
                interval=0.3,
                what=f"{url} of {name} answering 200",
                retry_on=(OSError,),
            )
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{name} output ends with:\n{self.logs(name)}") from None

    def remove_all(self) -> None:
        for name in reversed(self.names):
            _podman("rm", "--force", "--time", "10", name, timeout=60, what=f"removing {name}")


@pytest.fixture
def containers(run_flags: list[str], infra: Infrastructure) -> Iterator[Containers]:
    c = Containers(run_flags, stack_env(infra))
    try:
        yield c
    finally:
        c.remove_all()


@pytest.mark.timeout(BUILD_TIMEOUT + 300)
async def test_one_turn_through_the_image(containers: Containers) -> None:
    gw_port, orch_port, tools_port = free_port(), free_port(), free_port()
    gw = containers.run("gateway", {"TIDEWIRE_HTTP_PORT": str(gw_port), "TIDEWIRE_GATEWAY_ID": "gateway-img"})
    orch = containers.run(
        "orchestrator",
        {"TIDEWIRE_ORCHESTRATOR_ID": "orchestrator-img", "TIDEWIRE_HEALTH_PORT": str(orch_port)},
        "python",
        "-m",
        "orchestrator",
    )
    tools = containers.run("tools", {"TIDEWIRE_HEALTH_PORT": str(tools_port)}, "python", "-m", "tool_workers")
    for name, port in ((gw, gw_port), (orch, orch_port), (tools, tools_port)):
        containers.wait_ready(name, port)

    base = f"http://127.0.0.1:{gw_port}"
    token = make_token(f"image-{uuid.uuid4().hex[:8]}")
    async with WsTestClient(base, token) as c:
        ready = await c.connect()
        cmid = await c.send_message("hello from the container image")
        ack = await c.ack_for(cmid)
        assert not ack.duplicate and ack.seq == 1, ack
        end = await c.until_turn_end(ack.turn_id)
        assert end.status == "completed" and end.text, end
        deltas = [e for e in c.events if isinstance(e, client.Delta) and e.turn_id == ack.turn_id]
        assert deltas, f"no delta streamed for {ack.turn_id}; events: {[type(e).__name__ for e in c.events]}"
        streamed = ""
        for d in deltas:
            streamed = streamed[: d.offset] + d.text
        assert streamed == end.text

    async with aiohttp.ClientSession() as http:
        async with http.get(
            f"{base}/v1/sessions/{ready.session_id}",
            headers={"Authorization": f"Bearer {token}"},
            timeout=aiohttp.ClientTimeout(total=10),
        ) as r:
            assert r.status == 200, await r.text()
            history = await r.json()
    texts = {(m["role"], m["status"], m["text"]) for m in history["messages"]}
    assert ("user", "accepted", "hello from the container image") in texts, history
    assert ("assistant", "completed", end.text) in texts, history
    # the processes really ran from the image, as its non-root user
    who = _podman("exec", gw, "id", "-u", what="podman exec id")
    assert who.stdout.strip() == "10001", who
