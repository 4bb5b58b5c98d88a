"""What every procedure shows people: each step with its duration, and the one confirmation
prompt that destructive operations ask before they change anything."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field

from aiia_ops.errors import OpsError
from aiia_ops.flows.output import paint


@dataclass
class Steps:
    """Prints each step as it runs, with its duration."""

    out: Callable[[str], None] = print
    timings: list[tuple[str, float]] = field(default_factory=list)

    def run(self, title: str, fn: Callable[[], object]) -> object:
        self.out(f"-> {title}")
        started = time.monotonic()
        try:
            result = fn()
        except BaseException:
            self.out(paint(f"   failed after {time.monotonic() - started:.1f}s", "error"))
            raise
        took = time.monotonic() - started
        self.timings.append((title, took))
        self.out(f"   done in {took:.1f}s")
        return result

    @contextmanager
    def step(self, title: str):
        """`with steps.step(title):` for a step written as a block."""
        self.out(f"-> {title}")
        started = time.monotonic()
        try:
            yield
        except BaseException:
            self.out(paint(f"   failed after {time.monotonic() - started:.1f}s", "error"))
            raise
        took = time.monotonic() - started
        self.timings.append((title, took))
        self.out(f"   done in {took:.1f}s")


def confirm(question: str, *, yes: bool, expected: str = "y", what: str = "") -> None:
    """Ask before a destructive change. `--yes` skips the question; without a terminal and
    without `--yes` the answer is no. `expected` is the word to type ("y", or a name)."""
    if yes:
        return
    refusal = f"refusing to {what or 'go on'} without confirmation; pass --yes"
    if not sys.stdin.isatty():
        raise OpsError(refusal)
    hint = " [y/N] " if expected == "y" else f" Type '{expected}' to go on: "
    answer = input(question.rstrip() + hint).strip()
    if (answer.lower() if expected == "y" else answer) != expected:
        raise OpsError("not confirmed; nothing was changed")
