"""`python -m tool_workers`: one tool worker process (settings from `TIDEWIRE_*`, see settings.py).

SIGTERM or SIGINT stops it in order: no new jobs, running tools get a grace period, then the
NATS connection is flushed and closed.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal

from aiohttp import web

from shared import health, logs, runtime
from shared.bus import Bus
from shared.config import from_env
from shared.retry import startup_connect_retry
from tool_workers.registry import default_registry
from tool_workers.service import ToolWorker, create_health_app
from tool_workers.settings import ToolWorkerSettings

log = logging.getLogger("tool_workers")


async def run(settings: ToolWorkerSettings) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    bus: Bus = await startup_connect_retry()(
        Bus.connect,
        settings.nats_url,
        name=f"tool-worker-{os.getpid()}",
        timeout_s=settings.nats_timeout_seconds,
        replicas=settings.nats_replicas,
    )
    async with bus:
        runner: web.AppRunner | None = None
        try:
            worker = ToolWorker(bus, default_registry(settings), settings)
            if settings.health_port:
                runner = await health.serve(
                    create_health_app(worker, bus), settings.host, settings.health_port
                )
            await worker.serve(stop)
        finally:
            if runner is not None:
                await runner.cleanup()


def main() -> None:
    settings = from_env(ToolWorkerSettings)
    logs.setup("tool-worker", settings.log_level)
    runtime.run(run(settings))


if __name__ == "__main__":
    main()
