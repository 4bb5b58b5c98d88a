"""Verifying and restoring backups. A restore is built beside the live database, checked
against the census taken at backup time, then swapped in while PgBouncer holds the
environment's clients (PAUSE ... RESUME), and swapped back when /health/ fails. Facts go
through `runner.query()`, changes through `runner.run()`: a PrintingRunner prints the plan.
See docs/backups.md and docs/disaster-recovery.md.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path

from aiia_ops.commands import backups as bk
from aiia_ops.commands import restores as rj
from aiia_ops.commands.compose import service_key
from aiia_ops.errors import CommandFailed, OpsError
from aiia_ops.flows.backup import (
    audit,
    check_files,
    database_facts,
    find_record,
    latest_record,
    list_records,
    lock,
    performs,
    prune_env,
    require_postgres,
    running,
    say,
    take_set,
)
from aiia_ops.flows.output import paint
from aiia_ops.flows.status import health_through_nginx
from aiia_ops.flows.steps import confirm
from aiia_ops.host.faults import failpoint
from aiia_ops.host.lock import LockHeld, deploy_lock, holding
from aiia_ops.host.notify import notify
from aiia_ops.host.releases import now_iso, who
from aiia_ops.host.runners import Runner
from aiia_ops.host.signals import Interrupted, interruptible, shielded
from aiia_ops.model import Environment, Stack
from aiia_ops.model.state import StateDir

PAUSE_TIMEOUT = 20  # seconds PgBouncer may wait for running transactions before KILL
HEALTH_TIMEOUT = 90

Health = Callable[[Stack, Environment], tuple[bool, object]]


def drop(stack: Stack, runner: Runner, database: str, check: bool = True) -> None:
    runner.run(
        bk.psql(stack, "postgres", ("gone", database)), input=bk.drop_database_sql(), check=check
    )


def restore_copy(
    stack: Stack, runner: Runner, record: bk.BackupRecord, env: Environment, database: str
) -> list[str]:
    """Restore the set's dump into a new database `database` and compare its census with the
    manifest's. Returns the differences; the database stays (the caller drops or uses it)."""
    pg = stack.services.postgresql
    drop(stack, runner, database)
    runner.run(
        bk.psql(stack, "postgres", ("new", database), ("role", env.db_user)),
        input=bk.create_database_sql(),
    )
    try:
        runner.run(
            bk.stdin_from(
                str(Path(record.path) / bk.DUMP), bk.restore_into(stack, database, env.db_user)
            )
        )
    except CommandFailed as exc:
        raise OpsError(
            f"pg_restore of {record.id} into {database} on {pg.container} failed: the dump is "
            f"damaged or truncated:\n{exc}"
        ) from None
    # The census reads the copy just made: run() (it depends on the change), not query().
    out = runner.run(bk.census(stack, database), input=bk.BACKUP_SCRIPT.read_bytes())
    if not performs(runner):
        return []  # a printed restore made no copy to count
    expected = {k: tuple(v) for k, v in (record.manifest or {}).get("tables", {}).items()}
    return bk.compare_census(expected, bk.parse_census(out.stdout).tables)


def check_pg_space(stack: Stack, runner: Runner, needed: int, what: str) -> None:
    free = bk.parse_free(runner.query(bk.pg_free_space(stack)).stdout)
    if free is None:
        return  # no df in the image: PostgreSQL itself will say so if it runs out
    bk.check_space(free, needed, f"{stack.services.postgresql.container}'s data volume", what)


# --- verification ------------------------------------------------------------------------


def verify_backup(stack: Stack, state: StateDir, record: bk.BackupRecord, runner: Runner) -> dict:
    """Checksums, then a real restore into a scratch database compared with the census taken
    at backup time. The result goes to VERIFY.json in the set."""
    with lock(runner, state, record.env, "backup.verify"):
        t0 = time.monotonic()
        result: dict = {"time": now_iso(), "ok": False, "by": who()}
        problems = check_files(runner, record)
        result["checksums"] = problems if problems else "ok"
        if not problems:
            problems = _verify_restore(stack, record, runner, result)
        result["ok"] = not problems
        result["problems"] = problems
        result["duration_s"] = round(time.monotonic() - t0, 1)
        runner.write_file(str(Path(record.path) / bk.VERIFY), json.dumps(result, indent=2) + "\n")
    record.verify = result
    audit(runner, state, f"backup.verify {record.id}: {'ok' if result['ok'] else 'FAILED'}")
    return result


