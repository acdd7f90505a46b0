"""`tidewire`: `dev` runs the whole local stack, `chat` talks to it, `token` mints a dev token."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
from pathlib import Path

from shared import tokens

DEV_SECRET = "tidewire-dev-secret-change-me-in-production"


def cmd_dev(args: argparse.Namespace) -> int:
    from shared.infra import EmbeddedInfra
    from tidewire.stack import Stack, free_port

    state = Path(args.state_dir).resolve()
    state.mkdir(parents=True, exist_ok=True)
    print("starting NATS (JetStream), PostgreSQL and Redis from their wheels…", flush=True)
    infra = EmbeddedInfra(state / "infra")
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stack: Stack | None = None
    try:
        endpoints = infra.start()
        secret = os.environ.get("TIDEWIRE_JWT_SECRET", DEV_SECRET)
        port = args.port or int(os.environ.get("TIDEWIRE_HTTP_PORT", "0") or 0) or free_port()
        stack = Stack(infra_env={**endpoints.as_env(), "TIDEWIRE_JWT_SECRET": secret, "TIDEWIRE_DEV_MODE": "1"},
                      log_dir=state / "logs", orchestrators=args.orchestrators, http_port=port)
        print(f"starting 1 gateway, {args.orchestrators} orchestrators, 1 tool worker…", flush=True)
        stack.start()
        token = tokens.mint("dev", secret)
        url = f"http://127.0.0.1:{port}"
        metrics = [f"{url}/metrics"] + [f"http://127.0.0.1:{svc.env['port']}/metrics"
                                        for svc in stack.services if svc.module == "orchestrator"]
        (state / "dev.json").write_text(json.dumps({"url": url, "token": token, "metrics": metrics}, indent=2))
        print(f"""
tidewire is up.
  browser page : {url}/?token={token}
  terminal     : tidewire chat          (reads .tidewire/dev.json)
  dev token    : {token}
  WebSocket    : ws://127.0.0.1:{port}/v1/ws?access_token=<token>
  logs         : {state / 'logs'}
Ctrl-C stops everything.""", flush=True)
        while not stop.wait(1.0):
            dead = [s.name for s in stack.services if not s.alive()]
            if dead:
                print(f"service exited: {', '.join(dead)} (see logs)", file=sys.stderr, flush=True)
                break
    finally:
        print("\nstopping…", flush=True)
        if stack is not None:
            stack.stop()
        infra.stop()
        print("stopped.", flush=True)
    return 0


def cmd_token(args: argparse.Namespace) -> int:
    secret = os.environ.get("TIDEWIRE_JWT_SECRET", DEV_SECRET)
    print(tokens.mint(args.subject, secret, ttl_s=args.ttl))
    return 0


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["chat"]:  # the chat has its own options; hand them over untouched
        from tidewire.chat import main as chat_main

        chat_main(argv[1:])
        return
    if argv[:1] == ["top"]:
        from tidewire.top import main as top_main  # type: ignore[import-not-found]

        top_main(argv[1:])
        return
    p = argparse.ArgumentParser(prog="tidewire", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    dev = sub.add_parser("dev", help="run infrastructure + gateway + orchestrators + tool worker")
    dev.add_argument("--state-dir", default=".tidewire")
    dev.add_argument("--port", type=int, default=0)
    dev.add_argument("--orchestrators", type=int, default=2)
    dev.set_defaults(func=cmd_dev)
    sub.add_parser("chat", help="terminal client (see tidewire chat --help)")
    sub.add_parser("top", help="live view of the local stack's metrics")
    tok = sub.add_parser("token", help="mint a token with the dev key")
    tok.add_argument("--subject", required=True)
    tok.add_argument("--ttl", type=float, default=7 * 86400)
    tok.set_defaults(func=cmd_token)
    args = p.parse_args(argv)
    sys.exit(args.func(args))


if __name__ == "__main__":
    main()
