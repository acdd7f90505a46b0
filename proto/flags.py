"""Session and scope flags, declared once: every flag's name, the values it may take and who may set it.

A flag is a value stored at a scope (`deployment`, `tenant:<id>`, the session row, `session:<id>`:
shared/flags.py merges them). No flag has a default here: an unset flag (JSON `null`) inherits from
the weaker scope, and when no scope sets it the service's settings decide (`TIDEWIRE_PROVIDER`,
`TIDEWIRE_DISCONNECT_POLICY`, `TIDEWIRE_DOUBLE_TEXT_POLICY`, the default system prompt, every tool).

`FLAGS` is the table the gateway (a session owner's `PATCH /v1/sessions/{sid}/flags`), the
operator CLI (`python -m orchestrator.flags set`) and the OpenAPI document all read; `validate` is the
one check of a value, so a value one side accepts the other never refuses. `SessionFlags` is the body
a session's owner sends: the flags marked `session=True`, with the same types (tests/unit/
test_flags_schema.py holds the two together). This module imports nothing of tidewire's: callers map
`FlagError` to their own error (the gateway's `bad_frame`, the CLI's exit status 2).

Patterns end in `(?!\\n)$` where Python and JSON Schema would otherwise differ: Python's `$` also
matches before a final newline, ECMA's (the OpenAPI document's) does not.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, Final, Literal, TypeAlias, get_args

import msgspec

__all__ = [
    "DISCONNECT_POLICY_PATTERN",
    "DOUBLE_TEXT_POLICIES",
    "FLAGS",
    "KNOWN_FLAGS",
    "SESSION_FLAGS",
    "DisconnectPolicy",
    "DoubleTextPolicy",
    "FlagError",
    "FlagSpec",
    "Model",
    "SessionFlags",
    "SystemPromptVersion",
    "ToolSchemaVersion",
    "ToolSet",
    "UnknownFlag",
    "validate",
]

_NO_NUL = "^[^\\u0000]*$"  # Postgres jsonb cannot hold NUL
_NOT_BLANK_NO_NUL = "^[^\\u0000]*[^\\s\\u0000][^\\u0000]*$"
# `cancel_after=<s>`: plain decimal seconds (no exponent, sign, inf or nan), what both the gateway
# and the operator CLI accepted before this table existed (issue 17).
DISCONNECT_POLICY_PATTERN: Final = r"^(continue|cancel_after=[0-9]{1,6}(\.[0-9]{1,3})?)(?!\n)$"

# ---- the type of each flag (None aside: it always means "inherit") ----------------------------

Model: TypeAlias = Annotated[str, msgspec.Meta(min_length=1, max_length=128, pattern=_NOT_BLANK_NO_NUL)]
SystemPromptVersion: TypeAlias = Annotated[str, msgspec.Meta(min_length=1, max_length=128, pattern=_NO_NUL)]
ToolSet: TypeAlias = str | list[str]
ToolSchemaVersion: TypeAlias = str | int
DisconnectPolicy: TypeAlias = Annotated[str, msgspec.Meta(pattern=DISCONNECT_POLICY_PATTERN)]
DoubleTextPolicy: TypeAlias = Literal["queue", "interrupt", "reject"]

DOUBLE_TEXT_POLICIES: Final[tuple[str, ...]] = get_args(DoubleTextPolicy)


class FlagSpec(msgspec.Struct, frozen=True, kw_only=True):
    """One flag: its `type` (what `msgspec.convert` checks a value against), `rule` (the same in
    words, for error messages) and whether a session's owner may set it (`session`; otherwise only
    an operator may, at a scope)."""

    name: str
    type: Any
    rule: str
    session: bool


_SPECS: Final = (
    FlagSpec(
        name="model",
        type=Model,
        rule='a non-blank route of at most 128 characters, e.g. "openai:gpt-4o-mini"',
        session=True,
    ),
    FlagSpec(
        name="system_prompt_version",
        type=SystemPromptVersion,
        rule="a string of 1 to 128 characters (a key of TIDEWIRE_SYSTEM_PROMPTS)",
        session=True,
    ),
    FlagSpec(
        name="tool_set",
        type=ToolSet,
        rule='"all", "none", "a,b" or a list of tool names',
        session=False,
    ),
    FlagSpec(
        name="tool_schema_version", type=ToolSchemaVersion, rule="a string or an integer", session=False
    ),
    FlagSpec(
        name="disconnect_policy",
        type=DisconnectPolicy,
        rule="continue or cancel_after=<seconds>",
        session=True,
    ),
    FlagSpec(
        name="double_text_policy",
        type=DoubleTextPolicy,
        rule=f"one of {', '.join(DOUBLE_TEXT_POLICIES)}",
        session=True,
    ),
)

FLAGS: Final[Mapping[str, FlagSpec]] = {spec.name: spec for spec in _SPECS}
KNOWN_FLAGS: Final[tuple[str, ...]] = tuple(FLAGS)
SESSION_FLAGS: Final[tuple[str, ...]] = tuple(spec.name for spec in _SPECS if spec.session)


# The docstring is the schema's description in the OpenAPI document; the fields are SESSION_FLAGS.
class SessionFlags(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True, forbid_unknown_fields=True):
    """Per-session policies, applied to the session's next turns."""

    double_text_policy: DoubleTextPolicy | None = None
    disconnect_policy: DisconnectPolicy | None = None
    model: Model | None = None
    system_prompt_version: SystemPromptVersion | None = None


class FlagError(ValueError):
    """A value breaks its flag's rule; the message names the flag and says what it must be."""


class UnknownFlag(FlagError):
    """A name that is not in `FLAGS`."""


def validate(name: str, value: Any) -> Any:
    """The value, normalised (a list is a fresh list of str), if it is valid for the flag `name`;
    None is always valid (inherit). FlagError otherwise, UnknownFlag for a name not in `FLAGS`."""
    spec = FLAGS.get(name)
    if spec is None:
        raise UnknownFlag(f"unknown flag {name!r}")
    if value is None:
        return None
    try:
        return msgspec.convert(value, spec.type, strict=True)
    except msgspec.ValidationError:
        raise FlagError(f"{name} must be {spec.rule}") from None
