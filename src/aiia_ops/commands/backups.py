"""Backups as data: ids, manifests, the census of a database, retention, and the commands.

Nothing here runs a command or touches a disk. `flows/backup.py` and `flows/restore.py`
read the backup folders through a runner, run what is built here, and write the results.

A backup set lives in <state_dir>/backups/<env>/<id>/ (doc §8, "Backup Contents"):
    database.dump   pg_dump custom format of the environment's database (pg_restore reads it)
    media.tar.gz    the environment's uploads (<storage>/media), possibly empty
    config.tar.gz   the rendered configs, compose file and stack description, secrets removed
    MANIFEST.txt    what, when, which versions, sha256 of every file, census, restore steps
    VERIFY.json     written later by `invoke backup.verify` (not part of the checksummed set)
"""

from __future__ import annotations

import datetime as _dt
import json
import re
from dataclasses import dataclass, field
from pathlib import PurePosixPath

from aiia_ops import REPO_ROOT
from aiia_ops.errors import OpsError
from aiia_ops.model import Environment, Retention, Stack

DUMP, MEDIA, CONFIG, MANIFEST, VERIFY = (
    "database.dump",
    "media.tar.gz",
    "config.tar.gz",
    "MANIFEST.txt",
    "VERIFY.json",
)
SET_FILES = (DUMP, MEDIA, CONFIG)
KINDS = ("manual", "daily", "pre-deploy")  # what `invoke backup --kind` takes
SAFETY_KIND = "pre-restore"  # taken by `backup.restore` before it replaces a database
ALL_KINDS = (*KINDS, SAFETY_KIND)
# A set `backup.pitr` makes from the off-site repository, restores, then deletes: no
# retention of its own (the repository keeps that moment).
PITR_KIND = "pitr"
ID_KINDS = (*ALL_KINDS, PITR_KIND)
PARTIAL_SUFFIX = ".partial"
LAST_RUN = "last-run.json"
# Disk kept free beyond a backup's estimated size: logs and the database keep growing.
DISK_RESERVE = 256 * 1024**2
BACKUP_SCRIPT = REPO_ROOT / "services" / "postgres" / "scripts" / "backup-database"
MANIFEST_JSON_MARK = "--- machine-readable copy (read by invoke backup.*; do not edit) ---"
_ID_RE = re.compile(r"^(\d{8}T\d{6}Z)-([a-z0-9_]+)-([a-z-]+?)(?:-(\d+))?$")
_NAME_RE = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


# --- ids ---------------------------------------------------------------------------------


def new_id(now: _dt.datetime, env: str, kind: str, existing: set[str] = frozenset()) -> str:
    """<UTC time>-<env>-<kind>: sorts by time, says what it is, unique across environments."""
    if kind not in ID_KINDS:
        raise OpsError(f"unknown backup kind {kind!r}; expected one of: {', '.join(KINDS)}")
    base = f"{now.astimezone(_dt.UTC):%Y%m%dT%H%M%SZ}-{env}-{kind}"
    candidate, n = base, 1
    while candidate in existing:
        n += 1
        candidate = f"{base}-{n}"
    return candidate


def parse_id(backup_id: str) -> tuple[_dt.datetime, str, str]:
    refused = OpsError(
        f"{str(backup_id)[:80]!r} is not a backup id (like 20260101T020000Z-prod-daily); "
        "see invoke backup.list"
    )
    m = _ID_RE.fullmatch(backup_id) if isinstance(backup_id, str) else None
    if not m or m.group(3) not in ID_KINDS:
        raise refused
    try:  # the pattern holds digits; the calendar decides (month 13, 25 o'clock)
        when = _dt.datetime.strptime(m.group(1), "%Y%m%dT%H%M%SZ").replace(tzinfo=_dt.UTC)
    except ValueError:
        raise refused from None
    return when, m.group(2), m.group(3)


# --- census: tables, row counts and a content hash per table ----------------------------


