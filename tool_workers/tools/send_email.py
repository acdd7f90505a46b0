"""TEST TOOL `send_email`: a simulated NON-idempotent side effect.

Registered only with `TIDEWIRE_TEST_TOOLS=1`. The "email" is handed over first (one JSON line
appended to `<TIDEWIRE_TOOL_SIDE_EFFECT_DIR>/send_email.jsonl` when that is set), then the tool
waits `delay_seconds` for a "confirmation". A worker killed during that wait has already caused
the side effect, which is exactly why the call must not be run again on redelivery; tests count
the lines to prove it happened at most once.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path

from proto.tools import SendEmailArgs
from shared import tool_catalogue
from tool_workers.registry import Tool, ToolContext

SIDE_EFFECT_FILE = "send_email.jsonl"


def _record(directory: str, line: dict[str, object]) -> None:
    path = Path(directory) / SIDE_EFFECT_FILE
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(line) + "\n")
        f.flush()
        os.fsync(f.fileno())


async def run(args: SendEmailArgs, ctx: ToolContext) -> str:
    if ctx.settings.tool_side_effect_dir:
        line = {
            "call_id": ctx.call_id,
            "turn_id": ctx.turn_id,
            "to": args.to,
            "pid": os.getpid(),
            "attempt": ctx.attempt,
            "at": time.time(),
        }
        await asyncio.to_thread(_record, ctx.settings.tool_side_effect_dir, line)
    await asyncio.sleep(args.delay_seconds)
    return f"email to {args.to} sent"


TOOL = Tool.implementing(tool_catalogue.SEND_EMAIL, run)
