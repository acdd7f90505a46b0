"""The checkpoint store in Redis: per-session seq allocator, event log stream, turn queue and lease.

Why one Lua script per step: a seq is allocated and its event appended to the session's stream in
the same atomic step, so a crash can never leave a gap or a repeat. Assistant events carry a
fencing token (`owner:epoch`) that must equal the session's current lease, so a paused or
partitioned orchestrator that wakes up cannot inject events. No event is published to clients
before this store has accepted it, so a replay always covers what any client may have seen.

Events are stored as the exact JSON bytes clients receive; the caller encodes them with
`"seq":0` and the script substitutes the allocated seq (the same substitution is done in Python
with `with_seq`, so both sides hold identical bytes).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import redis.asyncio as aioredis
import redis.exceptions as redis_exceptions

from proto import flags
from shared import redis_connect
from shared.adapter import Adapter
from shared.errors import Conflict, RateLimited, ReplicaLag, SeedNeeded, StaleEpoch
from shared.subjects import ACTIVE_LEASES, LOAD_BOARD, ORCHESTRATORS, gateway_key, rkey, subject_key

DoubleTextPolicy = flags.DoubleTextPolicy  # declared once, with every other flag (proto/flags.py)
# "ask": queue when no turn is running or queued; otherwise write nothing and raise PolicyNeeded,
# so a send to an idle session never has to look its policy up (a Postgres read, PERF-LEDGER §1b)
AppendPolicy = Literal["queue", "interrupt", "reject", "ask"]


class PolicyNeeded(Exception):
    """append_user with policy "ask" found a turn running: call again with the session's policy."""


_SEQ_RE = b'"seq":0,'


def with_seq(raw: bytes, seq: int) -> bytes:
    """The event bytes with the placeholder seq replaced (first occurrence: `seq` follows `type`)."""
    return raw.replace(_SEQ_RE, b'"seq":%d,' % seq, 1)


# KEYS: seq log cmid pending turns cancelled quota ; ARGV: cmid turn_id ttl_ms event request policy
# quota_rate_per_s quota_burst. The subject's message bucket (KEYS[7], rate 0: none) is spent here,
# after the duplicate and policy checks: a retried send is answered, never refused or charged, and
# the quota costs no round trip of its own. The bucket is clocked by Redis TIME (gateways' clocks
# may differ). KEYS[7] is the subject's key, not the session's: fine on one primary (Sentinel), not
# in Redis Cluster.
_APPEND_USER = """
local ex = redis.call('HGET', KEYS[3], ARGV[1])
if ex then return {0, ex} end
local cur = redis.call('GET', KEYS[1])
if not cur then return {-1} end
local running = redis.call('LRANGE', KEYS[4], 0, -1)
if ARGV[6] == 'reject' and #running > 0 then return {-2} end
if ARGV[6] == 'ask' and #running > 0 then return {-4} end
local rate = tonumber(ARGV[7])
if rate > 0 then
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  local burst = tonumber(ARGV[8])
  local b = redis.call('HMGET', KEYS[7], 'tokens', 'ts')
  local tokens = tonumber(b[1]) or burst
  local ts = tonumber(b[2]) or now
  tokens = math.min(burst, tokens + math.max(0, now - ts) * rate / 1000)
  if tokens < 1 then return {-5, math.ceil((1 - tokens) * 1000 / rate)} end
  redis.call('HSET', KEYS[7], 'tokens', tostring(tokens - 1), 'ts', tostring(now))
  redis.call('PEXPIRE', KEYS[7], math.ceil(burst * 1000 / rate) + 1000)
end
local seq = tonumber(cur) + 1
local ev = string.gsub(ARGV[4], '"seq":0,', '"seq":' .. seq .. ',', 1)
redis.call('XADD', KEYS[2], seq .. '-0', 'e', ev)
redis.call('SET', KEYS[1], seq)
redis.call('HSET', KEYS[3], ARGV[1], seq .. ':' .. ARGV[2])
redis.call('HSET', KEYS[5], ARGV[2], ARGV[5])
local out = {1, seq}
if ARGV[6] == 'interrupt' then
  for _, t in ipairs(running) do
    redis.call('SADD', KEYS[6], t)
    table.insert(out, t)
  end
end
redis.call('RPUSH', KEYS[4], ARGV[2])
for i = 1, 6 do redis.call('PEXPIRE', KEYS[i], ARGV[3]) end
return out
"""

