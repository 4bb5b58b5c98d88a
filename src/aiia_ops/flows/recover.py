"""`invoke recover --host NEW_HOST --secrets FILE`: the whole server again, on a new host,
from the off-site store alone. The old host is never contacted: every fact comes from the
secrets export (the operator's), this repository (the stack, the images) and the store.

  0. preflight, before anything changes anywhere: the export opens with the passphrase; the
     store answers from here and from the new host; pgBackRest's repository opens with the
     key and has a base backup; restic's copy of the media and configs is listed; the new
     host's engine and compose answer and it runs none of the stack's containers.
  1. plan + confirmation (type the host's name, or --yes)
  2. images shipped (docker save | docker load over SSH)
  3. state dir, secrets from the export, configs rendered from the stack
  4. certificates from the off-site configuration set (else nginx's self-signed stand-in)
  5. PostgreSQL: pgBackRest restore of the newest moment into a new data volume, start,
     replay the archived WAL, promote (archiving goes on, on a new timeline)
  6. media: each environment's storage volume from the newest restic copy
  7. PgBouncer, Redis, nginx; each environment's release (invoke deploy's procedure)
  8. /health/ through nginx on the new host
"""

from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from aiia_ops.commands import app as apps
from aiia_ops.commands import backups as bk
from aiia_ops.commands import docker as cmd
from aiia_ops.commands import offsite_files as of
from aiia_ops.commands import pgbackrest as pb
from aiia_ops.errors import CommandFailed, OpsError
from aiia_ops.flows import offsite_files as files
from aiia_ops.flows.stack import prepare_state, write_configs
from aiia_ops.flows.steps import Steps, confirm
from aiia_ops.flows.targets import Target, host_target
from aiia_ops.host import export
from aiia_ops.host.git import shared_image_tags
from aiia_ops.host.http import health_through_nginx
from aiia_ops.host.runners import LocalRunner, Runner
from aiia_ops.host.secrets import load_secrets
from aiia_ops.model import Stack
from aiia_ops.model.secrets import Secrets
from aiia_ops.model.state import StateDir

START_TIMEOUT = 900  # PostgreSQL replaying the archived WAL before it accepts connections


def _say(line: str) -> None:
    print(line, flush=True)


@dataclass
class Facts:
    """What preflight found; the plan is printed from it."""

    target: Target
    address: str
    secrets: Secrets
    window: pb.Window
    snapshot: of.Snapshot | None
    storage_envs: list[str] = field(default_factory=list)


def resolve(stack: Stack, host: str) -> Target:
    entry = stack.hosts.get(host)
    if entry is None and "@" not in host:
        raise OpsError(
            f"unknown host {host!r}: name a host of the stack ({', '.join(stack.hosts)}) "
            "or give user@address[:port]; nothing was changed"
        )
    if entry is not None and entry.ssh is None:
        raise OpsError(
            f"--host {host} is this machine: recover onto another host, over SSH "
            "(hosts.<name>.ssh in the stack, or user@address[:port])"
        )
    return host_target(stack, host)


def _address(where: Target) -> str:
    if where.entry is not None and where.entry.address is not None:
        return str(where.entry.address)
    spec = where.entry.ssh if where.entry else where.label
    return spec.split("@", 1)[-1].rsplit(":", 1)[0]


def secrets_from(doc: dict, stack: Stack) -> Secrets:
    if doc.get("project") != stack.project:
        raise OpsError(
            f"the export is of project {doc.get('project')!r}, the stack is {stack.project!r}: "
            "give the stack file the server ran (--stack); nothing was changed"
        )
    tmp = Path(tempfile.mkdtemp(prefix="aiia-recover-"))
    try:
        export.unpack(doc, tmp)
        return load_secrets(tmp, list(stack.environments), create=False)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _probe(runner: Runner, address: str, port: int) -> bool:
    return runner.query(of.tcp_probe(address, port), timeout=20).ok


