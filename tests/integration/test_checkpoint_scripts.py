"""The Lua contracts of `shared/checkpoints.py`, proved directly against a real Redis.

The end-to-end recovery tests show fencing through SIGSTOP, but they accept `lease_lost` *or*
`stale_rejections`, so the scripts themselves may never be exercised there. These tests call the
store's public methods on a real server (the session-scoped `infra`) and check what each script
promises: a stale fencing token writes nothing, a lease is never held twice, a release never drops
queued work, seqs are allocated once each and without holes however many writers race, a
`client_msg_id` is accepted once, and the double-texting policies do what they say.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from proto import client
from shared.checkpoints import CheckpointStore, DoubleTextPolicy, Lease, UserAppend
from shared.errors import Conflict, SeedNeeded, StaleEpoch
from shared.eventlog import EventLog
from shared.subjects import rkey

LEASE_MS = 5_000
SHORT_LEASE_MS = 150


@pytest.fixture
async def store(infra) -> AsyncIterator[CheckpointStore]:
    s = CheckpointStore.connect(infra.endpoints.redis_url, ttl_s=600)
    try:
        yield s
    finally:
        await s.close()


@pytest.fixture
async def other_store(infra) -> AsyncIterator[CheckpointStore]:
    """A second client with pools of its own: another process, as far as Redis can tell."""
    s = CheckpointStore.connect(infra.endpoints.redis_url, ttl_s=600)
    try:
        yield s
    finally:
        await s.close()


def _sid() -> str:
    return f"ckpt-{uuid.uuid4().hex[:12]}"


def _event(kind: str, mark: str) -> bytes:
    """Encoded as the services encode events: `"seq":0,` right after the type, for the script to fill."""
    return json.dumps({"type": kind, "seq": 0, "mark": mark}, separators=(",", ":")).encode()


async def _user(
    store: CheckpointStore, sid: str, cmid: str, turn_id: str, policy: DoubleTextPolicy = "queue"
) -> UserAppend:
    request = b'{"turn":"%s"}' % turn_id.encode()
    return await store.append_user(sid, cmid, turn_id, _event("user_message", cmid), request, policy)


async def _expired_then_taken(store: CheckpointStore, sid: str) -> tuple[Lease, Lease]:
    """A lease that lapsed (its owner paused) and the lease a second owner then took."""
    old = await store.acquire(sid, "orch-a/1", SHORT_LEASE_MS)
    assert old is not None
    await asyncio.sleep(SHORT_LEASE_MS * 2 / 1000)
    new = await store.acquire(sid, "orch-b/1", LEASE_MS)
    assert new is not None
    return old, new


# ---- fencing -----------------------------------------------------------------------------------


async def test_append_with_a_stale_epoch_is_refused_and_writes_nothing(store: CheckpointStore) -> None:
    sid = _sid()
    await store.seed(sid, 0)
    old, new = await _expired_then_taken(store, sid)
    assert await store.append(new, [_event("turn_start", "by-new")], start_turn="t1") == 1
    log_before = await store.read_log(sid, 0)
    rejections = store.stale_rejections

    with pytest.raises(StaleEpoch):
        await store.append(
            old, [_event("delta", "stale-1"), _event("delta", "stale-2")], start_turn="t-stale"
        )

    assert await store.read_log(sid, 0) == log_before
    assert await store.last_seq(sid) == 1
    assert await store.turn_state(sid, "t-stale") is None  # the start marker is fenced too
    assert store.stale_rejections == rejections + 1


async def test_a_token_that_was_never_granted_is_refused(store: CheckpointStore) -> None:
    sid = _sid()
    await store.seed(sid, 5)
    lease = await store.acquire(sid, "orch-a/1", LEASE_MS)
    assert lease is not None
    for forged in (
        Lease(sid, lease.owner, lease.epoch + 1),
        Lease(sid, "orch-b/1", lease.epoch),
        Lease(sid, lease.owner, lease.epoch - 1),
    ):
        with pytest.raises(StaleEpoch):
            await store.append(forged, [_event("delta", "forged")])
    assert await store.last_seq(sid) == 5
    assert await store.read_log(sid, 0) == []


async def test_finish_turn_with_a_stale_epoch_is_refused_and_leaves_the_turn_queued(
    store: CheckpointStore,
) -> None:
    sid = _sid()
    await store.seed(sid, 0)
    ack = await _user(store, sid, "m1", "t1")
    old, new = await _expired_then_taken(store, sid)

    with pytest.raises(StaleEpoch):
        await store.finish_turn(old, "t1", "completed")

    assert await store.pending(sid) == ["t1"]
    assert await store.turn_state(sid, "t1") is None
    await store.finish_turn(new, "t1", "completed")
    assert await store.pending(sid) == []
    assert await store.turn_state(sid, "t1") == ("done", "completed")
    assert ack.seq == 1


# ---- the lease ---------------------------------------------------------------------------------


async def test_a_held_lease_is_never_granted_again_not_even_to_its_owner(
    store: CheckpointStore, other_store: CheckpointStore
) -> None:
    sid = _sid()
    first = await store.acquire(sid, "orch-a/1", LEASE_MS)
    assert first is not None
    assert await store.acquire(sid, "orch-a/1", LEASE_MS) is None  # same owner: two runners, one token
    assert await store.acquire(sid, "orch-b/1", LEASE_MS) is None
    assert await other_store.acquire(sid, "orch-b/1", LEASE_MS) is None
    assert await store.lease_holder(sid) == first.token


async def test_racing_acquires_grant_exactly_one_lease(
    store: CheckpointStore, other_store: CheckpointStore
) -> None:
    sid = _sid()
    results = await asyncio.gather(
        *(s.acquire(sid, f"orch-{i}/1", LEASE_MS) for i, s in enumerate([store, other_store] * 10))
    )
    granted = [r for r in results if r is not None]
    assert len(granted) == 1
    assert await store.lease_holder(sid) == granted[0].token


async def test_after_expiry_the_new_lease_has_a_strictly_greater_epoch(store: CheckpointStore) -> None:
    sid = _sid()
    epochs = []
    for owner in ("orch-a/1", "orch-a/1", "orch-b/1"):
        lease = await store.acquire(sid, owner, SHORT_LEASE_MS)
        assert lease is not None
        epochs.append(lease.epoch)
        await asyncio.sleep(SHORT_LEASE_MS * 2 / 1000)
    assert epochs == sorted(set(epochs)) and len(epochs) == 3
    # a release followed by a new acquire also moves the epoch on: a token is never reused
    lease = await store.acquire(sid, "orch-a/1", LEASE_MS)
    assert lease is not None and lease.epoch > epochs[-1]
    assert await store.release(lease)
    again = await store.acquire(sid, "orch-a/1", LEASE_MS)
    assert again is not None and again.epoch > lease.epoch


async def test_renew_by_a_stale_token_fails_and_does_not_extend_the_new_lease(store: CheckpointStore) -> None:
    sid = _sid()
    old, new = await _expired_then_taken(store, sid)
    assert await store.renew(old, LEASE_MS) is False
    assert await store.renew_many([old, new], LEASE_MS) == [False, True]
    assert await store.lease_holder(sid) == new.token


async def test_renew_after_expiry_does_not_resurrect_the_lease(store: CheckpointStore) -> None:
    sid = _sid()
    lease = await store.acquire(sid, "orch-a/1", SHORT_LEASE_MS)
    assert lease is not None
    await asyncio.sleep(SHORT_LEASE_MS * 2 / 1000)
    assert await store.renew(lease, LEASE_MS) is False
    assert await store.lease_holder(sid) is None


async def test_release_is_refused_while_turns_are_pending(store: CheckpointStore) -> None:
    sid = _sid()
    await store.seed(sid, 0)
    lease = await store.acquire(sid, "orch-a/1", LEASE_MS)
    assert lease is not None
    await _user(store, sid, "m1", "t1")

    assert await store.release(lease) is False
    assert await store.lease_holder(sid) == lease.token

    await store.finish_turn(lease, "t1", "completed")
    assert await store.release(lease) is True
    assert await store.lease_holder(sid) is None


async def test_a_stale_release_never_drops_the_new_owners_lease(store: CheckpointStore) -> None:
    sid = _sid()
    old, new = await _expired_then_taken(store, sid)
    await store.release(old)
    assert await store.lease_holder(sid) == new.token


# ---- seq allocation ----------------------------------------------------------------------------


async def test_seqs_are_never_repeated_or_skipped_under_concurrent_appenders(
    store: CheckpointStore, other_store: CheckpointStore
) -> None:
    """User messages (unfenced) and assistant batches (fenced) from many tasks on two clients."""
    sid = _sid()
    await store.seed(sid, 0)
    lease = await store.acquire(sid, "orch-a/1", LEASE_MS)
    assert lease is not None
    users_per_task, batches_per_task, tasks_per_client = 15, 15, 4
    sent: dict[str, int] = {}  # mark -> seq the store answered

    async def users(s: CheckpointStore, name: str) -> None:
        for i in range(users_per_task):
            cmid = f"{name}-u{i}"
            r = await _user(s, sid, cmid, f"turn-{cmid}")
            assert not r.duplicate
            sent[cmid] = r.seq

    async def assistant(s: CheckpointStore, name: str) -> None:
        for i in range(batches_per_task):
            marks = [f"{name}-b{i}-{j}" for j in range(1 + i % 3)]
            first = await s.append(lease, [_event("delta", m) for m in marks])
            for j, m in enumerate(marks):
                sent[m] = first + j

    async with asyncio.TaskGroup() as tg:
        for c, s in enumerate((store, other_store)):
            for t in range(tasks_per_client):
                tg.create_task(users(s, f"c{c}t{t}"))
                tg.create_task(assistant(s, f"c{c}t{t}"))

    log = await store.read_log(sid, 0, count=10_000)
    n = len(sent)
    assert [seq for seq, _ in log] == list(range(1, n + 1))
    assert await store.last_seq(sid) == n
    seen: dict[str, int] = {}
    for seq, raw in log:
        ev = json.loads(raw)
        assert ev["seq"] == seq, f"event at stream id {seq} carries seq {ev['seq']}"
        assert ev["mark"] not in seen, f"{ev['mark']} appended twice"
        seen[ev["mark"]] = seq
    assert seen == sent  # every answered seq is where that event sits, and nothing else is there


async def test_a_fenced_batch_gets_consecutive_seqs(store: CheckpointStore) -> None:
    sid = _sid()
    await store.seed(sid, 10)
    lease = await store.acquire(sid, "orch-a/1", LEASE_MS)
    assert lease is not None
    first = await store.append(
        lease, [_event("turn_start", "s"), _event("delta", "d1"), _event("delta", "d2")], start_turn="t1"
    )
    assert first == 11
    log = await store.read_log(sid, 10)
    assert [(seq, json.loads(raw)["mark"]) for seq, raw in log] == [(11, "s"), (12, "d1"), (13, "d2")]
    assert await store.turn_state(sid, "t1") == ("running", "11")


# ---- user messages -----------------------------------------------------------------------------


async def test_append_user_dedupes_by_client_msg_id(store: CheckpointStore) -> None:
    sid = _sid()
    await store.seed(sid, 0)
    first = await _user(store, sid, "m1", "t1")
    again = await _user(store, sid, "m1", "t-other")  # a resend, whatever turn id the retry carries
    assert (first.seq, first.turn_id, first.duplicate) == (1, "t1", False)
    assert (again.seq, again.turn_id, again.duplicate) == (1, "t1", True)
    assert len(await store.read_log(sid, 0)) == 1
    assert await store.last_seq(sid) == 1
    assert await store.pending(sid) == ["t1"]
    assert await store.user_seq(sid, "m1") == 1


async def test_racing_resends_of_one_message_are_accepted_once(
    store: CheckpointStore, other_store: CheckpointStore
) -> None:
    sid = _sid()
    await store.seed(sid, 0)
    results = await asyncio.gather(
        *(_user(s, sid, "m1", f"t{i}") for i, s in enumerate([store, other_store] * 8))
    )
    assert sum(not r.duplicate for r in results) == 1
    assert {(r.seq, r.turn_id) for r in results} == {(1, next(r.turn_id for r in results if not r.duplicate))}
    assert len(await store.read_log(sid, 0)) == 1


async def test_reject_policy_raises_conflict_while_a_turn_is_pending(store: CheckpointStore) -> None:
    sid = _sid()
    await store.seed(sid, 0)
    lease = await store.acquire(sid, "orch-a/1", LEASE_MS)
    assert lease is not None
    assert not (await _user(store, sid, "m1", "t1", "reject")).duplicate  # nothing running: accepted

    with pytest.raises(Conflict):
        await _user(store, sid, "m2", "t2", "reject")
    assert await store.last_seq(sid) == 1
    assert len(await store.read_log(sid, 0)) == 1
    assert await store.pending(sid) == ["t1"]
    assert await store.user_seq(sid, "m2") is None  # a refused message can be sent again later

    await store.finish_turn(lease, "t1", "completed")
    r = await _user(store, sid, "m2", "t2", "reject")
    assert (r.seq, r.duplicate) == (2, False)


async def test_interrupt_policy_returns_the_running_turns_and_marks_them_cancelled(
    store: CheckpointStore,
) -> None:
    sid = _sid()
    await store.seed(sid, 0)
    await _user(store, sid, "m1", "t1")
    await _user(store, sid, "m2", "t2")
    r = await _user(store, sid, "m3", "t3", "interrupt")
    assert r.interrupted == ("t1", "t2")
    assert (r.seq, r.turn_id, r.duplicate) == (3, "t3", False)
    assert await store.pending(sid) == ["t1", "t2", "t3"]
    for turn_id, cancelled in (("t1", True), ("t2", True), ("t3", False)):
        assert (await store.begin_turn(sid, turn_id)).cancelled is cancelled


async def test_queue_policy_interrupts_nothing(store: CheckpointStore) -> None:
    sid = _sid()
    await store.seed(sid, 0)
    await _user(store, sid, "m1", "t1")
    r = await _user(store, sid, "m2", "t2", "queue")
    assert r.interrupted == ()
    assert await store.pending(sid) == ["t1", "t2"]
    assert not (await store.begin_turn(sid, "t1")).cancelled


# ---- seeding -----------------------------------------------------------------------------------


async def test_a_missing_counter_asks_for_a_seed_and_seed_then_works(store: CheckpointStore) -> None:
    sid = _sid()
    with pytest.raises(SeedNeeded):
        await _user(store, sid, "m1", "t1")
    lease = await store.acquire(sid, "orch-a/1", LEASE_MS)
    assert lease is not None
    with pytest.raises(SeedNeeded):
        await store.append(lease, [_event("delta", "d")])
    assert await store.read_log(sid, 0) == []
    assert await store.user_seq(sid, "m1") is None  # the refused message was not remembered

    await store.seed(sid, 41)
    await store.seed(sid, 7)  # a seed never moves an existing counter (a racing seeder is harmless)
    r = await _user(store, sid, "m1", "t1")
    assert (r.seq, r.duplicate) == (42, False)
    assert await store.append(lease, [_event("delta", "d")]) == 43
    assert [seq for seq, _ in await store.read_log(sid, 0)] == [42, 43]


async def test_with_the_event_log_a_lost_counter_is_reseeded_and_a_stored_message_stays_one(
    store: CheckpointStore, infra
) -> None:
    """What Redis lost (an expiry, a failover) the event log still has: the store re-seeds from it,
    and a message already in the history is answered as the duplicate it is, not appended again."""
    elog = await EventLog.connect(infra.endpoints.postgres_dsn, timeout_s=5, max_size=1)
    try:
        sid = _sid()
        await elog.create_session(sid, "seed-test")
        stored = client.Message(seq=5, turn_id="t5", client_msg_id="m5", role="user", text="kept")
        await elog.append_user_message(sid, stored, client.json_encoder.encode(stored))
        request = b'{"turn":"t"}'
        again = await store.append_user(sid, "m5", "t-new", _event("user_message", "m5"), request, log=elog)
        assert (again.seq, again.turn_id, again.duplicate) == (5, "t5", True)
        assert await store.read_log(sid, 0) == [], "a message found in the history was appended again"
        fresh = await store.append_user(sid, "m6", "t6", _event("user_message", "m6"), request, log=elog)
        assert (fresh.seq, fresh.duplicate) == (6, False)
        sixth = client.Message(seq=6, turn_id="t6", client_msg_id="m6", role="user", text="new")
        await elog.append_user_message(sid, sixth, client.json_encoder.encode(sixth))  # as before an ack
        lease = await store.acquire(sid, "orch-a/1", LEASE_MS)
        assert lease is not None
        raw_redis = aioredis.from_url(infra.endpoints.redis_url)
        try:
            await raw_redis.delete(rkey(sid, "seq"))  # the counter lost again
        finally:
            await raw_redis.aclose()
        with pytest.raises(SeedNeeded):
            await store.append(lease, [_event("delta", "d")])
        assert await store.append(lease, [_event("delta", "d")], log=elog) == 7, (
            "not re-seeded from the history's last seq (6)"
        )
    finally:
        await elog.close()


# ---- a turn_end held until its Postgres commit -------------------------------------------------


async def test_a_held_batch_is_invisible_to_readers_until_finish_turn(store: CheckpointStore) -> None:
    sid = _sid()
    await store.seed(sid, 0)
    lease = await store.acquire(sid, "orch-a/1", LEASE_MS)
    assert lease is not None
    shown = [_event("turn_start", "s"), _event("delta", "d")]
    assert await store.append(lease, shown, start_turn="t1") == 1
    assert await store.append(lease, [_event("turn_end", "e")], hold=True) == 3

    visible, held = await store.read_visible(sid, 0)
    assert [json.loads(raw)["mark"] for raw in visible] == ["s", "d"] and held == 3
    assert await store.read_visible(sid, 2) == ([], 3)
    assert await store.last_seq(sid) == 2  # what a client may have seen, not what is allocated
    assert await store.held_seq(sid) == 3
    assert await store.last_event(sid) is None

    await store.finish_turn(lease, "t1", "completed")
    visible, held = await store.read_visible(sid, 0)
    assert [json.loads(raw)["mark"] for raw in visible] == ["s", "d", "e"] and held is None
    assert [json.loads(raw)["seq"] for raw in visible] == [1, 2, 3]
    assert await store.last_seq(sid) == 3
    tail = await store.last_event(sid)
    assert tail is not None and json.loads(tail)["mark"] == "e"


async def test_a_stale_owner_cannot_release_a_held_turn_end(store: CheckpointStore) -> None:
    sid = _sid()
    await store.seed(sid, 0)
    await _user(store, sid, "m1", "t1")
    old = await store.acquire(sid, "orch-a/1", SHORT_LEASE_MS)
    assert old is not None
    await store.append(old, [_event("turn_start", "s"), _event("turn_end", "e")], start_turn="t1", hold=True)
    await asyncio.sleep(SHORT_LEASE_MS * 2 / 1000)  # the owner paused before its commit
    new = await store.acquire(sid, "orch-b/1", LEASE_MS)
    assert new is not None

    with pytest.raises(StaleEpoch):
        await store.finish_turn(old, "t1", "completed")
    assert await store.held_seq(sid) == 2
    assert await store.read_visible(sid, 1) == ([], 2)
    assert await store.pending(sid) == ["t1"]

    await store.finish_turn(new, "t1", "completed")  # the taker commits and releases it
    assert await store.held_seq(sid) is None
    assert len((await store.read_visible(sid, 0))[0]) == 3


async def test_a_batch_held_from_its_turn_end_shows_the_text_before_it(store: CheckpointStore) -> None:
    """The turn's last append carries its tail text and its turn_end: the text is visible at once,
    the turn_end only after finish_turn."""
    sid = _sid()
    await store.seed(sid, 0)
    lease = await store.acquire(sid, "orch-a/1", LEASE_MS)
    assert lease is not None
    await store.append(lease, [_event("turn_start", "s")], start_turn="t1")
    tail = [_event("delta", "d1"), _event("delta", "d2"), _event("turn_end", "e")]
    assert await store.append(lease, tail, hold=True, held_from=2) == 2

    visible, held = await store.read_visible(sid, 0)
    assert [json.loads(raw)["mark"] for raw in visible] == ["s", "d1", "d2"] and held == 4
    assert await store.last_seq(sid) == 3
    await store.finish_turn(lease, "t1", "completed")
    visible, held = await store.read_visible(sid, 0)
    assert [json.loads(raw)["mark"] for raw in visible] == ["s", "d1", "d2", "e"] and held is None
    with pytest.raises(ValueError):
        await store.append(lease, tail, hold=True, held_from=3)
