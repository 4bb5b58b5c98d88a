"""invoke backup | backup.list | backup.prune | backup.verify | backup.restore | backup.recover

The runner side of backups: reads and writes the backup folders on this machine, runs the
commands `aiia_ops.commands.backups` builds. `take_backup()` is what a deploy calls for its
pre-deploy backup. See docs/backups.md and docs/disaster-recovery.md.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import errno
import fcntl
import hashlib
import io
import json
import os
import shutil
import sys
import tarfile
import time
from pathlib import Path

from invoke import Collection

from aiia_ops.commands import backups as bk
from aiia_ops.commands.compose import service_key
from aiia_ops.errors import CommandFailed, OpsError
from aiia_ops.flows.output import paint, table
from aiia_ops.flows.status import health_through_nginx
from aiia_ops.host.notify import notify
from aiia_ops.host.releases import audit, now_iso, who
from aiia_ops.host.runners import LocalRunner, PrintingRunner, Runner
from aiia_ops.host.secrets import load_secrets
from aiia_ops.model import Environment, Stack, load_stack
from aiia_ops.model.state import StateDir, local_state_dir
from aiia_ops.tasks.common import current_version, task

PAUSE_TIMEOUT = 20  # seconds PgBouncer may wait for running transactions before KILL
HEALTH_TIMEOUT = 90


def say(text: str) -> None:
    print(text, flush=True)


# --- the backup folders ------------------------------------------------------------------


def backups_root(state: StateDir) -> Path:
    return state.root / "backups"


def read_record(path: Path) -> bk.BackupRecord | None:
    """A finished set (has MANIFEST.txt), or None for anything else in the folder."""
    if path.name.endswith(bk.PARTIAL_SUFFIX) or not (path / bk.MANIFEST).is_file():
        return None
    try:
        when, env, kind = bk.parse_id(path.name)
    except OpsError:
        return None
    files = {f.name: f.stat().st_size for f in path.iterdir() if f.is_file()}
    files.pop(bk.VERIFY, None)
    try:
        manifest = bk.parse_manifest((path / bk.MANIFEST).read_text())
    except OpsError:
        manifest = None
    verify = None
    if (path / bk.VERIFY).is_file():
        with contextlib.suppress(ValueError):
            verify = json.loads((path / bk.VERIFY).read_text())
    return bk.BackupRecord(path.name, env, kind, when, str(path), files, manifest, verify)


def list_records(state: StateDir, env: str | None = None) -> list[bk.BackupRecord]:
    root = backups_root(state)
    envs = (
        [env]
        if env
        else sorted(p.name for p in root.iterdir() if p.is_dir())
        if root.exists()
        else []
    )
    out = []
    for name in envs:
        folder = root / name
        if folder.is_dir():
            out += [r for p in sorted(folder.iterdir()) if p.is_dir() and (r := read_record(p))]
    return sorted(out, key=lambda r: r.id)


def find_record(state: StateDir, backup_id: str) -> bk.BackupRecord:
    _, env, _ = bk.parse_id(backup_id)
    record = read_record(backups_root(state) / env / backup_id)
    if record is None:
        raise OpsError(
            f"no backup {backup_id!r} in {backups_root(state) / env}; see invoke backup.list"
        )
    return record


def latest_record(state: StateDir, env: str) -> bk.BackupRecord:
    """`--id latest`: the newest verified backup of env, else its newest one."""
    records = [r for r in list_records(state, env) if not r.verify_failed]
    if not records:
        raise OpsError(f"there is no backup of {env} here ({backups_root(state) / env})")
    verified = [r for r in records if r.verified_ok]
    return (verified or records)[-1]


@contextlib.contextmanager
def env_lock(state: StateDir, env: str):
    """One backup, restore or prune per environment at a time (flock: gone with the process,
    so a killed run never leaves a stale lock)."""
    folder = backups_root(state) / env
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another run"
            raise OpsError(
                f"a backup, restore or prune of {env} is already running ({holder}); wait for "
                "it to finish"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}, {who()}, since {now_iso()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1024 * 1024):
            h.update(chunk)
    return h.hexdigest()


def check_files(record: bk.BackupRecord) -> list[str]:
    """Checksums against the manifest: problems, one line each (empty = all good)."""
    if record.manifest is None:
        return [f"{bk.MANIFEST} is missing its machine-readable part or is damaged"]
    problems = []
    pruned = set((record.manifest.get("pruned") or {}).keys())
    for name, meta in sorted(record.manifest["files"].items()):
        path = Path(record.path) / name
        if not path.is_file():
            if name not in pruned:
                problems.append(f"{name}: missing")
            continue
        if path.stat().st_size != meta["size"]:
            problems.append(
                f"{name}: {path.stat().st_size} bytes, the manifest says {meta['size']}"
            )
        elif sha256_file(path) != meta["sha256"]:
            problems.append(f"{name}: sha256 differs from the manifest")
    if bk.DUMP not in record.manifest["files"]:
        problems.append(f"{bk.DUMP}: not in the manifest")
    return problems


def last_run_path(state: StateDir, env: str) -> Path:
    return backups_root(state) / env / bk.LAST_RUN


def read_last_run(state: StateDir, env: str) -> dict:
    path = last_run_path(state, env)
    with contextlib.suppress(OSError, ValueError):
        return json.loads(path.read_text())
    return {}


def write_last_run(state: StateDir, env: str, kind: str, entry: dict) -> None:
    """<state>/backups/<env>/last-run.json: {kind: its last run}, for backup.list and the
    monitor (a failed run is recorded too, with its error)."""
    path = last_run_path(state, env)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = read_last_run(state, env)
    data[kind] = {"env": env, "kind": kind, **entry}
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


# --- facts from the running stack --------------------------------------------------------


def require_postgres(stack: Stack, runner: Runner) -> None:
    pg = stack.services.postgresql.container
    if not runner.run(bk.pg_ready(stack), check=False).ok:
        running = runner.run(bk.container_running(pg), check=False)
        state = (
            "is not running" if running.stdout.strip() != "true" else "does not accept connections"
        )
        raise OpsError(
            f"PostgreSQL ({pg}) {state}; start it (invoke up) and try again. Nothing was changed"
        )


def database_facts(stack: Stack, runner: Runner, database: str) -> tuple[str, int]:
    """(server version, size in bytes or -1 when the database does not exist)."""
    out = runner.run(bk.psql(stack, "postgres", ("db", database)), input=bk.database_facts_sql())
    version, size = out.stdout.strip().splitlines()[-1].split("|")
    return version, int(size)


def running(runner: Runner, container: str) -> bool:
    out = runner.run(bk.container_running(container), check=False)
    return out.ok and out.stdout.strip() == "true"


def media_bytes(runner: Runner, env: Environment) -> int:
    argv = ["docker", "exec", env.container, "sh", "-c",
            'if [ -d "$1/media" ]; then du -sb "$1/media"; else echo 0; fi', "sh",
            bk.storage_dir(env)]  # fmt: skip
    out = runner.run(argv, check=False)
    with contextlib.suppress(ValueError, IndexError):
        return int(out.stdout.split()[0])
    return 0


def secret_values(state: StateDir, stack: Stack) -> dict[str, str]:
    """Every secret value there is: the loaded secrets (AIIA_* overrides included) and any
    KEY=value of the 0600 files under <state>/secrets (a webhook URL, a future key)."""
    s = load_secrets(state.root, list(stack.environments), create=False)
    out = {
        f.name.upper(): getattr(s, f.name)
        for f in dataclasses.fields(s)
        if isinstance(getattr(s, f.name), str)
    }
    for name, e in s.environments.items():
        for f in dataclasses.fields(e):
            out[f"{name.upper()}_{f.name.upper()}"] = getattr(e, f.name)
    for path in sorted(state.secrets.glob("*.env")) if state.secrets.is_dir() else []:
        for line in path.read_text().splitlines():
            key, sep, value = line.partition("=")
            known = sep and (value.strip() in out.values() or key.lstrip().startswith("#"))
            if sep and value.strip() and not known:
                out[f"{path.stem.upper()}_{key.strip()}"] = value.strip()
    if os.environ.get("AIIA_SLACK_WEBHOOK_URL"):
        out["SLACK_WEBHOOK_URL"] = os.environ["AIIA_SLACK_WEBHOOK_URL"]
    return {k: v for k, v in out.items() if v and len(v) >= 4}


def config_archive(stack: Stack, state: StateDir) -> bytes:
    """config.tar.gz: rendered configs, compose file and the stack file, secrets redacted."""
    secrets = secret_values(state, stack)
    members: list[tuple[str, Path]] = []
    if state.config.is_dir():
        members += [
            (f"config/{p.relative_to(state.config)}", p)
            for p in sorted(state.config.rglob("*"))
            if p.is_file()
        ]
    if state.compose_file.is_file():
        members.append(("compose.yml", state.compose_file))
    if stack.source and Path(stack.source).is_file():
        members.append(("stack.yml", Path(stack.source)))
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, path in members:
            try:
                data = bk.redact(path.read_bytes(), secrets)
            except PermissionError:
                raise OpsError(f"cannot read {path}; run the backup as root") from None
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), int(path.stat().st_mtime), 0o640
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


# --- taking a backup ---------------------------------------------------------------------


def take_backup(
    stack: Stack, state: StateDir, env_name: str, kind: str, runner: Runner | None = None
) -> bk.BackupRecord:
    """A complete backup set of one environment (the deploy's pre-deploy backup calls this).

    Refuses, writing nothing, when PostgreSQL is down or the disk is too full; a set is
    written under <id>.partial and renamed only when complete. Prunes the environment to
    its retention afterwards and records the run in <state>/backups/<env>/last-run.json."""
    runner = runner or LocalRunner()
    env = stack.environment(env_name)
    if kind not in bk.ALL_KINDS:
        raise OpsError(f"unknown backup kind {kind!r}; expected one of: {', '.join(bk.KINDS)}")
    if isinstance(runner, PrintingRunner):  # a dry run: say what would run, change nothing
        return _dry_backup(stack, state, env, kind, runner)
    if not isinstance(runner, LocalRunner):
        raise OpsError(
            f"backups are written on the machine that runs them; run `invoke backup --env "
            f"{env.name} --kind {kind}` on the host itself (the {type(runner).__name__} "
            "cannot write a backup set yet)"
        )
    started = time.time()
    try:
        with env_lock(state, env.name):
            record = _take(stack, state, env, kind, runner)
            _prune(stack, state, env.name, quiet=False)
    except OpsError as exc:
        write_last_run(
            state,
            env.name,
            kind,
            {
                "ok": False,
                "time": now_iso(),
                "error": str(exc).splitlines()[0],
                "duration_s": round(time.time() - started, 1),
            },
        )
        audit(state.root, f"backup {env.name} {kind} FAILED: {str(exc).splitlines()[0]}")
        if kind in ("daily", "pre-deploy"):  # nobody is watching a cron run
            notify(f":warning: {kind} backup of {env.name} failed: {str(exc)[:300]}", state.root)
        raise
    write_last_run(
        state,
        env.name,
        kind,
        {
            "ok": True,
            "time": now_iso(),
            "id": record.id,
            "size": record.size,
            "duration_s": round(time.time() - started, 1),
        },
    )
    audit(state.root, f"backup {env.name} {kind} {record.id} ({bk.human_size(record.size)})")
    return record


def _dry_backup(stack: Stack, state: StateDir, env: Environment, kind: str, runner: Runner):
    now = _dt.datetime.now(_dt.UTC)
    backup_id = bk.new_id(now, env.name, kind)
    folder = backups_root(state) / env.name / backup_id
    runner.run(bk.pg_ready(stack))
    runner.run(bk.stdout_to(str(folder / bk.DUMP), bk.dump_database(stack, env.database)))
    runner.run(bk.stdout_to(str(folder / bk.MEDIA), bk.media_archive(env)))
    print(
        f"[{runner.host}] write {folder / bk.CONFIG} and {folder / bk.MANIFEST}; prune {env.name}"
    )
    return bk.BackupRecord(backup_id, env.name, kind, now, str(folder))


def _take(stack: Stack, state: StateDir, env: Environment, kind: str, runner: Runner):
    require_postgres(stack, runner)
    server_version, db_size = database_facts(stack, runner, env.database)
    if db_size < 0:
        raise OpsError(
            f"database {env.database} does not exist; set the environment up first "
            f"(invoke setup --env={env.name}). Nothing was written"
        )
    app_up = running(runner, env.container)
    media = media_bytes(runner, env) if app_up else 0
    folder = backups_root(state) / env.name
    folder.mkdir(parents=True, exist_ok=True)
    previous = [r for r in list_records(state, env.name) if bk.DUMP in r.files]
    last_dump = previous[-1].files[bk.DUMP] if previous else None
    needed = bk.backup_estimate(db_size, media, last_dump)
    bk.check_space(shutil.disk_usage(folder).free, needed, str(folder), "backup")
    for stale in folder.glob(f"*{bk.PARTIAL_SUFFIX}"):  # left by a run that was killed
        shutil.rmtree(stale, ignore_errors=True)

    start = _dt.datetime.now(_dt.UTC)
    backup_id = bk.new_id(start, env.name, kind, {p.name for p in folder.iterdir()})
    partial = folder / f"{backup_id}{bk.PARTIAL_SUFFIX}"
    final = folder / backup_id
    partial.mkdir(mode=0o700)
    t0 = time.monotonic()
    try:
        say(f"-> {backup_id}: dumping {env.database} ({bk.human_size(db_size)}) ...")
        out = runner.run(
            bk.stdout_to(str(partial / bk.DUMP), bk.dump_database(stack, env.database)),
            input=bk.BACKUP_SCRIPT.read_bytes(),
        )
        census = bk.parse_census(out.stderr)
        if not census.tables:
            raise OpsError(f"the dump of {env.database} came with no table census; not kept")
        dumped = time.monotonic()
        if app_up:
            say(f"   media of {env.name} ({bk.human_size(media)}) ...")
            runner.run(bk.stdout_to(str(partial / bk.MEDIA), bk.media_archive(env)))
        else:
            say(f"   {env.container} is not running: no media archive in this set")
        (partial / bk.CONFIG).write_bytes(config_archive(stack, state))
        files = {
            name: {"sha256": sha256_file(partial / name), "size": (partial / name).stat().st_size}
            for name in bk.SET_FILES
            if (partial / name).is_file()
        }
        pg_dump = runner.run(
            ["docker", "exec", stack.services.postgresql.container, "pg_dump", "--version"],
            check=False,
        ).stdout.strip()
        app = runner.run(bk.container_version(env.container), check=False).stdout.strip()
        manifest = {
            "id": backup_id,
            "env": env.name,
            "kind": kind,
            "database": env.database,
            "database_size": db_size,
            "started": start.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "finished": now_iso(),
            "duration_s": round(time.monotonic() - t0, 1),
            "dump_s": round(dumped - t0, 1),
            "who": who(),
            "versions": {
                "aiia-ops (git)": current_version(),
                "postgresql server": server_version,
                "pg_dump": pg_dump or "unknown",
                "app image": app or f"{env.container} not running",
                "stack project": stack.project,
            },
            "files": files,
            "tables": {k: list(v) for k, v in census.tables.items()},
            "migrations": census.migrations,
            "restore_steps": bk.restore_steps(env, backup_id, stack.services.postgresql.container),
        }
        (partial / bk.MANIFEST).write_text(bk.render_manifest(manifest))
        os.replace(partial, final)
    except BaseException as exc:
        shutil.rmtree(partial, ignore_errors=True)
        if (isinstance(exc, OSError) and exc.errno == errno.ENOSPC) or (
            isinstance(exc, CommandFailed) and "No space left" in exc.stderr
        ):
            raise OpsError(
                f"the disk filled up while writing {backup_id}; the partial set was removed. "
                "Free space (invoke backup.prune) and try again"
            ) from None
        if isinstance(exc, CommandFailed):
            raise OpsError(
                f"backup of {env.database} failed; the partial set was removed:\n{exc}"
            ) from None
        raise
    record = read_record(final)
    assert record is not None
    say(
        f"   {backup_id}: {bk.human_size(record.size)} in {time.monotonic() - t0:.1f}s "
        f"({len(census.tables)} tables, {sum(r for r, _ in census.tables.values())} rows)"
    )
    return record


# --- pruning -----------------------------------------------------------------------------


def _prune(stack: Stack, state: StateDir, env: str, quiet: bool = False, dry: bool = False):
    plan = bk.plan_prune(list_records(state, env), stack.backups.retention)
    for record, why in plan.delete_sets:
        if not quiet or dry:
            say(f"   {'would delete' if dry else 'deleted'} {record.id} ({why})")
        if not dry:
            shutil.rmtree(record.path)
    for record, name, why in plan.delete_files:
        if not quiet or dry:
            say(f"   {'would delete' if dry else 'deleted'} {record.id}/{name} ({why})")
        if dry:
            continue
        (Path(record.path) / name).unlink(missing_ok=True)
        manifest_path = Path(record.path) / bk.MANIFEST
        if record.manifest is not None:
            record.manifest.setdefault("pruned", {})[name] = f"{now_iso()}: {why}"
            manifest_path.write_text(bk.render_manifest(record.manifest))
    return plan


# --- verification ------------------------------------------------------------------------


def _restore_copy(
    stack: Stack, runner: Runner, record: bk.BackupRecord, env: Environment, database: str
) -> list[str]:
    """Restore the set's dump into a new database `database` and compare its census with the
    manifest's. Returns the differences; the database stays (the caller drops or uses it)."""
    pg = stack.services.postgresql
    runner.run(bk.psql(stack, "postgres", ("gone", database)), input=bk.drop_database_sql())
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
    out = runner.run(bk.census(stack, database), input=bk.BACKUP_SCRIPT.read_bytes())
    expected = {k: tuple(v) for k, v in (record.manifest or {}).get("tables", {}).items()}
    return bk.compare_census(expected, bk.parse_census(out.stdout).tables)


def check_pg_space(stack: Stack, runner: Runner, needed: int, what: str) -> None:
    out = runner.run(bk.pg_free_space(stack), check=False)
    try:
        free = int(out.stdout.split()[-1])
    except (ValueError, IndexError):
        return  # no df in the image: PostgreSQL itself will say so if it runs out
    bk.check_space(free, needed, f"{stack.services.postgresql.container}'s data volume", what)


def verify_backup(stack: Stack, state: StateDir, record: bk.BackupRecord, runner: Runner) -> dict:
    """Checksums, then a real restore into a scratch database compared with the census taken
    at backup time. The result goes to VERIFY.json in the set."""
    t0 = time.monotonic()
    result: dict = {"time": now_iso(), "ok": False, "by": who()}
    problems = check_files(record)
    result["checksums"] = problems if problems else "ok"
    if not problems:
        env = stack.environment(record.env) if record.env in stack.environments else None
        if env is None:
            problems = [f"environment {record.env!r} is not in the stack: cannot restore it"]
        else:
            require_postgres(stack, runner)
            check_pg_space(
                stack, runner, record.manifest.get("database_size", 0), "scratch restore"
            )
            scratch = bk.scratch_name(env.database, "verify", record.id)
            say(f"-> {record.id}: checksums ok; restoring into scratch database {scratch} ...")
            try:
                problems = _restore_copy(stack, runner, record, env, scratch)
            except OpsError as exc:
                problems = [str(exc)]
            finally:
                runner.run(
                    bk.psql(stack, "postgres", ("gone", scratch)),
                    input=bk.drop_database_sql(),
                    check=False,
                )
            tables = (record.manifest or {}).get("tables", {})
            result["restore"] = problems if problems else "ok"
            result["tables"] = len(tables)
            result["rows"] = sum(v[0] for v in tables.values())
    result["ok"] = not problems
    result["problems"] = problems
    result["duration_s"] = round(time.monotonic() - t0, 1)
    (Path(record.path) / bk.VERIFY).write_text(json.dumps(result, indent=2) + "\n")
    record.verify = result
    audit(state.root, f"backup.verify {record.id}: {'ok' if result['ok'] else 'FAILED'}")
    return result


# --- restore -----------------------------------------------------------------------------


def _healthy(stack: Stack, env: Environment) -> tuple[bool, object]:
    try:
        data = health_through_nginx(env.domains[0], port=stack.local_host.published(443))
    except OSError as exc:
        return False, exc
    return data.get("http_status") == 200 and data.get("environment") == env.name, data


def _wait_healthy(stack: Stack, env: Environment, timeout: float) -> tuple[bool, object]:
    deadline = time.monotonic() + timeout
    ok, last = _healthy(stack, env)
    while not ok and time.monotonic() < deadline:
        time.sleep(1)
        ok, last = _healthy(stack, env)
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


def restore_plan_text(
    stack: Stack, env: Environment, record: bk.BackupRecord, safety: bool, exists: bool, media: bool
) -> str:
    m = record.manifest or {}
    steps = []
    if safety and exists:
        steps.append(f"take a safety backup of {env.database} ({bk.SAFETY_KIND})")
    new = bk.scratch_name(env.database, "restore", record.id)
    steps += [
        f"restore {record.id} ({bk.human_size(record.files.get(bk.DUMP, 0))} dump, taken "
        f"{m.get('started', '?')} from {record.env}) into a new database {new}, and check its "
        "tables, rows and content hashes against the manifest",
        f"pause {env.database} in PgBouncer (clients wait), end other connections, "
        + (f"swap {new} in for {env.database}" if exists else f"rename {new} to {env.database}"),
        f"resume {env.database} in PgBouncer; empty {env.name}'s cache (Redis db {env.redis_db})",
    ]
    if media:
        steps.append(f"replace {env.name}'s media with {bk.MEDIA} of the set")
    steps.append(
        f"check https://{env.domains[0]}/health/; if it fails (and it was healthy before), "
        "swap the previous database back"
    )
    if exists:
        steps.append(f"drop the previous {env.database}")
    return "\n".join(f"  {n}. {s}" for n, s in enumerate(steps, 1))


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
) -> dict:
    env = stack.environment(env_name)
    record = (
        latest_record(state, env.name) if backup_id == "latest" else find_record(state, backup_id)
    )
    backup_id = record.id
    if record.env != env.name and not allow_other_env:
        raise OpsError(
            f"{backup_id} is a backup of {record.env}, not {env.name}; to put {record.env}'s "
            f"data into {env.name}, pass --allow-other-env. Nothing was changed"
        )
    say(f"-> checking {backup_id} against its manifest ...")
    problems = check_files(record)
    if problems:
        raise OpsError(
            f"{backup_id} does not match its manifest, refusing to restore it:\n  "
            + "\n  ".join(problems)
            + "\nPick another backup (invoke backup.list). Nothing was changed"
        )
    require_postgres(stack, runner)
    _, current_size = database_facts(stack, runner, env.database)
    exists = current_size >= 0
    m = record.manifest or {}
    check_pg_space(stack, runner, m.get("database_size", 0), "restore")
    with_media = media and bk.MEDIA in record.files and running(runner, env.container)
    say(f"\nRestore {env.name} ({env.database}) from {backup_id}:")
    say(restore_plan_text(stack, env, record, safety, exists, with_media))
    if not yes:
        if not sys.stdin.isatty():
            raise OpsError("refusing to restore without confirmation; pass --yes")
        if input(f"Type '{env.name}' to restore: ").strip() != env.name:
            raise OpsError("not confirmed; nothing was changed")

    t0 = time.monotonic()
    report: dict = {"env": env.name, "id": backup_id, "safety_backup": None}
    with env_lock(state, env.name):
        was_healthy, _ = _healthy(stack, env)
        if safety and exists:
            say(f"-> safety backup of {env.database} ...")
            try:
                safety_record = _take(stack, state, env, bk.SAFETY_KIND, runner)
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
            problems = _restore_copy(stack, runner, record, env, new)
            if problems:
                raise OpsError(
                    "the restored copy differs from the backup's census:\n  "
                    + "\n  ".join(problems)
                )
        except BaseException:
            runner.run(
                bk.psql(stack, "postgres", ("gone", new)), input=bk.drop_database_sql(), check=False
            )
            raise
        report["restore_s"] = round(time.monotonic() - t_restore, 1)
        say(f"   restored and checked in {report['restore_s']}s; switching {env.database} ...")
        t_switch = time.monotonic()
        runner.run(bk.psql(stack, "postgres", ("gone", old)), input=bk.drop_database_sql())
        with paused(stack, runner, env.database):
            runner.run(
                bk.psql(stack, "postgres", ("db", env.database), ("new", new), ("old", old)),
                input=bk.swap_sql(),
            )
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
        ok, last = _wait_healthy(stack, env, HEALTH_TIMEOUT)
        if not ok and was_healthy and exists:
            with paused(stack, runner, env.database):
                runner.run(
                    bk.psql(stack, "postgres", ("db", env.database), ("new", new), ("old", old)),
                    input=bk.undo_swap_sql(),
                )
            runner.run(bk.flush_cache(stack, env), check=False)
            runner.run(
                bk.psql(stack, "postgres", ("gone", new)), input=bk.drop_database_sql(), check=False
            )
            audit(state.root, f"backup.restore {env.name} {backup_id} ROLLED BACK: unhealthy")
            raise OpsError(
                f"{env.name} was not healthy after the restore (last answer: {last}); the "
                f"previous database is back in place. See invoke logs --service "
                f"{service_key(env)}"
            )
        if exists:
            runner.run(bk.psql(stack, "postgres", ("gone", old)), input=bk.drop_database_sql())
        _prune(stack, state, env.name)  # the safety copies have a retention too
        report.update(healthy=ok, health=last, duration_s=round(time.monotonic() - t0, 1))
    audit(state.root, f"backup.restore {env.name} from {backup_id}: healthy={ok}")
    if not ok:
        raise OpsError(
            f"{env.database} was restored from {backup_id}, but {env.name} is not healthy yet "
            f"(last answer: {last}); see invoke logs --service {service_key(env)}"
        )
    return report


