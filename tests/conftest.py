"""Session-wide fixtures: the real servers (`infra`) and service processes (`spawn`).

`infra` is a ContainerInfra when a Docker engine answers, else an EmbeddedInfra (servers from wheels)
in a fresh temporary folder; `TIDEWIRE_INFRA=embedded` or `=docker` forces one. Servers named by
`TIDEWIRE_NATS_URL` / `TIDEWIRE_POSTGRES_DSN` / `TIDEWIRE_REDIS_URL` are used instead of started ones.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import pytest

from tidewire.dev.infra import ContainerInfra, EmbeddedInfra, Infrastructure, docker_available

try:
    from tests.procs import ServiceProcess
except ModuleNotFoundError:  # pytest started as a script: the repo root is not on sys.path, tests/ is
    from procs import ServiceProcess  # type: ignore[no-redef]

REPO_ROOT = Path(__file__).resolve().parent.parent

Spawn = Callable[..., ServiceProcess]


@pytest.fixture(scope="session")
def infra(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Infrastructure]:
    choice = os.environ.get("TIDEWIRE_INFRA", "auto")
    state = tmp_path_factory.mktemp("infra")
    use_docker = choice == "docker" or (choice == "auto" and docker_available())
    servers: EmbeddedInfra | ContainerInfra = ContainerInfra(state) if use_docker else EmbeddedInfra(state)
    try:
        servers.start()
        yield servers
    finally:
        servers.stop()


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    """An empty folder for a test's own state."""
    path = tmp_path / "state"
    path.mkdir()
    return path


@pytest.fixture
def spawn(infra: Infrastructure, tmp_path: Path) -> Iterator[Spawn]:
    """`spawn(module, env, *, name, args=())` runs `python -m module` with os.environ + the infra's
    TIDEWIRE_* endpoints + `env` (in that order of precedence, last wins); output goes to
    `<tmp_path>/<name>.log` (`<name>.2.log`... when a name is reused). Everything it spawned is
    SIGKILLed (whole process group) at teardown."""
    spawned: list[ServiceProcess] = []

    def _spawn(
        module: str, env: Mapping[str, str] | None = None, *, name: str, args: Sequence[str] = ()
    ) -> ServiceProcess:
        full_env = {**os.environ, **infra.endpoints.as_env(), "PYTHONUNBUFFERED": "1", **(env or {})}
        n = sum(1 for p in spawned if p.name == name)
        log_path = tmp_path / (f"{name}.log" if n == 0 else f"{name}.{n + 1}.log")
        with log_path.open("wb") as log:
            popen = subprocess.Popen(
                [sys.executable, "-m", module, *args],
                env=full_env,
                cwd=REPO_ROOT,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        proc = ServiceProcess(name, popen, log_path)
        spawned.append(proc)
        return proc

    yield _spawn
    for proc in spawned:
        proc.kill()
