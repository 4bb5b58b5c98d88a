"""Fault injection for the crash tests: `AIIA_FAILPOINT=<point>:<KILL|TERM|HUP>` makes the
process send itself that signal when it reaches `<point>` (a step boundary a procedure
names, e.g. `restore:paused`). Unset (always, outside the tests), `failpoint()` does
nothing. SIGKILL ends the process there and then, as `kill -9` or the OOM killer would;
SIGTERM and SIGHUP go through the handlers of host/signals.py, as CI cancelling a job or an
SSH session hanging up would."""

from __future__ import annotations

import os
import signal

ENV = "AIIA_FAILPOINT"
SIGNALS = {
    "KILL": signal.SIGKILL,
    "TERM": signal.SIGTERM,
    "HUP": signal.SIGHUP,
    "STOP": signal.SIGSTOP,  # frozen there, holding its locks, until SIGCONT
}


def failpoint(point: str) -> None:
    spec = os.environ.get(ENV, "")
    where, _, sig = spec.rpartition(":")
    if where == point and sig in SIGNALS:
        os.kill(os.getpid(), SIGNALS[sig])