def _verify_restore(stack: Stack, record: bk.BackupRecord, runner: Runner, result: dict):
    if record.env not in stack.environments:
        return [f"environment {record.env!r} is not in the stack: cannot restore it"]
    env = stack.environment(record.env)
    require_postgres(stack, runner)
    check_pg_space(stack, runner, record.manifest.get("database_size", 0), "scratch restore")
    scratch = bk.scratch_name(env.database, "verify", record.id)
    say(f"-> {record.id}: checksums ok; restoring into scratch database {scratch} ...")
    try:
        problems = restore_copy(stack, runner, record, env, scratch)
    except OpsError as exc:
        problems = [str(exc)]
    finally:
        drop(stack, runner, scratch, check=False)
    tables = (record.manifest or {}).get("tables", {})
    result["restore"] = problems if problems else "ok"
    result["tables"] = len(tables)
    result["rows"] = sum(v[0] for v in tables.values())
    return problems


def verify(
    stack: Stack, state: StateDir, backup_id: str | None, env: str | None, runner: Runner
) -> None:
    """`invoke backup.verify`: one set, or the newest of each environment (or of env)."""
    if backup_id:
        records = [find_record(state, backup_id, runner)]
    else:
        newest: dict[str, bk.BackupRecord] = {}
        for r in list_records(state, stack.environment(env).name if env else None, runner):
            newest[r.env] = r
        records = list(newest.values())
        if not records:
            raise OpsError("there is no backup to verify; take one: invoke backup")
    failed = []
    for record in records:
        result = verify_backup(stack, state, record, runner)
        if result["ok"]:
            say(
                f"{record.id}: {paint('ok', 'ok')} (checksums, restore, {result['tables']} tables"
                f" and {result['rows']} rows identical) in {result['duration_s']}s"
            )
        else:
            failed.append(record.id)
            say(f"{record.id}: {paint('FAILED', 'error')}")
            for p in result["problems"]:
                say(f"  {p}")
    if failed:
        # An alert, not a deletion: retention keeps the set (docs/backups.md, Retention).
        alerts = bk.verify_alerts(list_records(state, None, runner))
        text = "; ".join(alerts) or f"verification failed for {', '.join(failed)}"
        if performs(runner):
            notify(f":warning: backup {text}"[:1500], state.root)
        raise OpsError(
            f"verification failed for {', '.join(failed)}; do not rely on it (the set is kept;"
            " invoke backup.list shows the alert)"
        )


# --- restore -----------------------------------------------------------------------------


def healthy_through_nginx(stack: Stack, env: Environment) -> tuple[bool, object]:
    try:
        data = health_through_nginx(env.domains[0], port=stack.local_host.published(443))
    except OSError as exc:
        return False, exc
    return data.get("http_status") == 200 and data.get("environment") == env.name, data


def wait_healthy(stack: Stack, env: Environment, health: Health, timeout: float):
    deadline = time.monotonic() + timeout
    ok, last = health(stack, env)
    while not ok and time.monotonic() < deadline:
        time.sleep(1)
        ok, last = health(stack, env)
    return ok, last


# --- PgBouncer's pause, never left behind ---------------------------------------------------


def pause_wait(stack: Stack) -> float:
    """How long PAUSE may wait for running transactions before KILL: a third of the limit,
    so PAUSE + KILL + the swap fit inside it."""
    return min(PAUSE_TIMEOUT, max(1.0, stack.backups.pause_limit.seconds / 3))


