"""A restore that can be killed anywhere: its journal, the facts a re-run reads, and the
decision table that turns them into the few renames, drops and RESUMEs that put the
environment back on one whole database (pure: data in, data out).

The restore (flows/restore.py) writes `<state>/journal/restore-<env>.json` at every step
boundary. The swap itself is one transaction (both renames commit together), so the only
states a kill can leave are those `settle()` lists; a re-run settles them first:

    live db  copy  previous  journal phase         ->  actions, then
    -------  ----  --------  --------------------      ------------------------------------
    yes      any   no        before the swap           allow connections on db, drop copy: start
    yes      yes   no        paused/swapped (not done)  the same (the swap rolled back)
    yes      no    yes       swapped or later          allow connections on db: health
    yes      no    no        swapped or later          (the env had no database): health
    no       yes   yes/no    swapped or later          rename copy -> db: health
    no       no    yes       any                       rename previous -> db: start
    yes      yes   yes       any                       drop previous, allow on db: start
    no       no    no        any                       nothing to put back: start
    undoing (a rollback after a failed health check): committed -> allow, drop the copy:
    start; not committed -> the restored db stays live: health (which decides again)

Before any of it a paused PgBouncer is RESUMEd, and any swap session a killed run left in
PostgreSQL is ended (its transaction rolls back), so the facts read are final.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

from aiia_ops.commands.argv import quote
from aiia_ops.commands.backups import bouncer_admin, check_name
from aiia_ops.errors import OpsError
from aiia_ops.model import Stack

JOURNAL_DIR = "journal"
SWAP_APP = "aiia-restore-swap"  # application_name of the swap's psql session
GUARD_PID = "/tmp/aiia-resume-guard-{db}.pid"  # inside the pgbouncer container (tmpfs)

# The restore's step boundaries, in order (the journal's `phase`).
LOCKED = "locked"
SAFETY = "safety"
COPIED = "copied"
PAUSED = "paused"
SWAPPED = "swapped"
RESUMED = "resumed"
HEALTHY = "healthy"
DONE = "done"
UNDOING = "undoing"
PHASES = (LOCKED, SAFETY, COPIED, PAUSED, SWAPPED, RESUMED, HEALTHY, DONE)

# Where a re-run goes on after settling.
START = "start"  # a whole restore from the beginning
HEALTH = "health"  # the restored database is live: check health, then clean up
CLEANUP = "cleanup"  # healthy already: drop the previous database, prune, done


def journal_path(state_root: str, env: str) -> str:
    return f"{str(state_root).rstrip('/')}/{JOURNAL_DIR}/restore-{check_name(env)}.json"


@dataclass
class Journal:
    env: str
    backup_id: str
    database: str
    copy: str  # the restored copy built beside the live database
    previous: str  # the live database's name once swapped out
    existed: bool  # the environment had a database when the restore began
    phase: str = LOCKED
    safety_backup: str | None = None
    renames_done: bool = False  # the swap committed
    was_healthy: bool = False  # /health/ answered before the restore (an undo is possible)
    pid: int = 0
    host: str = ""
    started: str = ""
    history: list[str] = field(default_factory=list)

    def at(self, phase: str) -> Journal:
        self.phase = phase
        self.history.append(phase)
        if phase in (SWAPPED, RESUMED, HEALTHY, DONE):
            self.renames_done = True
        return self

    def render(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"


def parse_journal(text: str | bytes | None) -> Journal | None:
    """The journal, or None when there is none; a damaged one is an error naming the file's
    fix (it is small and written atomically, so damage means someone edited it)."""
    if text is None:
        return None
    try:
        data = json.loads(text)
        journal = Journal(**data)
    except (ValueError, TypeError) as exc:
        raise OpsError(
            f"the restore journal is unreadable ({exc}); look at it, then remove it if "
            "the environment's database is as you want it"
        ) from None
    if journal.phase not in (*PHASES, UNDOING):
        raise OpsError(f"the restore journal has an unknown phase {journal.phase!r}")
    for name in (journal.database, journal.copy, journal.previous):
        check_name(name)
    return journal


# --- facts ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class DbFacts:
    """Which of the three databases exist, and whether each accepts connections."""

    allow: dict[str, bool]  # datname -> datallowconn, only for those that exist

    def has(self, name: str) -> bool:
        return name in self.allow


def databases_sql() -> str:
    """datname|t/f for :db, :new, :old (those that exist)."""
    return (
        "SELECT datname || '|' || datallowconn FROM pg_database "
        "WHERE datname IN (:'db', :'new', :'old') ORDER BY datname;"
    )


def parse_databases(text: str) -> DbFacts:
    allow = {}
    for line in text.splitlines():
        name, _, flag = line.strip().partition("|")
        if name:
            allow[name] = flag in ("t", "true")
    return DbFacts(allow)


def show_databases(stack: Stack) -> list[str]:
    """PgBouncer's SHOW DATABASES as CSV with its header (the columns differ by version)."""
    argv = bouncer_admin(stack, "SHOW DATABASES")
    at = argv.index("-At")
    return [*argv[:at], "--csv", *argv[at + 1 :]]


