"""`StopFlag` can be set from a signal handler at any instant without hanging the waiter.

The child hammers its own main thread with SIGALRM every 0.7 ms for 2 s while that thread loops on
`wait()`/`clear()`; each handler sets the flag. With `threading.Event` in place of `StopFlag` this
very harness hung (the handler blocked on the lock its own thread held inside `wait()`) in 3 of 3
runs; a hang here shows as the child's faulthandler traceback.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

CHILD = textwrap.dedent(
    """
    import faulthandler, signal, sys, time
    from tidewire.dev.stopflag import StopFlag

    faulthandler.dump_traceback_later(15, exit=True)
    flag = StopFlag()
    fired = 0

    def on_alarm(*_):
        global fired
        fired += 1
        flag.set()

    signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, 0.0007, 0.0007)
    woke = 0
    t0 = time.monotonic()
    while time.monotonic() - t0 < 2.0:
        if flag.wait(0.0001):
            woke += 1
        flag.clear()
    signal.setitimer(signal.ITIMER_REAL, 0, 0)
    print(fired, woke)
    """
)


def test_a_signal_handler_setting_the_flag_never_hangs_the_waiting_thread() -> None:
    try:
        done = subprocess.run(
            [sys.executable, "-c", CHILD], cwd=ROOT, capture_output=True, text=True, timeout=30
        )
    except subprocess.TimeoutExpired as e:
        raise AssertionError(f"the waiting thread hung under signals: {e.stderr!r}") from None
    assert done.returncode == 0, f"child failed (a hang prints its traceback):\n{done.stderr}"
    fired, woke = (int(x) for x in done.stdout.split())
    assert fired > 500, f"only {fired} signals landed in 2 s: the harness did not exercise the flag"
    assert woke > 0, "no wait() ever saw the flag set by a handler"


def test_wait_returns_early_when_set_and_times_out_when_not() -> None:
    from tidewire.dev.stopflag import StopFlag

    flag = StopFlag()
    try:
        assert flag.wait(0.01) is False
        flag.set()
        assert flag.is_set() and flag.wait(5.0) is True
        flag.clear()
        assert not flag.is_set() and flag.wait(0.0) is False
    finally:
        flag.close()
