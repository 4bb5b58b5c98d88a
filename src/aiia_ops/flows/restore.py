"""Verifying and restoring backups. A restore is built beside the live database, checked
against the census taken at backup time, then swapped in while PgBouncer holds the
environment's clients (PAUSE ... RESUME), and swapped back when /health/ fails. Facts go
through `runner.query()`, changes through `runner.run()`: a PrintingRunner prints the plan.
See docs/backups.md and docs/disaster-recovery.md.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable
from pathlib import Path

from aiia_ops.commands import backups as bk
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
from aiia_ops.host.notify import notify
from aiia_ops.host.releases import now_iso, who
from aiia_ops.host.runners import Runner
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


@contextlib.contextmanager
def paused(stack: Stack, runner: Runner, database: str):
    """PgBouncer holds the environment's clients (PAUSE waits for running transactions and
    closes its server connections; KILL if they do not end in time); RESUME afterwards."""
    if running(runner, stack.services.pgbouncer.container):
        out = runner.run(bk.pause(stack, database), check=False, timeout=PAUSE_TIMEOUT)
        if not out.ok:
            say(f"   PAUSE {database} did not finish in {PAUSE_TIMEOUT}s: KILL {database}")
            runner.run(bk.kill(stack, database), check=False, timeout=PAUSE_TIMEOUT)
        try:
            yield
        finally:
            runner.run(bk.resume(stack, database), check=False, timeout=PAUSE_TIMEOUT)
    else:
        yield


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
    env = stack.environment(env_name)
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
    with lock(runner, state, env.name, f"backup.restore {backup_id}"):
        was_healthy, _ = health(stack, env)
        if safety and exists:
            say(f"-> safety backup of {env.database} ...")
            try:
                safety_record = take_set(stack, state, env, bk.SAFETY_KIND, runner)
            except OpsError as exc:
                raise OpsError(
                    f"the safety backup failed, so nothing was restored:\n{exc}\nIf the "
                    "database is beyond saving, pass --no-safety-backup"
                ) from None
            report["safety_backup"] = safety_record.id
        new = bk.scratch_name(env.database, "restore", record.id)
        old = bk.scratch_name(env.database, "previous", record.id)
        say(f"-> restoring into {new} ...")
        t_restore = time.monotonic()
        try:
            problems = restore_copy(stack, runner, record, env, new)
            if problems:
                raise OpsError(
                    "the restored copy differs from the backup's census:\n  "
                    + "\n  ".join(problems)
                )
        except BaseException:
            drop(stack, runner, new, check=False)
            raise
        report["restore_s"] = round(time.monotonic() - t_restore, 1)
        say(f"   restored and checked in {report['restore_s']}s; switching {env.database} ...")
        t_switch = time.monotonic()
        swap = bk.psql(stack, "postgres", ("db", env.database), ("new", new), ("old", old))
        drop(stack, runner, old)
        with paused(stack, runner, env.database):
            runner.run(swap, input=bk.swap_sql())
        report["switch_s"] = round(time.monotonic() - t_switch, 2)
        runner.run(bk.flush_cache(stack, env), check=False)
        if with_media:
            say(f"-> media of {env.name} ...")
            runner.run(
                bk.stdin_from(
                    str(Path(record.path) / bk.MEDIA), bk.media_restore(env, backup_id.lower())
                )
            )
        say(f"-> health of {env.name} ...")
        ok, last = wait_healthy(stack, env, health, HEALTH_TIMEOUT)
        if not ok and was_healthy and exists:
            with paused(stack, runner, env.database):
                runner.run(swap, input=bk.undo_swap_sql())
            runner.run(bk.flush_cache(stack, env), check=False)
            drop(stack, runner, new, check=False)
            audit(runner, state, f"backup.restore {env.name} {backup_id} ROLLED BACK: unhealthy")
            raise OpsError(
                f"{env.name} was not healthy after the restore (last answer: {last}); the "
                f"previous database is back in place. See invoke logs --service "
                f"{service_key(env)}"
            )
        if exists:
            drop(stack, runner, old)
        prune_env(stack, state, env.name, runner)  # the safety copies have a retention too
        report.update(healthy=ok, health=last, duration_s=round(time.monotonic() - t0, 1))
    audit(runner, state, f"backup.restore {env.name} from {backup_id}: healthy={ok}")
    if not ok:
        raise OpsError(
            f"{env.database} was restored from {backup_id}, but {env.name} is not healthy yet "
            f"(last answer: {last}); see invoke logs --service {service_key(env)}"
        )
    return report
