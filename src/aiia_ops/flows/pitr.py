"""Point-in-time recovery with pgBackRest: the repository's window, base backups, and
`backup.pitr`, which restores one environment's database to a moment.

How `pitr` restores without touching the live cluster: pgBackRest restores the whole
cluster, as of the moment, into a scratch volume; a scratch PostgreSQL (same image, archiving
off so the repository is never written, small shared_buffers) replays the WAL and promotes
there; the environment's database is dumped from it as an ordinary backup set (kind
"pitr"), and today's restore (flows/restore.py: safety copy, restore beside, swap under a
PgBouncer PAUSE, Redis flush, health, swap back when unhealthy) puts it in place. Media are
not point-in-time: the live media stay. The scratch container and volume go in every case.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from datetime import UTC, datetime

from aiia_ops.commands import backups as bk
from aiia_ops.commands import pgbackrest as pb
from aiia_ops.errors import CommandFailed, OpsError
from aiia_ops.flows.backup import lock, say, take_set
from aiia_ops.flows.restore import Health, healthy_through_nginx, restore_backup
from aiia_ops.flows.steps import confirm
from aiia_ops.host.runners import Runner
from aiia_ops.model import Stack
from aiia_ops.model.state import StateDir

STATUS_IO_TIMEOUT = 3  # seconds per try of the monitor's `pgbackrest info` (store down: ~20 s)
SWITCH_TIMEOUT = 60  # seconds for the current WAL segment to reach the repository
PROMOTE_TIMEOUT = 300
SCRATCH_SHARED_BUFFERS = "16MB"  # a second server beside the live one for a few minutes


def _exec(stack: Stack, argv: list[str]) -> list[str]:
    return pb.in_container(stack.services.postgresql.container, argv)


def _pgbackrest_error(exc: CommandFailed) -> str:
    return pb.error_line(exc.stderr + exc.stdout) or str(exc)


def run_pgbackrest(stack: Stack, runner: Runner, argv: list[str], what: str, timeout=1800):
    try:
        return runner.run(_exec(stack, argv), timeout=timeout)
    except CommandFailed as exc:
        message = pb.explain(_pgbackrest_error(exc), pb.require(stack))
        raise OpsError(f"{what} failed: {message}") from None


def archiver(stack: Stack, runner: Runner) -> dict:
    """pg_stat_archiver of the live server: last archived WAL and time, failures."""
    sql = (
        "SELECT json_build_object('archived', archived_count, 'last_wal', last_archived_wal,"
        " 'last_time', extract(epoch from last_archived_time), 'failed', failed_count,"
        " 'last_failed_wal', last_failed_wal,"
        " 'last_failed_time', extract(epoch from last_failed_time),"
        " 'current_wal', pg_walfile_name(pg_current_wal_lsn()),"
        " 'ready', (SELECT count(*) FROM pg_ls_archive_statusdir() WHERE name LIKE '%.ready'),"
        " 'oldest_ready', (SELECT extract(epoch from min(modification))"
        "   FROM pg_ls_archive_statusdir() WHERE name LIKE '%.ready'),"
        " 'now', extract(epoch from now())) FROM pg_stat_archiver;"
    )
    out = runner.query(bk.psql(stack), input=sql)
    if not out.ok:
        raise OpsError(f"cannot read pg_stat_archiver: {out.stderr.strip()}")
    return json.loads(out.stdout.strip())


def window(
    stack: Stack, runner: Runner, state: StateDir | None = None, io_timeout: int | None = None
) -> pb.Window:
    """The repository's window, read in the live server; with `state`, in a one-off
    container of its image given the state's env file: the keys a restore will use (a
    wrong key is refused here, before anything changes), and the live server may be down."""
    pitr = pb.require(stack)
    if state is None:
        argv = _exec(stack, pb.info(stack, io_timeout))
    else:
        image = _inspect(runner, "{{.Config.Image}}", stack.services.postgresql.container)
        argv = pb.one_off(image, _options(state, None), pb.info(stack, io_timeout))
    out = runner.query(argv, timeout=120)
    if not out.ok:
        last = pb.error_line(out.stderr + out.stdout) or f"exit {out.returncode}"
        raise OpsError(f"pgbackrest info failed: {pb.explain(last, pitr)}")
    return pb.parse_info(out.stdout, pitr.stanza)


def _options(state: StateDir, volume: str | None) -> list[str]:
    config = str(state.config / "postgresql")
    env_file = str(state.env_files / "postgresql.env")
    return pb.scratch_options(volume, config, env_file)


def status(stack: Stack, runner: Runner) -> dict:
    """Facts for backup.list and the monitor: window, archive lag, newest backup's age."""
    pitr = pb.require(stack)
    facts: dict = {"repository": f"repo1 s3://{pitr.repo1.bucket}{pitr.repo1.path} at "
                   f"{pitr.repo1.endpoint}:{pitr.repo1.port}"}  # fmt: skip
    # The repository first, the archiver after: `pgbackrest info` against a stopped store
    # takes its retries (tens of seconds); a lag read before them would be that old.
    try:
        w = window(stack, runner, io_timeout=STATUS_IO_TIMEOUT)
        facts["status"] = w.status
        facts["oldest"] = w.oldest
        facts["backups"] = [(b.label, b.kind, b.stopped, b.size) for b in w.backups]
        facts["reachable"] = w.status == "ok"  # info exits 0 with a down store's error
    except OpsError as exc:
        w = None
        facts.update(status=str(exc), oldest=None, backups=[], reachable=False)
    arch = archiver(stack, runner)
    now = float(arch["now"])
    facts["last_archived_wal"] = arch["last_wal"]
    # Lag: while finished segments wait for the repository, seconds since the last one went
    # (0 when none waits: an idle server archives nothing and is not late). Never: None.
    # (The .ready files' mtime is no measure: it moves while the archiver retries; seen on
    # the lab's stopped store. So: time since the last success while segments wait.)
    if arch["last_time"] is None:
        facts["archive_lag_s"] = None
    elif arch["ready"]:
        facts["archive_lag_s"] = max(0.0, now - float(arch["last_time"]))
    else:
        facts["archive_lag_s"] = 0.0
    facts["waiting_segments"] = arch["ready"]
    facts["archive_failed"] = arch["failed"]
    facts["newest"] = (
        None if arch["last_time"] is None else datetime.fromtimestamp(arch["last_time"], UTC)
    )
    newest = None if w is None else w.newest_backup
    facts["backup_age_s"] = None if newest is None else now - newest.stopped.timestamp()
    return facts


