"""A turn's progress as a small state machine with no I/O (the deterministic part).

`TurnProgress` knows what the turn has said so far, allocates offsets in code points, builds the
events to checkpoint (encoded with the `"seq":0` placeholder the checkpoint store replaces), and
can be rebuilt exactly from the checkpointed events after a crash: the new owner continues from
the checkpointed text, which is precisely what any client may have seen.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from proto import client
from proto.state import ChatMessage

_enc = client.json_encoder.encode


class TurnProgress:
    def __init__(self, turn_id: str) -> None:
        self.turn_id = turn_id
        self.started = False
        self.start_seq = 0
        self.text = ""
        self.offset = 0
        self.step_start = 0
        self.ended: client.TurnEnd | None = None
        self.calls: dict[str, client.ToolCall] = {}
        self.results: dict[str, client.ToolResult] = {}

    @classmethod
    def restore(cls, turn_id: str, events: Iterable[client.Event]) -> TurnProgress:
        p = cls(turn_id)
        for ev in events:
            if getattr(ev, "turn_id", None) != turn_id:
                continue
            if isinstance(ev, client.TurnStart):
                p.started, p.start_seq = True, ev.seq
            elif isinstance(ev, client.Delta):
                if ev.offset != p.offset:
                    raise ValueError(f"checkpoint of {turn_id} has a hole at offset {p.offset}")
                p.text += ev.text
                p.offset += len(ev.text)
            elif isinstance(ev, client.ToolCall):
                p.calls[ev.call_id] = ev
            elif isinstance(ev, client.ToolResult):
                p.results[ev.call_id] = ev
                p.step_start = p.offset
            elif isinstance(ev, client.TurnEnd):
                p.ended = ev
        return p

    # ---- building events ---------------------------------------------------------------------
    def turn_start(self) -> bytes:
        self.started = True
        return _enc(client.TurnStart(seq=0, turn_id=self.turn_id))

    def delta(self, text: str) -> bytes:
        raw = _enc(client.Delta(seq=0, turn_id=self.turn_id, offset=self.offset, text=text))
        self.text += text
        self.offset += len(text)
        return raw

    def status(self, text: str) -> bytes:
        return _enc(client.Status(seq=0, turn_id=self.turn_id, text=text))

    def tool_call(self, call_id: str, name: str, args: dict[str, Any]) -> bytes:
        ev = client.ToolCall(seq=0, turn_id=self.turn_id, call_id=call_id, name=name, args=args)
        self.calls[call_id] = ev
        return _enc(ev)

    def tool_result(self, call_id: str, ok: bool, text: str) -> bytes:
        ev = client.ToolResult(seq=0, turn_id=self.turn_id, call_id=call_id, ok=ok, text=text)
        self.results[call_id] = ev
        self.step_start = self.offset
        return _enc(ev)

    def end(self, status: client.TurnStatus) -> bytes:
        self.ended = client.TurnEnd(seq=0, turn_id=self.turn_id, status=status, text=self.text)
        return _enc(self.ended)

    # ---- what the model needs -------------------------------------------------------------------
    def step_text(self) -> str:
        """The text of the current model step, for `continue_from` after a takeover."""
        return self.text[self.step_start:]

    def unfinished_calls(self) -> list[client.ToolCall]:
        return [c for cid, c in self.calls.items() if cid not in self.results]

    def tool_messages(self) -> list[ChatMessage]:
        out: list[ChatMessage] = []
        if self.calls and self.step_start:
            out.append(ChatMessage(role="assistant", text=self.text[: self.step_start], turn_id=self.turn_id))
        for cid, res in self.results.items():
            out.append(ChatMessage(role="tool", text=res.text, tool_call_id=cid, name=self.calls[cid].name,
                                   turn_id=self.turn_id))
        return out


def status_line(names: list[str]) -> str:
    """The short human line shown the moment the model reaches for a tool."""
    pretty = {"clock": "the clock", "calculator": "the calculator", "slow_lookup": "a slow lookup",
              "http_get": "the web"}
    what = ", ".join(pretty.get(n, n) for n in names)
    return f"Let me check {what}…"
