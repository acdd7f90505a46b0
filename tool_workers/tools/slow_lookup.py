"""`slow_lookup`: a lookup with simulated latency, standing in for a slow backend.

Its result carries the start and end times of the run so tests can prove calls overlap.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from typing import Annotated

import msgspec

from tool_workers.registry import Tool, ToolContext


class SlowLookupArgs(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    query: Annotated[str, msgspec.Meta(min_length=1, max_length=500, description="What to look up.")]
    seconds: (
        Annotated[float, msgspec.Meta(ge=0, le=120, description="Simulated latency; default set by the worker.")]
        | None
    ) = None


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


TOOL = Tool(
    name="slow_lookup",
    description="Looks something up in a slow knowledge base (takes a few seconds).",
    args=SlowLookupArgs,
    run=run,
    max_seconds=8.0,
    idempotent=True,
    pool="slow",
)