def is_paused(stack: Stack, runner: Runner, database: str) -> bool | None:
    """PgBouncer's own answer (SHOW DATABASES; a database it does not list is not paused);
    None when it gave no answer."""
    out = runner.query(rj.show_databases(stack), timeout=PAUSE_TIMEOUT)
    return bool(rj.parse_paused(out.stdout, database)) if out.ok else None


def resume_if_paused(stack: Stack, runner: Runner, env: Environment) -> bool:
    """RESUME the environment's pool when a killed restore left it paused (call it holding
    the environment's deploy lock: then no live restore of it holds a pause). True if it
    was paused. Deploy's preflight can call this too."""
    with shielded():
        return _resume_if_paused(stack, runner, env)


def _resume_if_paused(stack: Stack, runner: Runner, env: Environment) -> bool:
    if not running(runner, stack.services.pgbouncer.container):
        return False
    state = is_paused(stack, runner, env.database)
    if state is False:
        return False
    # Paused, or PgBouncer would not say: RESUME (of a pool that is not paused: an error
    # that changes nothing).
    say(f"   PgBouncer holds {env.database} paused (a killed restore): RESUME {env.database}")
    runner.run(bk.resume(stack, env.database), check=False, timeout=PAUSE_TIMEOUT)
    runner.run(rj.cancel_guard(stack, env.database), check=False, timeout=PAUSE_TIMEOUT)
    return True


@contextlib.contextmanager
def paused(stack: Stack, runner: Runner, database: str, on_paused: Callable | None = None):
    """PgBouncer holds the environment's clients (PAUSE waits for running transactions and
    closes its server connections; KILL if they do not end in time); RESUME afterwards,
    shielded from signals. A guard in the pgbouncer container, started before PAUSE,
    RESUMEs after backups.pause_limit should this process die (SIGKILL) in between."""
    if not running(runner, stack.services.pgbouncer.container):
        yield
        return
    limit = stack.backups.pause_limit.whole_seconds
    try:
        with shielded():
            runner.run(rj.cancel_guard(stack, database), check=False, timeout=PAUSE_TIMEOUT)
            runner.run(rj.start_guard(stack, database, limit), check=False, timeout=PAUSE_TIMEOUT)
        wait = pause_wait(stack)
        out = runner.run(bk.pause(stack, database), check=False, timeout=wait)
        if not out.ok:
            say(f"   PAUSE {database} did not finish in {wait:.0f}s: KILL {database}")
            runner.run(bk.kill(stack, database), check=False, timeout=PAUSE_TIMEOUT)
        if on_paused:
            on_paused()
        yield
    finally:
        with shielded():
            runner.run(bk.resume(stack, database), check=False, timeout=PAUSE_TIMEOUT)
            runner.run(rj.cancel_guard(stack, database), check=False, timeout=PAUSE_TIMEOUT)


# --- the journal and what a re-run does with it ---------------------------------------------


def journal_file(state: StateDir, env: Environment) -> str:
    return rj.journal_path(str(state.root), env.name)


def read_journal(state: StateDir, env: Environment, runner: Runner) -> rj.Journal | None:
    return rj.parse_journal(runner.read_file(journal_file(state, env)))


def write_journal(state: StateDir, journal: rj.Journal, runner: Runner, phase: str) -> None:
    """Record a step boundary (written atomically), then the crash tests' failpoint."""
    journal.at(phase)
    runner.write_file(rj.journal_path(str(state.root), journal.env), journal.render(), mode=0o600)
    failpoint(f"restore:{phase}")


def clear_journal(state: StateDir, env: Environment, runner: Runner) -> None:
    runner.run(bk.remove_file(journal_file(state, env)), check=False)


def db_facts(stack: Stack, runner: Runner, journal: rj.Journal) -> rj.DbFacts:
    names = (("db", journal.database), ("new", journal.copy), ("old", journal.previous))
    out = runner.query(bk.psql(stack, "postgres", *names), input=rj.databases_sql())
    if not out.ok:
        raise OpsError(
            f"PostgreSQL did not list the databases of {journal.env}:\n{out.stderr.strip()}\n"
            "Start it (invoke up) and run the restore again"
        )
    return rj.parse_databases(out.stdout)


