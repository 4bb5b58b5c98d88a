"""Taking, listing and pruning backups: facts through `runner.query()`, every change through
`runner.run()` / `runner.write_file()`, so a `PrintingRunner(reader=LocalRunner())` gives a
truthful dry run of the very same code. `take_backup()` is what a deploy calls for its
pre-deploy backup. Verification and restores: flows/restore.py. See docs/backups.md.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import errno
import io
import json
import os
import tarfile
import time
from pathlib import Path

from aiia_ops.commands import backups as bk
from aiia_ops.errors import CommandFailed, OpsError
from aiia_ops.flows.output import paint, table
from aiia_ops.host.git import head_version
from aiia_ops.host.lock import backup_lock, holding
from aiia_ops.host.notify import notify
from aiia_ops.host.releases import audit_line, now_iso, who
from aiia_ops.host.runners import LocalRunner, PrintingRunner, Runner
from aiia_ops.host.secrets import load_secrets
from aiia_ops.host.ssh import SSHRunner
from aiia_ops.model import Environment, Stack
from aiia_ops.model.state import StateDir


def say(text: str) -> None:
    print(text, flush=True)


def performs(runner: Runner) -> bool:
    """False for the dry-run printer: its commands never ran, so what they would have
    printed (a census) cannot be checked, and nobody is alerted about them."""
    return not isinstance(runner, PrintingRunner)


def target(runner: Runner) -> Runner:
    return runner.reader if isinstance(runner, PrintingRunner) and runner.reader else runner


def lock(runner: Runner, state: StateDir, env: str, action: str):
    """One backup, restore, verify or prune of an environment at a time; refused at once
    (no wait) with the holder named. A lock left by a killed run is taken over."""
    return holding(runner, str(state.root), backup_lock(env), action=action)


def audit(runner: Runner, state: StateDir, message: str) -> None:
    runner.run(bk.append_line(str(state.root / "audit.log"), audit_line(message)), check=False)


# --- the backup folders ------------------------------------------------------------------


def backups_root(state: StateDir) -> Path:
    return state.root / "backups"


def _text(runner: Runner, path: Path) -> str | None:
    data = runner.read_file(str(path))
    return None if data is None else data.decode(errors="replace")


def read_tree(state: StateDir, runner: Runner) -> bk.Tree:
    return bk.parse_tree(runner.query(bk.list_tree(str(backups_root(state)))).stdout)


def list_records(
    state: StateDir, env: str | None = None, runner: Runner | None = None
) -> list[bk.BackupRecord]:
    runner = runner or LocalRunner()
    out = []
    for (env_name, name), files in read_tree(state, runner).sets.items():
        if env and env_name != env:
            continue
        folder = backups_root(state) / env_name / name
        manifest = _text(runner, folder / bk.MANIFEST) if bk.MANIFEST in files else None
        verify = _text(runner, folder / bk.VERIFY) if bk.VERIFY in files else None
        record = bk.record_from(str(folder), files, manifest, verify)
        if record is not None and record.env == env_name:
            out.append(record)
    return sorted(out, key=lambda r: r.id)


def find_record(state: StateDir, backup_id: str, runner: Runner | None = None) -> bk.BackupRecord:
    _, env, _ = bk.parse_id(backup_id)
    for record in list_records(state, env, runner):
        if record.id == backup_id:
            return record
    raise OpsError(
        f"no backup {backup_id!r} in {backups_root(state) / env}; see invoke backup.list"
    )


def latest_record(state: StateDir, env: str, runner: Runner | None = None) -> bk.BackupRecord:
    """`--id latest`: the newest verified backup of env, else its newest one."""
    records = [r for r in list_records(state, env, runner) if not r.verify_failed]
    if not records:
        raise OpsError(f"there is no backup of {env} here ({backups_root(state) / env})")
    verified = [r for r in records if r.verified_ok]
    return (verified or records)[-1]


def file_facts(runner: Runner, folder: Path, names) -> dict[str, dict]:
    """{name: {"sha256", "size"}} of the files of `names` that exist in `folder`."""
    paths = [str(folder / n) for n in names]
    sizes = bk.parse_sizes(runner.query(bk.file_sizes(paths)).stdout)
    digests = bk.parse_digests(runner.query(bk.file_digests(paths)).stdout)
    return {
        n: {"sha256": digests[n], "size": sizes[n]} for n in names if n in sizes and n in digests
    }


def check_files(runner: Runner, record: bk.BackupRecord) -> list[str]:
    """Checksums against the manifest: problems, one line each (empty = all good)."""
    names = sorted((record.manifest or {}).get("files", {}))
    paths = [str(Path(record.path) / n) for n in names]
    sizes = bk.parse_sizes(runner.query(bk.file_sizes(paths)).stdout) if paths else {}
    digests = bk.parse_digests(runner.query(bk.file_digests(paths)).stdout) if paths else {}
    return bk.check_files(record.manifest, sizes, digests)


def last_run_path(state: StateDir, env: str) -> Path:
    return backups_root(state) / env / bk.LAST_RUN


def read_last_run(state: StateDir, env: str, runner: Runner | None = None) -> dict:
    text = _text(runner or LocalRunner(), last_run_path(state, env))
    try:
        return json.loads(text) if text else {}
    except ValueError:
        return {}


def write_last_run(runner: Runner, state: StateDir, env: str, kind: str, entry: dict) -> None:
    """<state>/backups/<env>/last-run.json: {kind: its last run}, for backup.list and the
    monitor (a failed run is recorded too, with its error)."""
    data = read_last_run(state, env, runner)
    data[kind] = {"env": env, "kind": kind, **entry}
    runner.write_file(
        str(last_run_path(state, env)), json.dumps(data, indent=2, sort_keys=True) + "\n"
    )


def list_text(state: StateDir, env: str | None, as_json: bool) -> str:
    """`invoke backup.list`: the sets on this machine and the last run of each kind."""
    runner = LocalRunner()
    records = list_records(state, env, runner)
    names = [env] if env else read_tree(state, runner).envs
    last = {name: runs for name in names if (runs := read_last_run(state, name, runner))}
    if as_json:
        return bk.list_json(records, last)
    rows = bk.list_rows(records, _dt.datetime.now(_dt.UTC))
    lines = [table(bk.LIST_HEADERS, rows) if rows else "no backups yet (invoke backup)"]
    lines += [paint(alert, "error") for alert in bk.verify_alerts(records)]
    for env_name, kinds in sorted(last.items()):
        for kind, run in sorted(kinds.items()):
            state_text = paint("ok", "ok") if run.get("ok") else paint("FAILED", "error")
            detail = run.get("id") or run.get("error", "")
            lines.append(
                f"last {kind} run of {env_name}: {state_text} at {run.get('time')} {detail}"
            )
    return "\n".join(lines)


# --- facts from the running stack --------------------------------------------------------


def running(runner: Runner, container: str) -> bool:
    out = runner.query(bk.container_running(container))
    return out.ok and out.stdout.strip() == "true"


def require_postgres(stack: Stack, runner: Runner) -> None:
    pg = stack.services.postgresql.container
    if not runner.query(bk.pg_ready(stack)).ok:
        state = "does not accept connections" if running(runner, pg) else "is not running"
        raise OpsError(
            f"PostgreSQL ({pg}) {state}; start it (invoke up) and try again. Nothing was changed"
        )


def database_facts(stack: Stack, runner: Runner, database: str) -> tuple[str, int | None]:
    """(server version, size in bytes or -1 when the database does not exist; None when
    PostgreSQL gave no answer)."""
    out = runner.query(bk.psql(stack, "postgres", ("db", database)), input=bk.database_facts_sql())
    if not out.ok:
        raise OpsError(f"PostgreSQL did not say how large {database} is:\n{out.stderr.strip()}")
    return bk.parse_database_facts(out.stdout)


def media_bytes(runner: Runner, env: Environment) -> int:
    out = runner.query(bk.media_bytes(env))
    try:
        return int(out.stdout.split()[0])
    except (ValueError, IndexError):
        return 0


def free_bytes(runner: Runner, path: Path) -> int | None:
    return bk.parse_free(runner.query(bk.free_space(str(path))).stdout)


def secret_values(state: StateDir, stack: Stack) -> dict[str, str]:
    """Every secret value there is: the loaded secrets (AIIA_* overrides included) and any
    KEY=value of the 0600 files under <state>/secrets (a webhook URL, a future key)."""
    out: dict[str, str] = {}
    try:
        s = load_secrets(state.root, list(stack.environments), create=False)
    except OpsError:
        s = None  # not all set up yet: the files' values below are all there is to hide
    if s is not None:
        for f in dataclasses.fields(s):
            if isinstance(getattr(s, f.name), str):
                out[f.name.upper()] = getattr(s, f.name)
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
    if isinstance(target(runner), SSHRunner):
        raise OpsError(
            f"backups are written on the machine that runs them; run `invoke backup --env "
            f"{env.name} --kind {kind}` on the host itself"
        )
    started = time.time()
    try:
        with lock(runner, state, env.name, f"backup {kind}"):
            record = take_set(stack, state, env, kind, runner)
            prune_env(stack, state, env.name, runner)
    except OpsError as exc:
        first = str(exc).splitlines()[0]
        entry = {"ok": False, "time": now_iso(), "error": first}
        write_last_run(
            runner, state, env.name, kind, {**entry, "duration_s": round(time.time() - started, 1)}
        )
        audit(runner, state, f"backup {env.name} {kind} FAILED: {first}")
        if kind in ("daily", "pre-deploy") and performs(runner):  # nobody watches a cron run
            notify(f":warning: {kind} backup of {env.name} failed: {str(exc)[:300]}", state.root)
        raise
    write_last_run(
        runner,
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
    audit(runner, state, f"backup {env.name} {kind} {record.id} ({bk.human_size(record.size)})")
    return record


def take_set(
    stack: Stack, state: StateDir, env: Environment, kind: str, runner: Runner
) -> bk.BackupRecord:
    """The set itself, the environment's lock held by the caller."""
    require_postgres(stack, runner)
    server_version, db_size = database_facts(stack, runner, env.database)
    if db_size is not None and db_size < 0:
        raise OpsError(
            f"database {env.database} does not exist; set the environment up first "
            f"(invoke setup --env={env.name}). Nothing was written"
        )
    app_up = running(runner, env.container)
    media = media_bytes(runner, env) if app_up else 0
    folder = backups_root(state) / env.name
    tree = read_tree(state, runner)
    previous = [r for r in list_records(state, env.name, runner) if bk.DUMP in r.files]
    last_dump = previous[-1].files[bk.DUMP] if previous else None
    needed = bk.backup_estimate(db_size or 0, media, last_dump)
    free = free_bytes(runner, folder)
    if free is not None:
        bk.check_space(free, needed, str(folder), "backup")
    runner.run(bk.make_dirs(str(folder)))
    existing = tree.names(env.name)
    for stale in sorted(n for n in existing if n.endswith(bk.PARTIAL_SUFFIX)):
        runner.run(bk.remove_tree(str(folder / stale)), check=False)  # a killed run's

    start = _dt.datetime.now(_dt.UTC)
    backup_id = bk.new_id(start, env.name, kind, existing)
    partial = folder / f"{backup_id}{bk.PARTIAL_SUFFIX}"
    final = folder / backup_id
    runner.run(bk.make_private_dir(str(partial)))
    t0 = time.monotonic()
    try:
        say(f"-> {backup_id}: dumping {env.database} ({bk.human_size(db_size or 0)}) ...")
        out = runner.run(
            bk.stdout_to(str(partial / bk.DUMP), bk.dump_database(stack, env.database)),
            input=bk.BACKUP_SCRIPT.read_bytes(),
        )
        census = bk.parse_census(out.stderr)
        if not census.tables and performs(runner):
            raise OpsError(f"the dump of {env.database} came with no table census; not kept")
        dumped = time.monotonic()
        if app_up:
            say(f"   media of {env.name} ({bk.human_size(media)}) ...")
            runner.run(bk.stdout_to(str(partial / bk.MEDIA), bk.media_archive(env)))
        else:
            say(f"   {env.container} is not running: no media archive in this set")
        runner.write_file(str(partial / bk.CONFIG), config_archive(stack, state), mode=0o600)
        files = file_facts(runner, partial, bk.SET_FILES)
        pg_dump = runner.query(bk.pg_dump_version(stack)).stdout.strip()
        app = runner.query(bk.container_version(env.container)).stdout.strip()
        manifest = {
            "id": backup_id,
            "env": env.name,
            "kind": kind,
            "database": env.database,
            "database_size": db_size or 0,
            "started": start.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "finished": now_iso(),
            "duration_s": round(time.monotonic() - t0, 1),
            "dump_s": round(dumped - t0, 1),
            "who": who(),
            "versions": {
                "aiia-ops (git)": head_version(),
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
        text = bk.render_manifest(manifest)
        runner.write_file(str(partial / bk.MANIFEST), text)
        runner.run(bk.rename_dir(str(partial), str(final)))
    except BaseException as exc:
        runner.run(bk.remove_tree(str(partial)), check=False)
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
    sizes = {name: f["size"] for name, f in files.items()}
    sizes[bk.MANIFEST] = len(text.encode())
    record = bk.BackupRecord(backup_id, env.name, kind, start, str(final), sizes, manifest)
    say(
        f"   {backup_id}: {bk.human_size(record.size)} in {time.monotonic() - t0:.1f}s "
        f"({len(census.tables)} tables, {sum(r for r, _ in census.tables.values())} rows)"
    )
    return record


# --- pruning -----------------------------------------------------------------------------


def prune_env(stack: Stack, state: StateDir, env: str, runner: Runner) -> bk.PrunePlan:
    """Delete what the retention of stack.yml does not keep (the environment's lock held)."""
    plan = bk.plan_prune(list_records(state, env, runner), stack.backups.retention)
    for record, why in plan.delete_sets:
        say(f"   delete {record.id} ({why})")
        runner.run(bk.remove_tree(record.path))
    for record, name, why in plan.delete_files:
        say(f"   delete {record.id}/{name} ({why})")
        runner.run(bk.remove_file(str(Path(record.path) / name)))
        if record.manifest is not None:
            record.manifest.setdefault("pruned", {})[name] = f"{now_iso()}: {why}"
            runner.write_file(
                str(Path(record.path) / bk.MANIFEST), bk.render_manifest(record.manifest)
            )
    return plan


def prune(stack: Stack, state: StateDir, env: str | None, runner: Runner) -> str:
    """`invoke backup.prune`: every environment (or one), each under its lock."""
    if env:
        envs = [stack.environment(env).name]
    else:
        envs = sorted({r.env for r in list_records(state, runner=runner)})
    total = 0
    for name in envs:
        with lock(runner, state, name, "backup.prune"):
            plan = prune_env(stack, state, name, runner)
        total += len(plan.delete_sets) + len(plan.delete_files)
    r = stack.backups.retention
    return (
        f"{'nothing to prune' if not total else f'{total} item(s)'}; retention: pre-deploy "
        f"{r.pre_deploy}, daily {r.daily}, manual {r.manual}, media {r.media}, config {r.config}"
    )
