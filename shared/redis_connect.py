"""Redis clients from one URL, plain or Sentinel-managed, with the same pool and timeouts either way.

`TIDEWIRE_REDIS_URL` may name one server (`redis://host:port/0`, `rediss://`, `unix://`) or a set of
Sentinels that know the current primary:

    redis+sentinel://[[user]:password@]host1:port1,host2:port2,host3:port3/<master-name>[?db=0]

(`rediss+sentinel://` for TLS to the data nodes). With a Sentinel URL every new connection asks the
Sentinels for the primary's address first; after a failover, connections to the old primary fail (or
answer READONLY once it is back as a replica), are dropped, and the next command connects to the
promoted replica. Nothing here retries a command: the checkpoint writes are Lua steps that allocate a
seq, so a blind retry after a timeout could run one twice; callers decide (their tenacity policies).

What a failover cannot give back: Redis replication is asynchronous, so a write the old primary
acknowledged but had not yet sent to the replica is gone after the promotion (see docs/cluster.md:
`WAIT 1 <ms>` after a checkpoint append, before publishing it, closes that window at a measured cost).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, unquote

import redis.asyncio as aioredis
from redis.asyncio.connection import BlockingConnectionPool
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool

from shared.cancellation import keep_cancel

__all__ = ["SentinelTarget", "client", "connection_pool", "parse_sentinel_url", "is_sentinel_url"]

SENTINEL_SCHEMES = ("redis+sentinel", "rediss+sentinel")
DEFAULT_SENTINEL_PORT = 26379


@dataclass(frozen=True, kw_only=True)
class SentinelTarget:
    """What a `redis+sentinel://` URL names: the Sentinels, the monitored master's name, the database."""

    sentinels: tuple[tuple[str, int], ...]
    master_name: str
    db: int = 0
    username: str | None = None
    password: str | None = None
    ssl: bool = False
    # the Sentinels' own password, when they have one (`?sentinel_password=`); none by default
    sentinel_password: str | None = None
    options: dict[str, str] = field(default_factory=dict)


def is_sentinel_url(url: str) -> bool:
    return url.split("://", 1)[0].lower() in SENTINEL_SCHEMES


