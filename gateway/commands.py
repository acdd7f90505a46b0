"""What a client can ask of a session, shared by the WebSocket and HTTP transports.

`send_message` is the path that must never lose or repeat a message: the seq is allocated and the
event checkpointed atomically in Redis (deduplicated by client_msg_id), the row is made durable in
Postgres and the turn is published to JetStream (deduplicated by turn_id), and only then is the
`ack` returned. Every step is idempotent, so a client retry after any crash converges.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import signal
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import msgspec

from gateway import media
from gateway.deps import Deps
from gateway.limits import AdmittedSend
from proto import bus as busproto
from proto import client
from proto import flags as flag_schema
from shared import telemetry
from shared.checkpoints import AppendPolicy, DoubleTextPolicy, PolicyNeeded, UserAppend, with_seq
from shared.errors import (
    BadFrame,
    Degraded,
    Forbidden,
    NotFound,
    RateLimited,
    TidewireError,
    TooLarge,
)
from shared.eventlog import SessionRow

log = logging.getLogger(__name__)
T = TypeVar("T")


def new_id(prefix: str) -> str:
    return prefix + secrets.token_urlsafe(12)


def validate_flags(flags: dict[str, object]) -> dict[str, object]:
    """The flags a session's owner may set (proto.flags.SESSION_FLAGS), each normalised by the one
    flag validator; `bad_frame` for any other name or a value its rule refuses."""
    out: dict[str, object] = {}
    for k, v in flags.items():
        if k not in flag_schema.SESSION_FLAGS:
            raise BadFrame(f"unknown flag {k!r}")
        try:
            out[k] = flag_schema.validate(k, v)
        except flag_schema.FlagError as e:
            raise BadFrame(str(e)) from e
    return out


async def authorize(deps: Deps, session_id: str, subject: str) -> SessionRow:
    """Every path re-checks ownership; an unknown session and a foreign one are both refused."""
    try:
        row = await deps.eventlog.get_session(session_id)
    except Exception as e:
        deps.counters.degraded += 1
        raise Degraded("session store unavailable", retry_after_ms=1000) from e
    if row is None:
        raise NotFound("no such session")
    if row.subject != subject:
        raise Forbidden("this session belongs to someone else")
    return row


MAX_ATTACHMENTS = 10
FLAG_CACHE_TTL_S = 1.0
FLAG_CACHE_MAX = 10_000


async def session_flags(deps: Deps, session_id: str, subject: str | None = None) -> dict[str, object]:
    """The flags in force for a send: the session row's own flags (cached a second per process: a
    flip applies to the next sends), layered with the deployment, tenant (= subject) and operator
    session scopes exactly as the orchestrator layers them (shared.flags). Without `subject`, the
    session row's flags alone."""
    now = time.monotonic()
    hit = deps.flag_cache.get(session_id)
    if hit is not None and hit[0] > now:
        own = hit[1]
    else:
        try:
            row = await deps.eventlog.get_session(session_id)
        except Exception as e:
            deps.counters.degraded += 1
            raise Degraded("session store unavailable", retry_after_ms=1000) from e
        own = dict(row.flags) if row else {}
        if len(deps.flag_cache) >= FLAG_CACHE_MAX:
            deps.flag_cache.clear()
        deps.flag_cache[session_id] = (now + FLAG_CACHE_TTL_S, own)
    if subject is None:
        return own
    try:
        return await deps.flags.resolve(session_id, subject, own)
    except Exception as e:
        deps.counters.degraded += 1
        raise Degraded("flag store unavailable", retry_after_ms=1000) from e


async def create_session(deps: Deps, subject: str, title: str | None = None) -> str:
    if await deps.eventlog.count_sessions(subject) >= deps.settings.max_sessions_per_subject:
        raise TooLarge("too many sessions for this user")
    sid = secrets.token_urlsafe(18)
    await deps.eventlog.create_session(sid, subject, title)
    return sid


def _validate(deps: Deps, client_msg_id: str, text: str) -> None:
    if not client_msg_id or len(client_msg_id) > 128:
        raise BadFrame("client_msg_id must be 1..128 characters")
    if not text.strip():
        raise BadFrame("text must not be empty")
    if len(text) > deps.settings.max_text_chars:
        raise TooLarge(f"text longer than {deps.settings.max_text_chars} characters")


