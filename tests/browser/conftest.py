"""Fixtures for the browser tests: a stack of their own, headless Chromium, gateway kill/restart.

The stack (one gateway on a fixed port, two orchestrators, no tool worker) is module-scoped and not
shared with the integration tests. Chromium is the Debian package at /usr/bin/chromium, driven by
Playwright (Playwright's own browser download cannot work offline); without it the tests are skipped.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from tidewire.dev.infra import Infrastructure
from tidewire.dev.stack import Service, Stack, free_port

try:
    from tests.integration.conftest import make_token, stack_env
except ModuleNotFoundError:  # pytest started as a script: tests/ is on sys.path, the repo root is not
    from integration.conftest import make_token, stack_env  # type: ignore[no-redef]

try:
    from playwright.async_api import Browser, BrowserContext, async_playwright
except ModuleNotFoundError:  # the test module skips itself (pytest.importorskip) with a reason
    async_playwright = None  # type: ignore[assignment]

REPO_ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SCREENSHOTS = REPO_ROOT / "docs" / "screenshots"
HAVE_CHROMIUM = CHROMIUM.exists()

# Records, in every document of a context (so also after a reload), each state of the answers and of
# the connection badge, from a MutationObserver on the whole document: nothing is missed between polls.
RECORDER_JS = """
(() => {
  const rec = (window.__tw = { samples: [], states: [] });
  const snap = () => {
    for (const a of document.querySelectorAll(".assistant[data-turn-id]")) {
      const answer = a.querySelector(".answer");
      const s = { turn: a.dataset.turnId, text: answer ? answer.textContent : "", status: a.dataset.status ?? null };
      const last = rec.samples.findLast((x) => x.turn === s.turn);
      if (!last || last.text !== s.text || last.status !== s.status) rec.samples.push(s);
    }
    const cs = document.getElementById("conn-state");
    if (cs && rec.states.at(-1) !== cs.dataset.state) rec.states.push(cs.dataset.state);
  };
  new MutationObserver(snap).observe(document, {
    subtree: true, childList: true, characterData: true, attributes: true,
    attributeFilter: ["data-state", "data-status"],
  });
})();
"""


@pytest.fixture(scope="module")
def browser_stack(infra: Infrastructure, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    log_dir: Path = tmp_path_factory.mktemp("browser-stack-logs")
    s = Stack(
        infra_env=stack_env(infra), log_dir=log_dir, orchestrators=2, tool_workers=0, http_port=free_port()
    )
    s.start()
    try:
        yield s
    finally:
        s.stop()


class Gateways:
    """Kills the stack's gateway and starts a new one on the same port (the page's origin)."""

    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        self.restarts = 0

    def current(self) -> Service | None:
        alive = [s for s in self.stack.services if s.module == "gateway" and s.alive()]
        return alive[-1] if alive else None

    async def kill(self) -> None:
        svc = self.current()
        assert svc is not None, "no gateway running"
        await asyncio.to_thread(svc.kill)  # SIGKILL: no drain, no close frame

    async def restart(self) -> Service:
        self.restarts += 1
        return await asyncio.to_thread(
            self.stack.add_gateway, f"gateway-r{self.restarts}", self.stack.http_port
        )


@pytest.fixture(scope="module")
def gateways_of(browser_stack: Stack) -> Gateways:
    return Gateways(browser_stack)


@pytest.fixture
async def gateways(gateways_of: Gateways) -> AsyncIterator[Gateways]:
    """Gateway control for one test; a gateway is running again on the stack's port afterwards."""
    yield gateways_of
    if gateways_of.current() is None:
        await gateways_of.restart()


@pytest.fixture(scope="module")
async def browser() -> AsyncIterator[Browser]:
    if not HAVE_CHROMIUM:
        pytest.skip(reason=f"{CHROMIUM} not installed (Debian package `chromium`; see `make browser-deps`)")
    if async_playwright is None:
        pytest.skip(reason="Python package `playwright` is not installed (see `make browser-deps`)")
    async with async_playwright() as p:
        b = await p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            await b.close()


@pytest.fixture
async def context(browser: Browser) -> AsyncIterator[BrowserContext]:
    ctx = await browser.new_context(viewport={"width": 1000, "height": 720})
    ctx.set_default_timeout(20_000)
    await ctx.add_init_script(RECORDER_JS)
    try:
        yield ctx
    finally:
        await ctx.close()


@pytest.fixture
def token() -> str:
    """A subject of its own per test, so the page opens (creates) a fresh session."""
    return make_token(f"browser-{uuid.uuid4().hex[:12]}")


@pytest.fixture(scope="session")
def screenshots() -> Path:
    """docs/screenshots/, where the tests leave the pictures the docs show."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    return SCREENSHOTS
