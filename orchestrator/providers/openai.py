"""An OpenAI-compatible chat-completions provider (OpenAI, vLLM, Ollama, llama.cpp server, LM Studio).

One `stream` call is one streamed `POST {base_url}/chat/completions` through the official `openai`
async client, with the SDK's own retries switched off: retries are the orchestrator's tenacity policy
(`runner._stream_step`), which retries only before the first token. The mapping is:

- `ChatMessage`s become chat messages. A run of `role="tool"` messages needs the assistant message
  that asked for those calls; tidewire keeps only (tool_call_id, name, result), so that message is
  synthesised (one assistant message carrying every call of the run, arguments from this process's
  memory of the calls it emitted, `{}` otherwise, e.g. after a takeover).
- `ToolSpec`s become function tools; streamed tool-call fragments are assembled by `index` (id, name,
  arguments JSON) and yielded after the text as `ToolCallRequest`s.
- Errors become `ProviderError`: HTTP 408/409/429/5xx, connection failures and timeouts are
  retryable while nothing has been yielded and never after (a retry would repeat text); anything
  else (400, 401, 404...) is not retryable. Those that say the upstream is unhealthy carry
  `upstream_fault = True`, which the circuit breaker in `orchestrator.upstream` counts.
- Timeouts: connect (HTTP), first token (from the request until the first text or tool fragment)
  and idle gap (between chunks after that), each enforced with `asyncio.timeout` around the await.
- Cancellation (the consumer closes or cancels the stream) closes the HTTP response at once, so the
  server sees the connection drop and stops generating.
- `continue_from` (after a takeover): the partial answer is sent as an assistant message followed by
  an instruction to continue exactly from there. A real model cannot promise a seamless
  continuation; the provider only strips a restart that repeats the whole partial answer. See
  docs/providers.md.

Counters like the simulated provider: started, finished, failed, aborted and orphaned.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import json
import math
import os
from collections.abc import AsyncGenerator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, Literal

from orchestrator.providers.base import (
    ProviderError,
    ProviderEvent,
    ProviderRequest,
    TextDelta,
    ToolCallRequest,
    ToolSpec,
    Usage,
)
from proto.state import ChatMessage
from shared.config import from_env

if TYPE_CHECKING:
    from openai import AsyncOpenAI

__all__ = [
    "CONTINUE_INSTRUCTION",
    "OpenAIProvider",
    "OpenAISettings",
    "PrefixStripper",
    "SurrogateJoiner",
    "ToolCallAssembler",
    "to_openai_messages",
    "to_openai_tools",
]

CONTINUE_INSTRUCTION: Final = (
    "Your previous reply was interrupted. Continue it exactly from where it stopped: output only "
    "the remaining text, starting with the very next character, without repeating anything and "
    "without any preamble."
)
_TRANSIENT_STATUS: Final = frozenset({408, 409, 425, 429})
_ARGS_MEMORY: Final = 10_000


@dataclass(frozen=True)
class OpenAISettings:
    """Read from `TIDEWIRE_OPENAI_*` (see `from_env`). An empty `api_key` falls back to
    `OPENAI_API_KEY`, then to a placeholder (local servers need none). `continuation` is `instruction` (partial answer + a user instruction;
    works everywhere) or `prefill` (the partial answer is the last message, for servers that
    continue a final assistant message)."""

    base_url: str = "https://api.openai.com/v1"
    api_key: str = ""
    model: str = "gpt-4o-mini"
    connect_timeout_s: float = 5.0
    first_token_timeout_s: float = 30.0
    idle_timeout_s: float = 30.0
    include_usage: bool = True
    max_tokens: int = 0
    temperature: float = -1.0
    continuation: str = "instruction"

    def __post_init__(self) -> None:
        for name in ("connect_timeout_s", "first_token_timeout_s", "idle_timeout_s"):
            value = getattr(self, name)
            if not math.isfinite(value) or value <= 0:
                raise ValueError(f"TIDEWIRE_OPENAI_{name.upper()} must be a finite number > 0")
        if self.continuation not in ("instruction", "prefill"):
            raise ValueError("TIDEWIRE_OPENAI_CONTINUATION must be instruction or prefill")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> OpenAISettings:
        return from_env(cls, prefix="TIDEWIRE_OPENAI_", env=dict(os.environ if env is None else env))


# --------------------------------------------------------------------------- pure helpers


def to_openai_tools(tools: Sequence[ToolSpec]) -> list[dict[str, Any]]:
    return [
        {
            "type": "function",
            "function": {"name": t.name, "description": t.description, "parameters": t.parameters},
        }
        for t in tools
    ]


def to_openai_messages(
    messages: Sequence[ChatMessage],
    *,
    continue_from: str = "",
    continuation: str = "instruction",
    known_args: Mapping[str, str] | None = None,
) -> list[dict[str, Any]]:
    """Chat messages in OpenAI's shape; see the module docstring for the synthesised tool-call
    message and for `continue_from`."""
    known_args = known_args or {}
    out: list[dict[str, Any]] = []
    i = 0
    while i < len(messages):
        m = messages[i]
        if m.role != "tool":
            out.append({"role": m.role, "content": m.text})
            i += 1
            continue
        run: list[ChatMessage] = []
        while i < len(messages) and messages[i].role == "tool":
            run.append(messages[i])
            i += 1
        calls = []
        for n, t in enumerate(run):
            call_id = t.tool_call_id or f"call_{n}"
            calls.append(
                {
                    "id": call_id,
                    "type": "function",
                    "function": {"name": t.name or "tool", "arguments": known_args.get(call_id, "{}")},
                }
            )
        prev = out[-1] if out else None
        if prev is not None and prev["role"] == "assistant" and "tool_calls" not in prev:
            prev["tool_calls"] = calls
            if not prev["content"]:
                prev["content"] = None
        else:
            out.append({"role": "assistant", "content": None, "tool_calls": calls})
        for call, t in zip(calls, run, strict=True):
            out.append({"role": "tool", "tool_call_id": call["id"], "content": t.text})
    if continue_from:
        out.append({"role": "assistant", "content": continue_from})
        if continuation == "instruction":
            out.append({"role": "user", "content": CONTINUE_INSTRUCTION})
    return out


class SurrogateJoiner:
    """Some servers split a UTF-16 surrogate pair across two JSON chunks (`"\\ud83d"` then
    `"\\udc69"`). A `TextDelta` must never split a code point, so a trailing high surrogate is held
    back until its partner arrives, and pairs are joined into one code point."""

    def __init__(self) -> None:
        self._held = ""

    def feed(self, text: str) -> str:
        text = self._held + text
        self._held = ""
        if text and "\ud800" <= text[-1] <= "\udbff":
            text, self._held = text[:-1], text[-1]
        if any("\ud800" <= ch <= "\udfff" for ch in text):
            text = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
        return text

    def flush(self) -> str:
        held, self._held = self._held, ""
        return "\ufffd" if held else ""


class PrefixStripper:
    """After a takeover the model is asked to continue `prefix`; a model that instead starts its
    answer again would repeat text the user already has. Text is held back while it is still a
    prefix of `prefix`; if it grows to contain all of it, that repetition is dropped. The first
    character that diverges releases everything held."""

    def __init__(self, prefix: str) -> None:
        self._prefix = prefix
        self._held = ""
        self._done = not prefix

    def feed(self, text: str) -> str:
        if self._done:
            return text
        held = self._held + text
        if self._prefix.startswith(held) and len(held) < len(self._prefix):
            self._held = held
            return ""
        self._held, self._done = "", True
        return held[len(self._prefix) :] if held.startswith(self._prefix) else held

    def flush(self) -> str:
        held, self._held, self._done = self._held, "", True
        return held


@dataclass
class _PartialCall:
    call_id: str = ""
    name: str = ""
    arguments: str = ""


class ToolCallAssembler:
    """Accumulates streamed tool-call fragments by `index`: the id and name come once (usually
    first), the arguments JSON arrives in pieces, and parallel calls interleave."""

    def __init__(self) -> None:
        self._calls: dict[int, _PartialCall] = {}

    def feed(self, index: int, call_id: str | None, name: str | None, arguments: str | None) -> None:
        call = self._calls.setdefault(index, _PartialCall())
        if call_id:
            call.call_id = call_id
        if name and name != call.name:  # sent once by most servers; some repeat it, a few split it
            call.name += name
        if arguments:
            call.arguments += arguments

    def __bool__(self) -> bool:
        return bool(self._calls)

    def finish(self, id_seed: str) -> list[tuple[ToolCallRequest, str]]:
        """The assembled calls in index order, with their raw arguments JSON. Raises ValueError on
        a call without a name or with arguments that are not a JSON object. A server that sends
        no id gets a stable one derived from `id_seed` and the index."""
        out: list[tuple[ToolCallRequest, str]] = []
        for index in sorted(self._calls):
            call = self._calls[index]
            if not call.name:
                raise ValueError(f"tool call #{index} has no function name")
            raw = call.arguments.strip() or "{}"
            try:
                args = json.loads(raw)
            except ValueError as exc:
                raise ValueError(f"tool call {call.name!r} has malformed arguments: {exc}") from exc
            if not isinstance(args, dict):
                raise ValueError(f"tool call {call.name!r} arguments are not a JSON object")
            call_id = (
                call.call_id or "call_" + hashlib.sha256(f"{id_seed}\x1f{index}".encode()).hexdigest()[:16]
            )
            out.append((ToolCallRequest(call_id=call_id, name=call.name, args=args), raw))
        return out


def _error(message: str, *, retryable: bool, upstream_fault: bool) -> ProviderError:
    err = ProviderError(message, retryable=retryable)
    err.upstream_fault = upstream_fault  # type: ignore[attr-defined]  # read by orchestrator.upstream
    return err


def _estimate_tokens(chars: int) -> int:
    return math.ceil(chars / 4)


# --------------------------------------------------------------------------- the provider

Outcome = Literal["aborted", "finished", "failed"]


class OpenAIProvider:
    """The OpenAI-compatible model behind the `Provider` interface, with stream accounting."""

    def __init__(
        self,
        settings: OpenAISettings | None = None,
        *,
        name: str = "openai",
        client: AsyncOpenAI | None = None,
    ) -> None:
        self.name = name
        self.settings = OpenAISettings() if settings is None else settings
        self._client = client
        self.started = 0
        self.finished = 0
        self.failed = 0
        self.aborted = 0
        self.last_aborted_turns: collections.deque[str] = collections.deque(maxlen=100)
        self._call_args: collections.OrderedDict[str, str] = collections.OrderedDict()

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> OpenAIProvider:
        """`TIDEWIRE_OPENAI_{BASE_URL,API_KEY,MODEL,CONNECT_TIMEOUT_S,FIRST_TOKEN_TIMEOUT_S,
        IDLE_TIMEOUT_S,INCLUDE_USAGE,MAX_TOKENS,TEMPERATURE,CONTINUATION}`."""
        return cls(OpenAISettings.from_env(env))

    @property
    def orphaned(self) -> int:
        """Streams started and not yet finished, failed or aborted (0 once quiescent)."""
        return self.started - self.finished - self.failed - self.aborted

    @property
    def client(self) -> AsyncOpenAI:
        """Built on first use, inside the running loop (its HTTP pool belongs to that loop)."""
        if self._client is None:
            from openai import AsyncOpenAI, Timeout

            s = self.settings
            read = max(s.first_token_timeout_s, s.idle_timeout_s) * 2  # backstop; ours fire first
            self._client = AsyncOpenAI(
                base_url=s.base_url,
                max_retries=0,
                api_key=s.api_key or os.environ.get("OPENAI_API_KEY") or "sk-no-key-required",
                timeout=Timeout(read, connect=s.connect_timeout_s),
            )
        return self._client

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()

    def model_for(self, request: ProviderRequest) -> str:
        """`request.model` may be a bare model or a route (`openai:gpt-4o-mini`)."""
        model = request.model or self.settings.model
        prefix = self.name + ":"
        return model[len(prefix) :] if model.startswith(prefix) else model

    def _remember_args(self, call_id: str, raw: str) -> None:
        self._call_args[call_id] = raw
        self._call_args.move_to_end(call_id)
        while len(self._call_args) > _ARGS_MEMORY:
            self._call_args.popitem(last=False)

    def request_body(self, request: ProviderRequest) -> dict[str, Any]:
        s = self.settings
        body: dict[str, Any] = {
            "model": self.model_for(request),
            "messages": to_openai_messages(
                request.messages,
                continue_from=request.continue_from,
                continuation=s.continuation,
                known_args=self._call_args,
            ),
            "stream": True,
        }
        if request.tools:
            body["tools"] = to_openai_tools(request.tools)
        if s.include_usage:
            body["stream_options"] = {"include_usage": True}
        if s.max_tokens > 0:
            body["max_tokens"] = s.max_tokens
        if s.temperature >= 0:
            body["temperature"] = s.temperature
        return body

    async def stream(self, request: ProviderRequest) -> AsyncGenerator[ProviderEvent, None]:
        """Text deltas as they arrive, then the assembled tool calls, then one Usage."""
        import openai

        self.started += 1
        s = self.settings
        loop = asyncio.get_running_loop()
        outcome: Outcome = "aborted"
        response: Any = None
        emitted = False
        try:
            body = self.request_body(request)
            first_deadline = loop.time() + s.first_token_timeout_s
            try:
                async with asyncio.timeout_at(first_deadline):
                    response = await self.client.chat.completions.create(**body)
            except TimeoutError as exc:
                raise _error(
                    f"no response within {s.first_token_timeout_s:g} s", retryable=True, upstream_fault=True
                ) from exc
            except openai.APIStatusError as exc:
                transient = exc.status_code in _TRANSIENT_STATUS or exc.status_code >= 500
                raise _error(
                    f"upstream answered HTTP {exc.status_code}: {_short(exc)}",
                    retryable=transient,
                    upstream_fault=transient,
                ) from exc
            except openai.APIConnectionError as exc:  # includes APITimeoutError
                raise _error(f"upstream unreachable: {exc}", retryable=True, upstream_fault=True) from exc

            joiner = SurrogateJoiner()
            stripper = PrefixStripper(request.continue_from)
            calls = ToolCallAssembler()
            usage: Usage | None = None
            got_content = False
            chars = 0
            while True:
                try:
                    if got_content:
                        async with asyncio.timeout(s.idle_timeout_s):
                            chunk = await response.__anext__()
                    else:
                        async with asyncio.timeout_at(first_deadline):
                            chunk = await response.__anext__()
                except StopAsyncIteration:
                    break
                except TimeoutError as exc:
                    what = (
                        f"stalled for {s.idle_timeout_s:g} s"
                        if got_content
                        else f"no first token within {s.first_token_timeout_s:g} s"
                    )
                    raise _error(f"upstream {what}", retryable=not emitted, upstream_fault=True) from exc
                except openai.APIError as exc:  # an error event in the stream, or the connection broke
                    raise _error(
                        f"upstream failed mid-stream: {exc}", retryable=not emitted, upstream_fault=True
                    ) from exc
                except ValueError as exc:  # a chunk that is not JSON: the server is broken, not us
                    raise _error(
                        f"upstream sent a malformed chunk: {exc}", retryable=not emitted, upstream_fault=True
                    ) from exc
                if getattr(chunk, "usage", None) is not None:
                    usage = Usage(
                        prompt_tokens=int(chunk.usage.prompt_tokens or 0),
                        completion_tokens=int(chunk.usage.completion_tokens or 0),
                    )
                for choice in chunk.choices or ():
                    if choice.index not in (0, None):
                        continue
                    delta = choice.delta
                    if delta is None:
                        continue
                    for frag in delta.tool_calls or ():
                        got_content = True
                        fn = frag.function
                        calls.feed(frag.index, frag.id, fn.name if fn else None, fn.arguments if fn else None)
                    if delta.content:
                        got_content = True
                        text = stripper.feed(joiner.feed(delta.content))
                        if text:
                            chars += len(text)
                            emitted = True
                            yield TextDelta(text)
            tail = stripper.feed(joiner.flush()) + stripper.flush()
            if tail:
                chars += len(tail)
                emitted = True
                yield TextDelta(tail)
            if calls:
                try:
                    assembled = calls.finish(f"{request.turn_id}\x1f{len(request.messages)}")
                except ValueError as exc:
                    raise _error(str(exc), retryable=not emitted, upstream_fault=False) from exc
                for call, raw in assembled:
                    self._remember_args(call.call_id, raw)
                    yield call
            if usage is None:  # a server without stream_options support: estimate, never omit
                prompt = sum(len(m.text) for m in request.messages) + len(request.continue_from)
                usage = Usage(
                    prompt_tokens=_estimate_tokens(prompt), completion_tokens=_estimate_tokens(chars)
                )
            outcome = "finished"
            self.finished += 1  # counted before the last yield: closing after Usage is normal
            yield usage
        except (GeneratorExit, asyncio.CancelledError):
            raise
        except BaseException:
            outcome = "failed" if outcome == "aborted" else outcome
            raise
        finally:
            if response is not None:
                with contextlib.suppress(Exception):
                    await response.close()  # drops the connection: the server stops generating
            if outcome == "aborted":
                self.aborted += 1
                self.last_aborted_turns.append(request.turn_id)
            elif outcome == "failed":
                self.failed += 1


def _short(exc: Exception, limit: int = 300) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"
