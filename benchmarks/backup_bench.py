"""Backup, verify and restore of a database holding at least 1 GB of rows, timed.

    AIIA_STACK=... AIIA_STATE_DIR=... python benchmarks/backup_bench.py [--env staging]
        [--size-gb 1.0] [--keep-data]

Runs against the stack the stack file names (use an isolated one: tests/stackfiles.py),
with the real flows' code: `take_backup`, `verify_backup`, `restore_backup`. Fills the
environment's course tables with generated rows until the database reaches --size-gb
(PostgreSQL stays inside its container limit: the rows are made by INSERT ... SELECT in
batches, by the server itself; lesson bodies are random md5 hex, which zlib halves at best,
so the dump is not flattered by repetitive data), then measures each step and samples the PostgreSQL
container's memory use every second. Prints a Markdown table (for docs/backups.md) and a
JSON line. Leaves the environment restored to the generated data; --keep-data does not
delete it afterwards (default: the generated rows are deleted at the end).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import threading
import time

from aiia_ops.commands import backups as bk
from aiia_ops.flows import backup as backups
from aiia_ops.flows import restore as restores
from aiia_ops.host.runners import LocalRunner
from aiia_ops.model import load_stack
from aiia_ops.model.state import local_state_dir

BATCH = 20_000  # lessons per INSERT; one course per 10 lessons

FILL_SQL = """\
WITH c AS (
    INSERT INTO courses_course (title, slug, summary, created_at, updated_at)
    SELECT 'Bench course ' || g, 'bench-' || :'tag' || '-' || g,
           array_to_string(ARRAY(SELECT md5(random()::text || g) FROM generate_series(1, 8)), ' '),
           now(), now()
    FROM generate_series(1, :n / 10) g
    RETURNING id
)
INSERT INTO courses_lesson (course_id, position, title, body)
SELECT c.id, p, 'Lesson ' || p,
       array_to_string(ARRAY(SELECT md5(random()::text || p) FROM generate_series(1, 40)), ' ')
FROM c, generate_series(1, 10) p;
"""


def psql(stack, database, sql, **variables) -> str:
    runner = LocalRunner()
    return runner.run(bk.psql(stack, database, *variables.items()), input=sql).stdout.strip()


def db_size(stack, db) -> int:
    return int(psql(stack, "postgres", "SELECT pg_database_size(:'db');", db=db))


class MemorySampler(threading.Thread):
    """The container's memory use (cgroup, like docker stats) every second."""

    def __init__(self, container: str):
        super().__init__(daemon=True)
        self.container, self.peak, self.stop_flag = container, 0, threading.Event()

    def run(self):
        from aiia_ops.host.engine import Engine

        engine = Engine(LocalRunner())
        c = engine.inspect([self.container])[self.container]
        while not self.stop_flag.is_set():
            used = engine.usage({c.name: c.id}).get(c.name)
            if used is not None and used.memory_used is not None:
                self.peak = max(self.peak, used.memory_used)
            time.sleep(1)

    def stop(self) -> int:
        self.stop_flag.set()
        self.join(5)
        return self.peak


def timed(label, fn, pg_container):
    sampler = MemorySampler(pg_container)
    sampler.start()
    t0 = time.monotonic()
    result = fn()
    took = time.monotonic() - t0
    peak = sampler.stop()
    print(f"   {label}: {took:.1f}s, PostgreSQL memory peak {peak / 1024**2:.0f} MB", flush=True)
    return result, took, peak


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--env", default="staging")
    ap.add_argument("--size-gb", type=float, default=1.0)
    ap.add_argument("--keep-data", action="store_true")
    args = ap.parse_args()

    stack = load_stack()
    state = local_state_dir(stack)
    env = stack.environment(args.env)
    pg = stack.services.postgresql
    runner = LocalRunner()
    target = int(args.size_gb * 1024**3)
    tag = str(int(time.time()))

    print(f"filling {env.database} to {args.size_gb} GB ...", flush=True)
    t0, n = time.monotonic(), 0
    while db_size(stack, env.database) < target:
        psql(stack, env.database, FILL_SQL, n=str(BATCH), tag=f"{tag}-{n}")
        n += 1
    psql(stack, env.database, "VACUUM ANALYZE courses_course, courses_lesson;")
    size = db_size(stack, env.database)
    rows = psql(stack, env.database, "SELECT count(*) FROM courses_lesson;")
    print(f"   {size / 1024**3:.2f} GB, {rows} lessons, in {time.monotonic() - t0:.0f}s")

    record, t_backup, m_backup = timed(
        "backup",
        lambda: backups.take_backup(stack, state, env.name, "manual", runner),
        pg.container,
    )
    verify, t_verify, m_verify = timed(
        "verify", lambda: restores.verify_backup(stack, state, record, runner), pg.container
    )
    assert verify["ok"], verify
    report, t_restore, m_restore = timed(
        "restore",
        lambda: restores.restore_backup(stack, state, env.name, record.id, runner, yes=True),
        pg.container,
    )
    m = record.manifest
    figures = {
        "database_bytes": size,
        "rows": sum(v[0] for v in m["tables"].values()),
        "dump_bytes": record.files[bk.DUMP],
        "set_bytes": record.size,
        "backup_s": round(t_backup, 1),
        "backup_dump_s": m["dump_s"],
        "verify_s": round(t_verify, 1),
        "restore_total_s": round(t_restore, 1),
        "restore_pg_restore_s": report["restore_s"],
        "restore_switch_s": report["switch_s"],
        "pg_memory_peak_mb": round(max(m_backup, m_verify, m_restore) / 1024**2),
        "pg_memory_limit_mb": pg.memory.limit.bytes // 1024**2,
    }
    print()
    print("| figure | value |")
    print("|---|---|")
    print(f"| database size | {size / 1024**3:.2f} GB, {figures['rows']:,} rows |")
    print(f"| dump (custom format) / whole set | {bk.human_size(figures['dump_bytes'])} / "
          f"{bk.human_size(figures['set_bytes'])} |")  # fmt: skip
    print(f"| backup (dump + census + media + config) | {t_backup:.0f} s (dump {m['dump_s']} s) |")
    print(f"| verify (checksums + scratch restore + census) | {t_verify:.0f} s |")
    print(
        f"| restore (safety backup + restore + check + switch + health) | {t_restore:.0f} s "
        f"(pg_restore and check {report['restore_s']} s, switch {report['switch_s']} s) |"
    )
    print(
        f"| PostgreSQL memory peak / limit | {figures['pg_memory_peak_mb']} MB / "
        f"{figures['pg_memory_limit_mb']} MB |"
    )
    print(json.dumps(figures))

    if not args.keep_data:
        psql(stack, env.database, "DELETE FROM courses_lesson; DELETE FROM courses_course;")
        psql(stack, env.database, "VACUUM FULL courses_course, courses_lesson;")
        for r in backups.list_records(state, env.name):
            if r.id in (record.id, report.get("safety_backup")):
                subprocess.run(["rm", "-rf", r.path], check=True)


if __name__ == "__main__":
    main()
