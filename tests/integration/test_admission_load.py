"""Admission by measured delay, end to end on the real stack: orchestrators report their pickup
delay and loop lag to the checkpoint store, and a gateway refuses new sends with `degraded` while
the median report is past its threshold, and accepts them again once it is not."""

from __future__ import annotations

import asyncio

from proto import client
from shared.checkpoints import CheckpointStore
from tests.integration.conftest import make_token, stack_env
from tests.integration.wsclient import WsTestClient
from tests.waits import eventually
from tidewire.dev.stack import Stack

FAKES = [f"synthetic-orchestrator-{i}" for i in range(3)]


async def test_sends_are_shed_while_turns_wait_too_long_to_start_and_accepted_after(infra, tmp_path) -> None:
    env = stack_env(
        infra,
        TIDEWIRE_SHED_PICKUP_DELAY_MS="1000",
        TIDEWIRE_SHED_LOOP_LAG_MS="-1",
        TIDEWIRE_SHED_RETRY_AFTER_MS="300",
    )
    stack = Stack(infra_env=env, log_dir=tmp_path / "logs", orchestrators=2, tool_workers=0).start()
    store = CheckpointStore.connect(infra.endpoints.redis_url)
    try:
        reports = await eventually(
            lambda: store.read_load(fresh_ms=2000),
            timeout=10,
            ok=lambda r: len(r) >= 2,
            what="both orchestrators to report their load",
        )
        assert all(delay < 1000 for delay, _ in reports), reports
        async with WsTestClient(stack.url, make_token("admission")) as c:
            await c.connect()
            first = await c.ack_for(await c.send_message("/sim tokens=3 rate=0\nbefore"))
            await c.until_turn_end(first.turn_id, 30)

            async def send_answer() -> client.ServerFrame:
                cmid = await c.send_message("/sim tokens=3 rate=0\nduring")
                return await c.until(
                    lambda f: (
                        isinstance(f, client.Error) or (isinstance(f, client.Ack) and f.client_msg_id == cmid)
                    ),
                    10,
                    "an answer",
                )

            async def overloaded() -> client.ServerFrame:
                for name in FAKES:  # three slow reports outvote the two healthy ones
                    await store.report_load(name, 5000, 0)
                return await send_answer()

            shed = await eventually(
                overloaded,
                timeout=10,
                what="a send refused while turns wait 5 s to start",
                ok=lambda f: isinstance(f, client.Error),
            )
            assert shed.code == "degraded" and shed.retry_after_ms == 300, shed
            for name in FAKES:
                await store.withdraw_load(name)
            accepted = await eventually(
                send_answer,
                timeout=10,
                what="a send accepted once the reports are normal",
                ok=lambda f: isinstance(f, client.Ack),
            )
            assert isinstance(accepted, client.Ack)
            await c.until_turn_end(accepted.turn_id, 30)
    finally:
        for name in FAKES:
            await store.withdraw_load(name)
        await store.close()
        stack.stop()


async def test_by_default_a_standing_wait_refuses_a_share_of_sends_and_none_after(infra, tmp_path) -> None:
    """Delay-based shedding (gateway/shedding.py) is on by default: while orchestrators report that
    even their quickest turns waited seconds to start, a growing share of new sends is answered
    `degraded` at once; once the reports are gone, every send is accepted again."""
    stack = Stack(
        infra_env=stack_env(infra, TIDEWIRE_SHED_RETRY_AFTER_MS="400"),
        log_dir=tmp_path / "logs",
        orchestrators=1,
        tool_workers=0,
    ).start()
    store = CheckpointStore.connect(infra.endpoints.redis_url)
    try:
        async with WsTestClient(stack.url, make_token("standing-wait")) as c:
            await c.connect()

            async def send_answer() -> client.ServerFrame:
                cmid = await c.send_message("/sim tokens=2 rate=0\nx")
                frame = await c.until(
                    lambda f: (
                        isinstance(f, client.Error) or (isinstance(f, client.Ack) and f.client_msg_id == cmid)
                    ),
                    10,
                    "an answer to a send",
                )
                if isinstance(frame, client.Ack):
                    await c.until_turn_end(frame.turn_id, 30)
                return frame

            async def standing() -> client.ServerFrame:
                for name in FAKES:  # the real orchestrator has too few pickups to count
                    await store.report_load(name, 4000, 0, 3000)
                return await send_answer()

            shed = await eventually(
                standing,
                timeout=20,
                what="a send refused while even the quickest turns wait 3 s to start",
                ok=lambda f: isinstance(f, client.Error),
            )
            assert shed.code == "degraded" and shed.retry_after_ms == 400, shed
            assert "of new sends are refused" in shed.message, shed.message
            for name in FAKES:
                await store.withdraw_load(name)
            # the share decays within a few samples; then no send in a row is refused
            await eventually(
                send_answer, timeout=10, what="a send accepted", ok=lambda f: isinstance(f, client.Ack)
            )
            await asyncio.sleep(2.0)  # well past the decay (8 samples of 250 ms)
            answers = [await send_answer() for _ in range(10)]
            refused = [f for f in answers if not isinstance(f, client.Ack)]
            assert not refused, f"sends refused after the wait went away: {refused}"
    finally:
        for name in FAKES:
            await store.withdraw_load(name)
        await store.close()
        stack.stop()
