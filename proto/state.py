"""Structured state stored in Redis and Postgres (never opaque blobs): versioned msgspec payloads."""

from __future__ import annotations

from typing import Any, Literal

import msgspec

SESSION_STATE_VERSION = 1


class ChatMessage(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    role: Literal["system", "user", "assistant", "tool"]
    text: str
    turn_id: str | None = None
    seq: int | None = None
    tool_call_id: str | None = None
    name: str | None = None


class PackerMeta(msgspec.Struct, kw_only=True, omit_defaults=True):
    """What the context packer kept for the last turn, so a reader can see why the model saw what it saw."""

    budget_tokens: int = 0
    used_tokens: int = 0
    kept_seqs: list[int] = []
    dropped_seqs: list[int] = []
    summarised_seqs: list[int] = []
    summary: str | None = None


class ToolState(msgspec.Struct, kw_only=True, omit_defaults=True):
    call_id: str
    name: str
    status: Literal["running", "done", "failed", "cancelled"]


class SessionState(msgspec.Struct, kw_only=True, omit_defaults=True):
    """Session state cached in Redis with a TTL; rebuilt from the Postgres event log when missing."""

    version: int = SESSION_STATE_VERSION
    session_id: str
    subject: str
    window: list[ChatMessage] = []
    tools: list[ToolState] = []
    packer: PackerMeta = msgspec.field(default_factory=PackerMeta)
    flags: dict[str, Any] = {}
    last_turn_id: str | None = None