def _when(d: datetime | None) -> str:
    return "-" if d is None else f"{d:%Y-%m-%d %H:%M:%S} UTC"


def list_text(stack: Stack, runner: Runner) -> str:
    f = status(stack, runner)
    lag = f["archive_lag_s"]
    age = f["backup_age_s"]
    lines = [
        f"\npoint-in-time recovery: {f['repository']} ({f['status']})",
        f"  recoverable window: {_when(f['oldest'])} .. {_when(f['newest'])}",
        f"  archive lag: {'never archived' if lag is None else bk.human_age(lag)}"
        f" ({f['waiting_segments']} segments waiting; last archived"
        f" {f['last_archived_wal'] or '-'}, {f['archive_failed']} failed pushes)",
        f"  newest base backup: {'none' if age is None else bk.human_age(age) + ' old'}",
    ]
    lines += [
        f"    {label:<24} {kind:<5} {_when(t)}  {bk.human_size(s)}"
        for label, kind, t, s in f["backups"]
    ]
    return "\n".join(lines)


PRIMARY_WAIT_S = 60


def wait_primary(stack: Stack, runner: Runner, timeout: float = PRIMARY_WAIT_S) -> None:
    """Until the server answers as a primary: pgBackRest needs one ("unable to find primary
    cluster" from a stanza-create that ran while PostgreSQL was still restarting, seen once
    in the recover drill right after setup)."""
    deadline = time.monotonic() + timeout
    while True:
        out = runner.query(bk.psql(stack), input="SELECT pg_is_in_recovery();")
        if out.ok and out.stdout.strip() == "f":
            return
        if time.monotonic() >= deadline:
            why = out.stderr.strip() or "it is still in recovery"
            raise OpsError(
                f"PostgreSQL ({stack.services.postgresql.container}) did not answer as a "
                f"primary within {timeout:.0f}s: {why}; check `docker logs` and its health"
            )
        time.sleep(1)


