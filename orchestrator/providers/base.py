"""The one interface between the orchestrator and a language model.

A provider turns a `ProviderRequest` into an async stream of `ProviderEvent`s. One call to
`Provider.stream` is one *step* of the model: it yields text deltas, possibly followed by
`ToolCallRequest`s, and ends with exactly one `Usage`. When a step asks for tools, the
orchestrator runs them, appends `role="tool"` messages (carrying `tool_call_id` and `name`)
and calls `stream` again for the follow-up step.

Cancellation is the consumer's: it cancels the task iterating the stream or calls
`aclose()` on it (`contextlib.aclosing` does both on every exit path). A provider must
release its upstream resources (HTTP response, socket) when that happens.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Any, Protocol

import msgspec

from proto.state import ChatMessage

__all__ = [
    "ContinuationMismatch",
    "Provider",
    "ProviderError",
    "ProviderEvent",
    "ProviderRequest",
    "TextDelta",
    "ToolCallRequest",
    "ToolSpec",
    "Usage",
]


class TextDelta(msgspec.Struct, frozen=True):
    """A piece of assistant text. It never splits a code point; it MAY split a grapheme
    cluster (upstream chunking is arbitrary), which is why emission goes through
    `orchestrator.segmenter.GraphemeBuffer`."""

    text: str


class ToolCallRequest(msgspec.Struct, frozen=True):
    """The model asks for a tool. `call_id` is stable for a given turn (idempotency key)."""

    call_id: str
    name: str
    args: dict[str, Any]


class Usage(msgspec.Struct, frozen=True):
    """Token accounting for one step; always the last event of a successful step."""

    prompt_tokens: int
    completion_tokens: int


ProviderEvent = TextDelta | ToolCallRequest | Usage


class ToolSpec(msgspec.Struct, frozen=True):
    """A tool offered to the model; `parameters` is a JSON schema of its arguments."""

    name: str
    description: str
    parameters: dict[str, Any]


class ProviderRequest(msgspec.Struct, frozen=True, kw_only=True):
    """Everything a provider needs for one step.

    `continue_from` is the assistant text of THIS turn already delivered to clients (after a
    crash or a retry): the provider must continue right after it and never repeat it. Its
    length is in code points, like every offset in tidewire.
    """

    session_id: str
    turn_id: str
    messages: list[ChatMessage]
    tools: list[ToolSpec] = []
    continue_from: str = ""
    model: str | None = None


class ProviderError(Exception):
    """An upstream failure. `retryable=True` for transient errors (the step may be retried
    as is); `retryable=False` for a request the model will never answer (a poison turn)."""

    retryable: bool

    def __init__(self, message: str, *, retryable: bool) -> None:
        super().__init__(message)
        self.retryable = retryable

    def __reduce__(self) -> tuple[Any, ...]:
        # Keep the keyword-only flag across pickling (e.g. process pools, test runners).
        return (_rebuild_provider_error, (str(self), self.retryable))


def _rebuild_provider_error(message: str, retryable: bool) -> ProviderError:
    return ProviderError(message, retryable=retryable)


class ContinuationMismatch(ValueError):
    """`continue_from` is not a prefix of what the provider would say: the provider cannot
    continue seamlessly, so the orchestrator must fall back (e.g. end the turn with the text
    delivered so far, or start a fresh answer)."""


class Provider(Protocol):
    """A language model behind one small interface.

    `stream` is an async generator function: nothing happens upstream until the first
    `__anext__`. Consumers should iterate it inside `contextlib.aclosing(...)` so that an
    early exit closes it at once rather than at garbage collection.
    """

    name: str

    def stream(self, request: ProviderRequest) -> AsyncGenerator[ProviderEvent, None]: ...
