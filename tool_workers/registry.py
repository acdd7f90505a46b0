"""The worker's side of the tool catalogue: each tool definition bound to the code that runs it.

What a tool is (name, schema, time limit, idempotency, pool) is the shared contract in
`shared.tool_catalogue`, which the orchestrator reads without importing this package. Here a `Tool`
is that `ToolDef` plus `run`; a tool is one small module under `tool_workers/tools/` exporting
`TOOL = Tool.implementing(<its ToolDef>, run)`, plus one line in `_implementations()`.

`CallRecord`, `call_key`, `ToolArgsError` and `CALLS_BUCKET` are re-exported from where they now
live (`proto.tools`, `shared.tool_catalogue`, `shared.subjects`) for older imports.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, fields
from typing import Any, TypeVar

import msgspec

from proto.tools import CallRecord
from shared.config import from_env
from shared.subjects import CALLS_BUCKET
from shared.tool_catalogue import CatalogueSettings, ToolArgsError, ToolCatalogue, ToolDef, call_key, offered
from tool_workers.settings import ToolWorkerSettings

__all__ = [
    "CALLS_BUCKET",
    "CallRecord",
    "Tool",
    "ToolArgsError",
    "ToolContext",
    "ToolError",
    "ToolRegistry",
    "TransientToolError",
    "call_key",
    "default_registry",
]

ArgsT = TypeVar("ArgsT", bound=msgspec.Struct)


class ToolError(Exception):
    """A failure the model should read: the message becomes the `ok=false` result text."""


class TransientToolError(ToolError):
    """A failure worth retrying (a flaky upstream). Only idempotent tools are ever retried."""


@dataclass(frozen=True, kw_only=True)
class ToolContext:
    """What a running tool may know about its call. `attempt` counts JetStream deliveries."""

    session_id: str
    turn_id: str
    call_id: str
    attempt: int
    settings: ToolWorkerSettings


@dataclass(frozen=True, kw_only=True)
class Tool(ToolDef[ArgsT]):
    """A tool definition and its implementation. `run` returns the result text or raises `ToolError`."""

    run: Callable[[ArgsT, ToolContext], Awaitable[str]]

    @classmethod
    def implementing(
        cls, spec: ToolDef[ArgsT], run: Callable[[ArgsT, ToolContext], Awaitable[str]]
    ) -> Tool[ArgsT]:
        return cls(**{f.name: getattr(spec, f.name) for f in fields(spec)}, run=run)


class ToolRegistry(ToolCatalogue[Tool[Any]]):
    """The tools a worker can run, by name (a catalogue of implemented tools)."""


def _implementations() -> dict[str, Tool[Any]]:
    from tool_workers.tools import calculator, clock, flaky, http_get, send_email, slow_lookup  # noqa: PLC0415

    return {
        t.name: t
        for t in (clock.TOOL, calculator.TOOL, slow_lookup.TOOL, http_get.TOOL, flaky.TOOL, send_email.TOOL)
    }


def default_registry(settings: ToolWorkerSettings | None = None) -> ToolRegistry:
    """The built-in tools the catalogue offers under these settings, each with its implementation."""
    settings = from_env(ToolWorkerSettings) if settings is None else settings
    impls = _implementations()
    chosen = offered(
        CatalogueSettings(http_get_enabled=settings.http_get_enabled, test_tools=settings.test_tools)
    )
    return ToolRegistry(impls[spec.name] for spec in chosen)