class LocalStore:
    """pgBackRest and restic run here, in this machine's PostgreSQL image, with the keys
    of the export in a 0600 env file of a temporary folder (removed afterwards)."""

    def __init__(self, stack: Stack, secrets: Secrets, runner: Runner):
        self.stack, self.runner = stack, runner
        self.image = f"{stack.services.postgresql.image}:{shared_image_tags(stack)['postgresql']}"
        self.tmp = Path(tempfile.mkdtemp(prefix="aiia-recover-store-"))
        self.env_file = self.tmp / "pg.env"
        self.env_file.write_text("".join(f"{k}={v}\n" for k, v in pb.env(stack, secrets).items()))
        self.env_file.chmod(0o600)
        (self.tmp / "conf").mkdir()
        for name, text in pb.config_files(stack).items():
            (self.tmp / "conf" / name).write_text(text)
        (self.tmp / "conf").chmod(0o755)
        self.tmp.chmod(0o755)

    def close(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)

    def window(self) -> pb.Window:
        opts = [
            "--env-file",
            str(self.env_file),
            "--user",
            "10001:10001",
            "--network",
            "bridge",
            "-v",
            f"{self.tmp / 'conf'}:/etc/aiia:ro",
        ]
        out = self.runner.query(of.run_in(self.image, opts, pb.info(self.stack)), timeout=300)
        w = pb.parse_info(out.stdout, pb.require(self.stack).stanza) if out.ok else None
        if w is None or w.status != "ok":
            why = (out.stderr or out.stdout).strip().splitlines() if not out.ok else [w.status]
            why = [*why, *of.s3_error(out.stdout)]
            last = why[-1].strip() if why else "pgbackrest info"
            explained = pb.explain(last, pb.require(self.stack))
            if explained == last:  # nothing more specific: the usual two causes
                explained += " (wrong key in the export, or the wrong store)"
            raise OpsError(
                f"the off-site repository does not open: {explained}; nothing was changed"
            )
        return w

    def snapshot(self) -> of.Snapshot | None:
        return files.latest_snapshot(self.stack, self.image, str(self.env_file), self.runner)

    def storage_envs(self) -> list[str]:
        out = self.runner.query(
            of.ls_latest(self.stack, self.image, str(self.env_file)), timeout=300
        )
        return of.storage_envs(out.stdout) if out.ok else []


def preflight(stack: Stack, host: str, doc: dict, local: Runner) -> Facts:
    pitr = pb.require(stack)
    secrets = secrets_from(doc, stack)
    where = resolve(stack, host)
    where.runner.redact(*secrets.values())
    local.redact(*secrets.values())
    r = pitr.repo1
    if not _probe(local, r.endpoint, r.port):
        raise OpsError(
            f"the off-site store {r.endpoint}:{r.port} does not answer from here: start it "
            "or check the network; nothing was changed"
        )
    store = LocalStore(stack, secrets, local)
    try:
        if not local.query(apps.image_inspect(store.image)).ok:
            raise OpsError(f"this machine lacks {store.image}: run `invoke build` first")
        w = store.window()
        if w.newest_backup is None:
            raise OpsError("the off-site repository holds no base backup: nothing to restore")
        snap = store.snapshot()
        envs = store.storage_envs() if snap else []
    finally:
        store.close()
    runner = where.runner
    try:
        engine = runner.query(apps.engine_version(), timeout=60)
    except OSError as exc:
        raise OpsError(f"cannot reach {host} over SSH: {exc}; nothing was changed") from None
    if not engine.ok:
        raise OpsError(
            f"the Docker engine of {host} does not answer: run `invoke provision` on it "
            "(engine + compose v2); nothing was changed"
        )
    if not runner.query(of.compose_version()).ok:
        raise OpsError(f"{host} has no docker compose v2: run `invoke provision` on it")
    found = runner.query(of.project_containers(stack.project)).stdout.split()
    if found:
        raise OpsError(
            f"{host} already runs containers of {stack.project} ({', '.join(found[:4])}): "
            "recover is for a bare host; nothing was changed"
        )
    address = _address(where)
    if not _probe(runner, r.endpoint, r.port):
        raise OpsError(
            f"{host} cannot reach the off-site store {r.endpoint}:{r.port}; nothing was changed"
        )
    return Facts(where, address, secrets, w, snap, envs)


