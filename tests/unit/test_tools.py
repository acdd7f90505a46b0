"""Pure logic of the tools: the safe calculator, the registry's schemas and argument checks."""

from __future__ import annotations

import json

import pytest

from shared.config import from_env
from tool_workers.registry import (
    Tool,
    ToolArgsError,
    ToolContext,
    ToolError,
    ToolRegistry,
    call_key,
    default_registry,
)
from tool_workers.settings import ToolWorkerSettings
from tool_workers.tools import calculator, clock
from tool_workers.tools.calculator import CalculatorError, evaluate, format_number
from tool_workers.tools.http_get import host_allowed

ALL = ToolWorkerSettings(test_tools=True, http_get_enabled=True)


def ctx(settings: ToolWorkerSettings = ALL) -> ToolContext:
    return ToolContext(session_id="s", turn_id="t", call_id="c", attempt=1, settings=settings)


# ---- calculator -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("expression", "expected"),
    [
        ("1 + 2 * 3", 7),
        ("(1 + 2) * 3", 9),
        ("7 / 2", 3.5),
        ("7 // 2", 3),
        ("-7 % 3", 2),
        ("2 ** 10", 1024),
        ("2 ^ 10", 1024),
        ("2 ** -1", 0.5),
        ("-(+3)", -3),
        ("1.5e3 + 0.5", 1500.5),
        ("2 ** 8000 // 2 ** 7999", 2),
    ],
)
def test_calculator_evaluates_arithmetic(expression: str, expected: float) -> None:
    assert evaluate(expression) == expected


@pytest.mark.parametrize(
    ("expression", "why"),
    [
        ("__import__('os').system('id')", "function calls"),
        ("os", "the name 'os'"),
        ("(1).__class__", "attribute access"),
        ("'a' * 3", "only numbers"),
        ("True + 1", "only numbers"),
        ("[1, 2]", "unsupported syntax"),
        ("lambda: 1", "unsupported syntax"),
        ("1 if 1 else 2", "unsupported syntax"),
        ("1 < 2", "unsupported syntax"),
        ("1 << 100", "unsupported syntax"),
        ("1 +", "not a valid arithmetic expression"),
        ("1; 2", "not a valid arithmetic expression"),
        ("1 / 0", "division by zero"),
        ("2 ** 100000", "too large"),
        ("9 ** 9 ** 9", "too large"),
        ("(10 ** 1000) ** 1000", "too large"),
        ("2 ** 4096 * 2 ** 4096", "too large"),
        ("1.5 ** 5000", "too large"),
        ("1e308 * 10", "too large"),
        ("(-8) ** 0.5", "not a real number"),
        ("(" * 300 + "1" + ")" * 300, "characters"),
        ("(" * 240 + "1" + ")" * 240, "not a valid arithmetic expression"),
    ],
)
def test_calculator_refuses_anything_else(expression: str, why: str) -> None:
    with pytest.raises(CalculatorError) as info:
        evaluate(expression)
    assert why in str(info.value)


def test_calculator_formats_results_for_people() -> None:
    assert format_number(0.1 + 0.2) == "0.3"
    assert format_number(4.0) == "4"
    assert format_number(10**20) == "100000000000000000000"
    assert format_number(1e20) == "1e+20"


async def test_calculator_tool_turns_errors_into_tool_errors() -> None:
    args = calculator.TOOL.validate({"expression": "__import__('os')"})
    with pytest.raises(ToolError, match="calculator: unsupported syntax: function calls"):
        await calculator.TOOL.run(args, ctx())
    assert await calculator.TOOL.run(calculator.TOOL.validate({"expression": "6*7"}), ctx()) == "42"


# ---- registry -------------------------------------------------------------------------------


def test_default_registry_offers_test_and_network_tools_only_when_asked() -> None:
    assert default_registry(ToolWorkerSettings()).names() == ["calculator", "clock", "slow_lookup"]
    assert default_registry(ALL).names() == [
        "calculator",
        "clock",
        "flaky",
        "http_get",
        "send_email",
        "slow_lookup",
    ]
    assert all(t.test_only == (t.name in ("flaky", "send_email")) for t in default_registry(ALL))


