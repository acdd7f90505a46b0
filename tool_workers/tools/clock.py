"""`clock`: the current date and time, in UTC or a named time zone."""

from __future__ import annotations

from datetime import UTC, datetime
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from proto.tools import ClockArgs
from shared import tool_catalogue
from tool_workers.registry import Tool, ToolContext, ToolError


async def run(args: ClockArgs, ctx: ToolContext) -> str:
    try:
        zone = ZoneInfo(args.timezone)
    except (ZoneInfoNotFoundError, ValueError):
        raise ToolError(
            f"unknown time zone {args.timezone!r}; use an IANA name such as Europe/Paris"
        ) from None
    now = datetime.now(UTC).astimezone(zone)
    return f"{now:%A %Y-%m-%d %H:%M:%S} {args.timezone} (UTC{now:%z})"


TOOL = Tool.implementing(tool_catalogue.CLOCK, run)
