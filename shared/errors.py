"""One error hierarchy and one table of protocol outcomes: each member maps to its PROTOCOL.md
`error.code`, its HTTP status and (when it refuses a connection) its WebSocket close code here and
nowhere else; `outcome` is the one decision between an `error` frame and a close.

Close codes are values (`CloseCode`, like aiohttp's `WSCloseCode`) and a close is a typed
`Disconnect{code, reason}` (like centrifuge's): 4401/4403 are terminal for a client (reconnecting
cannot help), 4408/4410/4429/1012 are followed by a reconnect with backoff (PROTOCOL.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

from proto.client import Error, ErrorCode


class CloseCode(IntEnum):
    """The WebSocket close codes of PROTOCOL.md, in one place."""

    UNAUTHORIZED = 4401  # no, a bad or an expired token: terminal
    FORBIDDEN = 4403  # origin refused, or the session is not the caller's (or does not exist): terminal
    HEARTBEAT_TIMEOUT = 4408  # no frame (or no hello) in time: reconnect
    TOO_SLOW = 4410  # too far behind even after merging: reconnect and resume
    TOO_MANY_CONNECTIONS = 4429  # the subject holds every connection slot: reconnect later
    RESTARTING = 1012  # server restarting (RFC 6455 registry): reconnect elsewhere


def _close_reason(text: str) -> bytes:
    """A close reason: at most 123 bytes of valid UTF-8 (RFC 6455), cut on a code point."""
    return text.encode()[:120].decode(errors="ignore").encode()


@dataclass(frozen=True, slots=True)
class Disconnect:
    """Why the server closes a WebSocket: the close code and a human-readable reason."""

    code: CloseCode
    reason: str

    @property
    def reason_bytes(self) -> bytes:
        return _close_reason(self.reason)


# The closes that are not the refusal of an error (those come from `outcome`).
HEARTBEAT_TIMEOUT = Disconnect(CloseCode.HEARTBEAT_TIMEOUT, "heartbeat timeout")
NO_HELLO = Disconnect(CloseCode.HEARTBEAT_TIMEOUT, "no hello")
TOKEN_EXPIRED = Disconnect(CloseCode.UNAUTHORIZED, "token expired")
TOO_SLOW = Disconnect(CloseCode.TOO_SLOW, "too far behind: reconnect and resume")
RESTARTING = Disconnect(CloseCode.RESTARTING, "server restarting")


class TidewireError(Exception):
    """`code` and `http_status` always apply; `close_code` is how a WebSocket ends when this error
    refuses the connection itself (token, origin, session, slot), None = never closes: answered
    with an `error` frame and the connection stays usable."""

    code: ErrorCode = "internal"
    http_status: int = 500
    close_code: CloseCode | None = None

    def __init__(self, message: str, *, retry_after_ms: int | None = None, ref: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after_ms = retry_after_ms
        self.ref = ref

    def frame(self) -> Error:
        return Error(code=self.code, message=self.message, retry_after_ms=self.retry_after_ms, ref=self.ref)


class BadFrame(TidewireError):
    code = "bad_frame"
    http_status = 400


class TooLarge(TidewireError):
    code = "too_large"
    http_status = 413


class RateLimited(TidewireError):
    code = "rate_limited"
    http_status = 429
    close_code = CloseCode.TOO_MANY_CONNECTIONS  # at admission only: the subject's connection slots


class Unauthorized(TidewireError):
    code = "unauthorized"
    http_status = 401
    close_code = CloseCode.UNAUTHORIZED


class Forbidden(TidewireError):
    code = "forbidden"
    http_status = 403
    close_code = CloseCode.FORBIDDEN


class NotFound(TidewireError):
    code = "not_found"
    http_status = 404
    close_code = CloseCode.FORBIDDEN  # no 4404 in the protocol: a session you cannot open is refused


class Conflict(TidewireError):
    code = "conflict"
    http_status = 409


class Degraded(TidewireError):
    """A dependency is down or the system sheds load: nothing was accepted; retry later."""

    code = "degraded"
    http_status = 503


class Internal(TidewireError):
    code = "internal"
    http_status = 500


class StaleEpoch(Exception):
    """A checkpoint write carried a fencing token that is no longer the session's lease."""


class ReplicaLag(ConnectionError):
    """Too few Redis replicas confirmed a write in time (CheckpointStore min_replicas): it may not
    survive a failover, so it is not shown and not acknowledged; callers answer degraded or retry."""


class SeedNeeded(Exception):
    """Redis has no seq counter for the session (new, or expired): seed it from the event log."""


_DEPENDENCY_MODULES = ("redis", "asyncpg", "nats")


def from_dependency(e: BaseException) -> Degraded | None:
    """A failure of NATS, Postgres or Redis (down, slow, pool exhausted) is `degraded` for the client,
    who retries after a pause, not `internal`. Judged by the exception's module, so this file
    imports no driver."""
    mod = type(e).__module__.split(".", 1)[0]
    if isinstance(e, (ConnectionError, TimeoutError)) or mod in _DEPENDENCY_MODULES:
        return Degraded("a dependency is unavailable; nothing was accepted", retry_after_ms=1000)
    return None


INTERNAL_MESSAGE = "internal error; nothing was accepted"


def outcome(e: BaseException, *, admitted: bool) -> Error | Disconnect:
    """What the client is told about `e`: an `error` frame, or a close.

    Only a refusal of the connection itself closes it: an error with a close code raised before the
    connection was admitted (hello → ready). After that every error is about one frame and is
    answered with a frame (PROTOCOL.md: "an error about one frame never closes the connection").
    A dependency failure is `degraded`, anything else unexpected is `internal`; neither closes."""
    if isinstance(e, TidewireError):
        if not admitted and e.close_code is not None:
            return Disconnect(e.close_code, e.message)
        return e.frame()
    degraded = from_dependency(e)
    if degraded is not None:
        return degraded.frame()
    return Internal(INTERNAL_MESSAGE).frame()
