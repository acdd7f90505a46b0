"""Admission of a stream, the same for every transport (WebSocket, SSE, long-poll): who may open
which session's stream, holding which connection slot, resuming from where.

One order, so the three transports refuse the same input the same way (tests/integration/
test_admission.py): the Origin (403), the token (401), the session id's form (404), its ownership
(404 unknown / 403 foreign), a connection slot of the subject (429; held until the stream ends),
then the resume point. A new session (WebSocket `hello` without `session_id`) is created only after
every refusal, so a refused connection creates nothing.

One reset rule: a resume point past the session's `last_seq`, or below 0, cannot be honoured
exactly, so the stream is marked `reset` and resumes from `last_seq` (the client reloads the history
instead of receiving a partial replay: PROTOCOL.md, reconnect contract).

Errors are raised as the protocol's (shared.errors); each transport says them its way: a close code
(WebSocket), an HTTP error (SSE, long-poll). The WebSocket checks Origin and token at the upgrade
(`admit_caller`) and passes the principal in; everything after that happens at `hello`, where the
session id arrives.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Literal

from aiohttp import web

from gateway import commands
from gateway.auth import Principal, authenticate, check_origin
from gateway.keys import DEPS, REPLAYER
from gateway.limits import EDGE, check_session_id
from shared.errors import BadFrame, from_dependency

Transport = Literal["ws", "sse", "poll", "facade"]


@dataclass(frozen=True, slots=True)
class Admitted:
    """An admitted stream: whose, of which session, and from which seq (exclusive) it starts."""

    principal: Principal
    session_id: str
    after: int  # the first event sent is after this seq (= last_seq when reset)
    reset: bool  # the client's resume point could not be honoured: it must reload the history
    last_seq: int  # the session's last seq at admission (what `ready` carries)


def admit_caller(request: web.Request) -> Principal:
    """The first two steps of every admission: the Origin of a browser request, then the token."""
    settings = request.app[DEPS].settings
    check_origin(request, settings)
    return authenticate(request, settings)


def resume_point(raw: str | int | None) -> int | None:
    """A resume point as sent (`?after=`, `Last-Event-ID`, `last_seen_seq`); absent = None."""
    if raw is None or raw == "":
        return None
    if isinstance(raw, int):
        return raw
    try:
        value = int(raw)
    except ValueError as e:
        raise BadFrame("after / Last-Event-ID must be an integer") from e
    if value < 0:  # HTTP's resume points are seqs (OpenAPI: minimum 0); a WebSocket's negative one resets
        raise BadFrame("after / Last-Event-ID must be >= 0")
    return value


def decide_reset(after: int | None, last_seq: int) -> tuple[int, bool]:
    """The one reset rule: where the stream starts, and whether it is a reset."""
    start = 0 if after is None else after
    if start > last_seq or start < 0:
        return last_seq, True
    return start, False


@contextlib.asynccontextmanager
async def open_stream(
    request: web.Request,
    session_id: str | None,
    after: str | int | None,
    *,
    transport: Transport,
    principal: Principal | None = None,
) -> AsyncIterator[Admitted]:
    """Admits one stream and holds the subject's connection slot until the block exits.

    `session_id` None creates a new session for the caller (WebSocket only). `principal` is given
    when the caller was admitted already (the WebSocket upgrade); else Origin and token come first.
    Reconnects honoured exactly and resets are counted for the streaming transports (a long-poll is
    not a reconnect)."""
    deps = request.app[DEPS]
    if principal is None:
        principal = admit_caller(request)
    if session_id is not None:
        check_session_id(session_id)
        await commands.authorize(deps, session_id, principal.subject)
    async with request.app[EDGE].subjects.connection(principal.subject):
        requested = resume_point(after)
        if session_id is None:
            session_id = await commands.create_session(deps, principal.subject)
        try:
            last_seq = await request.app[REPLAYER].last_seq(session_id)
        except Exception as e:
            degraded = from_dependency(e)
            if degraded is None:
                raise
            raise degraded from e
        start, reset = decide_reset(requested, last_seq)
        if transport != "poll":
            if reset:
                deps.counters.resets += 1
            elif start > 0:
                deps.counters.resumes += 1
        yield Admitted(principal, session_id, start, reset, last_seq)
