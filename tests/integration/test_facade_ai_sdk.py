"""The Vercel AI SDK UI message stream facade: the wire format read raw, then the real `ai` package
(AbstractChat + DefaultChatTransport, clients/node) run by `node --test` against the live stack,
including resumeStream after the gateway was SIGKILLed mid-answer and restarted on its port."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.integration.conftest import make_token
from tests.waits import eventually, within

NODE_DIR = Path(__file__).resolve().parents[2] / "clients" / "node"


async def _chunks(resp: aiohttp.ClientResponse) -> list[Any]:
    """Every `data:` chunk of a UI message stream up to `[DONE]` (which is the last one)."""
    out: list[Any] = []
    while True:
        record = (await resp.content.readuntil(b"\n\n")).decode()
        for line in record.splitlines():
            if line.startswith("data: "):
                data = line[6:]
                out.append("[DONE]" if data == "[DONE]" else json.loads(data))
        if out and out[-1] == "[DONE]":
            return out


def _text(chunks: list[Any]) -> str:
    return "".join(c["delta"] for c in chunks if isinstance(c, dict) and c["type"] == "text-delta")


async def _post(
    http: aiohttp.ClientSession, url: str, token: str, chat_id: str, msg_id: str, text: str
) -> tuple[str, list[Any]]:
    body = {
        "id": chat_id,
        "trigger": "submit-message",
        "messageId": None,
        "messages": [{"id": msg_id, "role": "user", "parts": [{"type": "text", "text": text}]}],
    }
    async with http.post(
        f"{url}/v1/ai-sdk/chat", json=body, headers={"Authorization": f"Bearer {token}"}
    ) as r:
        assert r.status == 200, await r.text()
        assert r.headers["x-vercel-ai-ui-message-stream"] == "v1"
        return r.headers["X-Tidewire-Session"], await within(
            _chunks(r), timeout=60, what="the UI message stream"
        )


async def test_ui_message_stream_format_repost_and_resume(stack) -> None:
    token = make_token("ai-raw")
    hdr = {"Authorization": f"Bearer {token}"}
    async with aiohttp.ClientSession() as http:
        sid, chunks = await _post(http, stack.url, token, "chat-raw-1", "u1", "/sim tokens=60 rate=0\nhello")
        kinds = [c if c == "[DONE]" else c["type"] for c in chunks]
        assert kinds[0] == "start" and kinds[1] == "text-start"
        assert kinds[-4:] == ["text-end", "data-turn-end", "finish", "[DONE]"]
        turn_id = chunks[0]["messageId"]
        assert chunks[-2]["finishReason"] == "stop"
        # a re-POST of the same user message: no second turn, the same turn streamed again
        sid2, again = await _post(http, stack.url, token, "chat-raw-1", "u1", "/sim tokens=60 rate=0\nhello")
        assert sid2 == sid and again[0]["messageId"] == turn_id and _text(again) == _text(chunks)
        r = await http.get(f"{stack.url}/v1/sessions/{sid}", headers=hdr)
        history = (await r.json())["messages"]
        assert [m["role"] for m in history] == ["user", "assistant"] and history[1]["text"] == _text(chunks)
        # nothing active: 204
        r = await http.get(f"{stack.url}/v1/ai-sdk/chat/chat-raw-1/stream", headers=hdr)
        assert r.status == 204
        # an active turn: replayed from its start, then live, to the same text
        posting = asyncio.create_task(
            _post(http, stack.url, token, "chat-raw-1", "u2", "/sim tokens=600 rate=100\nlonger")
        )
        await eventually(
            lambda: posting.done() or _active(http, stack.url, hdr, sid),
            timeout=20,
            what="the second turn to be active",
        )
        assert not posting.done(), posting.result()
        async with http.get(f"{stack.url}/v1/ai-sdk/chat/chat-raw-1/stream", headers=hdr) as resumed:
            assert resumed.status == 200
            replay = await within(_chunks(resumed), timeout=60, what="the resumed stream")
        _, live = await within(posting, timeout=60, what="the second POST's stream")
        assert replay[0] == live[0] and _text(replay) == _text(live) and replay[-2]["type"] == "finish"
        # another subject: the session is refused, the chat id is someone else's (another) chat
        other = {"Authorization": f"Bearer {make_token('ai-raw-other')}"}
        r = await http.get(f"{stack.url}/v1/ai-sdk/chat/{sid}/stream", headers=other)
        assert r.status == 403 and (await r.json())["error"]["code"] == "forbidden"
        r = await http.get(f"{stack.url}/v1/ai-sdk/chat/chat-raw-1/stream", headers=other)
        assert r.status == 404


async def _active(http: aiohttp.ClientSession, url: str, hdr: dict[str, str], sid: str) -> bool:
    r = await http.get(f"{url}/v1/sessions/{sid}", headers=hdr)
    messages = (await r.json())["messages"]
    return len(messages) >= 3 and (len(messages) == 3 or messages[3]["status"] == "in_progress")


async def test_ai_sdk_stop_is_the_sessions_stop_and_a_session_id_is_a_chat_id(stack) -> None:
    token = make_token("ai-stop")
    hdr = {"Authorization": f"Bearer {token}"}
    async with aiohttp.ClientSession() as http:
        r = await http.post(f"{stack.url}/v1/sessions", headers=hdr)
        own = (await r.json())["session_id"]
        posting = asyncio.create_task(
            _post(http, stack.url, token, own, "s1", "/sim tokens=3000 rate=50\nstop me")
        )
        await eventually(
            lambda: posting.done() or _active_turn(http, stack.url, hdr, own),
            timeout=20,
            what="the turn to produce text",
        )
        r = await http.post(f"{stack.url}/v1/sessions/{own}/stop", headers=hdr)
        assert r.status == 202 and (await r.json())["stopped"] is True
        sid, chunks = await within(posting, timeout=30, what="the stream to end after the stop")
    assert sid == own  # the caller's own session id is used as the chat id
    end = next(c for c in chunks if isinstance(c, dict) and c["type"] == "data-turn-end")
    assert end["data"]["status"] == "cancelled"
    assert chunks[-2] == {"type": "finish", "finishReason": "other"} and chunks[-1] == "[DONE]"
    assert 0 < len(_text(chunks)) < 3000


async def _active_turn(http: aiohttp.ClientSession, url: str, hdr: dict[str, str], sid: str) -> bool:
    r = await http.get(f"{url}/v1/sessions/{sid}", headers=hdr)
    messages = (await r.json())["messages"]
    return len(messages) == 2 and len(messages[1]["text"]) > 50


def test_ai_package_chat_send_and_resume_after_gateway_kill(stack) -> None:
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.skip("Node.js (node and npm) is not installed: the AI SDK client test needs it")
    ci = subprocess.run(
        ["npm", "ci", "--no-audit", "--no-fund"], cwd=NODE_DIR, capture_output=True, text=True, timeout=300
    )
    assert ci.returncode == 0, f"npm ci failed:\n{ci.stdout[-2000:]}\n{ci.stderr[-2000:]}"
    gateway = stack.by_name("gateway")
    env = {
        **os.environ,
        "TIDEWIRE_URL": stack.url,
        "TIDEWIRE_TOKEN": make_token("ai-node"),
        "TIDEWIRE_GATEWAY_PID": str(gateway.pid),
    }
    node = subprocess.Popen(
        ["node", "--test", "--test-reporter=spec", "test/"],
        cwd=NODE_DIR,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.monotonic() + 240
    restarted = False
    try:
        while node.poll() is None:
            assert time.monotonic() < deadline, "node --test did not finish within 240 s"
            if not restarted and not gateway.alive():  # the node test killed it: bring it back on its port
                stack.add_gateway("gateway", stack.http_port)
                restarted = True
            time.sleep(0.1)
    finally:
        if node.poll() is None:
            node.kill()
        output = node.communicate(timeout=10)[0]
    print(output)
    assert node.returncode == 0, f"node --test failed:\n{output[-6000:]}"
    assert restarted, "the resume test did not kill the gateway"
    assert re.search(r"\bpass 2\b", output) and re.search(r"\bfail 0\b", output), output[-3000:]
