"""Hosts on one machine, each in its own network namespace, joined by a bridge: a partition is a link
set down (packets vanish, no FIN, no RST), not a process kill.

    host side: bridge tw<id>br, 10.<net>.0.1/24 (the "LAN"; servers bind this address or 0.0.0.0)
    each Host: netns tw<id>-<name>, veth pair, 10.<net>.0.<n>/24 inside, the other end on the bridge

`Host.partition()` sets the bridge's end of its link down: the host can no longer reach anything,
and nothing can reach it, until `Host.heal()`. The bridge itself stays up, so the machine's own
address on it stays reachable for everybody else. Needs root and iproute2 (`ip`); `unavailable()`
says why not when they are missing. `tc netem` does not work on these machines, so there is no
latency or loss shaping, only links up and down.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from dataclasses import dataclass, field

__all__ = ["Host", "Network", "unavailable"]


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], check=check, capture_output=True, text=True, timeout=10)


def unavailable() -> str | None:
    """Why namespaces cannot be used here, or None when they can (tried for real, then removed)."""
    if shutil.which("ip") is None:
        return "iproute2's `ip` is not installed"
    if os.geteuid() != 0:
        return "network namespaces need root"
    probe = f"twprobe{uuid.uuid4().hex[:6]}"
    try:
        made = _ip("netns", "add", probe, check=False)
        if made.returncode != 0:
            return f"`ip netns add` failed: {made.stderr.strip()}"
    finally:
        _ip("netns", "del", probe, check=False)
    return None


@dataclass
class Host:
    """One namespace on the bridge. `wrap(argv)` runs a command inside it."""

    name: str
    netns: str
    address: str
    bridge_end: str
    partitioned: bool = False

    def wrap(self, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.netns, *argv]

    def partition(self) -> None:
        _ip("link", "set", self.bridge_end, "down")
        self.partitioned = True

    def heal(self) -> None:
        _ip("link", "set", self.bridge_end, "up")
        self.partitioned = False


@dataclass
class Network:
    """A bridge and the hosts on it; `close()` (or leaving the `with`) removes all of it."""

    net: int = 77  # the second octet: 10.<net>.0.0/24
    ident: str = field(default_factory=lambda: uuid.uuid4().hex[:4])
    hosts: dict[str, Host] = field(default_factory=dict)
    _up: bool = False

    @property
    def bridge(self) -> str:
        return f"tw{self.ident}br"

    @property
    def gateway_address(self) -> str:
        """The machine's own address on the bridge: what hosts dial to reach servers outside them."""
        return f"10.{self.net}.0.1"

    def open(self) -> Network:
        _ip("link", "add", self.bridge, "type", "bridge")
        self._up = True
        _ip("addr", "add", f"{self.gateway_address}/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        return self

    def add_host(self, name: str) -> Host:
        """A new namespace with loopback up and one address on the bridge (.2, .3, …)."""
        n = len(self.hosts) + 2
        netns = f"tw{self.ident}-{name}"
        outer, inner = f"tw{self.ident}h{n}", f"tw{self.ident}i{n}"  # interface names: ≤ 15 chars
        _ip("netns", "add", netns)
        host = Host(name=name, netns=netns, address=f"10.{self.net}.0.{n}", bridge_end=outer)
        self.hosts[name] = host
        _ip("link", "add", outer, "type", "veth", "peer", "name", inner)
        _ip("link", "set", inner, "netns", netns)
        _ip("link", "set", outer, "master", self.bridge)
        _ip("link", "set", outer, "up")
        _ip("-n", netns, "addr", "add", f"{host.address}/24", "dev", inner)
        _ip("-n", netns, "link", "set", inner, "up")
        _ip("-n", netns, "link", "set", "lo", "up")
        return host

    def close(self) -> None:
        for host in self.hosts.values():
            _ip("link", "del", host.bridge_end, check=False)  # removes both ends of the pair
            _ip("netns", "del", host.netns, check=False)
        self.hosts.clear()
        if self._up:
            _ip("link", "del", self.bridge, check=False)
            self._up = False

    def __enter__(self) -> Network:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()
