"""Structured JSON logs, one object per line, scrubbed of PII and secrets before writing.

Every line (message and exception text) goes through `scrub`: credentials (bearer / basic
credentials, `access_token=` and other secret-named query or JSON values, JWTs), e-mail addresses,
payment card numbers (Luhn-checked, so ids and timestamps survive) and phone numbers are replaced by
a marker. What users write is not logged at all unless `TIDEWIRE_LOG_MESSAGE_TEXT=1`: call sites pass
it through `user_text`, and `text=...` / `"text": ...` fields of logged reprs and JSON are blanked.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import time
from collections.abc import Callable

_SECRET_KEYS = (
    r"access_token|refresh_token|id_token|token|api_key|apikey|password|passwd|secret|client_secret"
)


def _luhn_ok(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2 == 1:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _card(m: re.Match[str]) -> str:
    """Card numbers start with 2-6 (issuer ranges) and pass the Luhn check; nanosecond timestamps
    and most numeric ids do not, so they stay readable."""
    digits = re.sub(r"[ -]", "", m.group(0))
    return "[card]" if 13 <= len(digits) <= 19 and digits[0] in "23456" and _luhn_ok(digits) else m.group(0)


_Repl = str | Callable[[re.Match[str]], str]

_SCRUBBERS: list[tuple[re.Pattern[str], _Repl]] = [
    (re.compile(rf"(?i)\b({_SECRET_KEYS})=[^&\s\"']+"), r"\1=[redacted]"),
    (
        re.compile(rf"(?i)(\"(?:{_SECRET_KEYS}|authorization)\"\s*:\s*)\"(?:[^\"\\]|\\.)*\""),
        r'\1"[redacted]"',
    ),
    (re.compile(r"(?i)\bbearer\s+[A-Za-z0-9._~+/=-]+"), "Bearer [redacted]"),
    (re.compile(r"(?i)\bbasic\s+[A-Za-z0-9+/=]{8,}"), "Basic [redacted]"),
    (re.compile(r"\beyJ[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]{5,}(?:\.[A-Za-z0-9_-]*)?"), "[jwt]"),
    (re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}"), "[email]"),
    (re.compile(r"(?<![\w.])\d(?:[ -]?\d){12,18}(?![\w.])"), _card),
    (re.compile(r"(?<![\w.])\+\d[\d ().-]{7,}\d\b"), "[phone]"),
    (re.compile(r"(?<![\w.])\(?\d{3}\)?[ .-]\d{3}[ .-]\d{4}\b"), "[phone]"),
]

# `text='...'` in reprs (TurnRequest(..., text='...')) and `"text": "..."` in logged JSON
_TEXT_FIELDS: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"\b(text=)(?:'(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\")"), r"\1[text]"),
    (re.compile(r"(\"text\"\s*:\s*)\"(?:[^\"\\]|\\.)*\""), r'\1"[text]"'),
]

_log_message_text = False


def log_message_text() -> bool:
    return _log_message_text


def user_text(text: str) -> str:
    """What a user wrote, as it may appear in a log line: itself only when explicitly enabled."""
    return text if _log_message_text else f"[{len(text)} chars]"


def scrub(text: str, *, keep_message_text: bool | None = None) -> str:
    for pattern, repl in _SCRUBBERS:
        text = pattern.sub(repl, text)
    if not (_log_message_text if keep_message_text is None else keep_message_text):
        for pattern, field_repl in _TEXT_FIELDS:
            text = pattern.sub(field_repl, text)
    return text


class JsonFormatter(logging.Formatter):
    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": round(time.time(), 3),
            "level": record.levelname.lower(),
            "service": self.service,
            "logger": record.name,
            "msg": scrub(record.getMessage()),
        }
        trace_id = getattr(record, "trace_id", None)
        if trace_id:
            out["trace_id"] = trace_id
        if record.exc_info:
            out["exc"] = scrub(self.formatException(record.exc_info))
        return json.dumps(out, ensure_ascii=False)


def setup(service: str, level: str = "INFO", *, message_text: bool | None = None) -> None:
    """`message_text=None` reads `TIDEWIRE_LOG_MESSAGE_TEXT` (off unless 1 / true / yes / on)."""
    global _log_message_text
    if message_text is None:
        message_text = os.environ.get("TIDEWIRE_LOG_MESSAGE_TEXT", "").strip().lower() in (
            "1",
            "true",
            "yes",
            "on",
        )
    _log_message_text = message_text
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(service))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
