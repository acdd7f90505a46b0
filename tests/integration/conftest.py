"""A running tidewire stack (gateway + orchestrators + tool worker processes) on the real servers."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from shared import tokens
from tidewire.dev.infra import Infrastructure
from tidewire.dev.stack import Stack

SECRET = "integration-test-secret-0123456789abcdef"


def make_token(subject: str = "alice", **kw: float) -> str:
    return tokens.mint(subject, SECRET, **kw)  # type: ignore[arg-type]


# Limits are tested in test_edge.py with small values; elsewhere they must not get in the way of the
# guarantee under test (e.g. 200 connections of one user watching a hot session).
GENEROUS_LIMITS = {
    "TIDEWIRE_SHED_PICKUP_DELAY_MS": "-1",
    "TIDEWIRE_SHED_LOOP_LAG_MS": "-1",
    "TIDEWIRE_MAX_CONNECTIONS_PER_SUBJECT": "10000",
    "TIDEWIRE_MSG_RATE_PER_S": "1000",
    "TIDEWIRE_MSG_BURST": "1000",
    "TIDEWIRE_SUBJECT_MSG_RATE_PER_S": "1000",
    "TIDEWIRE_SUBJECT_MSG_BURST": "1000",
    "TIDEWIRE_FRAME_RATE_PER_S": "10000",
    "TIDEWIRE_FRAME_BURST": "10000",
}


def stack_env(infra: Infrastructure, **extra: str) -> dict[str, str]:
    return {
        **infra.endpoints.as_env(),
        **GENEROUS_LIMITS,
        "TIDEWIRE_JWT_SECRET": SECRET,
        "TIDEWIRE_TEST_TOOLS": "1",
        "TIDEWIRE_SIM_RATE": "400",
        "TIDEWIRE_LOG_LEVEL": "INFO",
        "TIDEWIRE_FAULT_POISON_MARKER": "POISON-PILL",
        **extra,
    }


async def lease_owner(infra: Infrastructure, session_id: str) -> str | None:
    """The orchestrator id holding the session's lease (ids are the Stack's service names)."""
    import redis.asyncio as aioredis

    r = aioredis.Redis.from_url(infra.endpoints.redis_url)
    try:
        v = await r.get(f"tw:{{{session_id}}}:lease")
    finally:
        await r.aclose()
    return None if v is None else v.decode().rsplit(":", 1)[0].split("/", 1)[0]


def scrape(port: str | int, address: str = "127.0.0.1") -> dict[str, float]:
    """A process's /metrics page read by `shared.promtext` (strictly: a malformed line fails the
    test), keyed `name{label="v",...}` with labels sorted by name, as tests spell a series."""
    import urllib.request

    from shared import promtext

    with urllib.request.urlopen(f"http://{address}:{port}/metrics", timeout=5) as r:
        page = promtext.parse(r.read().decode())
    return {
        s.name + ("{" + ",".join(f'{k}="{v}"' for k, v in s.labels) + "}" if s.labels else ""): s.value
        for s in page
    }


@pytest.fixture(scope="module")
def stack(infra: Infrastructure, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """One gateway, two orchestrators and one tool worker, shared by a test module."""
    log_dir: Path = tmp_path_factory.mktemp("stack-logs")
    s = Stack(infra_env=stack_env(infra), log_dir=log_dir, orchestrators=2, tool_workers=1)
    s.start()
    try:
        yield s
    finally:
        s.stop()