def parse_sentinel_url(url: str) -> SentinelTarget:
    """Parses `redis+sentinel://[user:pass@]h1:p1,h2:p2/master?db=N` (urllib cannot: the netloc holds a
    list). IPv6 hosts go in brackets (`[::1]:26379`). Raises ValueError on anything it does not know."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() not in SENTINEL_SCHEMES:
        raise ValueError(f"not a sentinel URL: {url!r}")
    rest, _, query = rest.partition("?")
    netloc, _, path = rest.partition("/")
    username = password = None
    if "@" in netloc:
        creds, netloc = netloc.rsplit("@", 1)
        user, has_pw, pw = creds.partition(":")
        username = unquote(user) or None
        password = unquote(pw) if has_pw else None
    sentinels: list[tuple[str, int]] = []
    for item in filter(None, (s.strip() for s in netloc.split(","))):
        if item.startswith("["):
            host, _, tail = item[1:].partition("]")
            port_s = tail.removeprefix(":")
        else:
            host, _, port_s = item.partition(":")
        if not host:
            raise ValueError(f"sentinel URL with an empty host: {url!r}")
        sentinels.append((host, int(port_s) if port_s else DEFAULT_SENTINEL_PORT))
    if not sentinels:
        raise ValueError(f"sentinel URL without sentinels: {url!r}")
    master, _, db_in_path = path.partition("/")
    master = unquote(master)
    if not master:
        raise ValueError(f"sentinel URL without a master name (…/<name>): {url!r}")
    options = {k: v[-1] for k, v in parse_qs(query, keep_blank_values=True).items()}
    db = int(options.pop("db", db_in_path or "0"))
    return SentinelTarget(
        sentinels=tuple(sentinels),
        master_name=master,
        db=db,
        username=username,
        password=password,
        ssl=scheme.lower().startswith("rediss"),
        sentinel_password=options.pop("sentinel_password", None),
        options=options,
    )


class BlockingSentinelConnectionPool(SentinelConnectionPool, BlockingConnectionPool):  # type: ignore[misc]
    """A Sentinel-managed pool that, like `BlockingConnectionPool`, makes a burst wait (up to `timeout`)
    for one of `max_connections` connections instead of failing or opening more."""


class CancelSafeRedis(aioredis.Redis):  # type: ignore[misc]
    """redis-py's client with every command and pipeline keeping the caller's cancellation
    (shared.cancellation): the only Redis client class the adapters use."""

    async def execute_command(self, *args: Any, **options: Any) -> Any:
        return await keep_cancel(super().execute_command(*args, **options))

    def pipeline(self, transaction: bool = True, shard_hint: Any = None) -> Any:
        return _CancelSafePipeline(self.connection_pool, self.response_callbacks, transaction, shard_hint)


class _CancelSafePipeline(aioredis.client.Pipeline):  # type: ignore[misc]
    async def execute(self, raise_on_error: bool = True) -> list[Any]:
        return await keep_cancel(super().execute(raise_on_error))


class SentinelRedis(CancelSafeRedis):
    """A client of the current primary that also closes its connections to the Sentinels."""

    sentinel: Sentinel | None = None

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        await super().aclose(close_connection_pool)
        if self.sentinel is not None:
            await self.sentinel.aclose()
            self.sentinel = None


def _sentinel_client(
    target: SentinelTarget,
    *,
    max_connections: int,
    timeout_s: float,
    health_check_interval: float,
    blocking: bool,
) -> SentinelRedis:
    timeouts = {"socket_timeout": timeout_s, "socket_connect_timeout": timeout_s}
    sentinel_kwargs: dict[str, Any] = dict(timeouts)
    if target.sentinel_password:
        sentinel_kwargs["password"] = target.sentinel_password
    manager = Sentinel(list(target.sentinels), sentinel_kwargs=sentinel_kwargs)
    kwargs: dict[str, Any] = {
        **timeouts,
        "db": target.db,
        "max_connections": max_connections,
        "health_check_interval": health_check_interval,
        # PING each new connection: a server that accepts but is not the primary
        # any more (or still loading) is found before a command is sent on it
        "check_connection": True,
    }
    if target.username:
        kwargs["username"] = target.username
    if target.password:
        kwargs["password"] = target.password
    if target.ssl:
        kwargs["ssl"] = True
    if blocking:
        kwargs["timeout"] = timeout_s  # waiting for a free connection of the pool
    pool_class = BlockingSentinelConnectionPool if blocking else SentinelConnectionPool
    redis = manager.master_for(
        target.master_name, redis_class=SentinelRedis, connection_pool_class=pool_class, **kwargs
    )
    assert isinstance(redis, SentinelRedis)
    redis.sentinel = manager
    return redis


def client(
    url: str,
    *,
    max_connections: int = 64,
    timeout_s: float = 3.0,
    health_check_interval: float = 10.0,
    blocking: bool = True,
) -> aioredis.Redis:
    """A client for `url` that owns its pool (`aclose()` releases it).

    Same settings for a plain and a Sentinel URL: at most `max_connections` connections, a burst waits
    up to `timeout_s` for one (`blocking`), `timeout_s` on connect and on every reply, an idle
    connection is PINGed before use after `health_check_interval` s. No command is retried."""
    if is_sentinel_url(url):
        return _sentinel_client(
            parse_sentinel_url(url),
            max_connections=max_connections,
            timeout_s=timeout_s,
            health_check_interval=health_check_interval,
            blocking=blocking,
        )
    pool_class = BlockingConnectionPool if blocking else aioredis.ConnectionPool
    extra: dict[str, Any] = {"timeout": timeout_s} if blocking else {}
    pool = pool_class.from_url(
        url,
        max_connections=max_connections,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        health_check_interval=health_check_interval,
        **extra,
    )
    return CancelSafeRedis.from_pool(pool)


def connection_pool(
    url: str, *, max_connections: int = 64, timeout_s: float = 3.0, health_check_interval: float = 10.0
) -> aioredis.ConnectionPool:
    """The blocking pool alone, for callers that build `Redis(connection_pool=...)` themselves (as
    `CheckpointStore.connect` does). With a Sentinel URL the pool keeps a reference to its Sentinel
    manager, whose own connections are closed by `client(...).aclose()` only: prefer `client`."""
    redis = client(
        url,
        max_connections=max_connections,
        timeout_s=timeout_s,
        health_check_interval=health_check_interval,
        blocking=True,
    )
    return redis.connection_pool
