"""Knowing at once that another orchestrator died, instead of waiting for its leases to lapse.

Every orchestrator with a health port lists itself in the registry (`tw:orchestrators`: instance →
URL) and keeps one idle WebSocket open to each peer's `/v1/peer`. When a peer process dies, by
SIGKILL or a planned exit, its kernel closes the socket and the watcher sees it within a loop
iteration: it then breaks the dead owner's leases (a compare-and-delete on the owner's name, so a
live owner's lease is never touched) and claims the sessions, so the answer continues after a
pause of one claim and one restore rather than a lease's TTL. The lease stays the backstop for
what a socket cannot tell (a partition, a process frozen but alive); fencing keeps a wrong
suspicion harmless: an owner whose lease was broken is refused at its next write.

An idle peer link costs a file descriptor and nothing else (no heartbeat); the registry is read
once a second.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import weakref
from collections.abc import Awaitable, Callable

import aiohttp
from aiohttp import web

from shared.checkpoints import CheckpointStore
from shared.supervise import supervised

log = logging.getLogger(__name__)

RECONCILE_S = 1.0
CONNECT_TIMEOUT_S = 2.0


PEER_SOCKETS = web.AppKey("peer_sockets", weakref.WeakSet[web.WebSocketResponse])


async def peer_endpoint(request: web.Request) -> web.StreamResponse:
    """`/v1/peer` on the health port: a socket that only ever closes (when this process goes)."""
    ws = web.WebSocketResponse(autoping=True)
    await ws.prepare(request)
    request.app[PEER_SOCKETS].add(ws)
    async for _ in ws:
        pass
    return ws


async def close_peer_sockets(app: web.Application) -> None:
    """A planned exit closes the links itself (the handlers would otherwise hold the health server's
    shutdown): each peer learns at once that this process is going."""
    sockets: weakref.WeakSet[web.WebSocketResponse] = app[PEER_SOCKETS]
    await asyncio.gather(
        *(ws.close(code=aiohttp.WSCloseCode.GOING_AWAY) for ws in list(sockets)), return_exceptions=True
    )


class PeerWatch:
    def __init__(
        self,
        store: CheckpointStore,
        instance: str,
        url: str | None,
        on_dead: Callable[[str], Awaitable[None]],
    ) -> None:
        self._store = store
        self._instance = instance
        self._url = url
        self._on_dead = on_dead
        self._links: dict[str, asyncio.Task[None]] = {}
        self._http: aiohttp.ClientSession | None = None
        self.deaths_seen = 0

    async def run(self) -> None:
        """Owned by the service for the life of the process."""
        self._http = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=None, connect=CONNECT_TIMEOUT_S)
        )
        try:
            if self._url is not None:
                await self._store.register_orchestrator(self._instance, self._url)
            await supervised("peer-watch", self._reconcile, every_s=RECONCILE_S, logger=log)
        finally:
            for task in self._links.values():
                task.cancel()
            await asyncio.gather(*self._links.values(), return_exceptions=True)
            await self._http.close()

    async def leave(self) -> None:
        """After the health server closed (the peers saw the links close first): off the registry."""
        if self._url is not None:
            with contextlib.suppress(Exception):
                await self._store.unregister_orchestrator(self._instance)

    async def _reconcile(self) -> None:
        if self._url is not None:  # refreshed: a peer that once lost sight of us finds us again
            await self._store.register_orchestrator(self._instance, self._url)
        peers = await self._store.orchestrators()
        for instance, url in peers.items():
            if instance != self._instance and instance not in self._links:
                self._links[instance] = asyncio.create_task(
                    self._watch(instance, url), name=f"peer-{instance}"
                )
        for instance in [i for i in self._links if i not in peers]:
            self._links.pop(instance).cancel()

    async def _watch(self, instance: str, url: str) -> None:
        assert self._http is not None
        try:
            try:
                async with self._http.ws_connect(
                    url.rstrip("/") + "/v1/peer", autoping=True, heartbeat=None
                ) as ws:
                    async for _ in ws:
                        pass
            except (aiohttp.ClientError, OSError, TimeoutError) as e:
                log.info("peer %s unreachable at %s (%s): taken as gone", instance, url, e)
            # the socket closed or never opened: the process is gone (or unreachable; fencing holds)
            self.deaths_seen += 1
            await self._store.unregister_orchestrator(instance)
            await self._on_dead(instance)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - the lease expiry still recovers its sessions
            log.warning("handling the end of peer %s failed: %s", instance, e, exc_info=e)
        finally:
            if self._links.get(instance) is asyncio.current_task():
                del self._links[instance]