def apply(stack: Stack, runner: Runner, action: rj.Action) -> None:
    if action.verb == "drop":
        drop(stack, runner, action.args[0])
    elif action.verb == "allow":
        runner.run(bk.psql(stack, "postgres", ("db", action.args[0])), input=rj.allow_sql())
    elif action.verb == "rename":
        src, dst = action.args
        runner.run(bk.psql(stack, "postgres", ("from", src), ("to", dst)), input=rj.rename_sql())


def settle_env(
    stack: Stack, state: StateDir, env: Environment, runner: Runner
) -> tuple[rj.Journal | None, rj.Settlement | None]:
    """Holding the environment's locks: RESUME a pool left paused, end a killed swap's
    session, and put the environment back on one whole database as the journal and the
    engine say. The journal is removed when the restore has to start over. Signals are
    held until it is done."""
    with shielded():
        return _settle_env(stack, state, env, runner)


def _settle_env(stack, state, env, runner):
    _resume_if_paused(stack, runner, env)
    journal = read_journal(state, env, runner)
    if journal is None:
        return None, None
    require_postgres(stack, runner)
    runner.run(rj.swap_psql(stack), input=rj.end_swap_sessions_sql(), check=False)
    facts = db_facts(stack, runner, journal)
    settlement = rj.settle(journal, facts)
    say(f"-> a restore of {env.name} from {journal.backup_id} stopped at '{journal.phase}':"
        f" {settlement.why}")  # fmt: skip
    for action in settlement.actions:
        say(f"   {action}")
        apply(stack, runner, action)
    if settlement.then == rj.START:
        clear_journal(state, env, runner)
    return journal, settlement


def left_behind(stack: Stack, state: StateDir, env: Environment, runner: Runner) -> bool:
    """Whether a killed restore left something to settle: its journal, or a paused pool."""
    if runner.read_file(journal_file(state, env)) is not None:
        return True
    pgbouncer = stack.services.pgbouncer.container
    return running(runner, pgbouncer) and is_paused(stack, runner, env.database) is not False


@contextlib.contextmanager
def restore_locks(runner: Runner, state: StateDir, env: Environment, action: str):
    """The environment's deploy lock (a restore must not swap the database between a
    deploy's migrate and its switch), then its backup lock; both refused at once, naming
    the holder."""
    try:
        hint = f"invoke lock.release --env={env.name}"
        root = str(state.root)
        deploy = holding(runner, root, deploy_lock(env.name), action=action, release_hint=hint)
        with deploy, lock(runner, state, env.name, action):
            yield
    except LockHeld as exc:
        raise OpsError(
            f"cannot restore {env.name} now: {exc}. A restore excludes deploys, migrations, "
            "backups and other restores of the same environment. Nothing was changed"
        ) from None


# --- restore -----------------------------------------------------------------------------


def restore_backup(
    stack: Stack,
    state: StateDir,
    env_name: str,
    backup_id: str,
    runner: Runner,
    yes: bool = False,
    allow_other_env: bool = False,
    safety: bool = True,
    media: bool = True,
    health: Health = healthy_through_nginx,
) -> dict:
    """`invoke backup.restore`: settle what a killed restore left (finishing it when its
    swap was done), then the whole procedure. SIGTERM/SIGHUP/Ctrl-C run the recovery."""
    env = stack.environment(env_name)
    try:
        with interruptible():
            record = _checked_record(state, env, backup_id, runner, allow_other_env)
            if left_behind(stack, state, env, runner):  # questions only, then the locks
                with restore_locks(runner, state, env, f"backup.restore {record.id} (settle)"):
                    journal, settled = settle_env(stack, state, env, runner)
                    if journal and settled and settled.then != rj.START:
                        rj.check_resumable(journal, backup_id)
                        return _finish(
                            stack, state, env, journal, settled.then, runner, media, health
                        )
            return _restore(stack, state, env, record, runner, yes, safety, media, health)
    except (Interrupted, KeyboardInterrupt) as exc:
        what = exc if isinstance(exc, Interrupted) else "interrupted (Ctrl-C)"
        raise OpsError(
            f"the restore of {env.name} was {what}; {env.database} is whole and PgBouncer "
            f"resumed. Run the same command again to finish it (invoke backup.restore --env "
            f"{env.name} --id {backup_id})"
        ) from None


