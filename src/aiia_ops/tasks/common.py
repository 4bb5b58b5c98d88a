"""What every task shares: user errors as clean exits, the current version."""

from __future__ import annotations

import functools

from invoke import Exit

from ..errors import OpsError
from ..versions import head_version


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
    return head_version()
