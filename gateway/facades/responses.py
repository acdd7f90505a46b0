"""The OpenAI Responses API over tidewire turns (`/v1/responses`): one response = one turn.

Ids. A response id is `resp_<session_id>.<turn_id>`: the session is recoverable from the id alone
(ownership is checked on every call: another subject's id is a 403, an unknown one a 404), and the
turn is the tidewire turn, so stop, idempotent sends and crash continuation are the turn's own.
`previous_response_id` or `conversation` (a session id, or `{"id": session_id}`) continue that
session; without either a call starts a new session. `Idempotency-Key` becomes the send's
`client_msg_id` (and, for a call that creates its session, names that session too), so a retried
call returns the same response and starts no second turn.

Events. `ResponsesMapper` is a pure function from the ordered list of a turn's tidewire events to
the ordered list of Responses streaming events, applied one event at a time; `sequence_number` is
the event's index in that list. Text is cut into `output_text.delta` events by the text alone
(each ends after a whitespace character, or after `CHUNK_MAX` code points), never by how tidewire
chunked it, so the numbering is the same for deltas read live from Redis or coalesced from
Postgres, on every delivery and across a crash. A partial word therefore waits for the next delta.
Tool calls are `mcp_call` output items (server-executed tools, `server_label: "tidewire"`); status
lines are `tidewire.status` events, which the openai client passes through as unknown types.
A cancelled turn ends with `response.incomplete` whose response has `status: "cancelled"`.
"""

from __future__ import annotations

import asyncio
import copy
import json
import time
from typing import Any

from aiohttp import web

from gateway import commands
from gateway.auth import Principal
from gateway.deps import Deps
from gateway.facades.common import (
    SETTINGS,
    TurnRecord,
    admitted,
    caller,
    idempotency_key,
    json_encode,
    load_record,
    new_session,
    owned_session,
    read_json,
    save_record,
    send_turn,
    session_for_key,
    stored_events,
    stream_sse,
    turn_events,
)
from gateway.facades.errors import openai_error
from gateway.keys import DEPS
from proto import client
from shared.errors import BadFrame, NotFound

CHUNK_MAX = 16
RESPONSE_PREFIX = "resp_"


def response_id(sid: str, turn_id: str) -> str:
    return f"{RESPONSE_PREFIX}{sid}.{turn_id}"


def parse_response_id(rid: str) -> tuple[str, str]:
    if not rid.startswith(RESPONSE_PREFIX) or "." not in rid:
        raise NotFound("no such response")
    sid, _, turn_id = rid[len(RESPONSE_PREFIX) :].partition(".")
    if not sid or not turn_id:
        raise NotFound("no such response")
    return sid, turn_id


def _cut(text: str) -> tuple[list[str], str]:
    """Complete chunks of `text` (each ends at a whitespace character or is CHUNK_MAX long) and the rest."""
    out: list[str] = []
    start = 0
    for i, ch in enumerate(text):
        if ch.isspace() or i - start + 1 >= CHUNK_MAX:
            out.append(text[start : i + 1])
            start = i + 1
    return out, text[start:]