def _checked_record(state, env, backup_id, runner, allow_other_env) -> bk.BackupRecord:
    """The set to restore, refused (questions only, nothing changed) when it belongs to
    another environment or does not match its manifest."""
    record = (
        latest_record(state, env.name, runner)
        if backup_id == "latest"
        else find_record(state, backup_id, runner)
    )
    backup_id = record.id
    if record.env != env.name and not allow_other_env:
        raise OpsError(
            f"{backup_id} is a backup of {record.env}, not {env.name}; to put {record.env}'s "
            f"data into {env.name}, pass --allow-other-env. Nothing was changed"
        )
    say(f"-> checking {backup_id} against its manifest ...")
    problems = check_files(runner, record)
    if problems:
        raise OpsError(
            f"{backup_id} does not match its manifest, refusing to restore it:\n  "
            + "\n  ".join(problems)
            + "\nPick another backup (invoke backup.list). Nothing was changed"
        )
    return record


def _restore(stack, state, env, record, runner, yes, safety, media, health):
    backup_id = record.id
    require_postgres(stack, runner)
    _, current_size = database_facts(stack, runner, env.database)
    exists = current_size is None or current_size >= 0
    m = record.manifest or {}
    check_pg_space(stack, runner, m.get("database_size", 0), "restore")
    with_media = media and bk.MEDIA in record.files and running(runner, env.container)
    say(f"\nRestore {env.name} ({env.database}) from {backup_id}:")
    say(bk.restore_plan_text(env, record, safety, exists, with_media))
    confirm(f"Restore {env.name} from {backup_id}?", yes=yes, expected=env.name, what="restore")

    t0 = time.monotonic()
    report: dict = {"env": env.name, "id": backup_id, "safety_backup": None}
    with restore_locks(runner, state, env, f"backup.restore {backup_id}"):
        journal = rj.Journal(
            env=env.name,
            backup_id=backup_id,
            database=env.database,
            copy=bk.scratch_name(env.database, "restore", record.id),
            previous=bk.scratch_name(env.database, "previous", record.id),
            existed=exists,
            pid=os.getpid(),
            host=socket.gethostname(),
            started=now_iso(),
        )
        write_journal(state, journal, runner, rj.LOCKED)
        try:
            journal.was_healthy = health(stack, env)[0]
            if safety and exists:
                say(f"-> safety backup of {env.database} ...")
                try:
                    safety_record = take_set(stack, state, env, bk.SAFETY_KIND, runner)
                except OpsError as exc:
                    raise OpsError(
                        f"the safety backup failed, so nothing was restored:\n{exc}\nIf the "
                        "database is beyond saving, pass --no-safety-backup"
                    ) from None
                report["safety_backup"] = journal.safety_backup = safety_record.id
                write_journal(state, journal, runner, rj.SAFETY)
            new, old = journal.copy, journal.previous
            say(f"-> restoring into {new} ...")
            t_restore = time.monotonic()
            problems = restore_copy(stack, runner, record, env, new)
            if problems:
                raise OpsError(
                    "the restored copy differs from the backup's census:\n  "
                    + "\n  ".join(problems)
                )
            report["restore_s"] = round(time.monotonic() - t_restore, 1)
            write_journal(state, journal, runner, rj.COPIED)
            say(f"   restored and checked in {report['restore_s']}s; switching {env.database} ...")
            t_switch = time.monotonic()
            drop(stack, runner, old)
            swap = rj.swap_psql(stack, ("db", env.database), ("new", new), ("old", old))
            at_pause = lambda: write_journal(state, journal, runner, rj.PAUSED)  # noqa: E731
            with paused(stack, runner, env.database, at_pause):
                runner.run(swap, input=bk.swap_sql())
                write_journal(state, journal, runner, rj.SWAPPED)
            report["switch_s"] = round(time.monotonic() - t_switch, 2)
            write_journal(state, journal, runner, rj.RESUMED)
        except BaseException:
            settle_env(stack, state, env, runner)
            raise
        report.update(_after_swap(stack, state, env, journal, runner, with_media, health))
        report["duration_s"] = round(time.monotonic() - t0, 1)
    return _done(state, env, backup_id, report, runner)


