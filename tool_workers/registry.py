"""The tool registry: what each tool is, what it accepts and how long it may take.

It is shared metadata. The orchestrator's dispatcher reads it to offer tools to the model
(JSON schemas generated from each tool's msgspec args Struct), to validate arguments before
anything is queued and to know how long to wait; a tool worker reads the same registry to run
the tools. A tool is one small module under `tool_workers/tools/` exporting a `Tool`, plus one
line in `default_registry()`.

This module also holds the shape of the call ledger (`CallRecord` in the JetStream KeyValue
bucket `tw_tool_calls`), which both sides read: workers write "started"/"done" there, and a
dispatcher whose job publish was deduplicated reads the stored result from it.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Generic, Literal, TypeVar

import msgspec

from shared.config import from_env
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

CALLS_BUCKET = "tw_tool_calls"


class ToolError(Exception):
    """A failure the model should read: the message becomes the `ok=false` result text."""


class TransientToolError(ToolError):
    """A failure worth retrying (a flaky upstream). Only idempotent tools are ever retried."""


class ToolArgsError(ValueError):
    """Arguments that do not match the tool's schema; the message says what is wrong."""


@dataclass(frozen=True, kw_only=True)
class ToolContext:
    """What a running tool may know about its call. `attempt` counts JetStream deliveries."""

    session_id: str
    turn_id: str
    call_id: str
    attempt: int
    settings: ToolWorkerSettings


@dataclass(frozen=True, kw_only=True)
class Tool(Generic[ArgsT]):
    """One tool. `run` returns the result text or raises `ToolError`.

    `max_seconds` bounds a whole call (queueing, retries and run); both the dispatcher and the
    worker enforce it. `idempotent=False` means a call is never run twice, even after a worker
    crash. `pool` picks the work queue (`tw.tools.<pool>`), so slow tools cannot starve fast
    ones. `schema_version` is sent with each job so a worker can refuse args it cannot read.
    """

    name: str
    description: str
    args: type[ArgsT]
    run: Callable[[ArgsT, ToolContext], Awaitable[str]]
    max_seconds: float
    idempotent: bool
    pool: str = "fast"
    schema_version: int = 1
    test_only: bool = False

    def parameters(self) -> dict[str, Any]:
        """The JSON schema of the arguments, inlined (models want an object, not a `$ref`)."""
        schema = dict(msgspec.json.schema(self.args))
        ref = schema.pop("$ref", None)
        defs: dict[str, Any] = dict(schema.pop("$defs", {}))
        if isinstance(ref, str):
            schema = dict(defs.pop(ref.rsplit("/", 1)[-1]))
            if defs:
                schema["$defs"] = defs
        schema.pop("title", None)
        return schema

    def validate(self, args: Any) -> ArgsT:
        """Raises ToolArgsError with a message the model can act on."""
        try:
            return msgspec.convert(args, self.args)
        except msgspec.ValidationError as exc:
            raise ToolArgsError(f"invalid arguments for {self.name}: {exc}") from None

    def timeout_text(self) -> str:
        return f"{self.name} timed out after {self.max_seconds:g} s"


class ToolRegistry:
    """Tools by name. Immutable after start-up by convention: built once, read everywhere."""

    def __init__(self, tools: Iterable[Tool[Any]] = ()) -> None:
        self._tools: dict[str, Tool[Any]] = {}
        for tool in tools:
            self.add(tool)

    def add(self, tool: Tool[Any]) -> None:
        if tool.name in self._tools:
            raise ValueError(f"tool {tool.name!r} registered twice")
        self._tools[tool.name] = tool

    def get(self, name: str) -> Tool[Any] | None:
        return self._tools.get(name)

    def names(self) -> list[str]:
        return sorted(self._tools)

    def pools(self) -> list[str]:
        return sorted({t.pool for t in self._tools.values()})

    def __iter__(self) -> Iterator[Tool[Any]]:
        return iter(self._tools.values())

    def __len__(self) -> int:
        return len(self._tools)

    def __contains__(self, name: object) -> bool:
        return name in self._tools


def default_registry(settings: ToolWorkerSettings | None = None) -> ToolRegistry:
    """The built-in tools; `http_get` only when enabled, test tools only when asked for."""
    from tool_workers.tools import calculator, clock, flaky, http_get, send_email, slow_lookup

    settings = from_env(ToolWorkerSettings) if settings is None else settings
    registry = ToolRegistry([clock.TOOL, calculator.TOOL, slow_lookup.TOOL])
    if settings.http_get_enabled:
        registry.add(http_get.TOOL)
    if settings.test_tools:
        registry.add(flaky.TOOL)
        registry.add(send_email.TOOL)
    return registry


# ---- the call ledger ------------------------------------------------------------------------


class CallRecord(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """One call in the `tw_tool_calls` bucket. "started" is written before a non-idempotent
    tool runs; "done" carries the result so a redelivered or re-published call is answered
    without running again."""

    state: Literal["started", "done"]
    name: str
    ok: bool = False
    text: str = ""
    timed_out: bool = False
    attempt: int = 1


_SAFE_TOKEN = re.compile(r"[A-Za-z0-9_\-=]{1,100}")


def call_key(turn_id: str, call_id: str) -> str:
    """The idempotency key of a call (`Nats-Msg-Id`, ledger key, result routing).

    Scoped by turn because providers only promise call ids unique within a turn; hashed when
    an id holds characters a NATS KV key or header cannot carry.
    """
    if _SAFE_TOKEN.fullmatch(turn_id) and _SAFE_TOKEN.fullmatch(call_id):
        return f"{turn_id}.{call_id}"
    digest = hashlib.sha256(f"{turn_id}\x1f{call_id}".encode()).hexdigest()
    return f"h.{digest[:40]}"
