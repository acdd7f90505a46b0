"""The chat page in headless Chromium against a real stack: streaming, Stop, reload mid-answer,
a gateway SIGKILL with reconnect, and an EventSource resuming with Last-Event-ID.

Every test opens its own session (a subject of its own, so `/?token=` creates one) and compares the
text the page shows with the durable history (`GET /v1/sessions/{sid}`), exactly. A MutationObserver
installed in every document (see conftest.RECORDER_JS) records each state of each answer, so "the
text only ever grew, never doubled" is checked on every intermediate state, not only the final one.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

from tidewire.dev.stack import Stack

pytest.importorskip(
    "playwright.async_api", reason="Python package `playwright` is not installed (make browser-deps)"
)

from playwright.async_api import BrowserContext, Page  # noqa: E402

CHROMIUM = Path("/usr/bin/chromium")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not CHROMIUM.exists(),
        reason=f"{CHROMIUM} not installed (Debian package `chromium`; see `make browser-deps`)",
    ),
]

FINISHED = ("completed", "cancelled", "failed", "timed_out")
END_TIMEOUT_MS = 30_000


class Chat:
    """One tab of the chat page, opened on a fresh session."""

    def __init__(self, page: Page, base: str, token: str) -> None:
        self.page = page
        self.base = base
        self.token = token
        self.sid = ""
        self.errors: list[str] = []
        page.on("pageerror", lambda e: self.errors.append(str(e)))

    @classmethod
    async def open(cls, context: BrowserContext, stack: Stack, token: str) -> Chat:
        chat = cls(await context.new_page(), stack.url, token)
        await chat.page.goto(f"{stack.url}/?token={token}")
        await chat.wait_connected()
        chat.sid = await chat.page.evaluate("new URL(location.href).searchParams.get('session')")
        assert chat.sid, "the page did not put the session in its URL"
        assert "token=" not in chat.page.url, "the token should be taken out of the visible URL"
        return chat

    async def wait_connected(self, timeout: float = 20_000) -> None:
        await self.page.wait_for_selector('#conn-state[data-state="connected"]', timeout=timeout)

    async def send(self, text: str) -> str:
        """Types and sends a message; returns the id of the (only new) assistant turn."""
        before = await self.page.locator(".assistant[data-turn-id]").count()
        await self.page.fill("#composer", text)
        await self.page.click("#send")
        await self.page.wait_for_function(
            "n => document.querySelectorAll('.assistant[data-turn-id]').length > n", arg=before
        )
        tid = await self.page.locator(".assistant[data-turn-id]").nth(before).get_attribute("data-turn-id")
        assert tid
        return tid

    def _sel(self, tid: str) -> str:
        return f'.assistant[data-turn-id="{tid}"]'

    async def answer(self, tid: str) -> str:
        return await self.page.eval_on_selector(f"{self._sel(tid)} .answer", "el => el.textContent")

    async def status(self, tid: str) -> str | None:
        return await self.page.get_attribute(self._sel(tid), "data-status")

    async def wait_chars(self, tid: str, n: int, timeout: float = 20_000) -> None:
        """Waits until the answer shows at least n code points."""
        await self.page.wait_for_function(
            """([sel, n]) => { const a = document.querySelector(sel);
                               return a && Array.from(a.textContent).length >= n; }""",
            arg=[f"{self._sel(tid)} .answer", n],
            timeout=timeout,
        )

    async def wait_end(self, tid: str, timeout: float = END_TIMEOUT_MS) -> str:
        await self.page.wait_for_selector(f"{self._sel(tid)}[data-status]", state="attached", timeout=timeout)
        status = await self.status(tid)
        assert status is not None
        return status

    async def samples(self, tid: str) -> list[dict[str, Any]]:
        """Every state of this turn's answer seen in the current document, in order."""
        return await self.page.evaluate("tid => window.__tw.samples.filter(s => s.turn === tid)", tid)

    async def states(self) -> list[str]:
        return await self.page.evaluate("window.__tw.states")

    async def history(self) -> dict[str, Any]:
        resp = await self.page.request.get(
            f"{self.base}/v1/sessions/{self.sid}", headers={"Authorization": f"Bearer {self.token}"}
        )
        assert resp.ok, f"GET /v1/sessions/{self.sid}: {resp.status} {await resp.text()}"
        return await resp.json()

    async def history_turn(self, tid: str) -> dict[str, Any]:
        """The finished assistant message of a turn in durable history (briefly polled)."""
        deadline = time.monotonic() + 10
        while True:
            hist = await self.history()
            found = [m for m in hist["messages"] if m["role"] == "assistant" and m["turn_id"] == tid]
            assert len(found) <= 1, f"turn {tid} twice in history: {found}"
            if found and found[0]["status"] in FINISHED:
                return found[0]
            assert time.monotonic() < deadline, f"turn {tid} not finished in history: {hist}"
            await asyncio.sleep(0.1)


