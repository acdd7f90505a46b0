"""`python -m tidewire.cluster_shim <service>`: runs `python -m <service>` with the three connection
changes the clustered topology needs and the services do not make yet. A stand-in, to be deleted once
the changes proposed in docs/cluster.md ("What the services still need") are in place:

* `TIDEWIRE_NATS_URL` may be a comma-separated server list: it reaches nats-py as a list, so a client
  can make its *first* connection to any live node (after that, nats-py also learns the cluster's
  other servers from the INFO gossip);
* every JetStream stream the process declares, including the KeyValue and Object Store buckets,
  gets `TIDEWIRE_NATS_REPLICAS` replicas (`shared/bus.py` hard-codes `num_replicas=1` for TW_TURNS,
  and its `ensure_streams` would otherwise scale a 3-replica stream back down to 1 at every start);
* `TIDEWIRE_REDIS_URL` may be a `redis+sentinel://` URL: `CheckpointStore.connect` builds its two
  pools with `shared.redis_connect.client` (same sizes and timeouts as today).

With `TIDEWIRE_CLUSTER_SHIM_RESYNC=1` (off by default: it is a trial of a proposed gateway change,
not a stand-in for one that is agreed) a gateway also re-reads the stores for every watched session
when its NATS connection comes back (docs/cluster.md, change 3), so the fix can be tried against
the deterministic stall test before it is made in gateway/.

Nothing else is changed; the service module runs exactly as `python -m <service>` would run it.
"""

from __future__ import annotations

import os
import runpy
import sys
from typing import Any


def _split_servers(url: Any) -> Any:
    if isinstance(url, str) and "," in url:
        return [u.strip() for u in url.split(",") if u.strip()]
    return url


def install() -> None:
    """Applies the three changes (idempotent)."""
    from nats.js.client import JetStreamContext

    from shared import checkpoints, redis_connect
    from shared.bus import Bus

    if getattr(Bus, "_cluster_shim", False):
        return
    replicas = int(os.environ.get("TIDEWIRE_NATS_REPLICAS", "1") or "1")

    connect = Bus.connect.__func__  # type: ignore[attr-defined]

    async def bus_connect(cls: type[Bus], url: str, **kwargs: Any) -> Bus:
        return await connect(cls, _split_servers(url), **kwargs)  # type: ignore[no-any-return]

    Bus.connect = classmethod(bus_connect)  # type: ignore[method-assign,assignment,arg-type]
    Bus._cluster_shim = True  # type: ignore[attr-defined]

    if replicas > 1:
        add_stream, update_stream = JetStreamContext.add_stream, JetStreamContext.update_stream

        def with_replicas(config: Any, params: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
            if config is not None:
                config = config.evolve(num_replicas=replicas) if (config.num_replicas or 1) < replicas else config
            elif params:
                params = {**params, "num_replicas": max(replicas, int(params.get("num_replicas") or 1))}
            return config, params

        async def add(self: JetStreamContext, config: Any = None, **params: Any) -> Any:
            config, params = with_replicas(config, params)
            return await add_stream(self, config, **params)

        async def update(self: JetStreamContext, config: Any = None, **params: Any) -> Any:
            config, params = with_replicas(config, params)
            return await update_stream(self, config, **params)

        JetStreamContext.add_stream = add  # type: ignore[method-assign,assignment]
        JetStreamContext.update_stream = update  # type: ignore[method-assign,assignment]

    store_cls = checkpoints.CheckpointStore

    def store_connect(cls: type[checkpoints.CheckpointStore], url: str, *, timeout_s: float = 3.0,
                      ttl_s: float = 86_400, max_connections: int = 64) -> checkpoints.CheckpointStore:
        def pool(n: int) -> Any:
            return redis_connect.client(url, max_connections=n, timeout_s=timeout_s, health_check_interval=10)

        return cls(pool(max_connections), ttl_s=ttl_s, lease_client=pool(2))

    store_cls.connect = classmethod(store_connect)  # type: ignore[method-assign,assignment]

    if os.environ.get("TIDEWIRE_CLUSTER_SHIM_RESYNC") == "1":
        _install_resync_on_reconnect()


def _install_resync_on_reconnect() -> None:
    """The proposed change 3: on NATS reconnect every listener of every SessionHub of this process
    re-reads the stores from the last seq it sent (a Feed sets its resync event; listeners without
    `resync`, the long-poll's, re-read at their next wake-up anyway)."""
    from gateway import hub as hub_module
    from gateway import stream
    from shared.bus import Bus

    hubs: list[Any] = []
    hub_init = hub_module.SessionHub.__init__

    def init(self: Any, *args: Any, **kwargs: Any) -> None:
        hub_init(self, *args, **kwargs)
        hubs.append(self)

    def resync_all(self: Any) -> None:
        for entry in list(self._entries.values()):
            for listener in list(entry.listeners):
                resync = getattr(listener, "resync", None)
                if resync is not None:
                    resync()

    hub_module.SessionHub.__init__ = init  # type: ignore[method-assign]
    hub_module.SessionHub.resync_all = resync_all  # type: ignore[attr-defined]
    stream.Feed.resync = lambda self: self._resync.set()  # type: ignore[attr-defined]

    connect = Bus.connect.__func__  # type: ignore[attr-defined]

    async def bus_connect(cls: type[Bus], url: str, **kwargs: Any) -> Bus:
        outer = kwargs.get("on_state")

        def on_state(up: bool) -> None:
            if outer is not None:
                outer(up)
            if up:
                for h in hubs:
                    h.resync_all()

        kwargs["on_state"] = on_state
        return await connect(cls, url, **kwargs)  # type: ignore[no-any-return]

    Bus.connect = classmethod(bus_connect)  # type: ignore[method-assign,assignment,arg-type]


def main() -> None:
    if len(sys.argv) < 2:
        raise SystemExit("usage: python -m tidewire.cluster_shim <module> [args...]")
    module = sys.argv[1]
    sys.argv = [module, *sys.argv[2:]]
    install()
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
