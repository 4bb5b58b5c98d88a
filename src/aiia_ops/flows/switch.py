"""Every change to nginx and PgBouncer: one host-wide lock, upstreams from recorded state.

A switch (deploy, rollback, recovery, `invoke setup`/`up`) takes the host-wide `switch`
lock, records its environment's new upstream in `<state>/switch/<env>.json` (atomically),
then renders every virtual host from the recorded switch state of EVERY environment, tests
the config, reloads nginx (and PgBouncer if its files changed), and lets the lock go. So a
staging deploy during prod's drain renders prod's upstream as prod's deploy recorded it,
never as the containers it happens to see. An environment that never switched since this
mechanism exists is rendered from what the engine shows under its final name.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from aiia_ops.commands import app as apps
from aiia_ops.commands import docker as cmd
from aiia_ops.commands import journal as jn
from aiia_ops.commands.render import HostFile, host_files
from aiia_ops.host import lock as locks
from aiia_ops.host.files import sync_files
from aiia_ops.host.releases import now_iso
from aiia_ops.host.runners import Runner
from aiia_ops.model import Stack
from aiia_ops.model.secrets import Secrets

SWITCH_WAIT = 180.0  # seconds a switch waits for another one (a render + reload: seconds)


def inspect_release(runner: Runner, stack: Stack, name: str) -> apps.Running | None:
    """What the engine says about app container `name` (None: there is none)."""
    result = runner.query(apps.inspect_container(name))
    if not result.ok or not result.stdout.strip():
        return None
    return apps.parse_inspect(result.stdout, stack.network.name)


def live_upstreams(runner: Runner, stack: Stack) -> dict[str, str]:
    """Where the engine's final-name containers are: each environment's live release."""
    lives = {
        env.name: inspect_release(runner, stack, env.container)
        for env in stack.environments.values()
    }
    return apps.upstreams(stack, lives)


def recorded(runner: Runner, state_dir: str, env: str) -> jn.SwitchState | None:
    return jn.parse_switch(runner.read_file(jn.switch_path(state_dir, env)))


def upstreams(runner: Runner, stack: Stack, state_dir: str) -> dict[str, str]:
    """Every environment's upstream: recorded switch state first, the engine otherwise."""
    names = list(stack.environments)
    states = {env: recorded(runner, state_dir, env) for env in names}
    missing = [e for e in names if states[e] is None]
    engine = live_upstreams(runner, stack) if missing else {}
    return jn.switched_upstreams(names, states, engine)


def write_host_files(
    runner: Runner, stack: Stack, secrets: Secrets, state_dir: str, ups: dict[str, str]
) -> list[str]:
    from aiia_ops.host.git import shared_image_tags

    files = host_files(stack, secrets, state_dir, shared_image_tags(stack), ups)
    return sync_files(runner, files)


def app_files(stack: Stack, secrets: Secrets, state_dir: str, env_name: str) -> list[HostFile]:
    """One environment's own files: its config dir (gunicorn.conf.py) and its env file."""
    from aiia_ops.commands.compose import config_dir_name, service_key
    from aiia_ops.host.git import shared_image_tags

    env = stack.environment(env_name)
    root = state_dir.rstrip("/")
    mine = (f"{root}/config/{config_dir_name(env)}/", f"{root}/env/{service_key(env)}.env")
    files = host_files(stack, secrets, state_dir, shared_image_tags(stack))
    return [f for f in files if f.path.startswith(mine)]


@contextmanager
def switch_lock(runner: Runner, state_dir: str, out: Callable[[str], None] = print) -> Iterator:
    """The host-wide lock of every render + check + reload (waits for another switch)."""
    with locks.holding(
        runner, state_dir, jn.SWITCH_LOCK, action="switch", wait=SWITCH_WAIT, out=out
    ) as info:
        yield info


def nginx_workers(runner: Runner, stack: Stack) -> set[str]:
    return apps.parse_workers(runner.query(apps.nginx_processes(stack)).stdout)


def switch(
    runner: Runner,
    stack: Stack,
    secrets: Secrets,
    state_dir: str,
    *,
    env: str | None = None,
    upstream: str = "",
    release: str = "",
    container: str = "",
    reload: bool = True,
    out: Callable[[str], None] = print,
    before_record: Callable[[], None] | None = None,
) -> set[str]:
    """Record `env`'s upstream (if given), render every vhost from the recorded state and
    reload, under the switch lock. Returns nginx's workers from before the reload (they
    drain what they still have for the previous upstream)."""
    with switch_lock(runner, state_dir, out):
        if env is not None:
            if before_record:
                before_record()
            state = jn.SwitchState(env, upstream, release, container, now_iso())
            runner.write_file(jn.switch_path(state_dir, env), state.to_json(), mode=0o644)
            out(f"   switch state recorded: {env} -> {upstream} ({release or '?'})")
        changed = write_host_files(
            runner, stack, secrets, state_dir, upstreams(runner, stack, state_dir)
        )
        old = nginx_workers(runner, stack) if reload else set()
        if reload:
            for argv in cmd.nginx_reload(stack):
                runner.run(argv)
            if any("/config/pgbouncer/" in path for path in changed):
                runner.run(cmd.pgbouncer_reload(stack))
            out("   nginx reloaded")
        return old


def wait_drained(
    runner: Runner, stack: Stack, old: set[str] | None, seconds: float, sleep=time.sleep
) -> bool:
    """nginx's workers from before a reload (`old`), or, when that is unknown (a killed run's
    reload), every worker shutting down, are gone. True if they went within `seconds`."""

    def left() -> set[str]:
        text = runner.query(apps.nginx_processes(stack)).stdout
        if old is None:
            return apps.parse_draining(text)
        return old & apps.parse_workers(text)

    deadline = time.monotonic() + seconds
    while left():
        if time.monotonic() > deadline:
            return False
        sleep(0.2)
    return True
