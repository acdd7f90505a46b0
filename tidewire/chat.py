"""`tidewire chat`: a line-based terminal chat on top of `TidewireClient`.

Each line read from stdin is sent as a message; the answer is printed as its deltas arrive. On a
terminal, status, tool and connection lines are shown dimmed between the answers; when stdout is
not a terminal they go to stderr instead, so stdout holds exactly the answers (one per turn, each
ending with a newline), which is what scripts and tests read. With piped stdin each line waits for
its answer before the next is sent, and the chat exits at end of input after the last answer.

Commands: `/stop` (stop the current turn), `/history`, `/quit`. Ctrl-C stops a streaming turn
(twice: quit); at the prompt it quits.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
import threading
import uuid
from collections import OrderedDict
from collections.abc import Awaitable
from pathlib import Path
from typing import Any, TextIO, TypeVar

import aiohttp

from proto import client
from tidewire.client import TidewireClient, TidewireError

__all__ = ["main", "run_chat"]

DEV_CONFIG = Path(".tidewire") / "dev.json"
HELP = "commands: /stop  /history  /quit"
_TURNS_KEPT = 256
_T = TypeVar("_T")


class _Screen:
    """Keeps answer text and "meta" lines (status, tools, connection) from running into each other."""

    def __init__(self, out: TextIO, err: TextIO, *, prompt: bool) -> None:
        self._out = out
        self._err = err
        self.tty = out.isatty()
        self._prompt = prompt
        self._mid_line = False

    def text(self, s: str) -> None:
        if s:
            self._out.write(s)
            self._out.flush()
            self._mid_line = not s.endswith("\n")

    def end_line(self) -> None:
        if self._mid_line:
            self.text("\n")

    def meta(self, line: str) -> None:
        if self.tty:
            self.end_line()
            self.text(f"\x1b[2m{line}\x1b[0m\n")
        else:
            self._err.write(line + "\n")
            self._err.flush()

    def prompt(self) -> None:
        if self._prompt:
            self.end_line()
            self.text("> ")

    def line_entered(self) -> None:
        """The terminal echoed the user's newline: the cursor is at the start of a line."""
        self._mid_line = False


class _StdinLines:
    """Lines of stdin, read on demand by a daemon thread.

    A thread works for terminals, pipes and regular files alike, and being a daemon it never keeps
    the process alive while blocked in `readline` (asyncio's pipe transport cannot read files, and
    would leave a terminal in non-blocking mode).
    """

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._loop = asyncio.get_running_loop()
        self._lines: asyncio.Queue[str] = asyncio.Queue()
        self._want = threading.Semaphore(0)
        self._requested = False
        self._eof = False
        threading.Thread(target=self._read, name="tidewire-chat-stdin", daemon=True).start()

    def _read(self) -> None:
        while True:
            self._want.acquire()
            try:
                line = self._stream.readline()
            except (OSError, ValueError):
                line = ""
            try:
                self._loop.call_soon_threadsafe(self._lines.put_nowait, line)
            except RuntimeError:  # the loop is closed: the chat is over
                return
            if not line:
                return

    async def next(self) -> str | None:
        """The next line without its newline, or None at end of input."""
        if self._eof:
            return None
        if not self._requested:
            self._requested = True
            self._want.release()
        line = await self._lines.get()
        self._requested = False
        if not line:
            self._eof = True
            return None
        return line.rstrip("\r\n")


