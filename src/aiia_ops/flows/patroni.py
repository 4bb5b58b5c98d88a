"""db.build, db.up, db.status, db.switchover, db.down: the replicated PostgreSQL of level 4
(Patroni + etcd + HAProxy on `replication.hosts`, commands/patroni.py, docs/patroni.md).

Every change goes through the database host's own runner (SSH to that host: `docker` there
reaches its engine), so `db.up` on a fresh host and on a running cluster is the same call:
missing containers are created, stopped ones started, running ones left alone.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from aiia_ops import SERVICES_DIR
from aiia_ops.commands import app as apps
from aiia_ops.commands import patroni as p
from aiia_ops.commands.docker import build_image, image_of_folder
from aiia_ops.errors import OpsError
from aiia_ops.flows.steps import Steps, confirm
from aiia_ops.host.git import folder_version, image_tag
from aiia_ops.host.runners import Runner
from aiia_ops.host.secrets import load_named, load_secrets
from aiia_ops.host.targets import runner_for
from aiia_ops.model import Stack

FOLDER = "patroni"
LEADER_WAIT = 120.0
Out = Callable[[str], None]


# What the image is made of (its tests are not: a test-only change rebuilds nothing).
IMAGE_SOURCES = (f"services/{FOLDER}/Dockerfile", f"services/{FOLDER}/scripts",
                 "services/postgres", "services/base")  # fmt: skip


def tag() -> str:
    """The image's tag: the last commit of its sources, the postgres image's and the base's."""
    return folder_version(*IMAGE_SOURCES)


def image(stack: Stack) -> str:
    return f"{stack.replication.image}:{tag()}"


def runners(stack: Stack) -> dict[str, Runner]:
    return {m.name: runner_for(stack.hosts[m.name], m.name) for m in p.members(stack)}


def close(rs: dict[str, Runner]) -> None:
    for r in rs.values():
        getattr(r, "close", lambda: None)()


# --- build and ship -------------------------------------------------------------------------


def build(stack: Stack, local: Runner, out: Out = print) -> str:
    """Build aiia/patroni FROM this checkout's aiia/postgres (built first when missing)."""
    steps = Steps(out=out)
    pg = f"{image_of_folder(stack, 'postgres')}:{image_tag('postgres')}"
    if not local.query(p.image_present_argv(pg)).ok:
        with steps.step(f"building {pg} (the base of {stack.replication.image})"):
            local.run(build_image(stack, "postgres", image_tag("postgres"), image_tag("postgres")),
                      stream=True)  # fmt: skip
    target = image(stack)
    with steps.step(f"building {target}"):
        local.run(p.build_argv(stack.replication.image, tag(), pg, str(SERVICES_DIR / FOLDER)),
                  stream=True)  # fmt: skip
    return target


def ship(stack: Stack, rs: dict[str, Runner], local: Runner, out: Out = print) -> None:
    """`docker save | docker load` to every database host that lacks this image."""
    target = image(stack)
    if not local.query(p.image_present_argv(target)).ok:
        raise OpsError(f"{target} is not built on this machine; run invoke db.build")
    for name, r in rs.items():
        if not r.query(p.image_present_argv(target)).ok:
            out(f"-> shipping {target} to {name}")
            r.pipe_from_local(apps.save_image(target), apps.load_image(), timeout=900)


# --- up -------------------------------------------------------------------------------------


def _state(r: Runner, container: str) -> str:
    res = r.query(p.state_argv(container))
    return res.stdout.strip() if res.ok else "missing"


def db_secrets(state_root: Path) -> dict[str, str]:
    return load_named(state_root, "patroni", p.SECRET_KEYS)