def _when(d: datetime | None) -> str:
    return "-" if d is None else f"{d:%Y-%m-%d %H:%M:%S} UTC"


def plan_text(stack: Stack, host: str, f: Facts) -> str:
    b = f.window.newest_backup
    snap = (
        "none (media not restored)"
        if f.snapshot is None
        else (
            f"{f.snapshot.id} of {_when(f.snapshot.time)}"
            f" (storage of {', '.join(f.storage_envs) or '-'})"
        )
    )
    return "\n".join(
        [
            f"\nRecover {stack.project} onto {host} ({f.address}, state {f.target.state_dir}):",
            f"  database: newest moment of {pb.require(stack).repo1.endpoint} "
            f"(base backup {b.label}, {_when(b.stopped)}; WAL up to {f.window.archive_max})",
            f"  media + configuration set: restic snapshot {snap}",
            "  1. images shipped; state dir, secrets from the export, configs from the stack",
            "  2. certificates from the configuration set",
            "  3. pgBackRest restore into a new data volume; PostgreSQL replays and promotes",
            "  4. storage volumes; PgBouncer, Redis, nginx; each environment's release; /health/",
            "  The old host is not contacted.",
        ]
    )


def recover(
    stack: Stack, host: str, secrets_file: Path, passphrase: str, yes: bool = False, out=_say
) -> dict:
    started = time.monotonic()
    doc = export.read(secrets_file, passphrase)
    local = LocalRunner()
    f = preflight(stack, host, doc, local)
    out(plan_text(stack, host, f))
    confirm(f"Recover onto {host}?", yes=yes, expected=host, what="recover")
    steps = Steps(out=out)
    runner, root = f.target.runner, f.target.state_dir
    state = StateDir(Path(root))
    timings: dict[str, float] = {}

    def timed(name: str, title: str, fn):
        t0 = time.monotonic()
        result = steps.run(title, fn)
        timings[name] = round(time.monotonic() - t0, 1)
        return result

    tags = shared_image_tags(stack)
    images = [f"{getattr(stack.services, n).image}:{t}" for n, t in tags.items()]
    timed(
        "images",
        "images to the new host (docker save | ssh docker load)",
        lambda: ship(local, runner, images),
    )
    timed(
        "state",
        "state dir, secrets from the export, configs",
        lambda: write_state(runner, stack, state, doc, f.secrets),
    )
    pg_image = images[list(tags).index("postgresql")]
    env_file = str(state.env_files / "postgresql.env")
    if f.snapshot is not None:
        timed(
            "certificates",
            "certificates from the off-site configuration set",
            lambda: files.restore_certificates(stack, pg_image, env_file, root, runner),
        )
    timed(
        "database",
        "PostgreSQL: pgBackRest restore of the newest moment, replay, promote",
        lambda: restore_database(stack, state, pg_image, runner),
    )
    envs = present_environments(stack, runner)
    for env in [e for e in f.storage_envs if e in envs]:
        timed(
            f"media_{env}",
            f"{env}'s storage volume (media) from the off-site copy",
            lambda e=env: files.restore_storage(stack, pg_image, env_file, e, runner),
        )
    timed(
        "services",
        "PgBouncer, Redis, nginx",
        lambda: runner.run(cmd.up(stack, root, cmd.shared_service_keys(stack)), stream=True),
    )
    from aiia_ops.flows.deploy import Deploy

    for env in envs:
        d = Deploy(
            stack,
            stack.environment(env),
            root,
            runner,
            f.secrets,
            steps=steps,
            host=f.target.entry,
            remote_engine=True,
        )
        timed(
            f"release_{env}",
            f"{env}: its release (invoke deploy's procedure)",
            lambda d=d: d.deploy(None),
        )
    port = f.target.entry.published(443) if f.target.entry else 443
    health = {}
    for env in envs:
        domain = stack.environment(env).domains[0]
        health[env] = timed(
            f"health_{env}",
            f"https://{domain}/health/ on {host}",
            lambda d=domain: served(d, f.address, port),
        )
    timings["total"] = round(time.monotonic() - started, 1)
    out(
        f"\n{stack.project} recovered onto {host} in {timings['total']:.0f}s: "
        f"{', '.join(envs)} answer /health/ 200 at {f.address}:{port}"
    )
    return {
        "host": host,
        "environments": envs,
        "timings": timings,
        "health": health,
        "backup": f.window.newest_backup.label,
        "snapshot": f.snapshot and f.snapshot.id,
    }