def assert_only_grew(samples: list[dict[str, Any]], final: str) -> None:
    """Every displayed state was a prefix of the final text: nothing shown twice, nothing wrong."""
    assert samples, "no state of the answer was recorded"
    for s in samples:
        assert final.startswith(s["text"]), (
            f"displayed text is not a prefix of the final text:\n shown: {s['text']!r}\n final: {final!r}"
        )
    assert samples[-1]["text"] == final and samples[-1]["status"] is not None


def streaming_lengths(samples: list[dict[str, Any]]) -> set[int]:
    return {len(s["text"]) for s in samples if s["status"] is None and s["text"]}


async def test_answer_streams_and_equals_history(
    context: BrowserContext, browser_stack: Stack, token: str, screenshots: Path
) -> None:
    chat = await Chat.open(context, browser_stack, token)
    tid = await chat.send("/sim tokens=120 rate=40\nHow do tides work?")
    await chat.wait_chars(tid, 60)
    assert await chat.status(tid) is None, "the answer should still be streaming"
    assert await chat.page.is_enabled("#stop")
    await chat.page.screenshot(path=str(screenshots / "mid-answer.png"))

    assert await chat.wait_end(tid) == "completed"
    final = await chat.answer(tid)
    samples = await chat.samples(tid)
    assert len(streaming_lengths(samples)) >= 2, f"the answer did not grow over time: {samples[:5]}"
    assert_only_grew(samples, final)
    past = await chat.history_turn(tid)
    assert past["status"] == "completed"
    assert final == past["text"]

    assert await chat.page.locator(".user").count() == 1
    assert await chat.page.get_attribute(".user", "data-seq") is not None  # acked: durable
    assert await chat.page.is_disabled("#stop")
    assert await chat.page.locator("#live-region p").count() >= 1
    assert chat.errors == []


async def test_stop_cancels_and_page_equals_history(
    context: BrowserContext, browser_stack: Stack, token: str
) -> None:
    chat = await Chat.open(context, browser_stack, token)
    tid = await chat.send("/sim tokens=400 rate=40\nTell me a long story about the sea.")
    await chat.wait_chars(tid, 30)
    assert await chat.status(tid) is None
    await chat.page.click("#stop")

    assert await chat.wait_end(tid, timeout=10_000) == "cancelled"
    final = await chat.answer(tid)
    assert final, "the part written before Stop should stay on the page"
    assert_only_grew(await chat.samples(tid), final)
    past = await chat.history_turn(tid)
    assert past["status"] == "cancelled"
    assert final == past["text"]
    assert await chat.page.is_disabled("#stop")
    assert chat.errors == []