# --- tasks -------------------------------------------------------------------------------


def _load(stack_path: str | None) -> tuple[Stack, StateDir]:
    stack = load_stack(stack_path)
    return stack, local_state_dir(stack)


@task(
    default=True,
    help={
        "env": "environment to back up: prod (default) or staging",
        "kind": "manual (default), daily (the 02:00 UTC cron) or pre-deploy",
    },
)
def backup(c, env="prod", kind="manual", stack=None):
    """Back up one environment (database, media, configs, manifest) while it serves."""
    model, state = _load(stack)
    if kind not in bk.KINDS:
        raise OpsError(f"unknown kind {kind!r}; expected one of: {', '.join(bk.KINDS)}")
    record = take_backup(model, state, env, kind, LocalRunner())
    say(f"{record.path}")


def _age(created: _dt.datetime) -> str:
    return bk.human_age((_dt.datetime.now(_dt.UTC) - created).total_seconds())


def _verified_text(record: bk.BackupRecord) -> str:
    if not record.verify:
        return "never"
    when = record.verify.get("time", "")
    try:
        at = _dt.datetime.strptime(when, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=_dt.UTC)
        ago = f"{_age(at)} ago"
    except ValueError:
        ago = when
    return f"{'ok' if record.verified_ok else 'FAILED'} {ago}"


