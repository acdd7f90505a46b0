"""`slow_lookup`: a lookup with simulated latency, standing in for a slow backend.

Its result carries the start and end times of the run so tests can prove calls overlap.
"""

from __future__ import annotations

import asyncio
import json
import os
import time

from proto.tools import SlowLookupArgs
from shared import tool_catalogue
from tool_workers.registry import Tool, ToolContext


async def run(args: SlowLookupArgs, ctx: ToolContext) -> str:
    started = time.time()
    delay = ctx.settings.slow_lookup_seconds if args.seconds is None else args.seconds
    await asyncio.sleep(delay)
    return json.dumps(
        {
            "query": args.query,
            "answer": f"no record found for {args.query!r} (simulated)",
            "started_at": started,
            "finished_at": time.time(),
            "worker_pid": os.getpid(),
            "attempt": ctx.attempt,
        }
    )


TOOL = Tool.implementing(tool_catalogue.SLOW_LOOKUP, run)