@dataclass(frozen=True)
class Census:
    tables: dict[str, tuple[int, str]]  # schema.table -> (rows, content hash)
    migrations: dict[str, str] = field(default_factory=dict)  # django app -> latest


def parse_census(text: str) -> Census:
    """Lines `census|<table>|<rows>|<hash>` and `migration|<app>|<name>`; others ignored."""
    tables, migrations = {}, {}
    for line in text.splitlines():
        if line.startswith("census|"):
            name, rows, digest = line[len("census|") :].rsplit("|", 2)
            tables[name] = (int(rows), digest)
        elif line.startswith("migration|"):
            _, app, name = line.split("|", 2)
            migrations[app] = name
    return Census(tables, migrations)


def compare_census(expected: dict[str, tuple[int, str]], actual: dict[str, tuple[int, str]]):
    """Differences, one line each; empty when the restore holds exactly the source's rows."""
    out = []
    for name in sorted(set(expected) | set(actual)):
        if name not in actual:
            out.append(f"{name}: missing after restore")
        elif name not in expected:
            out.append(f"{name}: not in the source")
        elif tuple(actual[name]) != tuple(expected[name]):
            (er, eh), (ar, ah) = expected[name], actual[name]
            what = f"{er} rows, now {ar}" if er != ar else f"same {er} rows, content differs"
            out.append(f"{name}: {what} (hash {eh} -> {ah})")
    return out


# --- the manifest ------------------------------------------------------------------------


def restore_steps(env: Environment, backup_id: str, pg_container: str) -> list[str]:
    """What a person does by hand, with nothing but docker, tar and sha256sum."""
    db, role = env.database, env.db_user
    return [
        "cd into this folder; check the files: grep -E '^[0-9a-f]{64}  ' MANIFEST.txt | "
        "sha256sum -c -",
        f"or let the tool do all of it: invoke backup.restore --env {env.name} --id {backup_id}",
        f"by hand - stop the app's traffic to the database: docker stop {env.container}",
        f"recreate the database: docker exec -i {pg_container} psql -d postgres -c "
        f"'DROP DATABASE IF EXISTS {db} WITH (FORCE)' -c 'CREATE DATABASE {db} OWNER {role}'",
        f"restore: docker exec -i {pg_container} pg_restore --dbname={db} --no-owner "
        f"--no-privileges --role={role} --exit-on-error --single-transaction < {DUMP}",
        # Streamed in: the app's root filesystem is read-only (commands/hardening.py).
        f"media: docker start {env.container} && docker exec -i {env.container} "
        f"tar -xzf - -C {env.volumes.get('storage', '/app/storage')} < {MEDIA}",
        f"start the app again: docker start {env.container}; then check "
        f"https://{env.domains[0]}/health/ answers 200",
        f"{CONFIG} holds the rendered configs with secrets replaced by <redacted:...>; the "
        "secrets come from your safe copy of <state_dir>/secrets (or `invoke setup` makes new "
        "ones)",
    ]


def render_manifest(data: dict) -> str:
    """MANIFEST.txt: for people first, then a JSON copy the tasks read back."""
    lines = [
        f"AI-IA backup {data['id']}",
        "",
        f"environment   {data['env']} (database {data['database']})",
        f"kind          {data['kind']}",
        f"taken         {data['started']} -> {data['finished']} ({data['duration_s']:.1f}s)",
        f"by            {data['who']}",
        f"database size {data['database_size']} bytes when taken",
        "",
        "Versions",
    ]
    lines += [f"  {k:<22}{v}" for k, v in sorted(data["versions"].items())]
    lines += ["", "Files (sha256  name, size in bytes)"]
    lines += [f"{f['sha256']}  {name}" for name, f in sorted(data["files"].items())]
    lines += [f"  {name}: {f['size']} bytes" for name, f in sorted(data["files"].items())]
    lines += ["", "Tables at backup time (rows, content hash)"]
    for name, (rows, digest) in sorted(data["tables"].items()):
        lines.append(f"  {name:<40}{rows:>12}  {digest}")
    if data.get("migrations"):
        lines += ["", "Schema (latest migration per Django app)"]
        lines += [f"  {app:<22}{name}" for app, name in sorted(data["migrations"].items())]
    lines += ["", "Restore by hand"]
    lines += [f"  {n}. {step}" for n, step in enumerate(data["restore_steps"], 1)]
    lines += ["", MANIFEST_JSON_MARK, json.dumps(data, indent=1, sort_keys=True), ""]
    return "\n".join(lines)