async def _stage(name: str, span: str, aw: Awaitable[T]) -> T:
    """One timed step of accepting a message: a child span of `gateway.send` and a stage histogram."""
    t0 = time.perf_counter()
    with telemetry.tracer.start_as_current_span(span):
        try:
            return await aw
        finally:
            telemetry.observe_stage(name, time.perf_counter() - t0)


async def send_message(
    deps: Deps,
    subject: str,
    session_id: str,
    req: client.SendRequest | client.Send,
    policy: DoubleTextPolicy | None = None,
    *,
    admitted: AdmittedSend | None = None,
) -> client.Ack:
    """The root span of a turn's trace (`gateway.send`); its context rides in the TurnRequest.
    `admitted` (from `Edge.admit_send`) carries the subject's quota, spent with the append."""
    received_mono = time.monotonic_ns()
    deps.counters.sends += 1
    with telemetry.tracer.start_as_current_span(
        "gateway.send",
        kind=telemetry.SpanKind.SERVER,
        attributes={"session_id": session_id, "client_msg_id": req.client_msg_id},
    ) as span:
        turn_id = ""

        def started(tid: str) -> None:
            nonlocal turn_id
            turn_id = tid
            span.set_attribute("turn_id", tid)
            deps.turn_traces.started(tid, span.get_span_context(), received_mono)

        try:
            ack = await _send_message(deps, subject, session_id, req, policy, started, admitted)
        except BaseException as e:
            if turn_id:
                deps.turn_traces.forget(turn_id)
            if isinstance(e, Degraded):  # a store or the bus too slow to make it durable: a wait too
                deps.accepts.note((time.monotonic_ns() - received_mono) / 1e9)
            raise
        span.set_attribute("duplicate", ack.duplicate)
        accepted_s = (time.monotonic_ns() - received_mono) / 1e9
        deps.accepts.note(accepted_s)
        telemetry.observe_stage("gateway_accept", accepted_s)
        return ack


