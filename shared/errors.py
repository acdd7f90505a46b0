"""One error hierarchy; each member maps to a PROTOCOL.md `error.code` here and nowhere else."""

from __future__ import annotations

from proto.client import Error, ErrorCode


class TidewireError(Exception):
    code: ErrorCode = "internal"
    http_status: int = 500

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


class Unauthorized(TidewireError):
    code = "unauthorized"
    http_status = 401


class Forbidden(TidewireError):
    code = "forbidden"
    http_status = 403


class NotFound(TidewireError):
    code = "not_found"
    http_status = 404


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