def test_every_tool_schema_is_an_inline_object_with_described_properties() -> None:
    for tool in default_registry(ALL):
        schema = tool.parameters()
        assert schema["type"] == "object", tool.name
        assert "$ref" not in json.dumps(schema), tool.name
        assert "title" not in schema
        assert set(schema.get("required", [])) <= set(schema["properties"])
        assert tool.max_seconds > 0
        json.dumps(schema)  # serialisable as is for a provider request


def test_schema_of_slow_lookup() -> None:
    tool = default_registry(ALL).get("slow_lookup")
    assert tool is not None
    schema = tool.parameters()
    assert schema["required"] == ["query"]
    assert schema["properties"]["query"]["type"] == "string"
    assert tool.idempotent and tool.pool == "slow" and tool.max_seconds == 8.0


def test_only_the_side_effect_tool_is_not_idempotent() -> None:
    assert [t.name for t in default_registry(ALL) if not t.idempotent] == ["send_email"]


def test_validation_errors_are_readable() -> None:
    tool = default_registry(ALL).get("slow_lookup")
    assert tool is not None
    with pytest.raises(ToolArgsError) as missing:
        tool.validate({})
    assert str(missing.value) == "invalid arguments for slow_lookup: Object missing required field `query`"
    with pytest.raises(ToolArgsError, match=r"Expected `float \| null`, got `str` - at `\$.seconds`"):
        tool.validate({"query": "q", "seconds": "soon"})
    with pytest.raises(ToolArgsError, match="unknown field `extra`"):
        tool.validate({"query": "q", "extra": 1})
    with pytest.raises(ToolArgsError, match=r"Expected `float` <= 120.0 - at `\$.seconds`"):
        tool.validate({"query": "q", "seconds": 1e9})
    assert tool.validate({"query": "q"}).seconds is None


def test_a_tool_name_is_registered_once() -> None:
    with pytest.raises(ValueError, match="registered twice"):
        ToolRegistry([clock.TOOL, clock.TOOL])


def test_timeout_text_names_the_tool_and_its_limit() -> None:
    assert calculator.TOOL.timeout_text() == "calculator timed out after 2 s"


async def test_clock_refuses_unknown_zones() -> None:
    with pytest.raises(ToolError, match="unknown time zone"):
        await clock.TOOL.run(clock.TOOL.validate({"timezone": "Mars/Olympus"}), ctx())
    assert "Europe/Paris" in await clock.TOOL.run(clock.TOOL.validate({"timezone": "Europe/Paris"}), ctx())


def test_call_key_is_turn_scoped_and_safe_for_nats() -> None:
    assert call_key("t1", "call_1") == "t1.call_1"
    assert call_key("t1", "call_1") != call_key("t2", "call_1")
    hashed = call_key("t1", "call.with spaces/and*stars")
    assert hashed.startswith("h.") and " " not in hashed and "*" not in hashed


def test_http_get_allowlist_matches_hosts_not_suffixes() -> None:
    allow = ("example.org", ".docs.example.com")
    assert host_allowed("example.org", allow)
    assert host_allowed("EXAMPLE.org.", allow)
    assert not host_allowed("evil-example.org", allow)
    assert not host_allowed("sub.example.org", allow)
    assert host_allowed("docs.example.com", allow)
    assert host_allowed("a.docs.example.com", allow)
    assert not host_allowed("xdocs.example.com", allow)


def test_worker_settings_read_from_env() -> None:
    s = from_env(
        ToolWorkerSettings,
        env={
            "TIDEWIRE_POOLS": "fast, slow",
            "TIDEWIRE_TEST_TOOLS": "1",
            "TIDEWIRE_HTTP_GET_ALLOWLIST": "example.org",
            "TIDEWIRE_SLOW_LOOKUP_SECONDS": "0.5",
        },
    )
    assert s.pools == ("fast", "slow")
    assert s.test_tools and not s.http_get_enabled
    assert s.http_get_allowlist == ("example.org",)
    assert s.slow_lookup_seconds == 0.5
    assert s.concurrency == 8 and s.health_port == 0


def test_tool_is_generic_over_its_args() -> None:
    tool: Tool[calculator.CalculatorArgs] = calculator.TOOL
    assert tool.validate({"expression": "1"}).expression == "1"
