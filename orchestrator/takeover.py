"""Taking over sessions whose owner is gone.

Two ways to notice: the supervised scan finds leases that lapsed (a crashed orchestrator's turn is
picked up within a lease TTL plus one scan, long before JetStream's ack wait), and the peer watch
(orchestrator/peers.py) reports a peer whose process is gone, whose leases are broken at once. A
session claimed with nothing left to run had its owner die after finishing a turn, maybe before
showing `turn_end` live: the log's tail is re-published (subscribers drop what they have seen).
"""

from __future__ import annotations

import logging

from orchestrator.ports import TurnPorts
from orchestrator.runners import RunnerPool
from shared.supervise import supervised

log = logging.getLogger(__name__)


class Takeover:
    def __init__(self, ports: TurnPorts, runners: RunnerPool) -> None:
        self.ports = ports
        self.runners = runners

    async def run(self) -> None:
        # a failure here would silently disable crash recovery, hence the supervised loop
        await supervised(
            "takeover", self.scan, every_s=self.ports.settings.takeover_scan_ms / 1000, logger=log
        )

    async def scan(self) -> None:
        for sid in await self.ports.checkpoints.expired_leases():
            await self.take_over(sid)

    async def take_over(self, sid: str) -> None:
        ports, cp = self.ports, self.ports.checkpoints
        if sid in self.runners or self.runners.full:
            return
        claim = await cp.claim(sid, ports.id, ports.settings.lease_ttl_ms)
        if claim.held:
            return
        if claim.lease is None:
            tail = await cp.last_event(sid)
            if tail is not None:
                await ports.bus.publish_events(sid, [tail])
            await cp.forget_active(sid)
            return
        log.info("taking over session %s (epoch %d)", sid, claim.lease.epoch)
        self.runners.start(claim.lease, claim.first)

    async def peer_gone(self, instance: str) -> None:
        """A peer's process is gone (its peer socket closed): its sessions are taken over now, not
        when their leases lapse."""
        self.ports.metrics["peer_deaths"] += 1
        sids = await self.ports.checkpoints.break_leases_of(instance)
        if sids:
            log.info("peer %s is gone: taking over %d sessions", instance, len(sids))
        for sid in sids:
            await self.take_over(sid)
