"""A stop flag that a signal handler may set, for the blocking (non-asyncio) main loops of the
dev tools (`tidewire dev`, `tidewire cluster`, `python -m tidewire.dev.infra up`).

`threading.Event.set()` from a signal handler can deadlock: Python runs the handler in the main
thread between bytecodes, so a signal that lands while the main thread is inside `Event.wait()`
holding the Event's (non-reentrant) lock makes the handler wait for a lock its own thread holds,
forever. That is how a `tidewire dev` ignored Ctrl-C once in CI. This flag holds no lock: `set()`
stores a bool and writes one byte to a non-blocking self-pipe, and `wait()` is a `select()` on
that pipe (PEP 475 retries the interrupted `select` after the handler ran, and the byte is there).
"""

from __future__ import annotations

import os
import select
import signal
from types import FrameType


class StopFlag:
    def __init__(self) -> None:
        self._r, self._w = os.pipe()
        os.set_blocking(self._r, False)
        os.set_blocking(self._w, False)
        self._set = False

    def install(self, *signals: signal.Signals) -> StopFlag:
        """Makes each of `signals` set the flag (call from the main thread)."""
        for sig in signals:
            signal.signal(sig, self._on_signal)
        return self

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.set()

    def set(self) -> None:
        self._set = True
        try:
            os.write(self._w, b"!")
        except BlockingIOError:  # the pipe is full of earlier wake-ups: the waiter wakes anyway
            pass
        except OSError:  # closed
            pass

    def clear(self) -> None:
        self._set = False
        try:
            while os.read(self._r, 4096):
                pass
        except (BlockingIOError, OSError):
            pass

    def is_set(self) -> bool:
        return self._set

    def wait(self, timeout: float | None = None) -> bool:
        """True once set; otherwise sleeps up to `timeout` seconds (returning early when set)."""
        if not self._set:
            try:
                select.select([self._r], [], [], timeout)
            except (OSError, ValueError):  # closed under us: behave like a plain sleep that ended
                pass
        return self._set

    def close(self) -> None:
        for fd in (self._r, self._w):
            try:
                os.close(fd)
            except OSError:
                pass
