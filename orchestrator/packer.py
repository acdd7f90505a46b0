"""Context packing: choose what of a session's history the model sees, within a token budget.

Why it exists: a long session does not fit a model's context window, and an over-long request
either fails upstream or silently loses its most important part (the question being asked). The
packer makes that choice explicitly and deterministically, and records it in `PackerMeta` so a
reader can see why the model saw what it saw.

Priorities, highest first:

1. the system prompt and the latest user message (always present; if together they exceed the
   budget they are truncated from the middle with `TRUNCATION_MARKER`, the user message keeping at
   least half the budget, so the budget is never exceeded);
2. the latest `keep_last_turns` turns, in full, newest first;
3. older turns, newest first, while they fit (a budget slice is set aside for the summary);
4. a single extractive summary system message ("Earlier in this conversation: …", the first
   sentence of each dropped user message, newest first, bounded) inserted after the system prompt
   when something was dropped and it fits.

A turn is a user message plus the assistant/tool messages with the same `turn_id`. Turns are
kept or dropped whole (the latest user message is the only message ever kept without the rest of
its turn), so a tool message is never sent without the assistant message that called it. Kept
messages stay in their original order; the stop at the first turn that does not fit keeps the
history a contiguous suffix, so the model never sees a hole in the middle of the conversation.

Token counts are an estimate (`estimate_tokens`), deliberately cheap and deterministic; every
message also costs `MESSAGE_OVERHEAD_TOKENS` for the chat template's role framing.
"""

from __future__ import annotations

import math
import re

import msgspec

from proto.state import ChatMessage, PackerMeta

__all__ = [
    "MESSAGE_OVERHEAD_TOKENS",
    "SUMMARY_MAX_TOKENS",
    "SUMMARY_PREFIX",
    "TRUNCATION_MARKER",
    "estimate_tokens",
    "first_sentence",
    "message_tokens",
    "pack",
    "summarise",
    "truncate_middle",
]

MESSAGE_OVERHEAD_TOKENS = 4
"""Tokens a chat template spends per message on role markers and separators."""

TRUNCATION_MARKER = "\n[…truncated…]\n"
SUMMARY_PREFIX = "Earlier in this conversation: "
SUMMARY_MAX_TOKENS = 200
SENTENCE_MAX_CHARS = 120

# Scripts where a token is about one character: CJK ideographs, kana, hangul, CJK punctuation, fullwidth forms.
_CJK = re.compile(
    "[\u3000-\u303f\u3040-\u30ff\u3100-\u312f\u3130-\u318f\u3400-\u4dbf\u4e00-\u9fff"
    "\uac00-\ud7af\uf900-\ufaff\ufe30-\ufe4f\uff00-\uffef\U00020000-\U0003134f]"
)
_SENTENCE_END = re.compile(r"[.!?](?=\s|$)|[。！？]")
_SPACES = re.compile(r"\s+")


def estimate_tokens(text: str) -> int:
    """About chars/4 (rounded up), but 1 per CJK character; 0 for "", at least 1 otherwise.

    An estimate, not a tokenizer: cheap, deterministic and monotone (adding characters never lowers
    it), which is what budgeting needs. Real tokenizers land within a small factor for prose.
    """
    if not text:
        return 0
    if text.isascii():
        return (len(text) + 3) // 4
    _, cjk = _CJK.subn("", text)
    return cjk + math.ceil((len(text) - cjk) / 4)


def message_tokens(message: ChatMessage) -> int:
    """Estimated cost of one message in a request: its text plus the per-message overhead."""
    return estimate_tokens(message.text) + MESSAGE_OVERHEAD_TOKENS


