"""`python -m gateway`: one gateway process, configured by TIDEWIRE_* environment variables.

With `TIDEWIRE_TLS_CERT` and `TIDEWIRE_TLS_KEY` (PEM files) the gateway serves HTTPS and WSS itself
(TLS 1.2 or newer); otherwise plain HTTP, for use behind a TLS-terminating proxy or on loopback.
"""

from __future__ import annotations

import ssl

from aiohttp import web

from gateway.app import create_app
from gateway.settings import GatewaySettings, load
from shared import logs, runtime


def tls_context(settings: GatewaySettings) -> ssl.SSLContext | None:
    if not settings.tls_cert and not settings.tls_key:
        return None
    if not (settings.tls_cert and settings.tls_key):
        raise SystemExit("TIDEWIRE_TLS_CERT and TIDEWIRE_TLS_KEY must be set together")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(settings.tls_cert, settings.tls_key)
    return ctx


def main() -> None:
    settings = load()
    logs.setup("gateway", settings.log_level, message_text=settings.log_message_text)
    web.run_app(
        create_app(settings),
        host=settings.host,
        port=settings.http_port,
        shutdown_timeout=settings.drain_seconds,
        print=None,
        access_log=None,
        handle_signals=True,
        ssl_context=tls_context(settings),
        loop=runtime.new_loop(),
    )


if __name__ == "__main__":
    main()
