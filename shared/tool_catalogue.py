"""The tool catalogue: the contract between the orchestrator and the tool workers.

What each tool is called, what it accepts (a `proto.tools` args Struct, whose JSON schema the model is
offered), how long a call may take, whether it may run twice and which work queue (pool) carries it.
The orchestrator's dispatcher reads only this: it validates arguments before anything is queued and
knows how long to wait, without importing the workers. A tool worker binds each definition to its
implementation (`tool_workers.registry.Tool`, which is a `ToolDef` plus `run`), so both sides read
the same definitions and cannot drift.

Which tools are offered is decided by two `TIDEWIRE_*` settings that the orchestrator and the
workers read from the same environment (`CatalogueSettings`): `http_get` only with
`TIDEWIRE_HTTP_GET_ENABLED=1`, the test tools only with `TIDEWIRE_TEST_TOOLS=1`.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import msgspec

from proto import tools as toolproto
from shared.config import from_env

__all__ = [
    "BUILTIN",
    "CatalogueSettings",
    "ToolArgsError",
    "ToolCatalogue",
    "ToolDef",
    "call_key",
    "default_catalogue",
]

ArgsT = TypeVar("ArgsT", bound=msgspec.Struct)
DefT = TypeVar("DefT", bound="ToolDef[Any]")


class ToolArgsError(ValueError):
    """Arguments that do not match the tool's schema; the message says what is wrong."""


@dataclass(frozen=True, kw_only=True)
class ToolDef(Generic[ArgsT]):
    """One tool as both sides know it.

    `max_seconds` bounds a whole call (queueing, retries and run); both the dispatcher and the
    worker enforce it. `idempotent=False` means a call is never run twice, even after a worker
    crash. `pool` picks the work queue (`tw.tools.<pool>`), so slow tools cannot starve fast
    ones. `schema_version` is sent with each job so a worker can refuse args it cannot read.
    """

    name: str
    description: str
    args: type[ArgsT]
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


class ToolCatalogue(Generic[DefT]):
    """Tools by name. Immutable after start-up by convention: built once, read everywhere."""

    def __init__(self, tools: Iterable[DefT] = ()) -> None:
        self._tools: dict[str, DefT] = {}
        for tool in tools:
            self.add(tool)

    def add(self, tool: DefT) -> None:
        if tool.name in self._tools:
            raise ValueError(f"tool {tool.name!r} registered twice")
        self._tools[tool.name] = tool

    def get(self, name: str) -> DefT | None:
        return self._tools.get(name)

    def names(self) -> list[str]:
        return sorted(self._tools)

    def pools(self) -> list[str]:
        return sorted({t.pool for t in self._tools.values()})

    def __iter__(self) -> Iterator[DefT]:
        return iter(self._tools.values())

    def __len__(self) -> int:
        return len(self._tools)

    def __contains__(self, name: object) -> bool:
        return name in self._tools


# ---- the built-in tools ---------------------------------------------------------------------

CLOCK: ToolDef[toolproto.ClockArgs] = ToolDef(
    name="clock",
    description="Current date and time. Use for any question about the time or date now.",
    args=toolproto.ClockArgs,
    max_seconds=2.0,
    idempotent=True,
    pool="fast",
)
CALCULATOR: ToolDef[toolproto.CalculatorArgs] = ToolDef(
    name="calculator",
    description="Evaluates arithmetic exactly: numbers, + - * / // % ** and parentheses.",
    args=toolproto.CalculatorArgs,
    max_seconds=2.0,
    idempotent=True,
    pool="fast",
)
SLOW_LOOKUP: ToolDef[toolproto.SlowLookupArgs] = ToolDef(
    name="slow_lookup",
    description="Looks something up in a slow knowledge base (takes a few seconds).",
    args=toolproto.SlowLookupArgs,
    max_seconds=8.0,
    idempotent=True,
    pool="slow",
)
HTTP_GET: ToolDef[toolproto.HttpGetArgs] = ToolDef(
    name="http_get",
    description="Fetches a web page (text) from an allowed host.",
    args=toolproto.HttpGetArgs,
    max_seconds=15.0,
    idempotent=True,
    pool="net",
)
FLAKY: ToolDef[toolproto.FlakyArgs] = ToolDef(
    name="flaky",
    description="TEST TOOL: fails transiently a few times, then succeeds.",
    args=toolproto.FlakyArgs,
    max_seconds=10.0,
    idempotent=True,
    pool="fast",
    test_only=True,
)
SEND_EMAIL: ToolDef[toolproto.SendEmailArgs] = ToolDef(
    name="send_email",
    description="TEST TOOL: sends an email (simulated; not idempotent).",
    args=toolproto.SendEmailArgs,
    max_seconds=10.0,
    idempotent=False,
    pool="slow",
    test_only=True,
)

BUILTIN: tuple[ToolDef[Any], ...] = (CLOCK, CALCULATOR, SLOW_LOOKUP, HTTP_GET, FLAKY, SEND_EMAIL)


@dataclass(frozen=True, kw_only=True)
class CatalogueSettings:
    """`TIDEWIRE_HTTP_GET_ENABLED`, `TIDEWIRE_TEST_TOOLS` (the same variables the workers read)."""

    http_get_enabled: bool = False
    test_tools: bool = False


def offered(settings: CatalogueSettings | None = None) -> list[ToolDef[Any]]:
    """The built-in definitions these settings offer, in registration order."""
    settings = from_env(CatalogueSettings) if settings is None else settings
    chosen: list[ToolDef[Any]] = [CLOCK, CALCULATOR, SLOW_LOOKUP]
    if settings.http_get_enabled:
        chosen.append(HTTP_GET)
    if settings.test_tools:
        chosen += [FLAKY, SEND_EMAIL]
    return chosen


def default_catalogue(settings: CatalogueSettings | None = None) -> ToolCatalogue[ToolDef[Any]]:
    """What the orchestrator offers the model (settings from the environment unless given)."""
    return ToolCatalogue(offered(settings))


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