def truncate_middle(text: str, max_tokens: int) -> str:
    """`text` cut from the middle (head and tail kept, `TRUNCATION_MARKER` between) to fit `max_tokens`.

    The middle goes because the start of a message usually states the request and the end the
    question; returned unchanged when it already fits.
    """
    if estimate_tokens(text) <= max_tokens:
        return text
    marker = TRUNCATION_MARKER
    if estimate_tokens(marker) > max_tokens:
        marker = "…"
        if estimate_tokens(marker) > max_tokens:
            return ""

    def build(k: int) -> str:
        head = (k + 1) // 2
        tail = k - head
        return text[:head] + marker + (text[len(text) - tail :] if tail else "")

    lo, hi = 0, len(text) - 1  # build(lo) fits; find the largest k that fits (estimate is monotone in k)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if estimate_tokens(build(mid)) <= max_tokens:
            lo = mid
        else:
            hi = mid - 1
    return build(lo)


def first_sentence(text: str, max_chars: int = SENTENCE_MAX_CHARS) -> str:
    """The first sentence (or line) of `text`, whitespace collapsed, at most `max_chars` code points."""
    text = text.strip()
    line = text.split("\n", 1)[0]
    m = _SENTENCE_END.search(line)
    if m is not None:
        line = line[: m.end()]
    line = _SPACES.sub(" ", line).strip().replace("“", '"').replace("”", '"')
    if len(line) > max_chars:
        line = line[: max_chars - 1].rstrip() + "…"
    return line


def _summary_text(sentences: list[str], omitted: bool) -> str:
    quoted = "; ".join(f"“{s}”" for s in sentences)
    return f"{SUMMARY_PREFIX}{'(…) ' if omitted else ''}the user wrote {quoted}."


def summarise(dropped: list[ChatMessage], max_tokens: int) -> tuple[str, list[int]] | None:
    """Extractive summary of dropped messages within `max_tokens`: (text, seqs it covers), or None.

    The first sentence of each dropped user message, newest first while it fits, shown in
    chronological order. Quoted so that user text placed in a system message reads as a quotation
    of the user, not as an instruction.
    """
    users = [m for m in dropped if m.role == "user" and m.text.strip()]
    chosen: list[tuple[str, ChatMessage]] = []
    for m in reversed(users):
        sentence = first_sentence(m.text)
        trial = [(sentence, m), *chosen]
        text = _summary_text([s for s, _ in trial], omitted=len(trial) < len(users))
        if estimate_tokens(text) <= max_tokens:
            chosen = trial
            continue
        if not chosen:  # not even one sentence fits whole: shorten it
            lo, hi = 0, len(sentence) - 1
            while lo < hi:
                mid = (lo + hi + 1) // 2
                cand = _summary_text([sentence[:mid] + "…"], omitted=len(users) > 1)
                if estimate_tokens(cand) <= max_tokens:
                    lo = mid
                else:
                    hi = mid - 1
            if lo > 0:
                chosen = [(sentence[:lo] + "…", m)]
        break
    if not chosen:
        return None
    text = _summary_text([s for s, _ in chosen], omitted=len(chosen) < len(users))
    return text, [m.seq for _, m in chosen if m.seq is not None]