class ResponsesMapper:
    """Tidewire events of one turn -> Responses streaming events, numbered from 0 by exactly 1.

    Deterministic: the output depends only on the record and on the events fed, in order. `response`
    is the Response object as of the events fed so far (what `GET /v1/responses/{id}` returns)."""

    def __init__(self, record: TurnRecord) -> None:
        self.record = record
        self.seq = 0
        self.output: list[dict[str, Any]] = []
        self.status = "in_progress"
        self.error: dict[str, Any] | None = None
        self.incomplete: dict[str, Any] | None = None
        self.ended = False
        self._msg: dict[str, Any] | None = None  # the open message item
        self._msg_text = ""
        self._pending = ""
        self._items = 0
        self._tools: dict[str, int] = {}  # call_id -> output index of its open mcp_call item

    # ---- the Response object ------------------------------------------------------------------------
    @property
    def rid(self) -> str:
        return response_id(self.record.session_id, self.record.turn_id)

    def response(self) -> dict[str, Any]:
        r = self.record
        text = "".join(
            p.get("text", "") for item in self.output if item["type"] == "message" for p in item["content"]
        )
        return {
            "id": self.rid,
            "object": "response",
            "created_at": r.created_at,
            "status": self.status,
            "background": r.background,
            "error": self.error,
            "incomplete_details": self.incomplete,
            "instructions": r.instructions,
            "max_output_tokens": None,
            "model": r.model,
            "output": copy.deepcopy(self.output),
            "parallel_tool_calls": False,
            "previous_response_id": r.previous_response_id,
            "conversation": {"id": r.session_id} if r.conversation else None,
            "store": r.store,
            "temperature": None,
            "top_p": None,
            "tool_choice": "auto",
            "tools": [],
            "text": {"format": {"type": "text"}},
            "truncation": "disabled",
            "usage": None,
            "metadata": r.metadata or {},
            "output_text": text,
            "tidewire": {"session_id": r.session_id, "turn_id": r.turn_id},
        }

    # ---- events ----------------------------------------------------------------------------------
    def _ev(self, type_: str, **fields: Any) -> dict[str, Any]:
        ev = {"type": type_, "sequence_number": self.seq, **fields}
        self.seq += 1
        return ev

    def start(self) -> list[dict[str, Any]]:
        return [self._ev("response.created", response=self.response())]

    def feed(self, ev: client.Event) -> list[dict[str, Any]]:
        if self.ended:
            return []
        if isinstance(ev, client.TurnStart):
            return [self._ev("response.in_progress", response=self.response())]
        if isinstance(ev, client.Delta):
            return self._text(ev.text)
        if isinstance(ev, client.Status):
            return [self._ev("tidewire.status", text=ev.text, turn_id=ev.turn_id)]
        if isinstance(ev, client.ToolCall):
            return self._tool_call(ev)
        if isinstance(ev, client.ToolResult):
            return self._tool_result(ev)
        if isinstance(ev, client.TurnEnd):
            return self._end(ev)
        return []

    def _text(self, text: str) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        if self._msg is None:
            index = len(self.output)
            self._items += 1
            item: dict[str, Any] = {
                "id": f"msg_{self.record.turn_id}_{self._items}",
                "type": "message",
                "status": "in_progress",
                "role": "assistant",
                "content": [],
            }
            self._msg, self._msg_text, self._pending = item, "", ""
            self.output.append(item)
            out.append(
                self._ev("response.output_item.added", output_index=index, item={**item, "content": []})
            )
            part: dict[str, Any] = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
            item["content"] = [part]
            out.append(
                self._ev(
                    "response.content_part.added",
                    item_id=item["id"],
                    output_index=index,
                    content_index=0,
                    part=dict(part),
                )
            )
        chunks, self._pending = _cut(self._pending + text)
        for chunk in chunks:
            out.append(self._delta(chunk))
        return out

    def _delta(self, chunk: str) -> dict[str, Any]:
        assert self._msg is not None
        self._msg_text += chunk
        self._msg["content"][0]["text"] = self._msg_text
        return self._ev(
            "response.output_text.delta",
            item_id=self._msg["id"],
            output_index=len(self.output) - 1,
            content_index=0,
            delta=chunk,
            logprobs=[],
        )

    def _close_text(self, status: str = "completed") -> list[dict[str, Any]]:
        item = self._msg
        if item is None:
            return []
        out: list[dict[str, Any]] = []
        if self._pending:
            out.append(self._delta(self._pending))
            self._pending = ""
        index = len(self.output) - 1
        part = dict(item["content"][0])
        out.append(
            self._ev(
                "response.output_text.done",
                item_id=item["id"],
                output_index=index,
                content_index=0,
                text=self._msg_text,
                logprobs=[],
            )
        )
        out.append(
            self._ev(
                "response.content_part.done",
                item_id=item["id"],
                output_index=index,
                content_index=0,
                part=part,
            )
        )
        item["status"] = status
        out.append(
            self._ev(
                "response.output_item.done",
                output_index=index,
                item={**item, "content": [dict(p) for p in item["content"]]},
            )
        )
        self._msg = None
        return out

    def _tool_call(self, ev: client.ToolCall) -> list[dict[str, Any]]:
        out = self._close_text()
        index = len(self.output)
        args = json.dumps(ev.args, ensure_ascii=False, sort_keys=True)
        item = {
            "id": f"mcp_{ev.call_id}",
            "type": "mcp_call",
            "server_label": "tidewire",
            "name": ev.name,
            "arguments": args,
            "output": None,
            "error": None,
            "status": "in_progress",
        }
        self.output.append(item)
        self._tools[ev.call_id] = index
        out.append(self._ev("response.output_item.added", output_index=index, item=dict(item)))
        out.append(
            self._ev(
                "response.mcp_call_arguments.done", item_id=item["id"], output_index=index, arguments=args
            )
        )
        out.append(self._ev("response.mcp_call.in_progress", item_id=item["id"], output_index=index))
        return out

    def _tool_result(self, ev: client.ToolResult) -> list[dict[str, Any]]:
        index = self._tools.pop(ev.call_id, None)
        if index is None:
            return []
        out = self._close_text()
        item = self.output[index]
        if ev.ok:
            item.update(output=ev.text, status="completed")
            out.append(self._ev("response.mcp_call.completed", item_id=item["id"], output_index=index))
        else:
            item.update(error=ev.text, status="failed")
            out.append(self._ev("response.mcp_call.failed", item_id=item["id"], output_index=index))
        out.append(self._ev("response.output_item.done", output_index=index, item=dict(item)))
        return out

    def _end(self, ev: client.TurnEnd) -> list[dict[str, Any]]:
        done = ev.status == "completed"
        out = self._close_text("completed" if done else "incomplete")
        for call_id, index in sorted(self._tools.items(), key=lambda kv: kv[1]):
            item = self.output[index]
            item.update(error=f"turn {ev.status}", status="failed")
            out.append(self._ev("response.mcp_call.failed", item_id=item["id"], output_index=index))
            out.append(self._ev("response.output_item.done", output_index=index, item=dict(item)))
            del self._tools[call_id]
        self.ended = True
        if ev.status == "completed":
            self.status = "completed"
            out.append(self._ev("response.completed", response=self.response()))
        elif ev.status == "cancelled":
            self.status = "cancelled"
            self.incomplete = {"reason": "cancelled"}
            out.append(self._ev("response.incomplete", response=self.response()))
        elif ev.status == "timed_out":
            self.status = "incomplete"
            self.incomplete = {"reason": "timed_out"}
            out.append(self._ev("response.incomplete", response=self.response()))
        else:
            self.status = "failed"
            self.error = {"code": "server_error", "message": "the turn failed"}
            out.append(self._ev("response.failed", response=self.response()))
        return out