def parse_manifest(text: str) -> dict:
    if MANIFEST_JSON_MARK not in text:
        raise OpsError("MANIFEST.txt has no machine-readable part: not a backup of this tool")
    try:
        return json.loads(text.split(MANIFEST_JSON_MARK, 1)[1])
    except ValueError as exc:
        raise OpsError(f"MANIFEST.txt is damaged ({exc}); the backup cannot be trusted") from None


# --- secrets never in clear --------------------------------------------------------------


def redact(data: bytes, secrets: dict[str, str]) -> bytes:
    """Each secret value becomes <redacted:NAME>, longest first (one may contain another)."""
    for name, value in sorted(secrets.items(), key=lambda kv: -len(kv[1])):
        if value:
            data = data.replace(value.encode(), f"<redacted:{name}>".encode())
    return data


# --- records and retention ---------------------------------------------------------------


@dataclass
class BackupRecord:
    id: str
    env: str
    kind: str
    created: _dt.datetime
    path: str
    files: dict[str, int] = field(default_factory=dict)  # present files -> size
    manifest: dict | None = None
    verify: dict | None = None  # VERIFY.json

    @property
    def size(self) -> int:
        return sum(self.files.values())

    @property
    def verified_ok(self) -> bool:
        return bool(self.verify and self.verify.get("ok"))

    @property
    def verify_failed(self) -> bool:
        return bool(self.verify) and not self.verified_ok


def keep_count(kind: str, retention: Retention) -> int:
    """Doc §8: before deployment 3, daily 7, manual 3; safety copies count as manual."""
    return {
        "pre-deploy": retention.pre_deploy,
        "daily": retention.daily,
        "manual": retention.manual,
        SAFETY_KIND: retention.manual,
    }[kind]


@dataclass
class PrunePlan:
    delete_sets: list[tuple[BackupRecord, str]] = field(default_factory=list)  # (record, why)
    delete_files: list[tuple[BackupRecord, str, str]] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not self.delete_sets and not self.delete_files


def plan_prune(records: list[BackupRecord], retention: Retention) -> PrunePlan:
    """Per environment: the newest N of each kind stay (N from the stack's retention),
    whatever their verification said; media and config archives stay only in the newest
    `media`/`config` sets that keep them. The newest verified backup always stays whole,
    whatever its age. A failed verification never makes a set deletable early: it can fail
    for reasons unrelated to the dump (the scratch restore running out of memory), so it
    raises an alert (`verify_alerts`) instead; only sets beyond their kind's N go."""
    plan = PrunePlan()
    for env in sorted({r.env for r in records}):
        mine = sorted((r for r in records if r.env == env), key=lambda r: r.id, reverse=True)
        verified = [r for r in mine if r.verified_ok]
        protected = verified[0].id if verified else None
        kept: list[BackupRecord] = []
        for kind in ALL_KINDS:
            of_kind = [r for r in mine if r.kind == kind]
            keep = {r.id for r in of_kind[: keep_count(kind, retention)]}
            for r in of_kind:
                if r.id in keep or r.id == protected:
                    kept.append(r)
                else:
                    plan.delete_sets.append(
                        (r, f"older than the newest {keep_count(kind, retention)} {kind}")
                    )
        kept.sort(key=lambda r: r.id, reverse=True)
        for name, limit, label in (
            (MEDIA, retention.media, "media"),
            (CONFIG, retention.config, "config"),
        ):
            holders = [r for r in kept if name in r.files]
            for r in holders[limit:]:
                if r.id != protected:
                    plan.delete_files.append((r, name, f"older than the newest {limit} {label}"))
    plan.delete_sets.sort(key=lambda x: x[0].id)
    return plan