# KEYS: seq log lease tstate hold ; ARGV: token ttl_ms start_turn_id hold n ev1..evn
# hold = '' or k: readers stop before the batch's k-th event (0-based) until finish_turn (the turn_end,
# not yet in Postgres); the events before it are visible at once
_APPEND_EVENTS = """
if redis.call('GET', KEYS[3]) ~= ARGV[1] then return {-3} end
local cur = redis.call('GET', KEYS[1])
if not cur then return {-1} end
local first = tonumber(cur) + 1
local seq = tonumber(cur)
local n = tonumber(ARGV[5])
for i = 1, n do
  seq = seq + 1
  local ev = string.gsub(ARGV[5 + i], '"seq":0,', '"seq":' .. seq .. ',', 1)
  redis.call('XADD', KEYS[2], seq .. '-0', 'e', ev)
end
redis.call('SET', KEYS[1], seq)
if ARGV[3] ~= '' then redis.call('HSET', KEYS[4], ARGV[3], 'running:' .. first) end
if ARGV[4] ~= '' then redis.call('SET', KEYS[5], first + tonumber(ARGV[4]), 'PX', ARGV[2]) end
for i = 1, 2 do redis.call('PEXPIRE', KEYS[i], ARGV[2]) end
redis.call('PEXPIRE', KEYS[4], ARGV[2])
return {1, first}
"""

# KEYS: lease pending tstate hold ; ARGV: token turn_id status ttl_ms
_FINISH_TURN = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return -3 end
redis.call('LREM', KEYS[2], 1, ARGV[2])
redis.call('HSET', KEYS[3], ARGV[2], 'done:' .. ARGV[3])
redis.call('PEXPIRE', KEYS[3], ARGV[4])
redis.call('DEL', KEYS[4])
return 1
"""

# KEYS: log hold ; ARGV: after count  -> {held seq or -1, id1, ev1, id2, ev2, ...}
# What a client may be shown: the log, up to (not including) a held turn_end.
_READ_VISIBLE = """
local held = tonumber(redis.call('GET', KEYS[2]) or '-1')
local max = '+'
if held >= 0 then
  if held <= tonumber(ARGV[1]) + 1 then return {held} end
  max = (held - 1) .. '-0'
end
local out = {held}
for _, e in ipairs(redis.call('XRANGE', KEYS[1], (tonumber(ARGV[1]) + 1) .. '-0', max, 'COUNT', ARGV[2])) do
  table.insert(out, e[1])
  table.insert(out, e[2][2])
end
return out
"""

# KEYS: lease epoch ; ARGV: owner ttl_ms  -- never re-granted while held, not even to the same owner:
# two runners of one process must not share a fencing token
_ACQUIRE = """
if redis.call('EXISTS', KEYS[1]) == 1 then return -1 end
local epoch = redis.call('INCR', KEYS[2])
redis.call('SET', KEYS[1], ARGV[1] .. ':' .. epoch, 'PX', ARGV[2])
return epoch
"""

# KEYS: lease ; ARGV: token ttl_ms
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('PEXPIRE', KEYS[1], ARGV[2]); return 1 end
return 0
"""

# KEYS: lease ; ARGV: owner  -- deletes the lease only if that owner holds it (its process is gone)
_BREAK = """
local v = redis.call('GET', KEYS[1])
if v and string.sub(v, 1, #ARGV[1] + 1) == ARGV[1] .. ':' then redis.call('DEL', KEYS[1]); return 1 end
return 0
"""

# KEYS: lease pending ; ARGV: token
_RELEASE = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return -3 end
if redis.call('LLEN', KEYS[2]) > 0 then return 0 end
redis.call('DEL', KEYS[1])
return 1
"""


# ---- the turn path's round trips: one to claim a session and its first turn, one to finish a
# turn and get the next (or give the session up). Both share this layout and the snapshot code.
# KEYS: lease epoch pending turns tstate attempts cancelled state cmid active hold
# ARGV: owner|token session_ttl_ms lease_ttl_ms session_id turn_id deadline_ms|status state_bytes
_SNAPSHOT = """
local function snapshot(head)
  local req = redis.call('HGET', KEYS[4], head)
  local starts = redis.call('HINCRBY', KEYS[6], head .. ':starts', 1)
  redis.call('PEXPIRE', KEYS[6], ARGV[2])
  local user_seq = false
  if req then
    local ok, r = pcall(cmsgpack.unpack, req)
    if ok and type(r) == 'table' and r['client_msg_id'] then
      user_seq = redis.call('HGET', KEYS[9], r['client_msg_id'])
    end
  end
  return {head, req or false, redis.call('HGET', KEYS[5], head) or false, starts,
          redis.call('HGET', KEYS[6], head .. ':failures') or false, redis.call('SISMEMBER', KEYS[7], head),
          redis.call('GET', KEYS[8]) or false, user_seq or false}