class _Renderer:
    """Prints the session's events; tells the input loop when each turn has been printed in full."""

    def __init__(self, tw: TidewireClient, screen: _Screen, own_ids: set[str]) -> None:
        self._tw = tw
        self._screen = screen
        self._own_ids = own_ids
        self._printed: OrderedDict[str, int] = OrderedDict()  # code points of each turn already shown
        self._tools: OrderedDict[str, str] = OrderedDict()
        self._ended: OrderedDict[str, None] = OrderedDict()
        self._waiters: dict[str, asyncio.Future[None]] = {}
        self.pending: set[str] = set()  # our turns not ended yet

    async def run(self) -> None:
        async for event in self._tw.events():
            self.render(event)

    async def wait(self, turn_id: str) -> None:
        """Returns once the turn's `turn_end` has been printed."""
        if turn_id in self._ended:
            return
        waiter = self._waiters.get(turn_id)
        if waiter is None:
            waiter = self._waiters[turn_id] = asyncio.get_running_loop().create_future()
        await asyncio.shield(waiter)

    def render(self, event: client.Event) -> None:
        screen = self._screen
        if isinstance(event, client.Message):
            if event.client_msg_id not in self._own_ids:
                screen.meta(f"> {event.text}")
        elif isinstance(event, client.Delta):
            self._show_answer(event.turn_id)
        elif isinstance(event, client.Status):
            screen.meta(f"… {event.text}")
        elif isinstance(event, client.ToolCall):
            _bounded_put(self._tools, event.call_id, event.name)
            args = json.dumps(event.args, ensure_ascii=False)
            screen.meta(f"[tool {event.name}({_short(args, 60)})]")
        elif isinstance(event, client.ToolResult):
            name = self._tools.pop(event.call_id, "tool")
            screen.meta(f"[{name} {'ok' if event.ok else 'failed'}: {_short(event.text, 80)}]")
        elif isinstance(event, client.TurnEnd):
            self._end_turn(event)

    def _show_answer(self, turn_id: str) -> None:
        text = self._tw.turn_text(turn_id)
        shown = self._printed.get(turn_id, 0)
        if len(text) > shown:
            self._screen.text(text[shown:])
            _bounded_put(self._printed, turn_id, len(text))

    def _end_turn(self, end: client.TurnEnd) -> None:
        shown = self._printed.pop(end.turn_id, 0)
        so_far = self._tw.turn_text(end.turn_id)[:shown]
        if end.text.startswith(so_far):
            self._screen.text(end.text[shown:])  # turn_end.text is the stable whole answer
        else:
            self._screen.end_line()
            self._screen.meta("[the full answer differs from what was streamed:]")
            self._screen.text(end.text)
        if not end.text.endswith("\n"):
            self._screen.text("\n")
        if end.status != "completed":
            self._screen.meta(f"[{end.status.replace('_', ' ')}]")
        _bounded_put(self._ended, end.turn_id, None)
        waiter = self._waiters.pop(end.turn_id, None)
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        if end.turn_id in self.pending:
            self.pending.discard(end.turn_id)
            if not self.pending:
                self._screen.prompt()


def _bounded_put(d: OrderedDict[str, Any], key: str, value: Any) -> None:
    d[key] = value
    d.move_to_end(key)
    while len(d) > _TURNS_KEPT:
        d.popitem(last=False)