async def test_reload_mid_answer_resumes_without_duplicates(
    context: BrowserContext, browser_stack: Stack, token: str
) -> None:
    chat = await Chat.open(context, browser_stack, token)
    tid = await chat.send("/sim tokens=200 rate=40\nExplain spring and neap tides.")
    await chat.wait_chars(tid, 40)
    shown_before = await chat.answer(tid)

    await chat.page.reload()
    await chat.wait_connected()
    assert chat.sid in chat.page.url, "the reload should reopen the same session"
    await chat.wait_chars(tid, 1)
    assert await chat.status(tid) is None, "the answer should be resumed mid-way, not already over"

    assert await chat.wait_end(tid) == "completed"
    final = await chat.answer(tid)
    assert final.startswith(shown_before)
    samples = await chat.samples(tid)  # this document's (after the reload) only
    assert len(streaming_lengths(samples)) >= 2, "the answer did not continue live after the reload"
    assert_only_grew(samples, final)
    past = await chat.history_turn(tid)
    assert past["status"] == "completed"
    assert final == past["text"]
    assert await chat.page.locator(".assistant[data-turn-id]").count() == 1
    assert await chat.page.locator(".user").count() == 1
    assert chat.errors == []


async def test_gateway_killed_shows_reconnecting_then_recovers(
    context: BrowserContext, browser_stack: Stack, token: str, gateways: Any, screenshots: Path
) -> None:
    chat = await Chat.open(context, browser_stack, token)
    tid = await chat.send("/sim tokens=300 rate=40\nWhat happens to the tide during a storm?")
    await chat.wait_chars(tid, 30)

    await gateways.kill()
    await chat.page.wait_for_selector('#conn-state[data-state="reconnecting"]', timeout=15_000)
    # The badge flips between `reconnecting in Ns` and `connecting` while the gateway is down:
    # take the picture while it says reconnecting (checked again right after).
    badge = (
        "() => { const c = document.getElementById('conn-state'); return [c.dataset.state, c.textContent]; }"
    )
    for _ in range(20):
        await chat.page.wait_for_function(
            "() => { const c = document.getElementById('conn-state');"
            "        return c.dataset.state === 'reconnecting' && c.textContent !== 'reconnecting in 0s'; }",
            timeout=15_000,
        )
        await chat.page.screenshot(path=str(screenshots / "reconnecting.png"))
        state, text = await chat.page.evaluate(badge)
        if state == "reconnecting":
            break
    assert state == "reconnecting" and text.startswith("reconnecting in "), (state, text)

    await gateways.restart()
    await chat.wait_connected(timeout=20_000)
    assert await chat.wait_end(tid) == "completed"
    final = await chat.answer(tid)
    assert_only_grew(await chat.samples(tid), final)
    past = await chat.history_turn(tid)
    assert past["status"] == "completed"
    assert final == past["text"]
    states = await chat.states()
    assert "reconnecting" in states and states[-1] == "connected", states
    assert await chat.page.locator(".assistant[data-turn-id]").count() == 1
    assert chat.errors == []


SSE_SETUP_JS = """
async ({ token, prompt }) => {
  const mod = await import("/static/tidewire.js");
  const { session_id: sid } = await mod.api("", token, "POST", "/v1/sessions");
  const rec = (window.__sse = { sid, raw: [], opens: 0, errors: 0, client: [], clientStates: [] });

  // 1. A raw EventSource: records every sequenced record exactly as the browser delivers it.
  const q = new URLSearchParams({ after: "0", delivery: "tokens", access_token: token });
  const es = new EventSource(`/v1/sessions/${sid}/events?${q}`);
  es.onopen = () => rec.opens++;
  es.onerror = () => { if (es.readyState !== EventSource.CLOSED) rec.errors++; else rec.closed = true; };
  for (const type of ["message", "turn_start", "delta", "status", "tool_call", "tool_result", "turn_end"]) {
    es.addEventListener(type, (m) => rec.raw.push({ type, id: m.lastEventId, data: JSON.parse(m.data), opens: rec.opens }));
  }

  // 2. The page's client module on the SSE transport (EventSource + fetch POSTs).
  const client = new mod.TidewireClient({ token, sessionId: sid, transport: "sse", lastSeenSeq: 0 });
  window.__sseClient = client;
  client.addEventListener("state", (e) => rec.clientStates.push(e.detail.state));
  client.addEventListener("event", (e) => {
    const ev = e.detail;
    rec.client.push({ seq: ev.seq, type: ev.type, turn: ev.turn_id ?? null,
                      text: ev.type === "turn_end" ? ev.text : null });
  });
  client.connect();
  await new Promise((resolve) => {
    const check = () => (client.state === "connected" && rec.opens > 0 ? resolve() : setTimeout(check, 20));
    check();
  });
  client.send(prompt);
  return sid;
}
"""