def parse_paused(text: str, database: str) -> bool | None:
    """PgBouncer's `paused` column for `database` (1 = paused); None when it is not listed
    or the answer is not SHOW DATABASES."""
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        return None
    header = lines[0].split(",")
    if "name" not in header or "paused" not in header:
        return None
    name_at, paused_at = header.index("name"), header.index("paused")
    for line in lines[1:]:
        cells = line.split(",")
        if len(cells) == len(header) and cells[name_at] == database:
            return cells[paused_at].strip() not in ("0", "", "f", "false")
    return None


def start_guard(stack: Stack, database: str, seconds: int) -> list[str]:
    """A dead man's switch inside the pgbouncer container: RESUME `database` after `seconds`
    unless cancelled. Started before PAUSE, so a restore killed with SIGKILL inside the
    pause leaves it paused for at most `seconds`. The shell reaps its own children (sleep
    and psql), so a cancelled guard leaves no zombie for pgbouncer (PID 1) to collect."""
    db = check_name(database)
    resume = quote(bouncer_admin(stack, f"RESUME {db}")[3:])
    pid_file = GUARD_PID.format(db=db)
    script = (
        f"echo $$ > {pid_file}; "
        'trap \'kill "$s" 2>/dev/null; wait "$s"; exit 0\' TERM; '
        f'sleep {int(seconds)} & s=$!; wait "$s"; {resume} >/dev/null 2>&1; rm -f {pid_file}'
    )
    return ["docker", "exec", "-d", stack.services.pgbouncer.container, "sh", "-c", script]


def cancel_guard(stack: Stack, database: str) -> list[str]:
    """Stop the guard of `database` (none running: nothing to do, exit 0)."""
    pid_file = GUARD_PID.format(db=check_name(database))
    script = (
        f'if [ -f {pid_file} ]; then kill "$(cat {pid_file})" 2>/dev/null; rm -f {pid_file}; '
        "fi; exit 0"
    )
    return ["docker", "exec", stack.services.pgbouncer.container, "sh", "-c", script]


def swap_psql(stack: Stack, *variables: tuple[str, str]) -> list[str]:
    """psql as the superuser, its session named SWAP_APP so a re-run can find and end it."""
    argv = ["docker", "exec", "-i", "-e", f"PGAPPNAME={SWAP_APP}",
            stack.services.postgresql.container, "psql", "-X", "-q", "-At", "-v",
            "ON_ERROR_STOP=1", "-d", "postgres"]  # fmt: skip
    for key, value in variables:
        argv += ["-v", f"{key}={check_name(value)}"]
    return argv


def end_swap_sessions_sql() -> str:
    """End the swap sessions a killed run left (their transaction rolls back), and wait
    until they are gone."""
    return f"""\
SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
    WHERE application_name = '{SWAP_APP}' AND pid <> pg_backend_pid();
DO $$
BEGIN
    FOR i IN 1..100 LOOP
        PERFORM pg_stat_clear_snapshot();
        EXIT WHEN NOT EXISTS (SELECT FROM pg_stat_activity
            WHERE application_name = '{SWAP_APP}' AND pid <> pg_backend_pid());
        PERFORM pg_sleep(0.1);
    END LOOP;
END $$;
"""


def allow_sql() -> str:
    return 'ALTER DATABASE :"db" WITH ALLOW_CONNECTIONS true;\n'


def rename_sql() -> str:
    return 'ALTER DATABASE :"from" RENAME TO :"to";\n'


# --- the decision table --------------------------------------------------------------------


