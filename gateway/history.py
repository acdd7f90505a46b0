"""`GET /v1/sessions/{sid}`: the durable history, and the answer being written now.

Postgres holds every accepted user message and every finished turn. A turn still being answered
lives only in the checkpoint store until its commit; its text so far is shown as an assistant
message with status `in_progress` (seq = its newest event), so whatever a client has been shown,
live or replayed, is in the history at that moment, and `last_seq` is the newest seq a client may
have seen. A turn_end is held from every reader until its commit (CheckpointStore.read_visible),
so a finished turn is never shown before its row exists.
"""

from __future__ import annotations

from gateway.deps import Deps
from proto import client

PAGE = 1000
MAX_PAGES = 20  # a turn in progress is at most this many pages of events; the rest of it is not listed


async def session_history(deps: Deps, session_id: str) -> client.SessionHistory:
    messages = await deps.eventlog.history(session_id)
    committed = {m.turn_id for m in messages if m.role == "assistant"}
    seqs = {m.seq for m in messages}
    after = max((m.seq for m in messages if m.role == "assistant"), default=0)
    last_seq = max(seqs, default=0)
    texts: dict[str, str] = {}
    newest: dict[str, int] = {}
    extra: list[client.HistoryMessage] = []
    for _ in range(MAX_PAGES):
        raws, _held = await deps.checkpoints.read_visible(session_id, after, PAGE)
        for raw in raws:
            ev = client.event_decoder.decode(raw)
            after = last_seq = max(last_seq, ev.seq)
            if isinstance(ev, client.Message):
                if ev.seq not in seqs:
                    extra.append(
                        client.HistoryMessage(
                            seq=ev.seq, role="user", text=ev.text, turn_id=ev.turn_id, status="accepted"
                        )
                    )
            elif ev.turn_id in committed:
                continue
            elif isinstance(ev, client.TurnEnd):  # visible, hence committed after Postgres was read
                committed.add(ev.turn_id)
                texts.pop(ev.turn_id, None)
                newest.pop(ev.turn_id, None)
                extra.append(
                    client.HistoryMessage(
                        seq=ev.seq, role="assistant", text=ev.text, turn_id=ev.turn_id, status=ev.status
                    )
                )
            else:
                text = texts.get(ev.turn_id, "")
                if isinstance(ev, client.Delta):
                    text = text[: ev.offset] + ev.text
                texts[ev.turn_id] = text
                newest[ev.turn_id] = ev.seq
        if len(raws) < PAGE:
            break
    extra += [
        client.HistoryMessage(seq=newest[t], role="assistant", text=text, turn_id=t, status="in_progress")
        for t, text in texts.items()
    ]
    if extra:
        messages = sorted([*messages, *extra], key=lambda m: m.seq)
    return client.SessionHistory(session_id=session_id, last_seq=last_seq, messages=messages)
