"""`clock`: the current date and time, in UTC or a named time zone."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import msgspec

from tool_workers.registry import Tool, ToolContext, ToolError


class ClockArgs(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    timezone: Annotated[
        str, msgspec.Meta(max_length=64, description="IANA time zone, e.g. Europe/Paris. Default UTC.")
    ] = "UTC"


async def run(args: ClockArgs, ctx: ToolContext) -> str:
    try:
        zone = ZoneInfo(args.timezone)
    except (ZoneInfoNotFoundError, ValueError):
        raise ToolError(f"unknown time zone {args.timezone!r}; use an IANA name such as Europe/Paris") from None
    now = datetime.now(UTC).astimezone(zone)
    return f"{now:%A %Y-%m-%d %H:%M:%S} {args.timezone} (UTC{now:%z})"


TOOL = Tool(
    name="clock",
    description="Current date and time. Use for any question about the time or date now.",
    args=ClockArgs,
    run=run,
    max_seconds=2.0,
    idempotent=True,
    pool="fast",
)