def init(stack: Stack, runner: Runner) -> str:
    """Create the stanza in the repository (idempotent), check archiving, take a full."""
    pb.require(stack)
    wait_primary(stack, runner)
    run_pgbackrest(stack, runner, pb.stanza_create(stack), "pgbackrest stanza-create")
    run_pgbackrest(stack, runner, pb.check(stack), "pgbackrest check (WAL archiving)", 300)
    return base_backup(stack, runner, "full")


def base_backup(stack: Stack, runner: Runner, kind: str = "auto") -> str:
    """A base backup: `auto` is full on the stack's weekday, differential otherwise."""
    pitr = pb.require(stack)
    if kind == "auto":
        kind = pb.backup_kind_for(datetime.now(UTC).weekday(), pitr)
    t0 = time.monotonic()
    run_pgbackrest(stack, runner, pb.backup(stack, kind), f"pgbackrest backup --type={kind}")
    return f"{kind} base backup in {time.monotonic() - t0:.1f}s"


def switch_and_wait(stack: Stack, runner: Runner, timeout: float = SWITCH_TIMEOUT) -> None:
    """Close the current WAL segment and wait until it is in the repository, so everything
    committed until now can be restored."""
    # pg_switch_wal() answers the end + 1 of the segment it closed (a boundary), or, with
    # nothing to switch, the current segment's start: the byte before names the segment
    # that holds everything committed until now, never the next, empty one.
    out = runner.run(bk.psql(stack), input="SELECT pg_walfile_name(pg_switch_wal() - 1);")
    segment = out.stdout.strip()
    deadline = time.monotonic() + timeout
    while True:
        last = archiver(stack, runner)["last_wal"] or ""
        if last >= segment:
            return
        if time.monotonic() > deadline:
            raise OpsError(
                f"WAL segment {segment} did not reach the repository within {timeout:.0f}s "
                f"(last archived: {last or 'none'}): is the off-site store reachable? "
                "Nothing was changed"
            )
        time.sleep(1)


def _inspect(runner: Runner, fmt: str, container: str) -> str:
    out = runner.query(pb.inspect(container, fmt))
    if not out.ok:
        raise OpsError(f"cannot inspect {container}: {out.stderr.strip()}")
    return out.stdout.strip()


@contextlib.contextmanager
def scratch_copy(stack: Stack, state: StateDir, target: datetime | None, runner: Runner):
    """The whole cluster as of `target` (None: the newest archived moment), from the
    repository alone, running in a scratch container (archiving off): yields a Stack whose
    postgresql is that container. The live server is not needed (it may be down); the
    scratch container and its volume go in every case."""
    pg = stack.services.postgresql
    image = _inspect(runner, "{{.Config.Image}}", pg.container)
    scratch = f"{pg.container}_pitr"
    volume = f"{stack.project}_pitr_scratch"
    common = _options(state, volume)
    runner.run(pb.remove_container(scratch), check=False)
    runner.run(pb.remove_volume(volume), check=False)
    runner.run(pb.create_volume(volume))
    try:
        say(f"-> pgbackrest restore of the cluster as of {target or 'the newest moment'} ...")
        t0 = time.monotonic()
        try:
            runner.run(pb.restore_into_volume(stack, image, common, target), timeout=3600)
        except CommandFailed as exc:
            message = pb.explain(_pgbackrest_error(exc), pb.require(stack))
            raise OpsError(f"pgbackrest restore failed: {message}. Nothing was changed") from None
        runner.run(pb.scratch_server(scratch, image, common, SCRATCH_SHARED_BUFFERS))
        _wait_promoted(runner, scratch)
        say(f"   replayed to the target and promoted in {time.monotonic() - t0:.1f}s")
        scratch_pg = dataclasses.replace(pg, container=scratch)
        yield dataclasses.replace(
            stack, services=dataclasses.replace(stack.services, postgresql=scratch_pg)
        )
    finally:
        runner.run(pb.remove_container(scratch), check=False)
        runner.run(pb.remove_volume(volume), check=False)


