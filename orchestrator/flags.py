"""Feature flags and model routing: which model, prompt, tools and policies a turn runs with.

Flags live in Postgres (`feature_flags`, one row per scope and name) so an operator can change a
deployment without a release, and so the change is audited. A turn's flags are the merge of, from
weakest to strongest:

1. scope `deployment` (everyone),
2. scope `tenant:<id>` (the token's tenant; the subject until tokens carry a tenant claim),
3. the session row's own flags (what its owner set with `PATCH /v1/sessions/{sid}/flags`),
4. scope `session:<id>` (an operator pinning one session, e.g. to debug it).

A JSON `null` at a scope means "not set here" (inherit). Values are cached per scope for `ttl_s`
(2 s by default), so a flip applies to turns starting a couple of seconds later and costs at most
three small queries per scope per TTL. Flipping a flag back is the rollback. The values a turn ran
with are recorded in its `turns.flags` row, so every answer can be traced to its configuration.

Known flags (their types and rules are proto/flags.py's `FLAGS`, which the gateway checks too):
`model` (a route: "simulated", "openai", "openai:gpt-4o-mini", or a bare model name for the default
upstream), `system_prompt_version`, `tool_set` ("all", "none" or a comma-separated list of tool
names), `tool_schema_version`, `disconnect_policy` ("continue" or "cancel_after=<s>"),
`double_text_policy` ("queue", "interrupt", "reject").

Operators: `python -m orchestrator.flags set <scope> <name> <json>`, `get <scope>...`,
`resolve --session <sid> --tenant <id>`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from orchestrator.providers.base import ToolSpec
from proto import flags as flag_schema
from shared.flags import (
    DEPLOYMENT_SCOPE,
    KNOWN_FLAGS,
    KNOWN_PROVIDERS,
    FlagResolver,
    session_scope,
    tenant_scope,
)

__all__ = [
    "DEPLOYMENT_SCOPE",
    "KNOWN_FLAGS",
    "KNOWN_PROVIDERS",
    "FlagResolver",
    "Route",
    "load_system_prompts",
    "main",
    "parse_route",
    "select_tools",
    "session_scope",
    "system_prompt_for",
    "tenant_scope",
    "validate_flag",
]

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------- routes


@dataclass(frozen=True)
class Route:
    """Which upstream serves a step, and which of its models (None: the upstream's default)."""

    provider: str
    model: str | None


def parse_route(value: Any, *, default_provider: str, known: Sequence[str] = KNOWN_PROVIDERS) -> Route:
    """`None`/"" → the default upstream; "openai" → that upstream, its default model;
    "openai:gpt-4o-mini" → that upstream and model; "gpt-4o-mini" (not an upstream name) → that
    model on the default upstream. The model part may itself contain colons ("ollama:llama3:8b"
    is not special: only the first colon splits, after a known upstream name)."""
    if value is None or str(value).strip() == "":
        return Route(default_provider, None)
    text = str(value).strip()
    head, sep, rest = text.partition(":")
    if sep and (head in known or head == default_provider):
        return Route(head, rest or None)
    if text in known or text == default_provider:
        return Route(text, None)
    return Route(default_provider, text)


# --------------------------------------------------------------------------- validation


def validate_flag(name: str, value: Any) -> Any:
    """The value, normalised, if it is valid for a known flag (None always is: it means "inherit");
    ValueError (proto.flags.FlagError) otherwise, by the same rule the gateway applies. Unknown
    names are accepted: they are recorded, and used by nobody (the CLI asks for --force first)."""
    if name not in flag_schema.FLAGS:
        return value
    return flag_schema.validate(name, value)


def select_tools(specs: Sequence[ToolSpec], tool_set: Any) -> list[ToolSpec]:
    """The tools a turn offers the model under its `tool_set` flag (unset or "all": every tool)."""
    if tool_set is None or tool_set == "all":
        return list(specs)
    names = tool_set if isinstance(tool_set, list) else str(tool_set).split(",")
    wanted = {n.strip() for n in names if n.strip() and n.strip() != "none"}
    return [s for s in specs if s.name in wanted]


def load_system_prompts(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """`TIDEWIRE_SYSTEM_PROMPTS`: a JSON object {version: prompt text}; empty when unset."""
    raw = (os.environ if env is None else env).get("TIDEWIRE_SYSTEM_PROMPTS", "").strip()
    if not raw:
        return {}
    data = json.loads(raw)
    if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
        raise ValueError("TIDEWIRE_SYSTEM_PROMPTS must be a JSON object of strings")
    return {str(k): v for k, v in data.items()}


def system_prompt_for(version: Any, default: str, prompts: Mapping[str, str]) -> str:
    """The prompt of a `system_prompt_version`; the default for an unset or unknown version (an
    unknown version is logged, never fatal: a bad flag must not take every turn down)."""
    if version is None:
        return default
    prompt = prompts.get(str(version))
    if prompt is None:
        log.warning("unknown system_prompt_version %r: using the default prompt", version)
        return default
    return prompt


# --------------------------------------------------------------------------- operator CLI


async def _cli(args: argparse.Namespace) -> int:
    from orchestrator.settings import load
    from shared.eventlog import EventLog

    settings = load()
    eventlog = await EventLog.connect(
        settings.postgres_dsn, timeout_s=settings.postgres_timeout_s, max_size=2
    )
    try:
        if args.command == "set":
            try:
                value = json.loads(args.value)
            except ValueError as exc:
                print(f"value must be JSON (quote strings: '\"openai:gpt-4o-mini\"'): {exc}", file=sys.stderr)
                return 2
            if args.name not in KNOWN_FLAGS and not args.force:
                print(
                    f"unknown flag {args.name!r} (known: {', '.join(KNOWN_FLAGS)}); --force to set it anyway",
                    file=sys.stderr,
                )
                return 2
            try:
                value = validate_flag(args.name, value)
            except ValueError as exc:
                print(str(exc), file=sys.stderr)
                return 2
            previous = (await eventlog.flags_for([args.scope])).get(args.name)
            await eventlog.set_flag(args.scope, args.name, value)
            print(json.dumps({"scope": args.scope, "name": args.name, "value": value, "previous": previous}))
        elif args.command == "get":
            print(json.dumps(await eventlog.flags_for(args.scopes), sort_keys=True))
        else:
            row = await eventlog.get_session(args.session)
            tenant = args.tenant or (row.subject if row else None)
            resolved = await FlagResolver(eventlog).resolve(args.session, tenant, row.flags if row else None)
            print(json.dumps(resolved, sort_keys=True))
    finally:
        await eventlog.close()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m orchestrator.flags", description=__doc__.split("\n\n")[0]
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p_set = sub.add_parser(
        "set", help="set a flag at a scope; setting the previous value back is the rollback"
    )
    p_set.add_argument("scope", help='"deployment", "tenant:<id>" or "session:<id>"')
    p_set.add_argument("name")
    p_set.add_argument("value", help="JSON, e.g. '\"openai:gpt-4o-mini\"' or null (unset: inherit)")
    p_set.add_argument("--force", action="store_true", help="allow a flag name tidewire does not know")
    p_get = sub.add_parser("get", help="the flags of the given scopes, later scopes overriding earlier ones")
    p_get.add_argument("scopes", nargs="+")
    p_res = sub.add_parser("resolve", help="the flags a new turn of this session would run with")
    p_res.add_argument("--session", required=True)
    p_res.add_argument("--tenant", help="default: the session's subject")
    return asyncio.run(_cli(parser.parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
