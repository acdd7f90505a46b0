"""A task cancelled while it waits on Redis or NATS is cancelled: the adapters re-raise a cancel
that the drivers lose on Python 3.11 (shared/cancellation.py). Without it, about one cancel in two
that landed during a Redis command was dropped, and a SIGTERMed gateway with an SSE stream open
took 12 s to exit."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from shared.bus import Bus
from shared.checkpoints import CheckpointStore

TRIES = 400


async def _lost_cancels(op: Callable[[], Awaitable[object]]) -> int:
    """Cancels `op` at varying points while it is pending; counts the tasks that went on as if
    never cancelled."""
    lost = 0
    for i in range(TRIES):

        async def worker() -> bool:
            await op()
            return True  # reached only if the cancel was lost

        task = asyncio.create_task(worker())
        for _ in range(i % 7):
            await asyncio.sleep(0)
        if not task.cancel():  # it finished before the cancel: nothing to lose
            continue
        try:
            async with asyncio.timeout(5):
                lost += bool(await task)
        except asyncio.CancelledError:
            pass
    return lost


async def test_a_cancel_during_a_redis_command_is_never_lost(infra) -> None:
    store = CheckpointStore.connect(infra.endpoints.redis_url, timeout_s=3)
    try:
        await store.ping()
        lost_cmd = await _lost_cancels(lambda: store.first_logged_seq("cancel-probe"))
        lost_pipe = await _lost_cancels(lambda: store.set_watchers("cancel-probe", "gw/1", 1))
    finally:
        await store.close()
    assert (lost_cmd, lost_pipe) == (0, 0), (
        f"cancels lost: {lost_cmd} of {TRIES} during a command, {lost_pipe} of {TRIES} during a pipeline"
    )


async def test_a_cancel_during_a_nats_publish_is_never_lost(infra) -> None:
    bus = await Bus.connect(infra.endpoints.nats_url, name="cancel-probe", timeout_s=3)
    try:
        lost = await _lost_cancels(lambda: bus.publish_events("cancel-probe", [b'{"seq":1}']))
    finally:
        await bus.close()
    assert lost == 0, f"cancels lost: {lost} of {TRIES} during a NATS publish"


async def test_a_cancel_during_a_pull_fetch_that_times_out_is_never_lost(infra) -> None:
    """On 3.11, a cancel that lands while `asyncio.wait_for` handles its own timeout comes out as
    TimeoutError: a fetch loop (the analytics writer's, the turn intake's) then fetched on as if
    never cancelled, and a test that cancelled the writer hung for 180 s."""
    import random

    import nats

    from shared.bus import fetch_batch

    nc = await nats.connect(infra.endpoints.nats_url, name="fetch-cancel-probe")
    js = nc.jetstream()
    stream = f"CANCELPROBE{random.randrange(1 << 30)}"
    await js.add_stream(name=stream, subjects=[f"{stream.lower()}.>"], storage="memory")
    sub = await js.pull_subscribe(f"{stream.lower()}.>", durable="probe", stream=stream)
    lost = 0
    rng = random.Random(7)
    try:
        for _ in range(150):

            async def fetch_forever() -> None:
                while True:
                    await fetch_batch(sub, 1, 0.002, what="the probe stream")

            task = asyncio.create_task(fetch_forever())
            await asyncio.sleep(rng.uniform(0.0, 0.01))
            task.cancel()
            done, _ = await asyncio.wait({task}, timeout=2)
            if not done:
                lost += 1
                task.cancel()
                await asyncio.wait({task}, timeout=2)
    finally:
        await js.delete_stream(stream)
        await nc.close()
    assert lost == 0, f"cancels lost: {lost} of 150 fetch loops went on fetching after cancel()"
