"""Where a deploy is, and what to do with what a killed one left: pure data and decisions.

A deploy writes its journal (`<state>/journal/deploy-<env>.json`) at every step boundary,
and the switch state of its environment (`<state>/switch/<env>.json`: the address nginx is
told to serve) each time it points nginx somewhere. Neither is trusted alone: before acting,
the recovery (in the same run, or the next run after a SIGKILL) reads what the engine shows
now and decides with `reconcile()`:

- the container at the served address runs: it stays served, and is never removed;
  a `-next` one is adopted (the old one, no longer served, is stopped and removed, and the
  served one renamed to the environment's name);
- the served one is gone or stopped but another release runs: nginx is pointed at the one
  that runs (the final name first), then the other is cleaned up;
- nothing runs: the final-name container is started again (never nginx at a dead address).

In the same run, a failure after the switch prefers the previous release while it still
runs (the switch-back); a killed run's leftovers are resolved in favour of what is served.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

from aiia_ops.commands.app import Running

# Step names, in order: the journal's `step` is the last boundary passed.
STEPS = (
    "lock",
    "backup",
    "image",
    "migrate",
    "collectstatic",
    "start",
    "health",
    "switch",
    "reload",
    "drain",
    "retire",
    "record",
    "done",
)


def journal_path(state_dir: str, env: str) -> str:
    return f"{str(state_dir).rstrip('/')}/journal/deploy-{env}.json"


def switch_path(state_dir: str, env: str) -> str:
    return f"{str(state_dir).rstrip('/')}/switch/{env}.json"


def switch_dir(state_dir: str) -> str:
    return f"{str(state_dir).rstrip('/')}/switch"


SWITCH_LOCK = "switch"  # host-wide: every render + check + reload of nginx and PgBouncer


@dataclass(frozen=True)
class Journal:
    env: str
    action: str
    tag: str
    step: str
    new_name: str  # the -next container of this run
    new_address: str = ""
    old_name: str = ""  # the live release when the run started ("" if none)
    old_address: str = ""
    old_release: str = ""
    switched: bool = False  # nginx was told to serve new_address
    pid: int = 0
    started: str = ""

    def at(self, step: str, **changes) -> Journal:
        if step not in STEPS:
            raise ValueError(f"unknown deploy step {step!r}")
        return Journal(**{**asdict(self), **changes, "step": step})

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"

    @property
    def finished(self) -> bool:
        return self.step == "done"


def parse_journal(data: bytes | str | None) -> Journal | None:
    """A journal from its file; None if absent or unreadable (then the engine alone decides)."""
    if not data:
        return None
    try:
        raw = json.loads(data)
        known = {k: raw[k] for k in Journal.__dataclass_fields__ if k in raw}
        journal = Journal(**known)
    except (ValueError, TypeError):
        return None
    return journal if journal.step in STEPS else None


@dataclass(frozen=True)
class SwitchState:
    """What nginx is told to serve for one environment."""

    env: str
    upstream: str  # address:port
    release: str = ""
    container: str = ""
    at: str = ""

    @property
    def address(self) -> str:
        return self.upstream.rsplit(":", 1)[0]

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"


def parse_switch(data: bytes | str | None) -> SwitchState | None:
    if not data:
        return None
    try:
        raw = json.loads(data)
        state = SwitchState(**{k: raw[k] for k in SwitchState.__dataclass_fields__ if k in raw})
    except (ValueError, TypeError):
        return None
    return state if isinstance(state.upstream, str) and ":" in state.upstream else None


def switched_upstreams(
    envs: list[str], recorded: dict[str, SwitchState | None], engine: dict[str, str]
) -> dict[str, str]:
    """Upstreams for every environment: its recorded switch state, else (never switched
    since this mechanism exists) what the engine shows under the final name."""
    out = {}
    for env in envs:
        state = recorded.get(env)
        if state is not None:
            out[env] = state.upstream
        elif env in engine:
            out[env] = engine[env]
    return out


# -- reconcile: what the engine shows + what is served -> what to do ------------------------


@dataclass(frozen=True)
class Action:
    """One change: kind in switch | start | stop | remove | rename."""

    kind: str
    name: str = ""  # container
    to: str = ""  # rename: the new name; switch: the address
    release: str = ""  # switch: the release served there

    def __str__(self) -> str:
        if self.kind == "switch":
            return f"point nginx at {self.name} ({self.to})"
        if self.kind == "rename":
            return f"rename {self.name} to {self.to}"
        return f"{self.kind} {self.name}"


@dataclass(frozen=True)
class Plan:
    actions: tuple[Action, ...] = ()
    serves: Running | None = None  # the container that serves when the plan is done
    why: str = ""
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def changes(self) -> bool:
        return bool(self.actions)


def _runs(c: Running | None) -> bool:
    return bool(c and c.running)


def reconcile(
    final_name: str,
    final: Running | None,
    nxt: Running | None,
    served: str | None,
    *,
    prefer_old: bool = False,
    drain_seconds: int = 30,
) -> Plan:
    """Given the environment's container under its final name, its `-next` container, and
    the address nginx is told to serve (`served`, None if unknown), the changes that leave
    exactly one release, the served one, running under the final name.

    `prefer_old`: the same run failed after its switch (health through nginx ...): go back
    to the final-name release if it still runs. Otherwise what is served wins.
    Invariants: nginx is never pointed at a stopped container; the container that serves
    at the end is never stopped or removed.
    """
    by_addr = {c.address: c for c in (final, nxt) if c is not None and c.address}
    current = by_addr.get(served or "")
    notes: list[str] = []

    # 1. Which one serves at the end.
    if prefer_old and _runs(final):
        keep = final
        why = f"back to {final.release} ({final.name}): it still runs"
    elif _runs(current):
        keep = current
        why = f"{current.release} ({current.name}) is served and runs"
    elif _runs(final):
        keep = final
        why = f"{final.name} runs; the served address {served or '(none)'} has no running release"
    elif _runs(nxt):
        keep = nxt
        why = f"{nxt.name} is the only release running"
    elif final is not None:
        keep = final
        why = f"nothing runs: {final.name} ({final.release}) is started again"
    elif nxt is not None:
        keep = nxt
        why = f"nothing runs: {nxt.name} ({nxt.release}) is started again"
    else:
        return Plan(why="no release container exists", serves=None)

    actions: list[Action] = []
    if not keep.running:
        actions.append(Action("start", keep.name))
    if served != keep.address:
        actions.append(Action("switch", keep.name, keep.address, keep.release))
    other = nxt if keep is final else final
    if other is not None:
        # Stopped gracefully (after nginx drained) only if it served requests: the previous
        # release, or the one nginx is being pointed away from. A -next never served just goes.
        if other.running and (other is final or other.address == served):
            actions.append(Action("stop", other.name, str(drain_seconds)))
        actions.append(Action("remove", other.name))
    if keep.name != final_name:
        actions.append(Action("rename", keep.name, final_name))
        notes.append(f"adopting {keep.name} ({keep.release}): nginx serves it")
    serves = Running(final_name, True, keep.release, keep.address, keep.health)
    return Plan(tuple(actions), serves, why, tuple(notes))


def parse_upstream_address(upstream: str | None) -> str | None:
    return upstream.rsplit(":", 1)[0] if upstream and ":" in upstream else None