def _short(text: str, limit: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


async def _first(aw: Awaitable[_T], stop: asyncio.Event) -> _T | None:
    """`aw`'s result, or None if `stop` is set first (then `aw` is cancelled)."""
    task = asyncio.ensure_future(aw)
    stopped = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({task, stopped}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopped.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    return task.result() if task.done() and not task.cancelled() else None


async def run_chat(
    base_url: str, token: str, session_id: str | None, delivery: str, *, turn_timeout_s: float = 600.0
) -> None:
    """Runs the chat until `/quit`, Ctrl-C at the prompt, or end of input (after the last answer).

    With piped input a line whose answer has not ended after `turn_timeout_s` (the server is
    unreachable, say) is given up on, so a script never hangs forever.
    """
    interactive = sys.stdin.isatty()
    screen = _Screen(sys.stdout, sys.stderr, prompt=interactive)

    def on_state(state: str, retry_in_s: float | None) -> None:
        if state == "reconnecting" and retry_in_s is not None:
            screen.meta(f"[reconnecting in {retry_in_s:.1f}s]")
        elif state == "connected":
            screen.meta("[connected]")
        elif state == "reset":
            screen.meta("[the server could not resume this session; /history shows it]")

    tw = TidewireClient(base_url, token, session_id=session_id, delivery=delivery, on_state=on_state)
    await tw.connect()
    screen.meta(f"[session {tw.session_id}]  {HELP}")
    own_ids: set[str] = set()
    renderer = _Renderer(tw, screen, own_ids)
    quit_now = asyncio.Event()
    stopping: set[str] = set()

    async def answered(turn_id: str) -> None:
        try:
            await asyncio.wait_for(renderer.wait(turn_id), turn_timeout_s)
        except TimeoutError:
            renderer.pending.discard(turn_id)
            screen.meta(f"[no answer within {turn_timeout_s:g}s]")

    tasks: set[asyncio.Task[Any]] = set()

    async def stop_turn(turn_id: str | None) -> None:
        try:
            await tw.stop(turn_id)
        except (TidewireError, TimeoutError, ConnectionError) as e:
            screen.meta(f"[could not stop: {e}]")

    def on_interrupt() -> None:
        turn = tw.current_turn or next(iter(renderer.pending), None)
        if turn is None or turn in stopping:
            quit_now.set()
            return
        stopping.add(turn)
        screen.meta("[stopping]")
        task = asyncio.ensure_future(stop_turn(turn))
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    loop = asyncio.get_running_loop()
    with contextlib.suppress(NotImplementedError, RuntimeError):
        loop.add_signal_handler(signal.SIGINT, on_interrupt)
    render_task = asyncio.create_task(renderer.run())
    lines = _StdinLines(sys.stdin)
    try:
        screen.prompt()
        while not quit_now.is_set():
            line = await _first(lines.next(), quit_now)
            if line is not None:
                screen.line_entered()
            if line is None:
                if not quit_now.is_set():  # end of input: let the answers finish, then leave
                    for turn in list(renderer.pending):
                        await _first(answered(turn), quit_now)
                break
            if not line.strip():
                screen.prompt()
                continue
            if line.startswith("/"):
                await _command(line.strip(), tw, screen, quit_now, stop_turn)
                if not renderer.pending:
                    screen.prompt()
                continue
            cmid = str(uuid.uuid4())
            own_ids.add(cmid)
            try:
                ack = await tw.send(line, client_msg_id=cmid)
            except (TidewireError, TimeoutError) as e:
                screen.meta(f"[not sent: {e}]")
                screen.prompt()
                continue
            renderer.pending.add(ack.turn_id)
            if not interactive:
                await _first(answered(ack.turn_id), quit_now)
    finally:
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.remove_signal_handler(signal.SIGINT)
        for task in list(tasks):
            with contextlib.suppress(Exception):
                await asyncio.wait_for(task, 2)
        await tw.close()
        with contextlib.suppress(asyncio.TimeoutError, TidewireError, asyncio.CancelledError):
            await asyncio.wait_for(render_task, 2)  # prints what was already queued, then ends
        screen.end_line()


async def _command(
    line: str, tw: TidewireClient, screen: _Screen, quit_now: asyncio.Event, stop_turn: Any
) -> None:
    name = line.split()[0]
    if name == "/quit":
        quit_now.set()
    elif name == "/stop":
        await stop_turn(tw.current_turn)
    elif name == "/history":
        try:
            history = await tw.history()
        except (TidewireError, TimeoutError, aiohttp.ClientError) as e:
            screen.meta(f"[history unavailable: {e}]")
            return
        for m in history.messages:
            suffix = "" if m.status in ("completed", "") or m.role == "user" else f" [{m.status}]"
            screen.text(f"{m.role}: {m.text}{suffix}\n")
    else:
        screen.meta(f"[unknown command {name}; {HELP}]")


def _dev_defaults() -> dict[str, str]:
    """`.tidewire/dev.json` in the current directory, written by `tidewire dev`."""
    try:
        data = json.loads(DEV_CONFIG.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return {k: v for k, v in data.items() if isinstance(v, str)} if isinstance(data, dict) else {}


def main(argv: list[str] | None = None) -> None:
    """Entry point of `tidewire chat` (argv excludes the subcommand)."""
    dev = _dev_defaults()
    parser = argparse.ArgumentParser(prog="tidewire chat", description="Chat with a Tidewire session.")
    parser.add_argument(
        "--url",
        default=dev.get("url") or os.environ.get("TIDEWIRE_URL"),
        help="gateway base URL, e.g. http://127.0.0.1:8080 (default: .tidewire/dev.json)",
    )
    parser.add_argument(
        "--token",
        default=dev.get("token") or os.environ.get("TIDEWIRE_TOKEN"),
        help="bearer token (default: .tidewire/dev.json)",
    )
    parser.add_argument("--session", default=None, help="resume this session id (default: a new session)")
    parser.add_argument("--delivery", default="tokens", choices=("tokens", "phrases", "batched"))
    parser.add_argument(
        "--turn-timeout",
        type=float,
        default=600.0,
        metavar="SECONDS",
        help="with piped input, give up on an answer after this long (default: 600)",
    )
    args = parser.parse_args(argv)
    if not args.url or not args.token:
        parser.error("no --url/--token given and no .tidewire/dev.json here (run `tidewire dev` first)")
    try:
        asyncio.run(
            run_chat(args.url, args.token, args.session, args.delivery, turn_timeout_s=args.turn_timeout)
        )
    except KeyboardInterrupt:
        raise SystemExit(130) from None
    except (TidewireError, ConnectionError, TimeoutError, aiohttp.ClientError) as e:
        print(f"tidewire chat: {str(e) or type(e).__name__}", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
