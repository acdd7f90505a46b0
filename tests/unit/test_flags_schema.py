"""The one flag schema (proto/flags.py): every flag's valid and invalid values, and the gateway, the
operator CLI's validator, shared.flags and the OpenAPI document all reading that one table."""

from __future__ import annotations

import json
from typing import Any

import msgspec
import pytest

from gateway import commands, sessions
from gateway.openapi import document, session_flags_decoder
from gateway.settings import GatewaySettings
from orchestrator import flags as orchestrator_flags
from orchestrator.turn import disconnect_grace
from proto import flags as flag_schema
from shared import flags as shared_flags
from shared.errors import BadFrame

VALID: dict[str, list[Any]] = {
    "model": ["simulated", "openai", "openai:gpt-4o-mini", "llama3.2:3b", " x ", "m" * 128],
    "system_prompt_version": ["v1", "2024-06", " ", "p" * 128],
    "tool_set": ["all", "none", "clock,calculator", "", ["clock"], []],
    "tool_schema_version": ["v2", "", 3, 0],
    "disconnect_policy": [
        "continue",
        "cancel_after=0",
        "cancel_after=5",
        "cancel_after=0.5",
        "cancel_after=999999.999",
    ],
    "double_text_policy": ["queue", "interrupt", "reject"],
}

INVALID: dict[str, list[Any]] = {
    "model": ["", "   ", "\t\n", "m" * 129, "a\x00b", 3, True, ["openai"], {"a": 1}],
    "system_prompt_version": ["", "p" * 129, "v\x001", 3, True, 1.5, ["v1"]],
    "tool_set": [3, True, ["clock", 3], {"clock": True}, [["clock"]]],
    "tool_schema_version": [True, False, 1.5, ["v1"], {"v": 1}],
    "disconnect_policy": [
        "",
        "Continue",
        "continue ",
        "continue\n",
        "cancel_after",
        "cancel_after=",
        "cancel_after=x",
        "cancel_after=-1",
        "cancel_after=+1",
        "cancel_after=1e3",
        "cancel_after=inf",
        "cancel_after=nan",
        "cancel_after= 5",
        "cancel_after=5 ",
        "cancel_after=5\n",
        "cancel_after=1_0",
        "cancel_after=.5",
        "cancel_after=5.",
        "cancel_after=1234567",
        "cancel_after=0.1234",
        5,
        True,
    ],
    "double_text_policy": ["sometimes", "Queue", "queue ", "", 3, True, ["queue"]],
}

SESSION_CASES = [(name, value, True) for name in flag_schema.SESSION_FLAGS for value in VALID[name]] + [
    (name, value, False) for name in flag_schema.SESSION_FLAGS for value in INVALID[name]
]


def test_the_tables_cover_every_flag_of_the_definition() -> None:
    assert set(VALID) == set(INVALID) == set(flag_schema.FLAGS)


@pytest.mark.parametrize(("name", "value"), [(n, v) for n, vs in VALID.items() for v in vs])
def test_a_valid_value_is_returned_unchanged(name: str, value: Any) -> None:
    got = flag_schema.validate(name, value)
    assert got == value and type(got) is type(value)


@pytest.mark.parametrize(("name", "value"), [(n, v) for n, vs in INVALID.items() for v in vs])
def test_an_invalid_value_is_refused_with_a_message_naming_the_flag(name: str, value: Any) -> None:
    with pytest.raises(flag_schema.FlagError) as refused:
        flag_schema.validate(name, value)
    assert str(refused.value) == f"{name} must be {flag_schema.FLAGS[name].rule}"
    assert isinstance(refused.value, ValueError)  # what the operator CLI catches


def test_null_means_inherit_for_every_flag() -> None:
    for name in flag_schema.FLAGS:
        assert flag_schema.validate(name, None) is None


def test_an_unknown_name_is_refused_by_the_schema() -> None:
    with pytest.raises(flag_schema.UnknownFlag, match="unknown flag 'modle'"):
        flag_schema.validate("modle", "x")


