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
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_delay, wait_fixed

from shared import health, logs, runtime
from shared.bus import Bus
from shared.config import from_env
from tool_workers.registry import default_registry
from tool_workers.service import ToolWorker, create_health_app
from tool_workers.settings import ToolWorkerSettings

log = logging.getLogger("tool_workers")


def nats_connect_retry() -> AsyncRetrying:
    """Start-up only: NATS may come up after us (compose, k8s); give it half a minute."""
    return AsyncRetrying(
        retry=retry_if_exception_type(Exception),
        stop=stop_after_delay(30),
        wait=wait_fixed(0.5),
        reraise=True,
    )


async def run(settings: ToolWorkerSettings) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    bus: Bus = await nats_connect_retry()(
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