def _finish(stack, state, env, journal: rj.Journal, then: str, runner, media, health) -> dict:
    """A re-run after a kill past the swap: the restored database is live; check its
    health (undoing it when unhealthy), then clean up, as the killed run would have. The
    caller holds the locks."""
    t0 = time.monotonic()
    record = find_record(state, journal.backup_id, runner)
    report: dict = {"env": env.name, "id": journal.backup_id, "resumed": journal.phase,
                    "safety_backup": journal.safety_backup}  # fmt: skip
    journal.pid, journal.host = os.getpid(), socket.gethostname()
    if then == rj.CLEANUP:
        report.update(_cleanup(stack, state, env, journal, runner), healthy=True, health="-")
    else:
        with_media = media and bk.MEDIA in record.files and running(runner, env.container)
        report.update(_after_swap(stack, state, env, journal, runner, with_media, health))
    report["duration_s"] = round(time.monotonic() - t0, 1)
    return _done(state, env, journal.backup_id, report, runner)


def _after_swap(stack, state, env, journal: rj.Journal, runner, with_media, health) -> dict:
    """Cache, media, health; healthy: clean up; unhealthy: the previous database back."""
    runner.run(bk.flush_cache(stack, env), check=False)
    if with_media:
        say(f"-> media of {env.name} ...")
        record = find_record(state, journal.backup_id, runner)
        runner.run(
            bk.stdin_from(
                str(Path(record.path) / bk.MEDIA), bk.media_restore(env, journal.backup_id.lower())
            )
        )
    say(f"-> health of {env.name} ...")
    ok, last = wait_healthy(stack, env, health, HEALTH_TIMEOUT)
    if not ok and journal.was_healthy and journal.existed:
        write_journal(state, journal, runner, rj.UNDOING)
        undo = rj.swap_psql(
            stack, ("db", env.database), ("new", journal.copy), ("old", journal.previous)
        )
        with paused(stack, runner, env.database):
            runner.run(undo, input=bk.undo_swap_sql())
        runner.run(bk.flush_cache(stack, env), check=False)
        drop(stack, runner, journal.copy, check=False)
        clear_journal(state, env, runner)
        what = f"backup.restore {env.name} {journal.backup_id}"
        audit(runner, state, f"{what} ROLLED BACK: unhealthy")
        raise OpsError(
            f"{env.name} was not healthy after the restore (last answer: {last}); the "
            f"previous database is back in place. See invoke logs --service "
            f"{service_key(env)}"
        )
    if not ok:
        return {"healthy": False, "health": last}
    write_journal(state, journal, runner, rj.HEALTHY)
    return {**_cleanup(stack, state, env, journal, runner), "healthy": ok, "health": last}


def _cleanup(stack, state, env, journal: rj.Journal, runner) -> dict:
    if journal.existed:
        drop(stack, runner, journal.previous)
    prune_env(stack, state, env.name, runner)  # the safety copies have a retention too
    write_journal(state, journal, runner, rj.DONE)
    clear_journal(state, env, runner)
    return {}


def _done(state, env, backup_id, report, runner) -> dict:
    ok, last = report.get("healthy"), report.get("health")
    audit(runner, state, f"backup.restore {env.name} from {backup_id}: healthy={ok}")
    if not ok:
        raise OpsError(
            f"{env.database} was restored from {backup_id}, but {env.name} is not healthy yet "
            f"(last answer: {last}); see invoke logs --service {service_key(env)}"
        )
    return report
