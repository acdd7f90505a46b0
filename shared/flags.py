"""Scoped feature flags, resolved with a per-scope cache: deployment < tenant:<id> < the session
row's own flags < session:<id> (proto/flags.py declares the flags themselves). Shared by
the orchestrator (a turn's model, prompt, tools, disconnect policy) and the gateway (the double
texting policy of a send), so both read a flag the same way.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import logging
import time
from collections.abc import Callable, Coroutine, Mapping, Sequence
from typing import Any, Final, Protocol

from proto import flags as flag_schema

log = logging.getLogger(__name__)

DEPLOYMENT_SCOPE: Final = "deployment"
KNOWN_PROVIDERS: Final = ("simulated", "openai")
KNOWN_FLAGS: Final = flag_schema.KNOWN_FLAGS
DOUBLE_TEXT_POLICIES: Final = flag_schema.DOUBLE_TEXT_POLICIES


_SCOPES = "\x00scopes"  # the cache entry listing the scopes that have rows


async def _none() -> dict[str, Any]:
    return {}


def tenant_scope(tenant: str) -> str:
    return f"tenant:{tenant}"


def session_scope(session_id: str) -> str:
    return f"session:{session_id}"


class FlagSource(Protocol):
    """What the resolver needs of the event log."""

    async def flags_for(self, scopes: Sequence[str]) -> dict[str, Any]: ...

    async def flag_scopes(self) -> list[str]:
        """Every scope that has a flag row."""
        ...


class FlagResolver:
    """Merged flags of a turn, each scope cached for `ttl_s`; concurrent misses of one scope share
    one query. When Postgres cannot be read, a stale cached value is served (and logged); with
    nothing cached the error propagates (the turn fails and is retried)."""

    def __init__(
        self,
        source: FlagSource,
        *,
        ttl_s: float = 2.0,
        max_entries: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._source = source
        self._ttl = ttl_s
        self._max = max_entries
        self._clock = clock
        self._cache: collections.OrderedDict[str, tuple[float, dict[str, Any]]] = collections.OrderedDict()
        self._inflight: dict[str, asyncio.Task[dict[str, Any]]] = {}
        self.queries = 0
        self.stale_served = 0

    async def resolve(
        self, session_id: str, tenant: str | None, session_flags: Mapping[str, Any] | None = None
    ) -> dict[str, Any]:
        """deployment < tenant:<tenant> < the session row's flags < session:<id>; None = unset."""
        scopes = [DEPLOYMENT_SCOPE, *([tenant_scope(tenant)] if tenant else []), session_scope(session_id)]
        # Scopes with no row at all (nearly every tenant and session) cost no query: one list of the
        # scopes in use, cached like a scope, stands for them (with 1,000 sessions the per-scope cache
        # missed on almost every turn: 1.9 flag queries per turn, PERF-LEDGER §1b).
        known = await self._scope(_SCOPES, self._list_scopes)
        *lower, operator_session = await asyncio.gather(
            *(self._scope(s) if s in known else _none() for s in scopes)
        )
        merged: dict[str, Any] = {}
        for layer in (*lower, dict(session_flags or {}), operator_session):
            for name, value in layer.items():
                if value is not None:
                    merged[name] = value
        return merged

    def invalidate(self, scope: str | None = None) -> None:
        if scope is None:
            self._cache.clear()
        else:
            self._cache.pop(scope, None)

    async def _list_scopes(self) -> dict[str, Any]:
        return dict.fromkeys(await self._source.flag_scopes(), True)

    async def _scope(
        self, scope: str, fetch: Callable[[], Coroutine[Any, Any, dict[str, Any]]] | None = None
    ) -> dict[str, Any]:
        """One query per scope at a time, shared by every caller that misses the cache. The query is a
        task of the resolver's own, not of its first caller: a caller cancelled mid-query (its runner
        lost the lease) must not leave a future that nobody will ever resolve, which once wedged every
        later turn of the process (PERF-LEDGER §5)."""
        hit = self._cache.get(scope)
        if hit is not None and hit[0] > self._clock():
            return hit[1]
        query = self._inflight.get(scope)
        if query is None:
            self.queries += 1
            query = asyncio.get_running_loop().create_task(
                fetch() if fetch is not None else self._source.flags_for([scope]), name=f"flags-{scope}"
            )
            self._inflight[scope] = query
            query.add_done_callback(functools.partial(self._settle, scope))
        try:
            return await asyncio.shield(query)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if hit is None:
                raise
            self.stale_served += 1
            log.warning("flags of %s unavailable (%s): serving the cached value", scope, exc)
            return hit[1]

    def _settle(self, scope: str, query: asyncio.Task[dict[str, Any]]) -> None:
        if self._inflight.get(scope) is query:
            del self._inflight[scope]
        if query.cancelled() or query.exception() is not None:  # retrieved: waiters re-raise it
            return
        self._cache[scope] = (self._clock() + self._ttl, query.result())
        self._cache.move_to_end(scope)
        while len(self._cache) > self._max:
            self._cache.popitem(last=False)