def _sse(ev: dict[str, Any]) -> bytes:
    kind: str = ev["type"]
    return b"event: " + kind.encode() + b"\ndata: " + json_encode(ev) + b"\n\n"


# ---- the request body -------------------------------------------------------------------------------


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if isinstance(part, dict) and part.get("type") in ("input_text", "output_text", "text"):
                texts.append(str(part.get("text", "")))
            elif isinstance(part, dict):
                raise BadFrame(f"input content of type {part.get('type')!r} is not supported")
        return "".join(texts)
    raise BadFrame("message content must be a string or a list of parts")


def input_text(value: Any) -> str:
    """A string, or message items: the user items' text (joined by a blank line) is the turn's text;
    the session already holds the earlier turns, so assistant and system items are not resent."""
    if isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise BadFrame("input must be a string or a list of items")
    texts = []
    for item in value:
        if not isinstance(item, dict):
            raise BadFrame("input items must be objects")
        kind = item.get("type", "message")
        if kind != "message":
            raise BadFrame(f"input items of type {kind!r} are not supported")
        if item.get("role") == "user":
            texts.append(_content_text(item.get("content")))
    text = "\n\n".join(t for t in texts if t)
    if not text:
        raise BadFrame("input has no user message")
    return text


def _opt_str(body: dict[str, Any], name: str) -> str | None:
    v = body.get(name)
    if v is not None and not isinstance(v, str):
        raise BadFrame(f"{name} must be a string")
    return v


def _metadata(body: dict[str, Any]) -> dict[str, str] | None:
    md = body.get("metadata")
    if md is None:
        return None
    if not isinstance(md, dict) or len(md) > 16 or not all(isinstance(v, str) for v in md.values()):
        raise BadFrame("metadata must be an object of at most 16 string values")
    return {str(k)[:64]: v[:512] for k, v in md.items()}


def _conversation(body: dict[str, Any]) -> str | None:
    conv = body.get("conversation")
    if conv is None:
        return None
    if isinstance(conv, dict):
        conv = conv.get("id")
    if not isinstance(conv, str) or not conv:
        raise BadFrame('conversation must be a session id or {"id": session_id}')
    return conv


# ---- handlers ---------------------------------------------------------------------------------------


async def create_response(request: web.Request) -> web.StreamResponse:
    deps = request.app[DEPS]
    principal = caller(request)
    body = await read_json(request)
    text = input_text(body.get("input"))
    model = _opt_str(body, "model") or request.app[SETTINGS].models[0]
    previous = _opt_str(body, "previous_response_id")
    conversation = _conversation(body)
    key = idempotency_key(request)
    if previous is not None and conversation is not None:
        raise BadFrame("previous_response_id and conversation are mutually exclusive")
    if previous is not None:
        sid = await owned_session(deps, parse_response_id(previous)[0], principal.subject)
    elif conversation is not None:
        sid = await owned_session(deps, conversation, principal.subject)
    elif key is not None:
        sid = await session_for_key(request, principal.subject, "responses", key, model)
    else:
        sid = await new_session(request, principal.subject, model)
    cmid = f"idem:{key}" if key is not None else commands.new_id("oa_")
    # a call that streams or waits is admitted before the send (a refused call starts no turn); a
    # background one holds no slot
    holds = bool(body.get("stream")) or not body.get("background")
    async with admitted(request, principal, sid, holds=holds):
        ack = await send_turn(request, principal.subject, sid, cmid, text)
        record = await save_record(
            request,
            TurnRecord(
                session_id=sid,
                turn_id=ack.turn_id,
                user_seq=ack.seq,
                created_at=int(time.time()),
                text=text,
                model=model,
                instructions=_opt_str(body, "instructions"),
                metadata=_metadata(body),
                background=bool(body.get("background")),
                store=body.get("store") is not False,
                previous_response_id=previous,
                conversation=conversation is not None,
            ),
        )
        headers = {"X-Tidewire-Session": sid}
        if body.get("stream"):
            return await _stream(request, record, -1, headers)
        if body.get("background"):
            mapper = await _replayed(request, record)
            return web.json_response(mapper.response(), headers=headers, dumps=_dumps)
        mapper = ResponsesMapper(record)
        mapper.start()
        async for ev in turn_events(request, sid, record.turn_id, record.user_seq):
            mapper.feed(ev)
        return web.json_response(mapper.response(), headers=headers, dumps=_dumps)


