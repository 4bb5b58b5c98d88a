"""What every task shares: user errors as clean exits, the current version."""

from __future__ import annotations

import functools
import subprocess

from invoke import Exit

from .. import REPO_ROOT
from ..errors import OpsError


def user_errors(fn):
    """Turn an OpsError into a message and exit 1: people see what to do, not a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except OpsError as exc:
            raise Exit(f"error: {exc}", code=1) from None

    return wrapper


def current_version() -> str:
    """The git commit of this checkout (short), with -dirty when there are local changes."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(REPO_ROOT), *args], capture_output=True, text=True
        ).stdout.strip()

    commit = git("rev-parse", "--short=12", "HEAD") or "unknown"
    dirty = git("status", "--porcelain", "--untracked-files=no")
    return f"{commit}-dirty" if dirty else commit