@task(
    name="list",
    help={"env": "only this environment", "json": "print JSON for machines"},
)
def list_(c, env=None, json_=False, stack=None):
    """The backups on this machine: id, kind, environment, size, age, last verified."""
    model, state = _load(stack)
    if env:
        model.environment(env)
    records = list_records(state, env)
    root = backups_root(state)
    names = (
        [env]
        if env
        else sorted(p.name for p in root.iterdir() if p.is_dir())
        if root.is_dir()
        else []
    )
    last = {name: runs for name in names if (runs := read_last_run(state, name))}
    if json_:
        print(
            json.dumps(
                {
                    "backups": [
                        {
                            "id": r.id,
                            "kind": r.kind,
                            "env": r.env,
                            "size": r.size,
                            "created": r.created.strftime("%Y-%m-%dT%H:%M:%SZ"),
                            "files": r.files,
                            "verify": r.verify,
                            "path": r.path,
                        }
                        for r in records
                    ],
                    "last_run": last,
                },
                indent=2,
            )
        )
        return
    rows = [
        [
            r.id,
            r.kind,
            r.env,
            bk.human_size(r.size),
            _age(r.created),
            _verified_text(r),
            ",".join(n.split(".")[0] for n in bk.SET_FILES if n in r.files),
        ]
        for r in records
    ]
    headers = ["id", "kind", "environment", "size", "age", "last verified", "files"]
    print(table(headers, rows) if rows else "no backups yet (invoke backup)")
    for env_name, kinds in sorted(last.items()):
        for kind, run in sorted(kinds.items()):
            state_text = paint("ok", "ok") if run.get("ok") else paint("FAILED", "error")
            detail = run.get("id") or run.get("error", "")
            print(f"last {kind} run of {env_name}: {state_text} at {run.get('time')} {detail}")


