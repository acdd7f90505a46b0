"""Tool wire and stored types: the arguments each built-in tool accepts, and the call-ledger record.

The argument Structs are what a model sends as a tool call's `args` (a `ToolJob` carries them to a
worker): the orchestrator validates against them before anything is queued, the worker decodes with
them, and their JSON schemas are what the model is offered (`shared.tool_catalogue`). `CallRecord` is
the value of one call in the KeyValue bucket `subjects.CALLS_BUCKET` (`shared.call_ledger`).
"""

from __future__ import annotations

from typing import Annotated, Final, Literal

import msgspec

__all__ = [
    "MAX_EXPRESSION_CHARS",
    "CalculatorArgs",
    "CallRecord",
    "ClockArgs",
    "FlakyArgs",
    "HttpGetArgs",
    "SendEmailArgs",
    "SlowLookupArgs",
]

MAX_EXPRESSION_CHARS: Final = 500


class _Args(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    pass


class CalculatorArgs(_Args, frozen=True, kw_only=True, forbid_unknown_fields=True):
    expression: Annotated[
        str,
        msgspec.Meta(
            min_length=1,
            max_length=MAX_EXPRESSION_CHARS,
            description="Arithmetic expression, e.g. (2 + 3) * 4 / 7 or 2 ** 10.",
        ),
    ]


class ClockArgs(_Args, frozen=True, kw_only=True, forbid_unknown_fields=True):
    timezone: Annotated[
        str, msgspec.Meta(max_length=64, description="IANA time zone, e.g. Europe/Paris. Default UTC.")
    ] = "UTC"


class SlowLookupArgs(_Args, frozen=True, kw_only=True, forbid_unknown_fields=True):
    query: Annotated[str, msgspec.Meta(min_length=1, max_length=500, description="What to look up.")]
    seconds: (
        Annotated[
            float, msgspec.Meta(ge=0, le=120, description="Simulated latency; default set by the worker.")
        ]
        | None
    ) = None


class HttpGetArgs(_Args, frozen=True, kw_only=True, forbid_unknown_fields=True):
    url: Annotated[str, msgspec.Meta(min_length=1, max_length=2048, description="http(s) URL to fetch.")]


class FlakyArgs(_Args, frozen=True, kw_only=True, forbid_unknown_fields=True):
    failures: Annotated[int, msgspec.Meta(ge=0, le=10, description="Transient failures before success.")] = 2


class SendEmailArgs(_Args, frozen=True, kw_only=True, forbid_unknown_fields=True):
    to: Annotated[str, msgspec.Meta(min_length=3, max_length=254, description="Recipient address.")]
    subject: Annotated[str, msgspec.Meta(max_length=200)]
    body: Annotated[str, msgspec.Meta(max_length=10_000)] = ""
    delay_seconds: Annotated[float, msgspec.Meta(ge=0, le=30, description="Simulated delivery time.")] = 0.0


class CallRecord(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """One call in the call ledger. "started" is written before a non-idempotent tool runs; "done"
    carries the result so a redelivered or re-published call is answered without running again."""

    state: Literal["started", "done"]
    name: str
    ok: bool = False
    text: str = ""
    timed_out: bool = False
    attempt: int = 1
