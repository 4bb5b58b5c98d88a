"""Signals as exceptions, so a long operation's recovery runs however it is stopped.

Python turns SIGINT (Ctrl-C) into KeyboardInterrupt but dies silently on SIGTERM (`kill`, CI
cancelling a job) and SIGHUP (the SSH session of the operator hanging up): the deploy's
`except BaseException` recovery never runs. Inside `interruptible()`, SIGTERM and SIGHUP
raise `Interrupted` instead. Inside `shielded()` (a recovery, a PgBouncer RESUME), SIGINT,
SIGTERM and SIGHUP are held until the block ends, so a second Ctrl-C cannot cut the
recovery short; the held signal is raised afterwards. SIGKILL cannot be caught: that case
is covered by the journal and the next run adopting what was left.

Only the main thread can set handlers; elsewhere both are no-ops.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

CAUGHT = (signal.SIGTERM, signal.SIGHUP)
HELD = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Interrupted(BaseException):
    """A SIGTERM or SIGHUP arrived. A BaseException like KeyboardInterrupt: `except
    Exception` does not swallow it; `except BaseException` recoveries see it."""

    def __init__(self, signum: int):
        self.signum = signum
        super().__init__(f"interrupted by {signal.Signals(signum).name}")


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def _raise(signum, _frame):
    raise Interrupted(signum)


@contextmanager
def interruptible() -> Iterator[None]:
    """SIGTERM and SIGHUP raise `Interrupted` inside this block (nested blocks are fine)."""
    if not _main_thread():
        yield
        return
    before = {s: signal.getsignal(s) for s in CAUGHT}
    for s in CAUGHT:
        signal.signal(s, _raise)
    try:
        yield
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)


@contextmanager
def shielded() -> Iterator[None]:
    """Hold SIGINT, SIGTERM and SIGHUP until the block ends, then raise the first one held
    (as KeyboardInterrupt or `Interrupted`), unless the block is already raising."""
    if not _main_thread():
        yield
        return
    held: list[int] = []
    before = {s: signal.getsignal(s) for s in HELD}
    for s in HELD:
        signal.signal(s, lambda signum, _frame: held.append(signum))
    raising = False
    try:
        yield
    except BaseException:
        raising = True
        raise
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)
        if held and not raising:
            if held[0] == signal.SIGINT:
                raise KeyboardInterrupt
            raise Interrupted(held[0])