def verify_alerts(records: list[BackupRecord]) -> list[str]:
    """One line per environment whose newer sets failed verification since its newest
    verified one: what `backup.list` shows and `backup.verify` sends. The sets are kept."""
    out = []
    for env in sorted({r.env for r in records}):
        mine = sorted((r for r in records if r.env == env), key=lambda r: r.id, reverse=True)
        failed = []
        for r in mine:
            if r.verified_ok:
                break
            if r.verify_failed:
                failed.append(r.id)
        if not failed:
            continue
        good = next((r.id for r in mine if r.verified_ok), None)
        out.append(
            f"ALERT {env}: {len(failed)} backup(s) failed verification since the last good one "
            f"({', '.join(failed)}); they are kept (retention never deletes a set for a failed "
            f"verification). Newest verified: {good or 'none'}. Find why (invoke backup.verify "
            "--id ID prints the problems) and verify again"
        )
    return out


# --- space -------------------------------------------------------------------------------


def backup_estimate(database_size: int, media_size: int, last_dump_size: int | None) -> int:
    """Bytes a new set may need: the database's size bounds a compressed dump (no indexes,
    zlib); the last dump of the same environment, with room to grow, is a closer guess."""
    dump = database_size if last_dump_size is None else min(database_size, last_dump_size * 3 // 2)
    return dump + media_size + 1024**2


def check_space(free: int, needed: int, where: str, what: str, reserve: int = DISK_RESERVE):
    if free - needed < reserve:
        raise OpsError(
            f"not enough free disk for {what}: {where} has {human_size(free)} free, the "
            f"{what} needs about {human_size(needed)} and {human_size(reserve)} must stay "
            "free; nothing was written. Free space (invoke backup.prune, docker image prune) "
            "and try again"
        )


def human_size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"  # pragma: no cover


def human_age(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f}s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f}m"
    if seconds < 36 * 3600:
        return f"{seconds / 3600:.0f}h"
    return f"{seconds / 86400:.0f}d"


# --- commands ----------------------------------------------------------------------------


def check_name(name: str) -> str:
    if not _NAME_RE.match(name):
        raise OpsError(f"{name!r} is not a plain lower-case database name")
    return name


def stdout_to(path: str, argv: list[str]) -> list[str]:
    """Run argv with its standard output in a file on the target host (no shell quoting:
    the path and argv are positional arguments of a fixed script)."""
    return ["sh", "-c", 'out=$1; shift; exec "$@" > "$out"', "sh", str(path), *argv]


def stdin_from(path: str, argv: list[str]) -> list[str]:
    return ["sh", "-c", 'in=$1; shift; exec "$@" < "$in"', "sh", str(path), *argv]


def pg_ready(stack: Stack) -> list[str]:
    return ["docker", "exec", stack.services.postgresql.container, "pg_isready", "-q"]


def psql(stack: Stack, db: str = "postgres", *variables: tuple[str, str]) -> list[str]:
    """psql as the superuser over the container's socket; SQL on stdin, ON_ERROR_STOP."""
    argv = ["docker", "exec", "-i", stack.services.postgresql.container, "psql", "-X", "-q",
            "-At", "-v", "ON_ERROR_STOP=1", "-d", db]  # fmt: skip
    for key, value in variables:
        argv += ["-v", f"{key}={value}"]
    return argv


def dump_database(stack: Stack, database: str) -> list[str]:
    """backup-database (its text on stdin): the dump on stdout, the census on stderr."""
    pg = stack.services.postgresql.container
    return ["docker", "exec", "-i", pg, "bash", "-s", "--", check_name(database)]


