"""A deterministic stand-in for a language model, for development, tests, chaos and benches.

The answer of a step is a pure function of (session_id, turn_id, the last user message
without its `/sim` line, the tool results present after it) plus the answer length: the
same inputs always give the same text, so a test can compute what a turn must end with
(`full_answer`) and a crashed turn can be continued exactly (`continue_from`). The text
looks like prose with some Markdown and deliberately awkward Unicode (ZWJ emoji, flags,
combining marks, CJK) so that Unicode handling is exercised end to end.

Timing (rate, time to first token, jitter, a mid-stream stall) and failures (transient
errors, poison turns) are settings, overridable per turn by a first line such as
`/sim tokens=20 rate=0 tool=slow_lookup split=1`.

Every stream is accounted for: `started`, `finished`, `failed`, `aborted`, and `orphaned`
(started but neither finished, failed nor aborted: still running, or dropped without being
closed). Tests assert `orphaned == 0` to prove upstream generations are never leaked.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import json
import math
import os
import random
import re
from collections.abc import AsyncGenerator, Iterator, Mapping, Sequence
from typing import Any, Final

import msgspec
import regex

from orchestrator.providers.base import (
    ContinuationMismatch,
    ProviderError,
    ProviderEvent,
    ProviderRequest,
    TextDelta,
    ToolCallRequest,
    Usage,
)
from proto.state import ChatMessage

__all__ = [
    "DirectiveError",
    "SimDirectives",
    "SimulatedProvider",
    "SimulatedSettings",
    "StepPlan",
    "call_id_for",
    "full_answer",
    "parse_directives",
    "plan_step",
]

_GRAPHEME: Any = regex.compile(r"\X")


# --------------------------------------------------------------------------- settings


class SimulatedSettings(msgspec.Struct, frozen=True, kw_only=True):
    """How the simulated model behaves. Defaults come from `TIDEWIRE_SIM_*` (see `from_env`).

    - `tokens`: answer length in tokens (a token is a word plus what follows it, ~4-6 chars).
    - `rate`: deltas per second (one delta = one token unless `chunk` is set); 0 = no pacing.
    - `ttft_ms`: delay before the first event.
    - `jitter`: 0..1, each inter-delta gap varies by up to this fraction.
    - `error_rate`: 0..1, chance that a stream raises a retryable `ProviderError` before its
      first event; deterministic given `seed` and the attempt number of that step.
    - `stall_ms`: one pause in the middle of the stream.
    - `chunk`: if > 0, deltas are `chunk` code points each instead of one token.
    - `split_graphemes`: add delta cuts inside grapheme clusters (never inside a code point).
    - `seed`: perturbs error injection and jitter, never the text.
    """

    tokens: int = 60
    rate: float = 50.0
    ttft_ms: float = 0.0
    jitter: float = 0.0
    error_rate: float = 0.0
    stall_ms: float = 0.0
    chunk: int = 0
    split_graphemes: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("rate", "ttft_ms", "jitter", "error_rate", "stall_ms"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if self.tokens < 0 or self.chunk < 0:
            raise ValueError("tokens and chunk must be >= 0")
        if self.jitter > 1 or self.error_rate > 1:
            raise ValueError("jitter and error_rate must be within 0..1")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> SimulatedSettings:
        """Read `TIDEWIRE_SIM_{TOKENS,RATE,TTFT_MS,JITTER,ERROR_RATE,STALL_MS,CHUNK,SPLIT,SEED}`."""
        env = os.environ if env is None else env
        d = cls()

        def get(key: str, default: Any, conv: Any) -> Any:
            raw = env.get(f"TIDEWIRE_SIM_{key}", "").strip()
            return conv(raw) if raw else default

        return cls(
            tokens=get("TOKENS", d.tokens, int),
            rate=get("RATE", d.rate, float),
            ttft_ms=get("TTFT_MS", d.ttft_ms, float),
            jitter=get("JITTER", d.jitter, float),
            error_rate=get("ERROR_RATE", d.error_rate, float),
            stall_ms=get("STALL_MS", d.stall_ms, float),
            chunk=get("CHUNK", d.chunk, int),
            split_graphemes=get("SPLIT", d.split_graphemes, _parse_bool),
            seed=get("SEED", d.seed, int),
        )


def _parse_bool(raw: str) -> bool:
    lowered = raw.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"not a boolean: {raw!r}")


# --------------------------------------------------------------------------- directives


class DirectiveError(ValueError):
    """A malformed `/sim` line. The provider turns it into a non-retryable ProviderError."""


class SimDirectives(msgspec.Struct, frozen=True, kw_only=True):
    """What a `/sim key=value ...` first line asks for, and the prompt without that line."""

    prompt: str
    overrides: dict[str, Any] = {}
    tools: tuple[str, ...] = ()
    tool_args: tuple[dict[str, Any], ...] = ()
    fail: bool = False


_SETTING_KEYS: Final[dict[str, tuple[str, Any]]] = {
    "tokens": ("tokens", int),
    "rate": ("rate", float),
    "ttft_ms": ("ttft_ms", float),
    "stall_ms": ("stall_ms", float),
    "jitter": ("jitter", float),
    "error_rate": ("error_rate", float),
    "chunk": ("chunk", int),
    "split": ("split_graphemes", _parse_bool),
}
_KEY_RE: Final = re.compile(r"([a-z_]+)=")
_JSON: Final = json.JSONDecoder()


def _directive_pairs(line: str) -> Iterator[tuple[str, Any]]:
    """Split `k=v k2={"json": 1}` into pairs; a value starting with `{`, `[` or `"` is JSON
    (so it may contain spaces), anything else runs to the next whitespace."""
    pos, end = 0, len(line)
    while True:
        while pos < end and line[pos].isspace():
            pos += 1
        if pos == end:
            return
        match = _KEY_RE.match(line, pos)
        if match is None:
            raise DirectiveError(f"expected key=value at {line[pos:]!r}")
        key, pos = match.group(1), match.end()
        if pos < end and line[pos] in '{["':
            try:
                value, pos = _JSON.raw_decode(line, pos)
            except ValueError as exc:
                raise DirectiveError(f"bad JSON for {key}: {exc}") from exc
        else:
            stop = pos
            while stop < end and not line[stop].isspace():
                stop += 1
            value, pos = line[pos:stop], stop
        yield key, value


def parse_directives(text: str) -> SimDirectives:
    """Parse the first line of a user message if it is `/sim ...`; otherwise no overrides.

    Keys: tokens, rate, ttft_ms, stall_ms, jitter, error_rate, chunk, split (0/1),
    tool (comma-separated names), args (a JSON object for every tool, or a JSON list with
    one object per tool), fail (0/1). Unknown keys are an error, so typos are not silent.
    """
    first, _, rest = text.partition("\n")
    head = first.strip()
    if not (head == "/sim" or (head.startswith("/sim") and head[4].isspace())):
        return SimDirectives(prompt=text)
    overrides: dict[str, Any] = {}
    tools: tuple[str, ...] = ()
    raw_args: Any = None
    fail = False
    for key, value in _directive_pairs(head[4:]):
        try:
            if key in _SETTING_KEYS:
                field, conv = _SETTING_KEYS[key]
                overrides[field] = conv(str(value))
            elif key == "tool":
                tools = tuple(name.strip() for name in str(value).split(","))
                if not all(tools):
                    raise DirectiveError(f"empty tool name in {value!r}")
            elif key == "args":
                raw_args = value
            elif key == "fail":
                fail = _parse_bool(str(value))
            else:
                raise DirectiveError(f"unknown key {key!r}")
        except DirectiveError:
            raise
        except ValueError as exc:
            raise DirectiveError(f"bad value for {key}: {exc}") from exc
    return SimDirectives(
        prompt=rest,
        overrides=overrides,
        tools=tools,
        tool_args=_tool_args(tools, raw_args),
        fail=fail,
    )


def _tool_args(tools: tuple[str, ...], raw: Any) -> tuple[dict[str, Any], ...]:
    if raw is None:
        return tuple({} for _ in tools)
    if not tools:
        raise DirectiveError("args= needs tool=")
    if isinstance(raw, dict):
        return tuple(dict(raw) for _ in tools)
    if isinstance(raw, list) and len(raw) == len(tools) and all(isinstance(a, dict) for a in raw):
        return tuple(raw)
    raise DirectiveError("args must be a JSON object, or a list of one object per tool")


# --------------------------------------------------------------------------- the text


_WORDS: Final = (
    "tide", "wire", "river", "signal", "harbor", "lantern", "quiet", "bright", "stream",
    "packet", "window", "garden", "orbit", "copper", "meadow", "socket", "paper", "amber",
    "delta", "echo", "vector", "cloud", "stone", "willow", "beacon", "cable", "summit",
    "cedar", "pixel", "morning", "ledger", "anchor", "marble", "thread", "canvas", "hollow",
    "silver", "north", "ember", "quartz", "ripple", "harvest", "compass", "falcon", "island",
    "kernel", "lattice", "saffron", "timber", "velvet", "carries", "gathers", "answers",
    "listens", "remembers", "returns", "slowly", "gently", "always", "together",
)  # fmt: skip
_SMALL: Final = ("the", "a", "of", "and", "to", "in", "with", "is", "for", "on", "that", "it")
_AWKWARD: Final = (
    "cafe\u0301",  # e + combining acute
    "re\u0301sume\u0301",
    "nai\u0308ve",  # i + combining diaeresis
    "\U0001f469\u200d\U0001f4bb",  # woman technologist: ZWJ sequence
    "\U0001f468\u200d\U0001f469\u200d\U0001f467",  # family: two ZWJs
    "\U0001f1ef\U0001f1f5",  # flag JP: two regional indicators
    "\U0001f1eb\U0001f1f7",  # flag FR
    "\U0001f44d\U0001f3fd",  # thumbs up + skin tone modifier
    "\u2764\ufe0f",  # heart + variation selector 16
    "1\ufe0f\u20e3",  # keycap one
    "東京",
    "漢字",
    "こんにちは",
)

_ATTACHMENT: Final = re.compile(r"^\[attachment m_[\w-]+\]$", re.M)
_QUOTE_LIMIT: Final = 200  # grapheme clusters of a tool result quoted in the answer


def _capitalise(word: str) -> str:
    if word.startswith("**"):
        return "**" + _capitalise(word[2:])
    return word[:1].upper() + word[1:]


def _word(rng: random.Random) -> str:
    roll = rng.random()
    if roll < 0.12:
        word = rng.choice(_AWKWARD)
    elif roll < 0.40:
        word = rng.choice(_SMALL)
    else:
        word = rng.choice(_WORDS)
    return f"**{word}**" if rng.random() < 0.06 else word


def _sentence(rng: random.Random, last_sep: str, *, lo: int = 4, hi: int = 11, lead: str = "") -> list[str]:
    words = [_word(rng) for _ in range(rng.randint(lo, hi))]
    words[0] = lead + _capitalise(words[0])
    out = [w + (", " if 0 < i and rng.random() < 0.08 else " ") for i, w in enumerate(words[:-1])]
    out.append(words[-1] + last_sep)
    return out


def _prose_tokens(rng: random.Random) -> Iterator[str]:
    """An endless stream of tokens: sentences, paragraphs, now and then a bullet list."""
    while True:
        if rng.random() < 0.12:
            yield from _sentence(rng, ":\n")
            items = rng.randint(2, 4)
            for i in range(items):
                yield from _sentence(rng, "\n\n" if i == items - 1 else "\n", lo=1, hi=4, lead="- ")
        else:
            punct = rng.choices(".!?", weights=(8, 1, 1))[0]
            yield from _sentence(rng, punct + ("\n\n" if rng.random() < 0.2 else " "))


def _quote(name: str, result: str) -> list[str]:
    """'The clock says: <result>. ' as tokens; long results are cut at a grapheme boundary."""
    clusters: list[str] = _GRAPHEME.findall(" ".join(result.split()))
    shown = "".join(clusters[:_QUOTE_LIMIT]) + ("…" if len(clusters) > _QUOTE_LIMIT else "")
    shown = shown or "(nothing)"
    ending = "" if shown.endswith((".", "!", "?", "…")) else "."
    return re.findall(r"\S+\s*", f"The {name} says: {shown}{ending} ")


def _finish(tokens: list[str]) -> list[str]:
    """End the answer on a full stop, without trailing whitespace."""
    if not tokens:
        return tokens
    last = tokens[-1].rstrip().rstrip(",:")
    if not last.endswith((".", "!", "?", "…")):
        last += "."
    return [*tokens[:-1], last]


# --------------------------------------------------------------------------- planning


def call_id_for(turn_id: str, index: int) -> str:
    """Stable tool call id: the same turn asks for the same call ids on every attempt."""
    digest = hashlib.sha256(f"{turn_id}\x1f{index}".encode()).hexdigest()
    return f"call_{digest[:16]}"


class StepPlan(msgspec.Struct, frozen=True, kw_only=True):
    """The deterministic content of one step; `stream` only adds timing and failures.

    `text` is the step's whole answer ("" for a step that calls tools); `cuts` are the end
    offsets (code points) of its deltas; `token_ends` the end offsets of its tokens.
    """

    settings: SimulatedSettings
    text: str
    cuts: tuple[int, ...]
    token_ends: tuple[int, ...]
    tool_calls: tuple[ToolCallRequest, ...]
    prompt_tokens: int
    fail: bool
    step: int


_CALCULATE: Final = re.compile(r"calculate\s+([-+*/%^().\d\s]*\d[-+*/%^().\d\s]*)")


def _planned_tools(directives: SimDirectives, offered: set[str]) -> list[tuple[str, dict[str, Any]]]:
    """Which tools the model calls. A `/sim tool=` always wins (even for a tool that does not
    exist: that is how unknown-tool handling is tested). The natural-language triggers only
    fire when the request offers that tool, or offers no tools at all."""
    if directives.tools:
        return list(zip(directives.tools, directives.tool_args, strict=True))
    prompt = directives.prompt.lower()

    def allowed(name: str) -> bool:
        return not offered or name in offered

    if "what time is it" in prompt and allowed("clock"):
        return [("clock", {})]
    match = _CALCULATE.search(prompt)
    if match and allowed("calculator"):
        return [("calculator", {"expression": match.group(1).strip()})]
    return []


def _split_at_last_user(messages: Sequence[ChatMessage]) -> tuple[str, list[ChatMessage]]:
    for index in range(len(messages) - 1, -1, -1):
        if messages[index].role == "user":
            return messages[index].text, [m for m in messages[index + 1 :] if m.role == "tool"]
    return "", [m for m in messages if m.role == "tool"]


def _seed(*parts: Any) -> int:
    blob = json.dumps(parts, ensure_ascii=False, separators=(",", ":")).encode()
    return int.from_bytes(hashlib.sha256(blob).digest()[:8], "big")


def _cuts(text: str, token_ends: Sequence[int], settings: SimulatedSettings) -> tuple[int, ...]:
    if settings.chunk > 0:
        cuts = set(range(settings.chunk, len(text), settings.chunk))
    else:
        cuts = set(token_ends)
    if settings.split_graphemes:
        for match in _GRAPHEME.finditer(text):
            start, end = match.span()
            if end - start >= 2:
                cuts.add(start + 1)  # e|U+0301, first|second regional indicator, 👩|ZWJ
            if end - start >= 3:
                cuts.add(end - 1)  # ZWJ|💻, VS16|keycap
    cuts.add(len(text))
    cuts.discard(0)
    return tuple(sorted(cuts))


def plan_step(request: ProviderRequest, settings: SimulatedSettings | None = None) -> StepPlan:
    """Compute the step deterministically, with no I/O.

    First step of a turn that calls tools: no text, the tool calls. Once tool messages are
    present after the last user message (the follow-up step): the answer quotes each result
    ("The clock says: ...") then continues with prose. Raises DirectiveError.
    """
    settings = SimulatedSettings.from_env() if settings is None else settings
    user_text, results = _split_at_last_user(request.messages)
    directives = parse_directives(user_text)
    try:
        settings = msgspec.structs.replace(settings, **directives.overrides)
    except ValueError as exc:
        raise DirectiveError(str(exc)) from exc
    prompt_tokens = math.ceil(sum(len(m.text) for m in request.messages) / 4)
    planned = _planned_tools(directives, {t.name for t in request.tools})

    if planned and not results:
        calls = tuple(
            ToolCallRequest(call_id=call_id_for(request.turn_id, i), name=name, args=args)
            for i, (name, args) in enumerate(planned)
        )
        return StepPlan(
            settings=settings,
            text="",
            cuts=(),
            token_ends=(),
            tool_calls=calls,
            prompt_tokens=prompt_tokens,
            fail=directives.fail,
            step=0,
        )

    names_by_id = {call_id_for(request.turn_id, i): name for i, (name, _) in enumerate(planned)}
    quoted = [
        (m.tool_call_id or "", m.name or names_by_id.get(m.tool_call_id or "", "tool"), m.text)
        for m in results
    ]
    rng = random.Random(_seed(request.session_id, request.turn_id, directives.prompt, quoted))
    tokens: list[str] = [tok for _, name, text in quoted for tok in _quote(name, text)]
    attached = len(_ATTACHMENT.findall(directives.prompt))
    if attached and not results:  # media arrive by reference: acknowledge them
        tokens[:0] = re.findall(r"\S+\s*", f"I received {attached} attachment{'s' * (attached > 1)}. ")
    prose = _prose_tokens(rng)
    tokens.extend(next(prose) for _ in range(settings.tokens))
    tokens = _finish(tokens)

    token_ends: list[int] = []
    offset = 0
    for token in tokens:
        offset += len(token)
        token_ends.append(offset)
    text = "".join(tokens)
    return StepPlan(
        settings=settings,
        text=text,
        cuts=_cuts(text, token_ends, settings),
        token_ends=tuple(token_ends),
        tool_calls=(),
        prompt_tokens=prompt_tokens,
        fail=directives.fail,
        step=1 if results else 0,
    )


def full_answer(request: ProviderRequest, settings: SimulatedSettings | None = None) -> str:
    """The complete text of this step, ignoring `continue_from` ("" for a tool-calling step).

    `settings` defaults to `SimulatedSettings.from_env()`, i.e. what a provider built with
    defaults would use; per-turn `/sim` overrides are applied either way.
    """
    return plan_step(request, settings).text


# --------------------------------------------------------------------------- the provider


class SimulatedProvider:
    """The simulated model behind the `Provider` interface, with stream accounting."""

    _ATTEMPT_MEMORY: Final = 10_000

    def __init__(self, settings: SimulatedSettings | None = None, *, name: str = "simulated") -> None:
        self.name = name
        self.settings = SimulatedSettings.from_env() if settings is None else settings
        self.started = 0
        self.finished = 0
        self.failed = 0
        self.aborted = 0
        self.last_aborted_turns: collections.deque[str] = collections.deque(maxlen=100)
        self._attempts: collections.OrderedDict[tuple[str, str, int], int] = collections.OrderedDict()

    @property
    def orphaned(self) -> int:
        """Streams started and not yet finished, failed or aborted. Zero once quiescent,
        unless a consumer dropped a stream without closing it (a leak)."""
        return self.started - self.finished - self.failed - self.aborted

    def full_answer(self, request: ProviderRequest) -> str:
        """The complete text this provider would give for the step."""
        return plan_step(request, self.settings).text

    def _next_attempt(self, request: ProviderRequest, step: int) -> int:
        key = (request.session_id, request.turn_id, step)
        attempt = self._attempts.pop(key, 0)
        self._attempts[key] = attempt + 1
        while len(self._attempts) > self._ATTEMPT_MEMORY:
            self._attempts.popitem(last=False)
        return attempt

    def _prepare(self, request: ProviderRequest) -> tuple[StepPlan, random.Random]:
        """Everything that can fail before the first event: fails fast, with no await."""
        try:
            plan = plan_step(request, self.settings)
        except DirectiveError as exc:
            raise ProviderError(f"bad /sim directive: {exc}", retryable=False) from exc
        if plan.fail:
            raise ProviderError("simulated poison turn (/sim fail=1)", retryable=False)
        attempt = self._next_attempt(request, plan.step)
        rng = random.Random(
            _seed(plan.settings.seed, request.session_id, request.turn_id, plan.step, attempt)
        )
        if rng.random() < plan.settings.error_rate:
            raise ProviderError(f"simulated transient upstream error (attempt {attempt})", retryable=True)
        if not plan.text.startswith(request.continue_from):
            raise ContinuationMismatch(
                f"continue_from ({len(request.continue_from)} code points) is not a prefix of the answer"
            )
        return plan, rng

    async def stream(self, request: ProviderRequest) -> AsyncGenerator[ProviderEvent, None]:
        """Yield the step's deltas at the configured pace, then its tool calls, then Usage.

        Errors (transient, poison, ContinuationMismatch) are raised before the first event.
        """
        self.started += 1
        try:
            plan, rng = self._prepare(request)
        except Exception:
            self.failed += 1
            raise
        settings = plan.settings
        start = len(request.continue_from)
        deltas: list[str] = []
        previous = start
        for cut in plan.cuts:
            if cut > previous:
                deltas.append(plan.text[previous:cut])
                previous = cut
        usage = Usage(
            prompt_tokens=plan.prompt_tokens,
            completion_tokens=sum(1 for end in plan.token_ends if end > start),
        )
        stall_at = len(deltas) // 2 if settings.stall_ms > 0 and deltas else -1
        loop = asyncio.get_running_loop()
        outcome = "aborted"
        try:
            if settings.ttft_ms > 0:
                await asyncio.sleep(settings.ttft_ms / 1000)
            next_at = loop.time()
            for index, delta in enumerate(deltas):
                if index == stall_at:
                    await asyncio.sleep(settings.stall_ms / 1000)
                    next_at = loop.time()
                if index > 0:
                    if settings.rate > 0:
                        next_at += (1 + settings.jitter * rng.uniform(-1, 1)) / settings.rate
                        await asyncio.sleep(max(0.0, next_at - loop.time()))
                    else:
                        await asyncio.sleep(0)  # stay cancellable and fair at full speed
                yield TextDelta(delta)
            for call in plan.tool_calls:
                yield call
            outcome = "finished"
            self.finished += 1  # counted before the last yield: closing after Usage is normal
            yield usage
        except (GeneratorExit, asyncio.CancelledError):
            raise
        except BaseException:
            if outcome == "aborted":
                outcome = "failed"
            raise
        finally:
            if outcome == "aborted":
                self.aborted += 1
                self.last_aborted_turns.append(request.turn_id)
            elif outcome == "failed":
                self.failed += 1