async def test_eventsource_reconnect_resumes_without_duplicates(
    context: BrowserContext, browser_stack: Stack, token: str, gateways: Any
) -> None:
    page = await context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    await page.goto(f"{browser_stack.url}/healthz")  # any page of the gateway's origin
    sid = await page.evaluate(
        SSE_SETUP_JS, {"token": token, "prompt": "/sim tokens=240 rate=40\nDescribe a tide table."}
    )
    await page.wait_for_function("window.__sse.raw.filter(e => e.type === 'delta').length >= 10")

    await gateways.kill()
    await page.wait_for_function("window.__sse.errors >= 1", timeout=10_000)  # the stream dropped
    await asyncio.sleep(0.5)  # deltas keep coming while nobody is connected
    await gateways.restart()
    await page.wait_for_function("window.__sse.raw.some(e => e.type === 'turn_end')", timeout=END_TIMEOUT_MS)
    await page.wait_for_function(
        "window.__sse.client.some(e => e.type === 'turn_end')", timeout=END_TIMEOUT_MS
    )
    rec = await page.evaluate("window.__sse")
    turn_text = await page.evaluate(
        "tid => window.__sseClient.turnText(tid)",
        next(e["data"]["turn_id"] for e in rec["raw"] if e["type"] == "turn_end"),
    )
    await page.evaluate("window.__sseClient.close()")

    raw = rec["raw"]
    assert not rec.get("closed"), "the EventSource gave up instead of reconnecting on its own"
    assert rec["opens"] >= 2, f"the EventSource did not reconnect: {rec['opens']} opens"
    ids = [int(e["id"]) for e in raw]
    assert all(int(e["id"]) == e["data"]["seq"] for e in raw), "id: and seq differ"
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    assert not dupes, f"events received twice after the reconnect: seqs {dupes}"
    assert ids == sorted(ids), f"ids not increasing: {ids}"
    assert any(e["opens"] >= 2 and e["type"] == "delta" for e in raw), (
        "no delta arrived after the reconnect: the test did not act mid-answer"
    )

    end = [e["data"] for e in raw if e["type"] == "turn_end"]
    assert len(end) == 1 and end[0]["status"] == "completed", end
    tid = end[0]["turn_id"]
    assembled = ""
    for e in raw:
        if e["type"] == "delta" and e["data"]["turn_id"] == tid:
            d = e["data"]
            assert d["offset"] == len(assembled), (
                f"delta seq {d['seq']} at offset {d['offset']}, expected {len(assembled)} (gap or overlap)"
            )
            assembled += d["text"]
    assert assembled == end[0]["text"]

    client_seqs = [e["seq"] for e in rec["client"]]
    assert client_seqs == sorted(set(client_seqs))
    assert [e["text"] for e in rec["client"] if e["type"] == "turn_end"] == [end[0]["text"]]
    assert turn_text == end[0]["text"]
    states = rec["clientStates"]
    first = states.index("connected")
    assert states[-1] == "connected" and len(states[first:]) > 2, f"the client did not reconnect: {states}"

    resp = await page.request.get(
        f"{browser_stack.url}/v1/sessions/{sid}", headers={"Authorization": f"Bearer {token}"}
    )
    past = [m for m in (await resp.json())["messages"] if m["role"] == "assistant" and m["turn_id"] == tid]
    assert len(past) == 1 and past[0]["text"] == end[0]["text"]
    assert errors == []