def census(stack: Stack, database: str) -> list[str]:
    pg = stack.services.postgresql.container
    return ["docker", "exec", "-i", pg, "bash", "-s", "--", "--census", check_name(database)]


def restore_into(stack: Stack, database: str, role: str) -> list[str]:
    """pg_restore (dump on stdin) into an empty database, every object owned by `role`."""
    pg = stack.services.postgresql.container
    return ["docker", "exec", "-i", pg, "pg_restore", f"--dbname={check_name(database)}",
            "--no-owner", "--no-privileges", f"--role={check_name(role)}", "--exit-on-error",
            "--single-transaction"]  # fmt: skip


def dump_toc(stack: Stack) -> list[str]:
    """pg_restore --list (dump on stdin): fails on a file that is not a custom-format dump."""
    return ["docker", "exec", "-i", stack.services.postgresql.container, "pg_restore", "--list"]


def pg_free_space(stack: Stack) -> list[str]:
    pg = stack.services.postgresql
    return ["docker", "exec", pg.container, "df", "-B1", "--output=avail",
            pg.volumes.get("pgdata", "/var/lib/postgresql/data")]  # fmt: skip


def database_facts_sql() -> str:
    """server version and size of :db (0 when it does not exist)."""
    return (
        "SELECT current_setting('server_version'), "
        "coalesce((SELECT pg_database_size(datname) FROM pg_database WHERE datname = :'db'), -1);"
    )


def create_database_sql() -> str:
    """An empty database :new owned by :role, locked down as ensure-database does it."""
    return """\
CREATE DATABASE :"new" OWNER :"role";
REVOKE ALL ON DATABASE :"new" FROM PUBLIC;
\\connect :"new"
ALTER SCHEMA public OWNER TO :"role";
REVOKE ALL ON SCHEMA public FROM PUBLIC;
"""


def drop_database_sql() -> str:
    return 'DROP DATABASE IF EXISTS :"gone" WITH (FORCE);\n'


def swap_sql() -> str:
    """Put :new in the place of :db; the previous :db (if any) becomes :old.

    PgBouncer has paused :db (no server connection left); direct connections (a one-off
    migration, a psql) are refused from here on and terminated, so the rename cannot fail
    on "database is being accessed by other users"."""
    return """\
SELECT EXISTS (SELECT FROM pg_database WHERE datname = :'db') AS aiia_has_db \\gset
\\if :aiia_has_db
ALTER DATABASE :"db" WITH ALLOW_CONNECTIONS false;
SELECT set_config('aiia.db', :'db', false);
DO $$
DECLARE left_over int;
BEGIN
    FOR i IN 1..100 LOOP
        PERFORM pg_stat_clear_snapshot();
        PERFORM pg_terminate_backend(pid) FROM pg_stat_activity
            WHERE datname = current_setting('aiia.db') AND pid <> pg_backend_pid();
        PERFORM pg_stat_clear_snapshot();
        SELECT count(*) INTO left_over FROM pg_stat_activity
            WHERE datname = current_setting('aiia.db') AND pid <> pg_backend_pid();
        EXIT WHEN left_over = 0;
        PERFORM pg_sleep(0.1);
    END LOOP;
    IF left_over > 0 THEN
        RAISE EXCEPTION '% connections to % would not end', left_over, current_setting('aiia.db');
    END IF;
END $$;
BEGIN;
ALTER DATABASE :"db" RENAME TO :"old";
\\else
BEGIN;
\\endif
ALTER DATABASE :"new" RENAME TO :"db";
COMMIT;
"""


def undo_swap_sql() -> str:
    """Back to the database as it was before a restore whose health check failed (the
    renames in one transaction, as in the swap)."""
    return """\
ALTER DATABASE :"db" WITH ALLOW_CONNECTIONS false;
SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :'db';
BEGIN;
ALTER DATABASE :"db" RENAME TO :"new";
ALTER DATABASE :"old" RENAME TO :"db";
COMMIT;
ALTER DATABASE :"db" WITH ALLOW_CONNECTIONS true;
"""