@dataclass(frozen=True)
class Action:
    """One change: ("allow", db) | ("rename", from, to) | ("drop", db)."""

    verb: str
    args: tuple[str, ...]

    def __str__(self) -> str:
        if self.verb == "rename":
            return f"rename {self.args[0]} to {self.args[1]}"
        if self.verb == "allow":
            return f"let {self.args[0]} accept connections again"
        return f"drop {self.args[0]}"


@dataclass(frozen=True)
class Settlement:
    actions: tuple[Action, ...]
    then: str  # START | HEALTH | CLEANUP
    why: str


def _allow(facts: DbFacts, name: str) -> list[Action]:
    return [Action("allow", (name,))] if facts.allow.get(name) is False else []


def settle(journal: Journal, facts: DbFacts) -> Settlement:
    """What puts the environment back on one whole database after a killed restore, and
    where the re-run goes on from. Never drops the only copy of anything live."""
    db, new, old = journal.database, journal.copy, journal.previous
    has_db, has_new, has_old = facts.has(db), facts.has(new), facts.has(old)
    acts: list[Action] = []
    if not (has_db or has_new or has_old):
        return Settlement((), START, "the environment had no database")

    if journal.phase == UNDOING:
        # The undo is one transaction (db -> copy, previous -> db, with db paused), so only
        # before or after it; a settle step cut off by a second kill leaves no live db.
        if has_db and has_old:
            # It had not committed: the restored database is live and whole. The health
            # check decides again (and undoes it, paused, when still unhealthy).
            acts = [*_allow(facts, db), *([Action("drop", (new,))] if has_new else [])]
            return Settlement(tuple(acts), HEALTH, "a rollback of the restore had not committed")
        if has_old:  # no live database: the previous one goes back
            acts += [Action("rename", (old, db))]
        elif not has_db:  # only the restored copy is left: keep it live
            return Settlement(
                (Action("rename", (new, db)), Action("allow", (db,))),
                HEALTH,
                "a rollback was cut off and only the restored database is left",
            )
        acts += [Action("allow", (db,))]
        acts += [Action("drop", (new,))] if has_new else []
        return Settlement(tuple(acts), START, "the rollback of an unhealthy restore was finished")

    if has_db and has_new and has_old:
        return Settlement(
            (*_allow(facts, db), Action("drop", (old,)), Action("drop", (new,))),
            START,
            "the swap had not happened; a stale previous copy was beside it",
        )
    if has_db and has_new:
        return Settlement(
            (*_allow(facts, db), Action("drop", (new,))),
            START,
            "the swap had not happened (or was rolled back): the old database is live",
        )
    if has_db:
        if journal.phase in (PAUSED, SWAPPED, RESUMED, HEALTHY, DONE):
            # No copy beside it and the swap under way or done: the copy is the live one.
            then = CLEANUP if journal.phase in (HEALTHY, DONE) else HEALTH
            return Settlement(tuple(_allow(facts, db)), then, "the restored database is live")
        return Settlement(tuple(_allow(facts, db)), START, "the swap had not begun")
    # No live database.
    if has_new and journal.phase in (COPIED, PAUSED, SWAPPED, RESUMED, HEALTHY, DONE):
        # The copy was restored and checked against the census: put it in place.
        acts = [Action("rename", (new, db)), Action("allow", (db,))]
        if has_old:
            return Settlement(tuple(acts), HEALTH, "between the two renames: finish the swap")
        return Settlement(tuple(acts), HEALTH, "the checked copy was not yet in place")
    if has_old and journal.existed:  # (else it is a stale copy of an earlier run)
        acts = [Action("rename", (old, db)), Action("allow", (db,))]
        acts += [Action("drop", (new,))] if has_new else []
        return Settlement(tuple(acts), START, "the previous database was put back")
    if has_new:  # an unchecked copy, and nothing else: never make it live unchecked
        return Settlement((Action("drop", (new,)),), START, "only an unchecked copy was left")
    return Settlement((), START, "the environment had no database")


def check_resumable(journal: Journal, backup_id: str) -> None:
    """A re-run asking for another backup while the last restore is half done (its
    restored database live, its health not yet seen) is refused, saying what to run."""
    if backup_id not in ("latest", journal.backup_id):
        raise OpsError(
            f"the restore of {journal.env} from {journal.backup_id} was interrupted after "
            f"its swap ({journal.phase}); the database is whole (PgBouncer resumed), but "
            f"finish that one first: invoke backup.restore --env {journal.env} --id "
            f"{journal.backup_id}"
        )
