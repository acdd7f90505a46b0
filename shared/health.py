"""Health and metrics endpoints, one shape for every service.

`/healthz` is liveness: the event loop answers (a restart would not help a service that is merely
cut off from NATS, so liveness never looks at dependencies). `/readyz` runs the service's named
checks, each under its own timeout, and answers `{"ok", "checks": {name: bool}}` with 200 or 503:
load balancers and Kubernetes take a pod out of rotation on it. `/metrics` is the Prometheus page of
`shared.telemetry`. The gateway adds these routes to its public app; the orchestrator and the tool
worker, which serve nothing else over HTTP, bind a small server of their own on `health_port`, at
`host` like every listener (127.0.0.1 by default; `TIDEWIRE_HOST=0.0.0.0` in a pod).
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from aiohttp import web

from shared import telemetry

Check = Callable[[], bool | Awaitable[object]]
"""A readiness check: a plain predicate, or a coroutine that succeeds by not raising (a ping)."""

CHECK_TIMEOUT_S = 1.0


async def run_checks(checks: Mapping[str, Check], timeout_s: float = CHECK_TIMEOUT_S) -> dict[str, bool]:
    results: dict[str, bool] = {}
    for name, check in checks.items():
        try:
            async with asyncio.timeout(timeout_s):
                outcome = check()
                if inspect.isawaitable(outcome):
                    await outcome
                    results[name] = True
                else:
                    results[name] = bool(outcome)
        except Exception:  # noqa: BLE001 - a failed probe is the answer
            results[name] = False
    return results


def add_routes(
    app: web.Application,
    *,
    checks: Callable[[], Mapping[str, Check]],
    details: Callable[[], Mapping[str, Any]] | None = None,
    extra_metrics: Callable[[], list[tuple[str, str, float | int]]] | None = None,
) -> None:
    """`/healthz`, `/readyz` (from `checks()`, plus `details()` in the body) and `/metrics`."""

    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    async def readyz(_: web.Request) -> web.Response:
        results = await run_checks(checks())
        ok = all(results.values())
        body = {"ok": ok, "checks": results, **(details() if details else {})}
        return web.json_response(body, status=200 if ok else 503)

    async def metrics(_: web.Request) -> web.Response:
        return web.Response(
            text=telemetry.render_prometheus(extra_metrics() if extra_metrics else ()),
            content_type=telemetry.PROMETHEUS_CONTENT_TYPE,
        )

    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)


async def serve(app: web.Application, host: str, port: int) -> web.AppRunner:
    """Binds `app` at host:port; the caller owns the runner and calls `cleanup()` on the way out."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
    except BaseException:
        await runner.cleanup()
        raise
    return runner
