"""TEST TOOL `flaky`: fails transiently `failures` times per call, then succeeds.

Registered only with `TIDEWIRE_TEST_TOOLS=1`. It is idempotent, so the worker retries its
transient failures (the named tenacity policy `shared.retry.transient_tool_retry`); tests use it to prove
that retries happen and are bounded.
"""

from __future__ import annotations

from collections import OrderedDict

from proto.tools import FlakyArgs
from shared import tool_catalogue
from tool_workers.registry import Tool, ToolContext, TransientToolError

_attempts: OrderedDict[str, int] = OrderedDict()  # call_id -> runs so far, in this process
_MAX_TRACKED = 1024


async def run(args: FlakyArgs, ctx: ToolContext) -> str:
    runs = _attempts.pop(ctx.call_id, 0) + 1
    _attempts[ctx.call_id] = runs
    while len(_attempts) > _MAX_TRACKED:
        _attempts.popitem(last=False)
    if runs <= args.failures:
        raise TransientToolError(f"flaky: transient failure {runs} of {args.failures}")
    return f"flaky succeeded on run {runs} after {args.failures} transient failures"


TOOL = Tool.implementing(tool_catalogue.FLAKY, run)