async def _send_message(
    deps: Deps,
    subject: str,
    session_id: str,
    req: client.SendRequest | client.Send,
    policy: DoubleTextPolicy | None,
    started: Callable[[str], None],
    admitted: AdmittedSend | None,
) -> client.Ack:
    received_ns = time.time_ns()
    trace_context = telemetry.inject() or None
    _validate(deps, req.client_msg_id, req.text)
    if req.attachments:
        if len(req.attachments) > MAX_ATTACHMENTS:
            raise BadFrame(f"at most {MAX_ATTACHMENTS} attachments per message")
        if deps.media is None:
            raise BadFrame("attachments are not enabled on this gateway")
        await media.check_attachments(deps.media, subject, req.attachments)

    async def resolved_policy() -> DoubleTextPolicy:
        flags = await session_flags(deps, session_id, subject)
        return flags.get("double_text_policy") or deps.settings.double_text_policy  # type: ignore[return-value]

    turn_id = new_id("t_")
    raw = client.json_encoder.encode(
        client.Message(
            seq=0,
            turn_id=turn_id,
            client_msg_id=req.client_msg_id,
            role="user",
            text=req.text,
            attachments=req.attachments,
        )
    )
    request = busproto.TurnRequest(
        session_id=session_id,
        turn_id=turn_id,
        user_seq=0,
        client_msg_id=req.client_msg_id,
        subject=subject,
        text=req.text,
        attachments=req.attachments,
        received_at_ns=received_ns,
        trace_context=trace_context,
    )
    cp = deps.checkpoints
    checkpoint_span = telemetry.tracer.start_span("checkpoint.append_user")
    t0 = time.perf_counter()
    encoded = busproto.bus_encoder.encode(request)
    quota = admitted.quota if admitted is not None else None

    async def append(policy: AppendPolicy) -> UserAppend:
        return await cp.append_user(
            session_id, req.client_msg_id, turn_id, raw, encoded, policy, quota, log=deps.eventlog
        )

    try:
        async with asyncio.timeout(deps.settings.redis_timeout_s * 2):
            try:
                appended = await append(policy or "ask")
            except PolicyNeeded:  # a turn is running: only now does the session's policy matter
                policy = await resolved_policy()
                appended = await append(policy)
    except RateLimited:
        if admitted is not None:
            admitted.refused()
        raise
    except TidewireError:
        raise
    except Exception as e:
        deps.counters.degraded += 1
        raise Degraded("checkpoint store unavailable", retry_after_ms=1000) from e
    finally:
        checkpoint_span.end()
        telemetry.observe_stage("checkpoint_append_user", time.perf_counter() - t0)

    seq, turn_id = appended.seq, appended.turn_id
    if appended.duplicate:
        logged = await cp.read_log(session_id, seq - 1, 1)
        if not logged or logged[0][0] != seq:
            return client.Ack(client_msg_id=req.client_msg_id, seq=seq, turn_id=turn_id, duplicate=True)
        raw_seq = logged[0][1]
        message = client.event_decoder.decode(raw_seq)
        assert isinstance(message, client.Message)
        # the original message wins: a retry may not rewrite it
        request = msgspec.structs.replace(
            request, turn_id=turn_id, text=message.text, attachments=message.attachments
        )
    else:
        raw_seq = with_seq(raw, seq)
        message = client.Message(
            seq=seq,
            turn_id=turn_id,
            client_msg_id=req.client_msg_id,
            role="user",
            text=req.text,
            attachments=req.attachments,
        )
        started(turn_id)
    request = msgspec.structs.replace(request, user_seq=seq)
    try:
        async with asyncio.timeout(max(deps.settings.postgres_timeout_s, deps.settings.nats_timeout_s) + 1):
            await asyncio.gather(
                _stage(
                    "eventlog_append",
                    "eventlog.append_user",
                    deps.eventlog.append_user_message(session_id, message, raw_seq),
                ),
                _stage("publish", "bus.publish_turn", deps.bus.publish_turn(request)),
            )
    except Exception as e:
        deps.counters.degraded += 1
        log.warning("send not acknowledged (%s): the client will retry with the same client_msg_id", e)
        raise Degraded(
            "message not yet durable; retry with the same client_msg_id", retry_after_ms=500
        ) from e
    marker = deps.settings.fault_kill_after_persist
    if marker and marker in req.text and not appended.duplicate:
        os.kill(os.getpid(), signal.SIGKILL)
    for t in appended.interrupted:
        await deps.bus.publish_cancel(
            busproto.CancelTurn(session_id=session_id, turn_id=t, reason="interrupt")
        )
    try:
        await deps.bus.publish_events(session_id, [raw_seq])
    except Exception as e:  # noqa: BLE001 - durable already; listeners catch up from the store
        log.warning("live echo failed: %s", e)
    return client.Ack(client_msg_id=req.client_msg_id, seq=seq, turn_id=turn_id, duplicate=appended.duplicate)


async def stop_turn(deps: Deps, session_id: str, turn_id: str | None) -> str | None:
    """Records the cancel in Redis (it survives an orchestrator crash) and tells the owner at once.
    Traced in the turn's own trace when this gateway received the turn."""
    deps.counters.cancel_requests += 1
    known = deps.turn_traces.span_context(turn_id) if turn_id else None
    parent = telemetry.context_of(known) if known is not None else None
    with telemetry.tracer.start_as_current_span(
        "gateway.stop", context=parent, attributes={"session_id": session_id, "turn_id": turn_id or ""}
    ):
        return await _stop_turn(deps, session_id, turn_id)


async def _stop_turn(deps: Deps, session_id: str, turn_id: str | None) -> str | None:
    try:
        if turn_id is None:
            pending = await deps.checkpoints.pending(session_id)
            if not pending:
                return None
            turn_id = pending[0]
        await deps.checkpoints.request_cancel(session_id, turn_id)
        await deps.bus.publish_cancel(busproto.CancelTurn(session_id=session_id, turn_id=turn_id))
    except Exception as e:
        deps.counters.degraded += 1
        raise Degraded("could not deliver the stop request", retry_after_ms=500) from e
    return turn_id