def bouncer_admin(stack: Stack, command: str) -> list[str]:
    """PgBouncer's admin console over its socket, as the user the ini allows there without a
    password (same UID as pgbouncer): no secret on any command line."""
    b = stack.services.pgbouncer
    return ["docker", "exec", b.container, "psql", "-X", "-q", "-At", "-h", "/tmp", "-p",
            str(b.port), "-U", "pgbouncer", "pgbouncer", "-c", command]  # fmt: skip


def pause(stack: Stack, database: str) -> list[str]:
    return bouncer_admin(stack, f"PAUSE {check_name(database)}")


def kill(stack: Stack, database: str) -> list[str]:
    return bouncer_admin(stack, f"KILL {check_name(database)}")


def resume(stack: Stack, database: str) -> list[str]:
    return bouncer_admin(stack, f"RESUME {check_name(database)}")


def flush_cache(stack: Stack, env: Environment) -> list[str]:
    """The environment's Redis database: cached pages of the replaced data must go."""
    r = stack.services.redis
    return ["docker", "exec", r.container, "redis-cli", "-n", str(env.redis_db), "FLUSHDB"]


def storage_dir(env: Environment) -> str:
    return env.volumes.get("storage", "/app/storage")


_MEDIA_TAR = """\
cd "$1"
if [ -d media ]; then exec tar -czf - media; fi
exec tar -czf - --files-from /dev/null
"""

_MEDIA_UNTAR = """\
set -eu
cd "$1"
new=".media-restore-$2"
rm -rf "$new" && mkdir "$new"
tar -xzf - -C "$new"
[ -d "$new/media" ] || mkdir "$new/media"
if [ -d media ]; then mv media "$new/old"; fi
mv "$new/media" media
rm -rf "$new"
"""


def media_archive(env: Environment) -> list[str]:
    """tar.gz of <storage>/media on stdout, from inside the running app container."""
    return ["docker", "exec", env.container, "sh", "-c", _MEDIA_TAR, "sh", storage_dir(env)]


def media_size(env: Environment) -> list[str]:
    return ["docker", "exec", env.container, "du", "-sb", "--", f"{storage_dir(env)}"]


def media_restore(env: Environment, backup_id: str) -> list[str]:
    """Unpack (archive on stdin) beside the live media folder, then swap the two."""
    return ["docker", "exec", "-i", env.container, "sh", "-c", _MEDIA_UNTAR, "sh",
            storage_dir(env), backup_id]  # fmt: skip


def container_running(name: str) -> list[str]:
    return ["docker", "inspect", "--format", "{{.State.Running}}", name]


def container_version(name: str) -> list[str]:
    return ["docker", "inspect", "--format",
            '{{.Config.Image}} {{index .Config.Labels "org.eduaiia.version"}}', name]  # fmt: skip


def scratch_name(database: str, purpose: str, backup_id: str) -> str:
    """A temporary database name beside `database`, at most 63 characters."""
    stamp = backup_id.split("-", 1)[0].lower()
    return check_name(f"{database}__{purpose}_{stamp}"[:63])


def backup_dir(state_root: str, env: str, backup_id: str = "") -> PurePosixPath:
    base = PurePosixPath(state_root) / "backups" / env
    return base / backup_id if backup_id else base


def media_bytes(env: Environment) -> list[str]:
    """Size of <storage>/media in bytes (0 when there is none yet)."""
    return ["docker", "exec", env.container, "sh", "-c",
            'if [ -d "$1/media" ]; then du -sb "$1/media"; else echo 0; fi', "sh",
            storage_dir(env)]  # fmt: skip


def pg_dump_version(stack: Stack) -> list[str]:
    return ["docker", "exec", stack.services.postgresql.container, "pg_dump", "--version"]


# --- the backup folders, through any runner ----------------------------------------------