def write_files(stack: Stack, rs: dict[str, Runner], secrets: dict[str, str]) -> None:
    env = "".join(f"{k}={v}\n" for k, v in secrets.items())
    for m in p.members(stack):
        r = rs[m.name]
        r.run(["mkdir", "-p", m.config_dir, str(Path(m.env_file).parent)])
        r.run(["chmod", "700", str(Path(m.env_file).parent)])
        r.write_file(m.env_file, env, mode=0o600)
        r.write_file(f"{m.config_dir}/patroni.yml", p.patroni_config(stack, m), mode=0o644)
        r.write_file(f"{m.config_dir}/haproxy.cfg", p.haproxy_config(stack, m), mode=0o644)


def start(stack: Stack, rs: dict[str, Runner], names: list[str] | None = None, out: Out = print):
    """Each member's containers, etcd everywhere first (it waits for its peers)."""
    target = image(stack)
    wanted = [m for m in p.members(stack) if names is None or m.name in names]
    for container in p.CONTAINERS:
        for m in wanted:
            r = rs[m.name]
            now = _state(r, container)
            if now == "running":
                continue
            if now == "missing":
                out(f"-> {m.name}: creating {container}")
                r.run(p.run_argv(stack, m, container, target))
            else:
                out(f"-> {m.name}: starting {container} (was {now})")
                r.run(p.start_argv(container))


def _ask(r: Runner, argv: list[str], unreachable: set[str] | None, timeout: float = 20):
    """A read on one member's host; None when the host does not answer (down, or cut off
    the network: SSH's connect timeout), and then it is not asked again in this call."""
    if unreachable is not None and r.host in unreachable:
        return None
    try:
        return r.query(argv, timeout=timeout)
    except OpsError:
        if unreachable is not None:
            unreachable.add(r.host)
        return None


def cluster(
    stack: Stack, rs: dict[str, Runner], unreachable: set[str] | None = None
) -> list[p.MemberState]:
    """Patroni's view of the cluster, from the first member that answers."""
    for r in rs.values():
        res = _ask(r, p.list_argv(), unreachable)
        if res is not None and res.ok and res.stdout.strip().startswith("["):
            return p.parse_list(res.stdout)
    return []


def wait_for(
    stack: Stack, rs: dict[str, Runner], ok: Callable[[list[p.MemberState]], bool], what: str,
    timeout: float = LEADER_WAIT,
) -> list[p.MemberState]:  # fmt: skip
    deadline = time.monotonic() + timeout
    states: list[p.MemberState] = []
    while time.monotonic() < deadline:
        states = cluster(stack, rs)
        if ok(states):
            return states
        time.sleep(1)
    shown = ", ".join(f"{s.name} {s.role} {s.state}" for s in states) or "no member answers"
    raise OpsError(
        f"{what} not reached within {timeout:.0f}s ({shown}); see: docker logs aiia_patroni"
    )


def all_streaming(stack: Stack) -> Callable[[list[p.MemberState]], bool]:
    n = len(stack.replication.hosts)

    def ok(states: list[p.MemberState]) -> bool:
        lead = p.leader(states)
        replicas = [s for s in states if s.role != "Leader" and s.state == "streaming"]
        return lead is not None and len(replicas) == n - 1

    return ok


def ensure_databases(stack: Stack, state_root: Path, r: Runner) -> None:
    """Each environment's role and database on the primary, and pg_stat_statements in it."""
    envs = load_secrets(state_root, list(stack.environments))
    for name, env in stack.environments.items():
        r.redact(envs.environments[name].db_password)
        r.run(p.ensure_database_argv(env.database, env.db_user),
              input=envs.environments[name].db_password + "\n")  # fmt: skip
        r.run(p.psql_argv(env.database, "CREATE EXTENSION IF NOT EXISTS pg_stat_statements;"))


def up(stack: Stack, state_root: Path, local: Runner, out: Out = print) -> list[p.MemberState]:
    rs = runners(stack)
    try:
        secrets = db_secrets(state_root)
        for r in rs.values():
            r.redact(*secrets.values())
        ship(stack, rs, local, out)
        write_files(stack, rs, secrets)
        start(stack, rs, out=out)
        out("-> waiting for a leader and every replica streaming")
        states = wait_for(stack, rs, all_streaming(stack), "a leader with every replica streaming")
        lead = p.leader(states)
        ensure_databases(stack, state_root, rs[lead.name])
        return states
    finally:
        close(rs)


