"""Feed: a live gap that fills itself within the grace costs no store read; one that does not is
read from the stores; either way the connection gets every event once, in seq order."""

from __future__ import annotations

import asyncio

import pytest

from gateway import stream
from gateway.delivery import OutboundBuffer
from gateway.stream import Feed
from proto import client


def _msg(seq: int) -> client.Message:
    return client.Message(seq=seq, turn_id="t_1", client_msg_id=f"c{seq}", role="user", text=f"m{seq}")


class _Store:
    """The stores as a replay sees them: the events committed so far; counts the reads."""

    def __init__(self) -> None:
        self.events: list[client.Message] = []
        self.reads = 0

    async def page_ended(self, session_id: str, after: int, limit: int = 256) -> tuple[list[bytes], bool]:
        self.reads += 1
        raws = [client.json_encoder.encode(e) for e in self.events if e.seq > after]
        return raws[:limit], len(raws) <= limit


class _Hub:
    async def join(self, session_id: str, listener: object) -> None:
        return None

    async def leave(self, session_id: str, listener: object) -> None:
        return None


async def _delivered(buf: OutboundBuffer, upto: int, what: str) -> list[int]:
    seqs: list[int] = []
    async with asyncio.timeout(5):
        while not seqs or seqs[-1] < upto:
            for f in buf.pop_ready(1e12):
                assert isinstance(f, client.Message), f"unexpected frame {f!r}"
                seqs.append(f.seq)
            await asyncio.sleep(0.01)
    assert seqs == sorted(set(seqs)), f"{what}: delivered out of order or twice: {seqs}"
    return seqs


async def _started(store: _Store) -> tuple[Feed, OutboundBuffer, asyncio.Task[None]]:
    buf = OutboundBuffer("tokens", max_frames=10_000)
    feed = Feed("s", 0, buf, store, _Hub())  # type: ignore[arg-type]
    task = asyncio.create_task(feed.run())
    async with asyncio.timeout(5):
        while feed._replaying or store.reads == 0:  # noqa: ASYNC110 - the first replay found nothing: live now
            await asyncio.sleep(0.01)
    return feed, buf, task


@pytest.mark.asyncio
async def test_a_gap_that_fills_itself_within_the_grace_reads_nothing() -> None:
    store = _Store()
    feed, buf, task = await _started(store)
    try:
        feed.on_live([_msg(2), _msg(3)])  # the echo of 1 comes later (another publisher)
        assert buf.pop_ready(1e12) == [], "events past a gap must wait for it"
        await asyncio.sleep(stream.GAP_GRACE_S / 4)
        feed.on_live([_msg(1)])
        assert await _delivered(buf, 3, "self-filled gap") == [1, 2, 3]
        await asyncio.sleep(stream.GAP_GRACE_S * 1.5)  # past the grace: the timer found nothing to read
        assert store.reads == 1, f"expected only the initial replay read, got {store.reads} reads"
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


@pytest.mark.asyncio
async def test_a_gap_still_open_after_the_grace_is_read_from_the_stores() -> None:
    store = _Store()
    feed, buf, task = await _started(store)
    try:
        store.events = [_msg(1), _msg(2)]  # 1 was lost live; the stores have it
        feed.on_live([_msg(2), _msg(3)])
        assert await _delivered(buf, 3, "gap read from the stores") == [1, 2, 3]
        # one read fills the gap: a short page is the end of what the stores show
        assert store.reads == 2, f"expected the initial replay and one gap read, got {store.reads}"
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