end
"""

# claim: -> {-1, msg_state} held by someone; {0, msg_state} nothing queued; {epoch, msg_state, snapshot...}
_CLAIM = (
    _SNAPSHOT
    + """
local msg_state = false
if ARGV[5] ~= '' then msg_state = redis.call('HGET', KEYS[5], ARGV[5]) or false end
if redis.call('EXISTS', KEYS[1]) == 1 then return {-1, msg_state} end
local head = redis.call('LINDEX', KEYS[3], 0)
if not head then return {0, msg_state} end
local epoch = redis.call('INCR', KEYS[2])
redis.call('SET', KEYS[1], ARGV[1] .. ':' .. epoch, 'PX', ARGV[3])
redis.call('ZADD', KEYS[10], ARGV[6], ARGV[4])
local out = {epoch, msg_state}
for _, v in ipairs(snapshot(head)) do table.insert(out, v) end
return out
"""
)

# finish (turn_id given) and next: -> {-3} stale; {0} session given up; {1, snapshot...}
_FINISH_NEXT = (
    _SNAPSHOT
    + """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return {-3} end
if ARGV[5] ~= '' then
  redis.call('LREM', KEYS[3], 1, ARGV[5])
  redis.call('HSET', KEYS[5], ARGV[5], 'done:' .. ARGV[6])
  redis.call('PEXPIRE', KEYS[5], ARGV[2])
  redis.call('DEL', KEYS[11])
  if ARGV[7] ~= '' then redis.call('SET', KEYS[8], ARGV[7], 'PX', ARGV[2]) end
end
local head = redis.call('LINDEX', KEYS[3], 0)
if not head then
  redis.call('DEL', KEYS[1])
  redis.call('ZREM', KEYS[10], ARGV[4])
  return {0}
end
local out = {1}
for _, v in ipairs(snapshot(head)) do table.insert(out, v) end
return out
"""
)

_TURN_KEYS = ("lease", "epoch", "pending", "turns", "tstate", "attempts", "cancelled", "state", "cmid")


@dataclass(frozen=True)
class MessageQuota:
    """A subject's message bucket (shared by every gateway), spent by `append_user`."""

    subject: str
    rate_per_s: float
    burst: float


@dataclass(frozen=True)
class UserAppend:
    seq: int
    turn_id: str
    duplicate: bool
    interrupted: tuple[str, ...] = ()


class SeqSource(Protocol):
    """The durable history the seq counter is re-seeded from (shared.eventlog.EventLog)."""

    async def last_seq(self, session_id: str) -> int: ...
    async def find_user_message(self, session_id: str, client_msg_id: str) -> Any: ...


@dataclass(frozen=True)
class TurnSnapshot:
    request: bytes | None
    state: tuple[str, str] | None  # ('running', turn_start seq) or ('done', status)
    starts: int
    failures: int
    cancelled: bool
    turn_id: str = ""
    session_state: bytes | None = None  # the session's stored state, read in the same round trip
    user_seq: int | None = None  # the seq of the turn's user message


@dataclass(frozen=True)
class Claim:
    lease: Lease | None  # None: someone holds the session (held), or nothing is queued
    msg_turn_state: tuple[str, str] | None  # the state of the turn the caller asked about
    first: TurnSnapshot | None  # with a lease: the head of the queue
    held: bool = False


def _state(v: object) -> tuple[str, str] | None:
    if v is None:
        return None
    kind, _, rest = (v.decode() if isinstance(v, bytes) else str(v)).partition(":")
    return kind, rest


def _bytes(v: object) -> bytes | None:
    if v is None:
        return None
    return v if isinstance(v, bytes) else str(v).encode()


def _int(v: object) -> int:
    return int(v) if isinstance(v, int | bytes | str) else 0


def _snapshot(r: Sequence[object]) -> TurnSnapshot:
    head, req, ts, starts, failures, cancelled, state, user_seq = r
    cmid_entry = _bytes(user_seq)  # '<seq>:<turn_id>'
    return TurnSnapshot(
        _bytes(req),
        _state(ts),
        _int(starts),
        _int(failures),
        bool(cancelled),
        turn_id=(_bytes(head) or b"").decode(),
        session_state=_bytes(state),
        user_seq=None if cmid_entry is None else int(cmid_entry.partition(b":")[0]),
    )