@task(
    help={
        "env": "only this environment (default: all)",
        "dry_run": "show what would be deleted",
    }
)
def prune(c, env=None, dry_run=False, stack=None):
    """Delete backups beyond the retention of stack.yml (never the newest verified one)."""
    model, state = _load(stack)
    envs = [model.environment(env).name] if env else sorted({r.env for r in list_records(state)})
    total = 0
    for name in envs:
        with env_lock(state, name):
            plan = _prune(model, state, name, dry=dry_run)
        total += len(plan.delete_sets) + len(plan.delete_files)
    r = model.backups.retention
    say(
        f"{'nothing to prune' if not total else f'{total} item(s)'}; retention: pre-deploy "
        f"{r.pre_deploy}, daily {r.daily}, manual {r.manual}, media {r.media}, config {r.config}"
    )


@task(
    help={
        "id": "backup id (default: the newest backup of each environment, or of --env)",
        "env": "with no id: the newest backup of this environment",
    },
)
def verify(c, id=None, env=None, stack=None):
    """Checksums, then a real restore into a scratch database, compared with the source."""
    model, state = _load(stack)
    runner = LocalRunner()
    if id:
        records = [find_record(state, id)]
    else:
        all_records = list_records(state, model.environment(env).name if env else None)
        newest: dict[str, bk.BackupRecord] = {}
        for r in all_records:
            newest[r.env] = r
        records = list(newest.values())
        if not records:
            raise OpsError("there is no backup to verify; take one: invoke backup")
    failed = []
    for record in records:
        result = verify_backup(model, state, record, runner)
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
        raise OpsError(f"verification failed for {', '.join(failed)}; do not rely on it")


@task(
    help={
        "env": "environment to restore: prod or staging",
        "id": "backup id (invoke backup.list), or 'latest': the newest verified one",
        "yes": "do not ask",
        "allow_other_env": "restore a backup taken of another environment",
        "no_safety_backup": "skip the safety backup (only when the database is beyond saving)",
        "no_media": "restore the database only, not the media",
    }
)
def restore(
    c, env, id, yes=False, allow_other_env=False, no_safety_backup=False, no_media=False, stack=None
):
    """Restore a backup: safety backup, restore beside the live database, swap, health."""
    model, state = _load(stack)
    report = restore_backup(
        model,
        state,
        env,
        id,
        LocalRunner(),
        yes=yes,
        allow_other_env=allow_other_env,
        safety=not no_safety_backup,
        media=not no_media,
    )
    say(
        f"\n{env} restored from {report['id']} in {report['duration_s']}s "
        f"(switch {report['switch_s']}s; safety backup: {report['safety_backup'] or 'none'}); "
        "/health/ answers 200"
    )


namespace = Collection("backup", backup, list_, prune, verify, restore)