def test_every_accepted_disconnect_policy_is_one_the_orchestrator_can_act_on() -> None:
    for policy in VALID["disconnect_policy"]:
        grace = disconnect_grace(policy)
        assert (grace is None) == (policy == "continue")
        assert grace is None or grace >= 0


# ---- the sites that read the table ------------------------------------------------------------


def _gateway_accepts(name: str, value: Any) -> tuple[bool, Any]:
    """What `PATCH /v1/sessions/{sid}/flags {name: value}` does: decode, then the handler's checks."""
    try:
        decoded = session_flags_decoder.decode(json.dumps({name: value}))
    except msgspec.ValidationError:
        return False, None
    try:
        return True, sessions._flags(decoded)[name]
    except BadFrame:
        return False, None


def _orchestrator_accepts(name: str, value: Any) -> tuple[bool, Any]:
    try:
        return True, orchestrator_flags.validate_flag(name, value)
    except ValueError:
        return False, None


@pytest.mark.parametrize(("name", "value", "valid"), SESSION_CASES)
def test_gateway_and_orchestrator_agree_on_every_session_flag(name: str, value: Any, valid: bool) -> None:
    gateway = _gateway_accepts(name, value)
    assert gateway == _orchestrator_accepts(name, value)
    assert gateway[0] is valid
    assert gateway == ((True, value) if valid else (False, None))


@pytest.mark.parametrize(("name", "value", "valid"), SESSION_CASES)
def test_the_gateways_validate_flags_follows_the_schema(name: str, value: Any, valid: bool) -> None:
    if valid:
        assert commands.validate_flags({name: value}) == {name: value}
        return
    with pytest.raises(BadFrame) as refused:
        commands.validate_flags({name: value})
    assert refused.value.code == "bad_frame"
    assert refused.value.message == f"{name} must be {flag_schema.FLAGS[name].rule}"


def test_a_session_owner_cannot_set_an_operator_flag_nor_an_unknown_one() -> None:
    operator_only = [n for n in flag_schema.FLAGS if n not in flag_schema.SESSION_FLAGS]
    assert operator_only == ["tool_set", "tool_schema_version"]
    for name in [*operator_only, "modle"]:
        with pytest.raises(BadFrame, match=f"unknown flag '{name}'"):
            commands.validate_flags({name: "all"})
        assert _gateway_accepts(name, "all") == (False, None)
    for name in operator_only:  # ... which an operator can, by the same rule
        assert _orchestrator_accepts(name, VALID[name][0]) == (True, VALID[name][0])
        assert _orchestrator_accepts(name, INVALID[name][0]) == (False, None)


def test_the_operator_validator_lets_an_unknown_name_through_for_force() -> None:
    assert orchestrator_flags.validate_flag("modle", {"any": "thing"}) == {"any": "thing"}


def test_session_flags_body_holds_exactly_the_session_flags_with_their_types() -> None:
    fields = msgspec.structs.fields(flag_schema.SessionFlags)
    assert sorted(f.name for f in fields) == sorted(flag_schema.SESSION_FLAGS)
    for f in fields:
        assert f.type == flag_schema.FLAGS[f.name].type | None, f.name


def test_known_flags_everywhere_are_the_schemas() -> None:
    assert shared_flags.KNOWN_FLAGS == orchestrator_flags.KNOWN_FLAGS == tuple(flag_schema.FLAGS)
    assert shared_flags.DOUBLE_TEXT_POLICIES == ("queue", "interrupt", "reject")


def test_the_openapi_flag_schema_lists_exactly_the_session_flags_of_the_definition() -> None:
    schemas = document(GatewaySettings())["components"]["schemas"]
    flags = schemas["SessionFlags"]
    assert set(flags["properties"]) == set(flag_schema.SESSION_FLAGS)
    assert flags["additionalProperties"] is False
    for name, prop in flags["properties"].items():
        assert prop["anyOf"] == [msgspec.json.schema(flag_schema.FLAGS[name].type), {"type": "null"}], name
    create = schemas["CreateSessionRequest"]["properties"]["flags"]
    assert {"$ref": "#/components/schemas/SessionFlags"} in create["anyOf"]
