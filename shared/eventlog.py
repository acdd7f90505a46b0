"""The durable event log in Postgres: sessions, user messages (before ack) and finished turns.

Every statement runs in its own transaction on a pool owned by the process; `synchronous_commit`
stays on, so a returned `append_user_message` means the row survives a crash of Postgres itself.
Appends are idempotent: a retried call never creates a second row.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any

import asyncpg

from proto import client
from shared.adapter import Adapter


@dataclass(frozen=True)
class SessionRow:
    session_id: str
    subject: str
    title: str | None
    flags: dict[str, Any]
    created_at: float


@dataclass(frozen=True)
class StoredUserMessage:
    seq: int
    turn_id: str


def _decode_json(value: Any) -> Any:
    return json.loads(value) if isinstance(value, str) else value


async def apply_migrations(pool: asyncpg.Pool) -> list[int]:
    """Applies numbered `shared/migrations/NNN_*.sql` files once each, under an advisory lock,
    so concurrent service start-ups are safe. Returns the versions applied now."""
    files = sorted(
        (f for f in resources.files("shared.migrations").iterdir() if f.name.endswith(".sql")),
        key=lambda f: f.name,
    )
    applied: list[int] = []
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(7477617)")
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations (version int PRIMARY KEY, name text NOT NULL,"
            " applied_at timestamptz NOT NULL DEFAULT now())"
        )
        done = {r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")}
        for f in files:
            version = int(f.name.split("_", 1)[0])
            if version in done:
                continue
            await conn.execute(f.read_text())
            await conn.execute(
                "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)", version, f.name
            )
            applied.append(version)
    return applied


def merge_turn_rows(session_id: str, raws: Sequence[bytes]) -> list[tuple[Any, ...]]:
    """Turns checkpointed events into event rows: consecutive deltas of one turn become one merged
    delta row (PROTOCOL.md's merging rule), with the members' seqs and end offsets kept as marks."""
    rows: list[tuple[Any, ...]] = []
    run: list[client.Delta] = []

    def close_run() -> None:
        if not run:
            return
        first, last = run[0], run[-1]
        merged = client.Delta(
            seq=last.seq, turn_id=first.turn_id, offset=first.offset, text="".join(d.text for d in run)
        )
        rows.append(
            (
                session_id,
                last.seq,
                first.seq,
                "delta",
                first.turn_id,
                None,
                client.json_encoder.encode(merged).decode(),
                [d.seq for d in run],
                [d.offset + len(d.text) for d in run],
            )
        )
        run.clear()

    for raw in raws:
        ev = client.event_decoder.decode(raw)
        if isinstance(ev, client.Delta):
            if run and (run[-1].turn_id != ev.turn_id or run[-1].offset + len(run[-1].text) != ev.offset):
                close_run()
            run.append(ev)
            continue
        close_run()
        cmid = ev.client_msg_id if isinstance(ev, client.Message) else None
        rows.append((session_id, ev.seq, ev.seq, event_type(ev), ev.turn_id, cmid, raw.decode(), None, None))
    close_run()
    return rows


def event_type(ev: client.Event) -> str:
    tag = type(ev).__struct_config__.tag
    assert isinstance(tag, str)
    return tag


async def _keep_session(conn: asyncpg.Connection) -> None:
    """Pool release without the default reset query (advisory unlock, CLOSE ALL, UNLISTEN, RESET
    ALL: 38 % of Postgres round trips per turn, PERF-LEDGER §1b). This code never sets session
    state, LISTENs or holds session-level locks; asyncpg still rolls back a transaction left open."""


class EventLog(Adapter):
    """Postgres adapter. Business code receives this, never the pool."""

    def __init__(
        self, pool: asyncpg.Pool, *, statement_timeout_s: float = 5.0, probe_pool: asyncpg.Pool | None = None
    ) -> None:
        self._pool = pool
        self._timeout = statement_timeout_s
        # health probes use a connection of their own: a pool saturated by load is not "Postgres down"
        self._probe_pool = probe_pool or pool

    @classmethod
    async def connect(
        cls, dsn: str, *, min_size: int = 1, max_size: int = 10, timeout_s: float = 5.0, migrate: bool = True
    ) -> EventLog:
        pool = await asyncpg.create_pool(
            dsn,
            min_size=min_size,
            max_size=max_size,
            timeout=timeout_s,
            command_timeout=timeout_s,
            reset=_keep_session,
        )
        assert pool is not None
        if migrate:
            await apply_migrations(pool)
        probe_pool = await asyncpg.create_pool(
            dsn, min_size=0, max_size=1, timeout=timeout_s, command_timeout=timeout_s, reset=_keep_session
        )
        return cls(pool, statement_timeout_s=timeout_s, probe_pool=probe_pool)

    async def close(self) -> None:
        await self._pool.close()
        if self._probe_pool is not self._pool:
            await self._probe_pool.close()

    async def ping(self) -> None:
        await self._probe_pool.fetchval("SELECT 1", timeout=self._timeout)

    # ---- sessions ----------------------------------------------------------------------------
    async def create_session(self, session_id: str, subject: str, title: str | None = None) -> None:
        await self._pool.execute(
            "INSERT INTO sessions (session_id, subject, title) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
            session_id,
            subject,
            title,
            timeout=self._timeout,
        )

    async def get_session(self, session_id: str) -> SessionRow | None:
        r = await self._pool.fetchrow(
            "SELECT session_id, subject, title, flags, extract(epoch from created_at) AS ts"
            " FROM sessions WHERE session_id = $1",
            session_id,
            timeout=self._timeout,
        )
        if r is None:
            return None
        return SessionRow(r["session_id"], r["subject"], r["title"], _decode_json(r["flags"]), float(r["ts"]))

    async def list_sessions(self, subject: str, limit: int = 50) -> list[SessionRow]:
        rows = await self._pool.fetch(
            "SELECT session_id, subject, title, flags, extract(epoch from created_at) AS ts FROM sessions"
            " WHERE subject = $1 ORDER BY created_at DESC LIMIT $2",
            subject,
            limit,
            timeout=self._timeout,
        )
        return [
            SessionRow(r["session_id"], r["subject"], r["title"], _decode_json(r["flags"]), float(r["ts"]))
            for r in rows
        ]

    async def count_sessions(self, subject: str) -> int:
        n = await self._pool.fetchval(
            "SELECT count(*) FROM sessions WHERE subject = $1", subject, timeout=self._timeout
        )
        return int(n)

    async def set_session_flags(self, session_id: str, flags: dict[str, Any]) -> None:
        await self._pool.execute(
            "UPDATE sessions SET flags = flags || $2::jsonb WHERE session_id = $1",
            session_id,
            json.dumps(flags),
            timeout=self._timeout,
        )

    # ---- user messages -----------------------------------------------------------------------
    async def append_user_message(self, session_id: str, message: client.Message, raw: bytes) -> bool:
        """Durable before ack. Returns False when the message (same seq or client_msg_id) was there."""
        status = await self._pool.execute(
            "INSERT INTO events (session_id, seq, first_seq, type, turn_id, client_msg_id, payload)"
            " VALUES ($1, $2, $2, 'message', $3, $4, $5) ON CONFLICT DO NOTHING",
            session_id,
            message.seq,
            message.turn_id,
            message.client_msg_id,
            raw.decode(),
            timeout=self._timeout,
        )
        return bool(status.endswith(" 1"))

    async def find_user_message(self, session_id: str, client_msg_id: str) -> StoredUserMessage | None:
        r = await self._pool.fetchrow(
            "SELECT seq, turn_id FROM events WHERE session_id = $1 AND client_msg_id = $2",
            session_id,
            client_msg_id,
            timeout=self._timeout,
        )
        return None if r is None else StoredUserMessage(int(r["seq"]), r["turn_id"])

    async def last_seq(self, session_id: str) -> int:
        v = await self._pool.fetchval(
            "SELECT max(seq) FROM events WHERE session_id = $1", session_id, timeout=self._timeout
        )
        return int(v or 0)

    # ---- turns -------------------------------------------------------------------------------
    async def append_turn(
        self,
        session_id: str,
        turn_id: str,
        user_seq: int,
        raws: Sequence[bytes],
        end: client.TurnEnd,
        epoch: int,
        flags: dict[str, Any] | None = None,
    ) -> None:
        """Writes a finished turn (its checkpointed events, deltas merged) and its assistant message in
        one transaction. Idempotent: a takeover that repeats it changes nothing."""
        rows = merge_turn_rows(session_id, raws)
        async with self._pool.acquire() as conn, conn.transaction():
            await conn.executemany(
                "INSERT INTO events (session_id, seq, first_seq, type, turn_id, client_msg_id, payload,"
                " mark_seqs, mark_ends) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) ON CONFLICT DO NOTHING",
                rows,
                timeout=self._timeout,
            )
            await conn.execute(
                "INSERT INTO turns (turn_id, session_id, user_seq, end_seq, status, text, epoch, flags)"
                " VALUES ($1, $2, $3, $4, $5, $6, $7, $8::jsonb) ON CONFLICT (turn_id) DO NOTHING",
                turn_id,
                session_id,
                user_seq,
                end.seq,
                end.status,
                end.text,
                epoch,
                json.dumps(flags or {}),
                timeout=self._timeout,
            )

    async def turn_status(self, turn_id: str) -> str | None:
        v = await self._pool.fetchval(
            "SELECT status FROM turns WHERE turn_id = $1", turn_id, timeout=self._timeout
        )
        return None if v is None else str(v)

    # ---- reading -----------------------------------------------------------------------------
    async def read_events(self, session_id: str, after: int, limit: int = 500) -> list[bytes]:
        """Events with seq > after, in order, as the exact JSON clients get. A merged delta row that
        straddles `after` is cut at the member boundary so nothing is repeated."""
        rows = await self._pool.fetch(
            "SELECT seq, first_seq, payload, mark_seqs, mark_ends FROM events"
            " WHERE session_id = $1 AND seq > $2 ORDER BY seq LIMIT $3",
            session_id,
            after,
            limit,
            timeout=self._timeout,
        )
        out: list[bytes] = []
        for r in rows:
            raw = r["payload"].encode()
            if r["first_seq"] <= after and r["mark_seqs"]:
                d = client.event_decoder.decode(raw)
                assert isinstance(d, client.Delta)
                cut = d.offset
                for s, end in zip(r["mark_seqs"], r["mark_ends"], strict=True):
                    if s <= after:
                        cut = end
                raw = client.json_encoder.encode(
                    client.Delta(seq=d.seq, turn_id=d.turn_id, offset=cut, text=d.text[cut - d.offset :])
                )
            out.append(raw)
        return out

    async def history(self, session_id: str) -> list[client.HistoryMessage]:
        rows = await self._pool.fetch(
            "SELECT seq, 'user' AS role, payload::json->>'text' AS text, turn_id, 'accepted' AS status"
            " FROM events WHERE session_id = $1 AND type = 'message'"
            " UNION ALL SELECT end_seq, 'assistant', text, turn_id, status FROM turns WHERE session_id = $1"
            " ORDER BY 1",
            session_id,
            timeout=self._timeout,
        )
        return [
            client.HistoryMessage(
                seq=int(r["seq"]), role=r["role"], text=r["text"], turn_id=r["turn_id"], status=r["status"]
            )
            for r in rows
        ]

    async def window(self, session_id: str, limit: int = 64) -> list[tuple[int, str, str, str]]:
        """The last messages as (seq, role, text, turn_id), oldest first: rebuilds the session state."""
        rows = await self._pool.fetch(
            "SELECT * FROM (SELECT seq, 'user' AS role, payload::json->>'text' AS text, turn_id"
            " FROM events WHERE session_id = $1 AND type = 'message'"
            " UNION ALL SELECT end_seq, 'assistant', text, turn_id FROM turns WHERE session_id = $1"
            " ORDER BY 1 DESC LIMIT $2) w ORDER BY 1",
            session_id,
            limit,
            timeout=self._timeout,
        )
        return [(int(r["seq"]), r["role"], r["text"], r["turn_id"]) for r in rows]

    # ---- flags and analytics -----------------------------------------------------------------
    async def flag_scopes(self) -> list[str]:
        rows = await self._pool.fetch("SELECT DISTINCT scope FROM feature_flags", timeout=self._timeout)
        return [r["scope"] for r in rows]

    async def flags_for(self, scopes: Sequence[str]) -> dict[str, Any]:
        """Flags of the given scopes, later scopes overriding earlier ones."""
        rows = await self._pool.fetch(
            "SELECT scope, name, value FROM feature_flags WHERE scope = ANY($1)",
            list(scopes),
            timeout=self._timeout,
        )
        order = {s: i for i, s in enumerate(scopes)}
        out: dict[str, Any] = {}
        for r in sorted(rows, key=lambda r: order[r["scope"]]):
            out[r["name"]] = _decode_json(r["value"])
        return out

    async def set_flag(self, scope: str, name: str, value: Any) -> None:
        await self._pool.execute(
            "INSERT INTO feature_flags (scope, name, value) VALUES ($1, $2, $3::jsonb)"
            " ON CONFLICT (scope, name) DO UPDATE SET value = excluded.value, updated_at = now()",
            scope,
            name,
            json.dumps(value),
            timeout=self._timeout,
        )

    async def record_analytics(self, rows: Sequence[tuple[Any, ...]]) -> None:
        await self._pool.executemany(
            "INSERT INTO turn_analytics (turn_id, session_id, status, ttft_ms, duration_ms, completion_chars,"
            " tool_calls) VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT DO NOTHING",
            rows,
            timeout=self._timeout,
        )
