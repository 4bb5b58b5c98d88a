"""What every task shares, declared once: the `task` decorator (the shared --stack option,
user errors as one clean exit), loading the stack and the state dir, the current version."""

from __future__ import annotations

import functools
import inspect

import invoke
from invoke import Exit

from aiia_ops.errors import OpsError
from aiia_ops.host.git import head_version
from aiia_ops.model import Stack, load_stack
from aiia_ops.model.placement import refuse_multi_host
from aiia_ops.model.state import StateDir, local_state_dir

STACK_HELP = "stack file (default: $AIIA_STACK, else deploy/stack.yml)"
PROFILE_HELP = "machine profile: profiles/NAME.yml beside the stack file (default: $AIIA_PROFILE)"


def user_errors(fn):
    """Turn an OpsError into `error: <message>` and exit 1: what to do, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except OpsError as exc:
            raise Exit(f"error: {exc}", code=1) from None

    return wrapper


def task(*args, help: dict[str, str] | None = None, **kwargs):
    """`invoke.task` with the project's conventions: every task that takes `stack` documents
    it the same way, and every user error leaves through `user_errors`."""

    def decorate(fn):
        merged = dict(help or {})
        if "stack" in inspect.signature(fn).parameters:
            merged.setdefault("stack", STACK_HELP)
        if "profile" in inspect.signature(fn).parameters:
            merged.setdefault("profile", PROFILE_HELP)
        return invoke.task(help=merged, **kwargs)(user_errors(fn))

    if args and callable(args[0]):
        return decorate(args[0])
    return decorate


def load(
    stack: str | None, profile: str | None = None, swarm: bool = False, any_hosts: bool = False
) -> tuple[Stack, StateDir]:
    """The stack file (--stack, $AIIA_STACK, deploy/stack.yml) with its profile (--profile,
    $AIIA_PROFILE), and this host's state dir. A stack on several hosts is refused: the
    tasks that use this drive one engine (`swarm`: unless the task has a swarm runtime
    path and the stack says `runtime: swarm`; `any_hosts`: a task that only works on this
    machine whatever the placement, such as building the images the hosts are sent)."""
    model = load_stack(stack, profile)
    if not any_hosts and not (swarm and model.runtime == "swarm"):
        refuse_multi_host(model, "this task")
    return model, local_state_dir(model)


def current_version() -> str:
    """The git commit of this checkout (short), with -dirty when there are local changes."""
    return head_version()