def materialize(
    stack: Stack, state: StateDir, env_name: str, target: datetime | None, runner: Runner
) -> bk.BackupRecord:
    """The environment's database as of `target`, as a backup set of kind `pitr`."""
    env = stack.environment(env_name)
    with (
        scratch_copy(stack, state, target, runner) as scratch_stack,
        lock(runner, state, env.name, "backup.pitr"),
    ):
        return take_set(scratch_stack, state, env, bk.PITR_KIND, runner)


def _wait_promoted(runner: Runner, container: str) -> None:
    deadline = time.monotonic() + PROMOTE_TIMEOUT
    while time.monotonic() < deadline:
        if _inspect(runner, "{{.State.Running}}", container) != "true":
            logs = runner.query(pb.logs(container, 40))
            last = [ln for ln in (logs.stderr + logs.stdout).splitlines() if "FATAL" in ln]
            raise OpsError(
                "the restored copy did not start"
                + (f": {last[-1].split('FATAL:', 1)[-1].strip()}" if last else "")
                + ". Nothing was changed"
            )
        psql = pb.in_container(container, ["psql", "-XAtq", "-d", "postgres"], stdin=True)
        out = runner.query(psql, input="SELECT pg_is_in_recovery();")
        if out.ok and out.stdout.strip() == "f":
            return
        time.sleep(1)
    raise OpsError(f"the restored copy was still replaying WAL after {PROMOTE_TIMEOUT}s")


def pitr(
    stack: Stack,
    state: StateDir,
    env_name: str,
    to: str,
    runner: Runner,
    yes: bool = False,
    health: Health = healthy_through_nginx,
) -> dict:
    """Restore one environment's database to the moment `to` ('latest' or a timestamp)."""
    pb.require(stack)
    env = stack.environment(env_name)
    target = pb.parse_target(to)
    switch_and_wait(stack, runner)
    w = window(stack, runner, state)  # with the keys the restore will use
    if w.status != "ok" and not w.backups:
        why = pb.explain(w.status, pb.require(stack))
        why = f"the repository cannot be read: {why}" if why == w.status else why
        raise OpsError(f"{why}; nothing was changed")
    newest = datetime.now(UTC)
    pb.check_target(target, w, newest)
    moment = (
        "the newest archived moment" if target is None else f"{target:%Y-%m-%d %H:%M:%S.%f} UTC"
    )
    say(f"\nPoint-in-time restore of {env.name} ({env.database}) to {moment}:")
    source = w.newest_backup.label if target is None else "the base backup before it"
    say(f"  window {_when(w.oldest)} .. {_when(newest)}; from {source}")
    say("  1. restore the cluster as of then into a scratch volume; replay; promote (no archiving)")
    say(f"  2. dump {env.database} from it as a backup set (kind {bk.PITR_KIND})")
    say(f"  3. safety backup of the live {env.database}, restore beside it, swap under a")
    say(f"     PgBouncer PAUSE, flush {env.name}'s Redis cache, /health/ (swap back if unhealthy)")
    say("  Media are not point-in-time: the live media stay.")
    confirm(f"Restore {env.name} to {moment}?", yes=yes, expected=env.name, what="pitr")
    t0 = time.monotonic()
    record = materialize(stack, state, env.name, target, runner)
    try:
        report = restore_backup(
            stack, state, env.name, record.id, runner, yes=True, media=False, health=health
        )
    finally:  # a transport only: the repository keeps that moment
        runner.run(bk.remove_tree(record.path), check=False)
    report.update(pitr_set=record.id, target=moment, pitr_s=round(time.monotonic() - t0, 1))
    return report