def list_tree(root: str) -> list[str]:
    """Every folder and file down to <root>/<env>/<set>/<file>: `type<TAB>path<TAB>size`."""
    return ["find", str(root), "-mindepth", "1", "-maxdepth", "3", "-printf", r"%y\t%P\t%s\n"]


@dataclass
class Tree:
    envs: list[str] = field(default_factory=list)  # <root>/<env>/ folders
    sets: dict[tuple[str, str], dict[str, int]] = field(default_factory=dict)  # files, sizes

    def names(self, env: str) -> set[str]:
        """Every folder in <root>/<env>/ (finished sets, partial ones, anything else)."""
        return {name for e, name in self.sets if e == env}


def parse_tree(text: str) -> Tree:
    tree = Tree()
    for line in text.splitlines():
        kind, _, rest = line.partition("\t")
        path, _, size = rest.rpartition("\t")
        parts = path.split("/")
        if kind == "d" and len(parts) == 1:
            tree.envs.append(parts[0])
        elif kind == "d" and len(parts) == 2:
            tree.sets.setdefault((parts[0], parts[1]), {})
        elif kind == "f" and len(parts) == 3 and size.isdigit():
            tree.sets.setdefault((parts[0], parts[1]), {})[parts[2]] = int(size)
    tree.envs.sort()
    return tree


def record_from(
    path: str, files: dict[str, int], manifest_text: str | None, verify_text: str | None
) -> BackupRecord | None:
    """A finished set (has MANIFEST.txt), or None for anything else in the folder."""
    name = PurePosixPath(path).name
    if name.endswith(PARTIAL_SUFFIX) or MANIFEST not in files or manifest_text is None:
        return None
    try:
        when, env, kind = parse_id(name)
    except OpsError:
        return None
    try:
        manifest = parse_manifest(manifest_text)
    except OpsError:
        manifest = None
    verify = None
    if verify_text is not None:
        try:
            verify = json.loads(verify_text)
        except ValueError:
            verify = None
    present = {k: v for k, v in files.items() if k != VERIFY}
    return BackupRecord(name, env, kind, when, path, present, manifest, verify)


def file_sizes(paths: list[str]) -> list[str]:
    return ["stat", "--printf", r"%s\t%n\n", "--", *paths]


def file_digests(paths: list[str]) -> list[str]:
    return ["sha256sum", "--", *paths]


def parse_sizes(text: str) -> dict[str, int]:
    """`stat` lines -> {file name: size}; files that do not exist are simply absent."""
    out = {}
    for line in text.splitlines():
        size, _, path = line.partition("\t")
        if size.isdigit():
            out[PurePosixPath(path).name] = int(size)
    return out


def parse_digests(text: str) -> dict[str, str]:
    out = {}
    for line in text.splitlines():
        digest, _, path = line.partition("  ")
        if re.fullmatch(r"[0-9a-f]{64}", digest):
            out[PurePosixPath(path).name] = digest
    return out


def check_files(manifest: dict | None, sizes: dict[str, int], digests: dict[str, str]):
    """Sizes and checksums against the manifest: problems, one line each (empty = good)."""
    if manifest is None:
        return [f"{MANIFEST} is missing its machine-readable part or is damaged"]
    problems = []
    pruned = set((manifest.get("pruned") or {}).keys())
    for name, meta in sorted(manifest["files"].items()):
        if name not in sizes:
            if name not in pruned:
                problems.append(f"{name}: missing")
        elif sizes[name] != meta["size"]:
            problems.append(f"{name}: {sizes[name]} bytes, the manifest says {meta['size']}")
        elif digests.get(name) != meta["sha256"]:
            problems.append(f"{name}: sha256 differs from the manifest")
    if DUMP not in manifest["files"]:
        problems.append(f"{DUMP}: not in the manifest")
    return problems


def free_space(path: str) -> list[str]:
    """Bytes free where `path` is (or would be): df of its nearest existing folder."""
    return ["sh", "-c", 'p=$1; while [ ! -e "$p" ]; do p=$(dirname "$p"); done; '
            'exec df -B1 --output=avail "$p"', "sh", str(path)]  # fmt: skip