def ship(local: Runner, runner: Runner, images: list[str]) -> None:
    for image in images:
        if runner.query(apps.image_inspect(image)).ok:
            continue
        if not local.query(apps.image_inspect(image)).ok:
            raise OpsError(f"image {image} is not built here: run invoke build")
        runner.pipe_from_local(apps.save_image(image), apps.load_image())


def write_state(runner: Runner, stack: Stack, state: StateDir, doc: dict, secrets: Secrets):
    prepare_state(runner, state)
    runner.run(["mkdir", "-p", str(state.secrets)])
    runner.run(["chmod", "700", str(state.secrets)])
    for name, text in doc["files"].items():
        runner.write_file(f"{state.secrets}/{name}", text.encode(), mode=0o600)
    write_configs(runner, stack, state, secrets)


def restore_database(stack: Stack, state: StateDir, image: str, runner: Runner) -> None:
    pg = stack.services.postgresql
    volume = of.data_volume(stack)
    runner.run(pb.create_volume(volume))
    options = pb.scratch_options(
        volume, str(state.config / "postgresql"), str(state.env_files / "postgresql.env")
    )
    try:
        runner.run(of.run_in(image, options, of.restore_newest(stack)), timeout=7200)
    except CommandFailed as exc:
        lines = [ln for ln in (exc.stderr + exc.stdout).splitlines() if ln.strip()]
        raise OpsError(f"pgbackrest restore failed: {lines[-1] if lines else exc}") from None
    runner.run(cmd.up(stack, str(state.root), ["postgresql"], wait=False), stream=True)
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        got = runner.query(bk.psql(stack), input="SELECT pg_is_in_recovery();")
        if got.ok and got.stdout.strip() == "f":
            return
        state_ = runner.query(pb.inspect(pg.container, "{{.State.Running}} {{.RestartCount}}"))
        running, _, restarts = state_.stdout.strip().partition(" ")
        if running == "false" or int(restarts or 0) > 2 or time.monotonic() > deadline:
            logs = runner.query(pb.logs(pg.container, 20))
            tail = [ln for ln in (logs.stderr + logs.stdout).splitlines() if ln.strip()]
            raise OpsError(
                "the restored PostgreSQL did not come up"
                + (f": {tail[-1]}" if tail else "")
                + " (`docker logs` on the host shows why)"
            )
        time.sleep(2)


def present_environments(stack: Stack, runner: Runner) -> list[str]:
    """The environments whose database the restored cluster holds (those the server ran)."""
    out = runner.run(bk.psql(stack), input="SELECT datname FROM pg_database;")
    names = set(out.stdout.split())
    return [e.name for e in stack.environments.values() if e.database in names]


def served(domain: str, address: str, port: int, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    data: dict = {}
    while time.monotonic() < deadline:
        try:
            data = health_through_nginx(domain, address, port)
            if data.get("http_status") == 200:
                return data
        except OSError as exc:
            data = {"error": str(exc)}
        time.sleep(1)
    raise OpsError(f"https://{domain}/health/ on {address}:{port}: {data}")
