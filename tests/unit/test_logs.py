"""Log scrubbing: every kind of PII and secret is replaced, ordinary ids and numbers survive, and what
users write stays out of the logs unless TIDEWIRE_LOG_MESSAGE_TEXT=1."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator

import pytest

from shared import logs, tokens


@pytest.fixture(autouse=True)
def _text_logging_off() -> Iterator[None]:
    before = logs._log_message_text
    logs._log_message_text = False
    yield
    logs._log_message_text = before


@pytest.mark.parametrize(
    "line,secret,marker",
    [
        ("mail from alice.smith+tag@example.co.uk failed", "alice.smith+tag@example.co.uk", "[email]"),
        ("contact BOB@Mail.Example.org", "BOB@Mail.Example.org", "[email]"),
        ("call +1 (415) 555-2671 now", "415) 555-2671", "[phone]"),
        ("call +44 20 7946 0958", "20 7946 0958", "[phone]"),
        ("call 415-555-2671", "415-555-2671", "[phone]"),
        ("call (415) 555-2671", "555-2671", "[phone]"),
        ("call 415.555.2671", "415.555.2671", "[phone]"),
        ("visa 4111 1111 1111 1111 declined", "4111 1111 1111 1111", "[card]"),
        ("mc 5555-5555-5555-4444", "5555-5555-5555-4444", "[card]"),
        ("amex 378282246310005", "378282246310005", "[card]"),
        ("header Authorization: Bearer abc.def-ghi_jkl", "abc.def-ghi_jkl", "Bearer [redacted]"),
        ("authorization: bearer XYZ123token", "XYZ123token", "Bearer [redacted]"),
        ("Authorization: Basic YWxpY2U6c2VjcmV0", "YWxpY2U6c2VjcmV0", "Basic [redacted]"),
        ("GET /v1/ws?access_token=s3cr3t&x=1", "s3cr3t", "access_token=[redacted]"),
        ("GET /cb?code=1&refresh_token=r-tok", "r-tok", "refresh_token=[redacted]"),
        ("db password=hunter2 rejected", "hunter2", "password=[redacted]"),
        ('{"api_key": "AKIA-123", "x": 1}', "AKIA-123", '"api_key": "[redacted]"'),
        ('{"authorization": "Token abc"}', "Token abc", '"authorization": "[redacted]"'),
    ],
)
def test_each_kind_of_pii_is_scrubbed(line: str, secret: str, marker: str) -> None:
    out = logs.scrub(line)
    assert secret not in out
    assert marker in out


def test_jwts_are_scrubbed_anywhere() -> None:
    token = tokens.mint("alice", "unit-test-secret-0123456789abcdef0123")
    for line in (f"bad token {token}", f"token={token}", f"x?access_token={token}", f"'{token}'"):
        out = logs.scrub(line)
        assert token not in out and token.split(".")[1] not in out, out
    assert logs.scrub(f"raw {token} here") == "raw [jwt] here"


@pytest.mark.parametrize(
    "line",
    [
        "turn t_abc123 took 1234 ms",
        "received_at_ns=1718000000123456789",  # a 19-digit timestamp is not a card
        "seq 4111111111111112 jumped",  # fails the Luhn check
        "session 7b9fZ-Ak_0 on gw-1a2b3c4d",
        "version 1.2.3 on 127.0.0.1:8080",
        "orchestrator-1:42 renewed the lease",
    ],
)
def test_ordinary_ids_and_numbers_survive(line: str) -> None:
    assert logs.scrub(line) == line


def test_message_text_is_not_logged_by_default() -> None:
    line = "TurnRequest(session_id='s1', turn_id='t1', text='my diagnosis is private', subject='alice')"
    out = logs.scrub(line)
    assert "diagnosis" not in out and "text=[text]" in out and "turn_id='t1'" in out
    assert "private" not in logs.scrub(
        'payload {"type":"message","seq":3,"text":"private \\"quoted\\" words"}'
    )
    assert logs.user_text("private words") == "[13 chars]"


def test_message_text_is_logged_when_enabled_but_pii_still_scrubbed() -> None:
    logs._log_message_text = True
    out = logs.scrub("text='mail me at a@b.example about the plan'")
    assert "about the plan" in out and "a@b.example" not in out
    assert logs.user_text("hello") == "hello"


@pytest.mark.parametrize("value,expected", [("1", True), ("true", True), ("0", False), ("", False)])
def test_setup_reads_the_environment(monkeypatch: pytest.MonkeyPatch, value: str, expected: bool) -> None:
    monkeypatch.setenv("TIDEWIRE_LOG_MESSAGE_TEXT", value)
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        logs.setup("unit", "INFO")
        assert logs.log_message_text() is expected
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)


def test_formatter_scrubs_message_and_exception() -> None:
    fmt = logs.JsonFormatter("gateway")
    try:
        raise ValueError("user bob@example.com sent access_token=abc")
    except ValueError:
        import sys

        record = logging.LogRecord(
            "x",
            logging.ERROR,
            __file__,
            1,
            "card %s text=%r",
            ("4111-1111-1111-1111", "secret"),
            sys.exc_info(),
        )
    out = json.loads(fmt.format(record))
    assert out["service"] == "gateway" and out["level"] == "error"
    assert out["msg"] == "card [card] text=[text]"
    assert "bob@example.com" not in out["exc"] and "abc" not in out["exc"].split("access_token=")[1][:12]
