"""The one table of protocol outcomes (shared.errors): every error's `error.code`, HTTP status and
WebSocket close code, and the one decision between an `error` frame and a close."""

from __future__ import annotations

import pytest

from proto import client
from shared import errors
from shared.errors import CloseCode, Disconnect, outcome

# error class -> (error.code, HTTP status, close code when it refuses a connection)
TABLE: dict[type[errors.TidewireError], tuple[str, int, CloseCode | None]] = {
    errors.BadFrame: ("bad_frame", 400, None),
    errors.TooLarge: ("too_large", 413, None),
    errors.RateLimited: ("rate_limited", 429, CloseCode.TOO_MANY_CONNECTIONS),
    errors.Unauthorized: ("unauthorized", 401, CloseCode.UNAUTHORIZED),
    errors.Forbidden: ("forbidden", 403, CloseCode.FORBIDDEN),
    errors.NotFound: ("not_found", 404, CloseCode.FORBIDDEN),
    errors.Conflict: ("conflict", 409, None),
    errors.Degraded: ("degraded", 503, None),
    errors.Internal: ("internal", 500, None),
}


def test_every_protocol_error_code_has_exactly_one_class_in_the_table() -> None:
    # the protocol's classes, declared in shared.errors (a module may refine one for itself, e.g. a
    # facade's TurnNotEnded: it inherits its code, so it is not a row of the table)
    subclasses = {c for c in errors.TidewireError.__subclasses__() if c.__module__ == errors.__name__}
    assert subclasses == set(TABLE)
    codes = [code for code, _, _ in TABLE.values()]
    assert sorted(codes) == sorted(set(codes))
    assert set(codes) == set(client.ErrorCode.__args__)  # type: ignore[attr-defined]


@pytest.mark.parametrize("cls", list(TABLE), ids=lambda c: c.__name__)
def test_each_error_maps_to_its_code_status_and_close_code(cls: type[errors.TidewireError]) -> None:
    code, status, close = TABLE[cls]
    e = cls("why", retry_after_ms=1500, ref="r1")
    assert (e.code, e.http_status, e.close_code) == (code, status, close)
    assert e.frame() == client.Error(code=code, message="why", retry_after_ms=1500, ref="r1")  # type: ignore[arg-type]


def test_close_codes_are_the_protocols() -> None:
    assert {c.name: int(c) for c in CloseCode} == {
        "UNAUTHORIZED": 4401,
        "FORBIDDEN": 4403,
        "HEARTBEAT_TIMEOUT": 4408,
        "TOO_SLOW": 4410,
        "TOO_MANY_CONNECTIONS": 4429,
        "RESTARTING": 1012,
    }


@pytest.mark.parametrize("cls", list(TABLE), ids=lambda c: c.__name__)
def test_a_refused_connection_closes_with_the_close_code_else_gets_an_error_frame(
    cls: type[errors.TidewireError],
) -> None:
    _, _, close = TABLE[cls]
    refused = outcome(cls("no"), admitted=False)
    if close is None:
        assert refused == cls("no").frame()
    else:
        assert refused == Disconnect(close, "no")


@pytest.mark.parametrize("cls", list(TABLE), ids=lambda c: c.__name__)
def test_an_error_about_one_frame_never_closes_an_admitted_connection(
    cls: type[errors.TidewireError],
) -> None:
    assert outcome(cls("no"), admitted=True) == cls("no").frame()


@pytest.mark.parametrize("admitted", [False, True])
def test_dependency_failures_are_degraded_and_bugs_internal_and_neither_closes(admitted: bool) -> None:
    for e in (ConnectionError("down"), TimeoutError()):
        f = outcome(e, admitted=admitted)
        assert isinstance(f, client.Error) and f.code == "degraded" and f.retry_after_ms
    bug = outcome(KeyError("x"), admitted=admitted)
    assert bug == client.Error(code="internal", message=errors.INTERNAL_MESSAGE)


def test_close_reasons_fit_a_close_frame_and_never_split_a_code_point() -> None:
    d = Disconnect(CloseCode.FORBIDDEN, "é" * 200)
    raw = d.reason_bytes
    assert len(raw) <= 123
    assert raw.decode() == "é" * 60
    assert errors.TOO_SLOW.code == 4410 and errors.RESTARTING.code == 1012
    assert errors.HEARTBEAT_TIMEOUT.code == errors.NO_HELLO.code == 4408
    assert errors.TOKEN_EXPIRED.code == 4401