def parse_free(text: str) -> int | None:
    """The last number df printed; None when there is none (no df: nothing to check)."""
    try:
        return int(text.split()[-1])
    except (ValueError, IndexError):
        return None


def parse_database_facts(text: str) -> tuple[str, int | None]:
    """(server version, size in bytes, -1 when the database does not exist); the size is
    None when there was no answer."""
    lines = text.strip().splitlines()
    try:
        version, size = lines[-1].split("|")
        return version, int(size)
    except (ValueError, IndexError):
        return "", None


def make_private_dir(path: str) -> list[str]:
    return ["mkdir", "-m", "700", "--", str(path)]


def make_dirs(path: str) -> list[str]:
    return ["mkdir", "-p", "--", str(path)]


def rename_dir(src: str, dst: str) -> list[str]:
    """One rename(2): a set appears complete or not at all (-T: never `dst/src`)."""
    return ["mv", "-T", "--", str(src), str(dst)]


def remove_tree(path: str) -> list[str]:
    return ["rm", "-rf", "--", str(path)]


def remove_file(path: str) -> list[str]:
    return ["rm", "-f", "--", str(path)]


def append_line(path: str, line: str) -> list[str]:
    """Append one line to a log (O_APPEND: two writers never lose each other's line)."""
    return ["sh", "-c", 'printf "%s" "$2" >> "$1"', "sh", str(path), line]


# --- what people read --------------------------------------------------------------------


LIST_HEADERS = ["id", "kind", "environment", "size", "age", "last verified", "files"]


def age_text(created: _dt.datetime, now: _dt.datetime) -> str:
    return human_age((now - created).total_seconds())


def verified_text(record: BackupRecord, now: _dt.datetime) -> str:
    if not record.verify:
        return "never"
    when = record.verify.get("time", "")
    try:
        at = _dt.datetime.strptime(when, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=_dt.UTC)
        ago = f"{age_text(at, now)} ago"
    except ValueError:
        ago = when
    return f"{'ok' if record.verified_ok else 'FAILED'} {ago}"


def list_rows(records: list[BackupRecord], now: _dt.datetime) -> list[list[str]]:
    return [
        [
            r.id,
            r.kind,
            r.env,
            human_size(r.size),
            age_text(r.created, now),
            verified_text(r, now),
            ",".join(n.split(".")[0] for n in SET_FILES if n in r.files),
        ]
        for r in records
    ]


def list_json(records: list[BackupRecord], last: dict[str, dict]) -> str:
    backups = [
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
    ]
    return json.dumps({"backups": backups, "last_run": last}, indent=2)


def restore_plan_text(
    env: Environment, record: BackupRecord, safety: bool, exists: bool, media: bool
) -> str:
    m = record.manifest or {}
    steps = []
    if safety and exists:
        steps.append(f"take a safety backup of {env.database} ({SAFETY_KIND})")
    new = scratch_name(env.database, "restore", record.id)
    steps += [
        f"restore {record.id} ({human_size(record.files.get(DUMP, 0))} dump, taken "
        f"{m.get('started', '?')} from {record.env}) into a new database {new}, and check its "
        "tables, rows and content hashes against the manifest",
        f"pause {env.database} in PgBouncer (clients wait), end other connections, "
        + (f"swap {new} in for {env.database}" if exists else f"rename {new} to {env.database}"),
        f"resume {env.database} in PgBouncer; empty {env.name}'s cache (Redis db {env.redis_db})",
    ]
    if media:
        steps.append(f"replace {env.name}'s media with {MEDIA} of the set")
    steps.append(
        f"check https://{env.domains[0]}/health/; if it fails (and it was healthy before), "
        "swap the previous database back"
    )
    if exists:
        steps.append(f"drop the previous {env.database}")
    return "\n".join(f"  {n}. {s}" for n, s in enumerate(steps, 1))