# --- status, switchover, down ------------------------------------------------------------------


def memory(
    rs: dict[str, Runner], unreachable: set[str] | None = None
) -> dict[str, dict[str, float]]:
    """Each member host's containers' memory; a host that does not answer is left out."""
    out = {}
    for name, r in rs.items():
        res = _ask(r, p.stats_argv(), unreachable)
        if res is not None:
            out[name] = p.parse_mem(res.stdout)
    return out


def status(stack: Stack) -> tuple[list[p.MemberState], dict[str, dict[str, float]]]:
    rs = runners(stack)
    unreachable: set[str] = set()
    try:
        return cluster(stack, rs, unreachable), memory(rs, unreachable)
    finally:
        close(rs)


def replication(stack: Stack) -> tuple[list[p.MemberState], dict]:
    """What the monitor shows: Patroni's view, and the primary's own pg_stat_replication."""
    rs = runners(stack)
    unreachable: set[str] = set()
    try:
        states = cluster(stack, rs, unreachable)
        lead = p.leader(states)
        lag: dict = {}
        if lead is not None and lead.name in rs:
            res = _ask(rs[lead.name], p.replication_argv(), unreachable)
            lag = p.parse_replication(res.stdout) if res is not None and res.ok else {}
        return states, lag
    finally:
        close(rs)


def switchover(
    stack: Stack, candidate: str | None, yes: bool, out: Out = print
) -> tuple[str, str, float]:
    """A planned change of primary: Patroni stops the old one cleanly, promotes the candidate
    (or the healthiest replica), and the old one follows it. (old, new, seconds)."""
    rs = runners(stack)
    try:
        states = cluster(stack, rs)
        lead = p.leader(states)
        if lead is None:
            raise OpsError("no running leader: a switchover needs one (invoke db.status)")
        if candidate is not None:
            p.member(stack, candidate)
            match = next((s for s in states if s.name == candidate), None)
            if candidate == lead.name:
                raise OpsError(f"{candidate} is already the primary; name a replica or omit --to")
            if match is None or match.state != "streaming":
                raise OpsError(f"{candidate} is not a streaming replica; see invoke db.status")
        confirm(f"Switch the primary away from {lead.name} (its clients reconnect)?", yes=yes,
                what="switch the primary")  # fmt: skip
        started = time.monotonic()
        rs[lead.name].run(p.switchover_argv(lead.name, candidate), timeout=120)

        def moved(s: list[p.MemberState]) -> bool:
            new = p.leader(s)
            return new is not None and new.name != lead.name and (
                candidate is None or new.name == candidate)  # fmt: skip

        states = wait_for(stack, rs, moved, "a new primary")
        took = time.monotonic() - started
        new = p.leader(states)
        wait_for(stack, rs, all_streaming(stack), "every replica streaming from the new primary")
        out(f"-> {new.name} is the primary; {lead.name} follows it")
        return lead.name, new.name, took
    finally:
        close(rs)


def down(stack: Stack, wipe: bool, yes: bool, out: Out = print) -> None:
    """Stop and remove the containers; `wipe` also deletes every member's data (asks)."""
    if wipe:
        confirm("Delete the database and etcd data of every database host?", yes=yes,
                expected=stack.replication.scope, what="delete the cluster's data")  # fmt: skip
    rs = runners(stack)
    try:
        for name, r in rs.items():
            for container in reversed(p.CONTAINERS):
                if _state(r, container) != "missing":
                    out(f"-> {name}: removing {container}")
                    if _state(r, container) == "running":
                        r.run(p.stop_argv(container), timeout=60)
                    r.run(p.remove_argv((container,)))
            if wipe:
                r.run(p.remove_volumes_argv())
    finally:
        close(rs)
