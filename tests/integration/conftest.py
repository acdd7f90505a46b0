"""A running tidewire stack (gateway + orchestrators + tool worker processes) on the real servers."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from shared import tokens
from shared.infra import Infrastructure
from tidewire.stack import Stack

SECRET = "integration-test-secret-0123456789abcdef"


def make_token(subject: str = "alice", **kw: float) -> str:
    return tokens.mint(subject, SECRET, **kw)  # type: ignore[arg-type]


def stack_env(infra: Infrastructure, **extra: str) -> dict[str, str]:
    return {**infra.endpoints.as_env(), "TIDEWIRE_JWT_SECRET": SECRET, "TIDEWIRE_TEST_TOOLS": "1",
            "TIDEWIRE_SIM_RATE": "400", "TIDEWIRE_LOG_LEVEL": "INFO", **extra}


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