def _dumps(obj: Any) -> str:
    return json_encode(obj).decode()


async def _replayed(request: web.Request, record: TurnRecord) -> ResponsesMapper:
    mapper = ResponsesMapper(record)
    mapper.start()
    for ev in await stored_events(request, record.session_id, record.turn_id, record.user_seq):
        mapper.feed(ev)
    return mapper


async def _stream(
    request: web.Request, record: TurnRecord, starting_after: int, headers: dict[str, str]
) -> web.StreamResponse:
    async def produce(write: Any) -> None:
        mapper = ResponsesMapper(record)

        async def emit(events: list[dict[str, Any]]) -> None:
            chunk = b"".join(_sse(e) for e in events if e["sequence_number"] > starting_after)
            if chunk:
                await write(chunk)

        await emit(mapper.start())
        async for ev in turn_events(request, record.session_id, record.turn_id, record.user_seq):
            await emit(mapper.feed(ev))

    return await stream_sse(request, headers, produce)


async def _owned_record(request: web.Request, deps: Deps) -> tuple[Principal, TurnRecord]:
    principal = caller(request)
    sid, turn_id = parse_response_id(request.match_info["rid"])
    await owned_session(deps, sid, principal.subject)
    return principal, await load_record(request, sid, turn_id)


async def get_response(request: web.Request) -> web.StreamResponse:
    deps = request.app[DEPS]
    principal, record = await _owned_record(request, deps)
    stream = request.query.get("stream", "false").lower() in ("true", "1")
    raw_after = request.query.get("starting_after")
    try:
        starting_after = int(raw_after) if raw_after not in (None, "") else -1
    except ValueError as e:
        raise BadFrame("starting_after must be an integer") from e
    if not stream:
        mapper = await _replayed(request, record)
        return web.json_response(mapper.response(), dumps=_dumps)
    async with admitted(request, principal, record.session_id):
        return await _stream(request, record, starting_after, {"X-Tidewire-Session": record.session_id})


async def cancel_response(request: web.Request) -> web.StreamResponse:
    """The turn's stop: idempotent (a finished response is returned as it is), keeps the partial
    text; waits up to 10 s for the turn's end so the answer carries `status: "cancelled"`."""
    deps = request.app[DEPS]
    _, record = await _owned_record(request, deps)
    mapper = await _replayed(request, record)
    if not mapper.ended:
        await commands.stop_turn(deps, record.session_id, record.turn_id)
        mapper = ResponsesMapper(record)
        mapper.start()
        try:
            async with asyncio.timeout(10):
                async for ev in turn_events(request, record.session_id, record.turn_id, record.user_seq):
                    mapper.feed(ev)
        except TimeoutError:
            pass  # answered as it is now: in_progress, with the stop recorded
    return web.json_response(mapper.response(), dumps=_dumps)


async def list_input_items(request: web.Request) -> web.StreamResponse:
    deps = request.app[DEPS]
    _, record = await _owned_record(request, deps)
    item = {
        "id": f"msg_{record.turn_id}_in",
        "type": "message",
        "role": "user",
        "status": "completed",
        "content": [{"type": "input_text", "text": record.text}],
    }
    return web.json_response(
        {"object": "list", "data": [item], "first_id": item["id"], "last_id": item["id"], "has_more": False},
        dumps=_dumps,
    )


async def delete_response(request: web.Request) -> web.StreamResponse:
    return openai_error(BadFrame("responses are part of the session's durable history and cannot be deleted"))


ROUTES = [
    web.post("/v1/responses", create_response),
    web.get("/v1/responses/{rid}", get_response),
    web.post("/v1/responses/{rid}/cancel", cancel_response),
    web.get("/v1/responses/{rid}/input_items", list_input_items),
    web.delete("/v1/responses/{rid}", delete_response),
]
