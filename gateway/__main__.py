"""`python -m gateway`: one gateway process, configured by TIDEWIRE_* environment variables."""

from __future__ import annotations

from aiohttp import web

from gateway.app import create_app
from gateway.settings import load
from shared import logs


def main() -> None:
    settings = load()
    logs.setup("gateway", settings.log_level)
    web.run_app(create_app(settings), host=settings.host, port=settings.http_port,
                shutdown_timeout=settings.drain_seconds, print=None, access_log=None,
                handle_signals=True)


if __name__ == "__main__":
    main()