def _turn_groups(history: list[ChatMessage]) -> list[list[int]]:
    """Indices of `history` grouped into turns, groups in order of their first message.

    Messages share a group when they share a `turn_id`; an assistant/tool message without one
    joins the latest group, anything else without one is a group of its own.
    """
    groups: list[list[int]] = []
    by_turn: dict[str, int] = {}
    for i, m in enumerate(history):
        if m.turn_id is not None:
            g = by_turn.get(m.turn_id)
            if g is None:
                by_turn[m.turn_id] = len(groups)
                groups.append([i])
            else:
                groups[g].append(i)
        elif m.role in ("assistant", "tool") and groups:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def pack(
    system_prompt: str,
    history: list[ChatMessage],
    budget_tokens: int,
    *,
    reserve_tokens: int = 0,
    keep_last_turns: int = 2,
    summary_max_tokens: int = SUMMARY_MAX_TOKENS,
) -> tuple[list[ChatMessage], PackerMeta]:
    """Messages for the model (system prompt first, then kept history in order) and what was chosen.

    `reserve_tokens` is left free for the answer; the messages' estimated cost never exceeds
    `budget_tokens - reserve_tokens`. Raises ValueError when that is too small to hold even the
    per-message overhead of the system prompt and the latest user message.

    `PackerMeta`: `kept_seqs` / `dropped_seqs` partition the history's seqs (messages without a
    seq are not listed); `summarised_seqs` lists the dropped user messages quoted in the summary
    and, if the latest user message had to be truncated, its seq too (the only seq that can be in
    both `kept_seqs` and `summarised_seqs`: kept, but in condensed form).
    """
    if budget_tokens < 0 or reserve_tokens < 0 or keep_last_turns < 0 or summary_max_tokens < 0:
        raise ValueError("budget_tokens, reserve_tokens, keep_last_turns and summary_max_tokens must be >= 0")
    avail = budget_tokens - reserve_tokens
    over = MESSAGE_OVERHEAD_TOKENS
    last_user = next((i for i in range(len(history) - 1, -1, -1) if history[i].role == "user"), None)
    if avail < over * (1 if last_user is None else 2):
        raise ValueError(
            f"budget of {avail} tokens cannot hold the system prompt and the latest user message"
        )

    system = ChatMessage(role="system", text=system_prompt)
    costs = [message_tokens(m) for m in history]
    sys_cost = message_tokens(system)

    if sys_cost + sum(costs) <= avail:  # the common case while a session is short
        out = [system, *history]
        return out, _meta(budget_tokens, out, history, set(range(len(history))), [], None)

    # 1. mandatory: system prompt and latest user message, truncated if together they do not fit.
    summarised: list[int] = []
    forced: dict[int, ChatMessage] = {}
    user_cost = costs[last_user] if last_user is not None else 0
    if sys_cost + user_cost > avail:
        user_alloc = max(avail - sys_cost, min(user_cost, avail // 2)) if last_user is not None else 0
        system = ChatMessage(role="system", text=truncate_middle(system_prompt, avail - user_alloc - over))
        sys_cost = message_tokens(system)
        if last_user is not None:
            m = history[last_user]
            short = truncate_middle(m.text, avail - sys_cost - over)
            if short != m.text:
                m = msgspec.structs.replace(m, text=short)
                if m.seq is not None:
                    summarised.append(m.seq)
            forced[last_user] = m
            user_cost = message_tokens(m)
    elif last_user is not None:
        forced[last_user] = history[last_user]
    kept: set[int] = set(forced)
    remaining = avail - sys_cost - user_cost

    # 2./3. whole turns, newest first, stopping at the first that does not fit.
    reserve_summary = 0
    for rank, group in enumerate(reversed(_turn_groups(history))):
        if rank == keep_last_turns:
            # Older turns compete with the summary: leave it a slice (at most half of what is left).
            reserve_summary = min(summary_max_tokens + over, remaining // 2)
        extra = [i for i in group if i not in kept]
        cost = sum(costs[i] for i in extra)
        if cost > remaining - reserve_summary:
            break
        kept.update(extra)
        remaining -= cost

    # 4. summary of what was dropped, if it fits in what is left.
    dropped = [i for i in range(len(history)) if i not in kept]
    summary: str | None = None
    if dropped:
        got = summarise([history[i] for i in dropped], min(summary_max_tokens, remaining - over))
        if got is not None:
            summary, seqs = got
            summarised = seqs + summarised

    out = [system]
    if summary is not None:
        out.append(ChatMessage(role="system", text=summary))
    out.extend(forced.get(i, history[i]) for i in sorted(kept))
    meta = _meta(budget_tokens, out, history, kept, summarised, summary)
    assert meta.used_tokens <= avail, (meta.used_tokens, avail)
    return out, meta


def _meta(
    budget: int,
    out: list[ChatMessage],
    history: list[ChatMessage],
    kept: set[int],
    summarised: list[int],
    summary: str | None,
) -> PackerMeta:
    return PackerMeta(
        budget_tokens=budget,
        used_tokens=sum(message_tokens(m) for m in out),
        kept_seqs=[m.seq for i, m in enumerate(history) if i in kept and m.seq is not None],
        dropped_seqs=[m.seq for i, m in enumerate(history) if i not in kept and m.seq is not None],
        summarised_seqs=summarised,
        summary=summary,
    )