@dataclass(frozen=True)
class Lease:
    session_id: str
    owner: str
    epoch: int

    @property
    def token(self) -> str:
        return f"{self.owner}:{self.epoch}"


class CheckpointStore(Adapter):
    """Redis adapter for everything hot about a session. Business code receives this, not a client."""

    def __init__(
        self,
        client: aioredis.Redis,
        *,
        ttl_s: float = 86_400,
        lease_client: aioredis.Redis | None = None,
        min_replicas: int = 0,
        replica_timeout_ms: int = 500,
    ) -> None:
        self.redis = client
        # Redis replicates asynchronously: with min_replicas > 0 every write that a client may be
        # shown (a seq, an event, a lease epoch, a finished turn) is confirmed by WAIT on the same
        # connection before it counts, so a failover to a replica cannot re-issue a seq already seen
        self.min_replicas = min_replicas
        self.replica_timeout_ms = replica_timeout_ms
        # leases are renewed on connections of their own: never queued behind checkpoint writes
        self.lease_redis = lease_client or client
        self.ttl_ms = int(ttl_s * 1000)
        self._append_user = client.register_script(_APPEND_USER)
        self._append_events = client.register_script(_APPEND_EVENTS)
        self._finish_turn = client.register_script(_FINISH_TURN)
        self._read_visible = client.register_script(_READ_VISIBLE)
        self._claim = client.register_script(_CLAIM)
        self._finish_next = client.register_script(_FINISH_NEXT)
        self._acquire = client.register_script(_ACQUIRE)
        self._renew = client.register_script(_RENEW)
        self._release = client.register_script(_RELEASE)
        self._break = client.register_script(_BREAK)
        self.stale_rejections = 0

    @classmethod
    def connect(
        cls,
        url: str,
        *,
        timeout_s: float = 3.0,
        ttl_s: float = 86_400,
        max_connections: int = 64,
        min_replicas: int = 0,
    ) -> CheckpointStore:
        """A bounded pool: a burst of requests waits (up to the timeout) for a connection instead of
        opening one per request; Redis executes commands one at a time anyway."""

        def client(n: int) -> aioredis.Redis:
            return redis_connect.client(url, max_connections=n, timeout_s=timeout_s, health_check_interval=10)

        return cls(
            client(max_connections),
            ttl_s=ttl_s,
            lease_client=client(2),
            min_replicas=min_replicas,
            replica_timeout_ms=int(timeout_s * 1000 / 3),
        )

    async def _write(self, script: Any, keys: list[str], args: list[Any]) -> Any:
        """Runs a writing script; with `min_replicas`, in one pipeline with `WAIT` (same connection,
        one round trip) and raising ReplicaLag when too few replicas confirmed it."""
        if not self.min_replicas:
            return await script(keys=keys, args=args)
        for attempt in (1, 2):
            try:
                async with self.redis.pipeline(transaction=False) as p:
                    p.evalsha(script.sha, len(keys), *keys, *args)
                    p.execute_command("WAIT", self.min_replicas, self.replica_timeout_ms)
                    reply, acked = await p.execute()
                break
            except redis_exceptions.NoScriptError:
                if attempt == 2:
                    raise
                await self.redis.script_load(script.script)  # a restarted or promoted server
        if int(acked) < self.min_replicas:
            raise ReplicaLag(
                f"{acked} of {self.min_replicas} replicas confirmed a write within "
                f"{self.replica_timeout_ms} ms"
            )
        return reply

    async def close(self) -> None:
        await self.redis.aclose()
        if self.lease_redis is not self.redis:
            await self.lease_redis.aclose()

    async def ping(self) -> None:
        await self.redis.ping()

    # ---- seq ---------------------------------------------------------------------------------
    async def seed(self, session_id: str, last_seq: int) -> None:
        """Re-seeds the counter from the event log's last seq; a no-op when it already exists."""
        await self.redis.set(rkey(session_id, "seq"), last_seq, nx=True, px=self.ttl_ms)

    async def last_seq(self, session_id: str) -> int | None:
        """The last seq a client may have seen: the counter, or just before a held turn_end."""
        seq, held = await self.redis.mget(rkey(session_id, "seq"), rkey(session_id, "hold"))
        if seq is None:
            return None
        return int(held) - 1 if held is not None else int(seq)

    async def last_event(self, session_id: str) -> bytes | None:
        """The log's newest visible event (re-published when a dead owner's session is found idle)."""
        if await self.held_seq(session_id) is not None:
            return None
        entries = await self.redis.xrevrange(rkey(session_id, "log"), max="+", min="-", count=1)
        return bytes(entries[0][1][b"e"]) if entries else None

    # ---- user messages -----------------------------------------------------------------------
    async def append_user(
        self,
        session_id: str,
        client_msg_id: str,
        turn_id: str,
        event: bytes,
        request: bytes,
        policy: AppendPolicy = "queue",
        quota: MessageQuota | None = None,
        *,
        log: SeqSource | None = None,
    ) -> UserAppend:
        """Appends a user message and queues its turn, once per `client_msg_id`; spends one message
        of `quota` (RateLimited, nothing appended, when it is empty). With `log`, a session whose
        counter Redis no longer has (new, expired, lost in a failover) is re-seeded from it; the
        message is looked up there first, since Redis's record of `client_msg_id`s went too."""
        keys = [rkey(session_id, k) for k in ("seq", "log", "cmid", "pending", "turns", "cancelled")]
        keys.append(subject_key(quota.subject, "msgs") if quota else rkey(session_id, "quota"))
        rate, burst = (quota.rate_per_s, quota.burst) if quota else (0, 0)
        args = [client_msg_id, turn_id, self.ttl_ms, event, request, policy, rate, burst]
        r = await self._write(self._append_user, keys, args)
        if int(r[0]) == -1 and log is not None:  # no counter: re-seed from the history, once
            stored = await log.find_user_message(session_id, client_msg_id)
            if stored is not None:
                return UserAppend(stored.seq, stored.turn_id, True)
            await self.seed(session_id, await log.last_seq(session_id))
            r = await self._write(self._append_user, keys, args)
        code = int(r[0])
        if code == -5:
            raise RateLimited("too many messages for this user", retry_after_ms=max(1, int(r[1])))
        if code == -1:
            raise SeedNeeded(session_id)
        if code == -2:
            raise Conflict("a turn is still running and this session rejects double texting")
        if code == -4:
            raise PolicyNeeded(session_id)
        if code == 0:
            seq_s, _, tid = (r[1].decode() if isinstance(r[1], bytes) else r[1]).partition(":")
            return UserAppend(int(seq_s), tid, True)
        return UserAppend(
            int(r[1]), turn_id, False, tuple(x.decode() if isinstance(x, bytes) else str(x) for x in r[2:])
        )

    async def user_seq(self, session_id: str, client_msg_id: str) -> int | None:
        v = await self.redis.hget(rkey(session_id, "cmid"), client_msg_id)
        return None if v is None else int(v.decode().partition(":")[0])

    async def ensure_queued(self, session_id: str, turn_id: str, request: bytes) -> bool:
        """Re-queues a turn whose Redis entry was lost (Redis restarted without it); True if it did."""
        if turn_id.encode() in await self.redis.lrange(rkey(session_id, "pending"), 0, -1):
            return False
        await self.redis.hset(rkey(session_id, "turns"), turn_id, request)
        await self.redis.rpush(rkey(session_id, "pending"), turn_id)
        return True

    # ---- assistant events (fenced) ----------------------------------------------------------
    async def append(
        self,
        lease: Lease,
        events: Sequence[bytes],
        *,
        start_turn: str = "",
        hold: bool = False,
        held_from: int = 0,
        log: SeqSource | None = None,
    ) -> int:
        """Appends events atomically under the lease; returns the first seq allocated. With `hold`,
        readers (`read_visible`) see nothing from the batch's `held_from`-th event on until
        `finish_turn`: a turn_end is checkpointed before its Postgres commit (so a crash in between
        still ends the turn once, by takeover) but must not be shown before the history has it; the
        text before it in the same batch is visible at once. With `log`, a lost seq counter is
        re-seeded from it and the append tried once more."""
        sid = lease.session_id
        keys = [rkey(sid, k) for k in ("seq", "log", "lease", "tstate", "hold")]
        if hold and not 0 <= held_from < len(events):
            raise ValueError(f"held_from {held_from} is outside a batch of {len(events)}")
        args = [lease.token, self.ttl_ms, start_turn, str(held_from) if hold else "", len(events), *events]
        r = await self._write(self._append_events, keys, args)
        if int(r[0]) == -1 and log is not None:  # no counter: re-seed from the history, once
            await self.seed(sid, await log.last_seq(sid))
            r = await self._write(self._append_events, keys, args)
        code = int(r[0])
        if code == -3:
            self.stale_rejections += 1
            raise StaleEpoch(lease.token)
        if code == -1:
            raise SeedNeeded(sid)
        return int(r[1])

    async def finish_turn(self, lease: Lease, turn_id: str, status: str) -> None:
        sid = lease.session_id
        keys = [rkey(sid, "lease"), rkey(sid, "pending"), rkey(sid, "tstate"), rkey(sid, "hold")]
        if int(await self._finish_turn(keys=keys, args=[lease.token, turn_id, status, self.ttl_ms])) == -3:
            self.stale_rejections += 1
            raise StaleEpoch(lease.token)

    # ---- the turn path ---------------------------------------------------------------------------
    def _turn_keys(self, session_id: str) -> list[str]:
        return [*(rkey(session_id, k) for k in _TURN_KEYS), ACTIVE_LEASES, rkey(session_id, "hold")]

    async def claim(self, session_id: str, owner: str, lease_ttl_ms: int, turn_id: str = "") -> Claim:
        """One round trip: the state of `turn_id`, and, when the session is free and has queued
        turns, its lease (fencing epoch, takeover index) with a snapshot of the queue's head
        (request, state, starts counted, failures, cancel flag, session state, user seq)."""
        deadline = int(time.time() * 1000) + lease_ttl_ms
        r = await self._write(
            self._claim,
            self._turn_keys(session_id),
            [owner, self.ttl_ms, lease_ttl_ms, session_id, turn_id, deadline, ""],
        )
        code, msg_state = _int(r[0]), _state(r[1])
        if code <= 0:
            return Claim(None, msg_state, None, held=code < 0)
        return Claim(Lease(session_id, owner, code), msg_state, _snapshot(r[2:]))

    async def finish_and_next(
        self, lease: Lease, turn_id: str = "", status: str = "", session_state: bytes | None = None
    ) -> TurnSnapshot | None:
        """One round trip, fenced: marks `turn_id` done (releasing its held turn_end and storing the
        session state), then returns the next queued turn, or gives the session up (None) when the
        queue is empty. Without `turn_id`, only the second half."""
        r = await self._write(
            self._finish_next,
            self._turn_keys(lease.session_id),
            [lease.token, self.ttl_ms, 0, lease.session_id, turn_id, status, session_state or b""],
        )
        code = int(r[0])
        if code == -3:
            self.stale_rejections += 1
            raise StaleEpoch(lease.token)
        return None if code == 0 else _snapshot(r[1:])

    # ---- reading -----------------------------------------------------------------------------
    async def read_log(self, session_id: str, after: int, count: int = 500) -> list[tuple[int, bytes]]:
        entries = await self.redis.xrange(rkey(session_id, "log"), min=f"{after + 1}-0", max="+", count=count)
        return [(int(eid.split(b"-")[0]), fields[b"e"]) for eid, fields in entries]

    async def read_visible(
        self, session_id: str, after: int, count: int = 500
    ) -> tuple[list[bytes], int | None]:
        """Events after `after` that a client may see, and the held seq (a turn_end awaiting its
        Postgres commit) if the read stopped there; one round trip."""
        r = await self._read_visible(
            keys=[rkey(session_id, "log"), rkey(session_id, "hold")], args=[after, count]
        )
        held = int(r[0])
        return [bytes(raw) for raw in r[2::2]], (held if held >= 0 else None)

    async def held_seq(self, session_id: str) -> int | None:
        v = await self.redis.get(rkey(session_id, "hold"))
        return None if v is None else int(v)

    async def first_logged_seq(self, session_id: str) -> int | None:
        entries = await self.redis.xrange(rkey(session_id, "log"), min="-", max="+", count=1)
        return int(entries[0][0].split(b"-")[0]) if entries else None

    async def pending(self, session_id: str) -> list[str]:
        return [t.decode() for t in await self.redis.lrange(rkey(session_id, "pending"), 0, -1)]

    async def turn_state(self, session_id: str, turn_id: str) -> tuple[str, str] | None:
        """('running', turn_start_seq) or ('done', status) or None when the turn never started."""
        v = await self.redis.hget(rkey(session_id, "tstate"), turn_id)
        if v is None:
            return None
        kind, _, rest = v.decode().partition(":")
        return kind, rest

    async def begin_turn(self, session_id: str, turn_id: str) -> TurnSnapshot:
        """Everything a runner needs before it starts (or takes over) a turn, in one round trip;
        counts this start."""
        key = rkey(session_id, "attempts")
        async with self.redis.pipeline(transaction=False) as p:
            p.hget(rkey(session_id, "turns"), turn_id)
            p.hget(rkey(session_id, "tstate"), turn_id)
            p.hincrby(key, turn_id + ":starts", 1)
            p.hget(key, turn_id + ":failures")
            p.pexpire(key, self.ttl_ms)
            p.sismember(rkey(session_id, "cancelled"), turn_id)
            request, tstate, starts, failures, _, cancelled = await p.execute()
        state = None
        if tstate is not None:
            kind, _, rest = tstate.decode().partition(":")
            state = (kind, rest)
        return TurnSnapshot(
            None if request is None else bytes(request),
            state,
            int(starts),
            int(failures or 0),
            bool(cancelled),
        )

    async def record_failure(self, session_id: str, turn_id: str) -> int:
        """A run of the turn raised (a bug or a store failure), as opposed to its owner being killed."""
        key = rkey(session_id, "attempts")
        n = await self.redis.hincrby(key, turn_id + ":failures", 1)
        await self.redis.pexpire(key, self.ttl_ms)
        return int(n)

    # ---- cancellation ------------------------------------------------------------------------
    async def request_cancel(self, session_id: str, turn_id: str) -> None:
        key = rkey(session_id, "cancelled")
        await self.redis.sadd(key, turn_id)
        await self.redis.pexpire(key, self.ttl_ms)

    # ---- lease -------------------------------------------------------------------------------
    async def acquire(self, session_id: str, owner: str, ttl_ms: int) -> Lease | None:
        """One round trip. The takeover index entry is refreshed even when the lease is refused: it
        is only a hint of when to look again, and the holder keeps refreshing it anyway."""
        async with self.redis.pipeline(transaction=False) as p:
            await self._acquire(
                keys=[rkey(session_id, "lease"), rkey(session_id, "epoch")], args=[owner, ttl_ms], client=p
            )
            p.zadd(ACTIVE_LEASES, {session_id: int(time.time() * 1000) + ttl_ms})
            epoch, _ = await p.execute()
        return None if int(epoch) < 0 else Lease(session_id, owner, int(epoch))

    async def renew(self, lease: Lease, ttl_ms: int) -> bool:
        return (await self.renew_many([lease], ttl_ms))[0]

    async def renew_many(self, leases: Sequence[Lease], ttl_ms: int) -> list[bool]:
        """Renews every given lease in one pipelined round trip; False where the lease is no longer ours."""
        if not leases:
            return []
        deadline = int(time.time() * 1000) + ttl_ms
        async with self.lease_redis.pipeline(transaction=False) as p:
            for lease in leases:
                await self._renew(
                    keys=[rkey(lease.session_id, "lease")], args=[lease.token, ttl_ms], client=p
                )
            p.zadd(ACTIVE_LEASES, {lease.session_id: deadline for lease in leases})
            replies = await p.execute()
        return [bool(int(r)) for r in replies[:-1]]

    async def release(self, lease: Lease) -> bool:
        """Gives the session up only when its turn queue is empty (else the owner must go on)."""
        r = int(
            await self._release(
                keys=[rkey(lease.session_id, "lease"), rkey(lease.session_id, "pending")], args=[lease.token]
            )
        )
        if r == 1:
            await self.redis.zrem(ACTIVE_LEASES, lease.session_id)
        return r != 0

    async def lease_holder(self, session_id: str) -> str | None:
        v = await self.redis.get(rkey(session_id, "lease"))
        return None if v is None else v.decode()

    async def expired_leases(self, limit: int = 20) -> list[str]:
        """Sessions whose owner stopped renewing: candidates for takeover."""
        now = int(time.time() * 1000)
        return [
            s.decode() for s in await self.redis.zrangebyscore(ACTIVE_LEASES, "-inf", now, start=0, num=limit)
        ]

    async def forget_active(self, session_id: str) -> None:
        await self.redis.zrem(ACTIVE_LEASES, session_id)

    # ---- orchestrator registry and dead owners --------------------------------------------------
    async def register_orchestrator(self, instance: str, url: str) -> None:
        await self.redis.hset(ORCHESTRATORS, instance, url)

    async def unregister_orchestrator(self, instance: str) -> None:
        await self.redis.hdel(ORCHESTRATORS, instance)

    async def orchestrators(self) -> dict[str, str]:
        return {k.decode(): v.decode() for k, v in (await self.redis.hgetall(ORCHESTRATORS)).items()}

    async def break_leases_of(self, owner: str) -> list[str]:
        """Deletes every lease `owner` (a process known to be gone) still holds; returns their
        sessions, to be claimed at once. A lease held by anyone else is never touched."""
        sids = [s.decode() for s in await self.redis.zrange(ACTIVE_LEASES, 0, -1)]
        broken: list[str] = []
        for i in range(0, len(sids), 500):
            chunk = sids[i : i + 500]
            async with self.redis.pipeline(transaction=False) as p:
                for sid in chunk:
                    p.get(rkey(sid, "lease"))
                holders = await p.execute()
            for sid, holder in zip(chunk, holders, strict=True):
                if (
                    holder is not None
                    and holder.decode().rpartition(":")[0] == owner
                    and int(await self._break(keys=[rkey(sid, "lease")], args=[owner]))
                ):
                    broken.append(sid)
        return broken

    # ---- load board (admission) ------------------------------------------------------------------
    async def report_load(
        self, instance: str, pickup_delay_ms: int, loop_lag_ms: int, min_pickup_ms: int = -1
    ) -> None:
        """An orchestrator's recent pickup delay (a turn's wait from the gateway's receipt to its
        start: the longest, and the shortest of enough pickups to tell a standing queue, -1 when too
        few) and event-loop lag, for the gateways' admission; one write per report."""
        now = int(time.time() * 1000)
        await self.redis.hset(LOAD_BOARD, instance, f"{pickup_delay_ms}:{loop_lag_ms}:{now}:{min_pickup_ms}")

    async def withdraw_load(self, instance: str) -> None:
        await self.redis.hdel(LOAD_BOARD, instance)

    async def read_load(self, fresh_ms: int) -> list[tuple[int, int]]:
        """(pickup delay ms, loop lag ms) of every orchestrator that reported in the last `fresh_ms`."""
        return [(delay, lag) for delay, lag, _ in await self.read_load_reports(fresh_ms)]

    async def read_load_reports(self, fresh_ms: int) -> list[tuple[int, int, int]]:
        """(longest pickup delay ms, loop lag ms, shortest pickup delay ms or -1) of every
        orchestrator that reported in the last `fresh_ms`; entries older than ten times that are
        removed (their process is gone)."""
        now = int(time.time() * 1000)
        out: list[tuple[int, int, int]] = []
        stale: list[bytes] = []
        for field, value in (await self.redis.hgetall(LOAD_BOARD)).items():
            try:
                parts = [int(x) for x in value.split(b":")]
                delay, lag, at = parts[:3]
                shortest = parts[3] if len(parts) > 3 else -1
            except ValueError:
                stale.append(field)
                continue
            if now - at <= fresh_ms:
                out.append((delay, lag, shortest))
            elif now - at > 10 * fresh_ms:
                stale.append(field)
        if stale:
            await self.redis.hdel(LOAD_BOARD, *stale)
        return out

    # ---- presence (disconnect policy) ---------------------------------------------------------
    # A gateway process keeps one liveness key alive (one write per tick, whatever it watches) and
    # writes a session's watch set only when its first connection to it joins or its last leaves:
    # idle sessions cost nothing (the per-session refresh was 75 % of idle CPU, PERF-LEDGER §2b).
    async def gateway_alive(self, instance: str, ttl_ms: int) -> None:
        await self.redis.set(gateway_key(instance), 1, px=ttl_ms)

    async def gateway_gone(self, instance: str) -> None:
        await self.redis.delete(gateway_key(instance))

    async def set_watchers(self, session_id: str, instance: str, count: int) -> None:
        key = rkey(session_id, "watch")
        if count > 0:
            async with self.redis.pipeline(transaction=False) as p:
                p.sadd(key, instance)
                p.pexpire(key, self.ttl_ms)
                await p.execute()
        else:
            await self.redis.srem(key, instance)

    async def watched(self, session_id: str) -> bool:
        """True while a live gateway has a connection on the session; members whose gateway died
        (its liveness key expired) are dropped on the way."""
        key = rkey(session_id, "watch")
        members = [m.decode() for m in await self.redis.smembers(key)]
        if not members:
            return False
        alive = await self.redis.mget([gateway_key(m) for m in members])
        dead = [m for m, a in zip(members, alive, strict=True) if a is None]
        if dead:
            await self.redis.srem(key, *dead)
        return len(dead) < len(members)
