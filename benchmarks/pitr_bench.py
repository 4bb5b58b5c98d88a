"""Point-in-time recovery, measured: WAL volume at the load test's write rate, PostgreSQL's
memory with archiving on (pgBackRest's processes inside it), RPO when the server dies
mid-load, and the time of `backup.pitr` for a database of --size-mb.

    AIIA_STACK=... AIIA_STATE_DIR=... python benchmarks/pitr_bench.py [--env prod]
        [--rate 13.4] [--seconds 120] [--kills 3] [--size-mb 200] [--parts wal,rpo,pitr]
        [--json FILE]

Runs against a stack with backups.pitr on, set up, `backup.pitr-init` done and its store
up: the off-site tests' stack kept (`AIIA_E2E_KEEP=1 AIIA_LAB_KEEP=1 pytest tests/lab_offsite`,
then AIIA_STACK/AIIA_STATE_DIR of its /tmp/aiia-pitr-*), with the flows' own code. That
stack has the committed memory limits (PostgreSQL 146 MB, pgBackRest's allowance inside
it); the store's tmpfs (384 MB, for the full-disk test) needs room for --size-mb:
`mount -o remount,size=4g /var/lib/aiia-lab/lab9/offsite/data`.

- Writes are the app's: a course and 2 lessons in one transaction (the load test's POST),
  through PgBouncer as the environment's role, at --rate a second: the `app` scenario's
  448 requests/s x 3% writes = 13.4 (docs/performance.md).
- WAL: bytes of WAL records generated (pg_stat_wal.wal_bytes), 16 MB segment files closed
  (LSN delta: archive_timeout switches part-filled ones), and bytes the repository's
  archive grew (pgbackrest repo-ls, compressed and encrypted, read before the full backup
  expires older WAL), per hour.
- Memory: the container's (cgroup, as docker stats) and the sum of pgBackRest processes'
  PSS (`docker top` pids, /proc/PID/smaps_rollup), sampled every 0.5 s, under the write
  load and during a full backup.
- RPO: SIGKILL of the PostgreSQL container under the write load; the newest moment the
  repository alone restores (flows/pitr.scratch_copy) against the acknowledged commits:
  seconds between the failure and the oldest acknowledged commit it lacks.
- pitr: the environment's database filled to --size-mb (backup_bench's rows), a full base
  backup, then `flows.pitr.pitr(... "latest")` end to end (restore, replay, dump, safety
  backup, restore beside, swap, health). The generated rows are deleted afterwards.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from aiia_ops.commands import backups as bk
from aiia_ops.commands import pgbackrest as pb
from aiia_ops.flows import pitr as flow
from aiia_ops.host.runners import LocalRunner
from aiia_ops.host.secrets import load_secrets
from aiia_ops.model import load_stack
from aiia_ops.model.state import local_state_dir
from benchmarks.backup_bench import BATCH, FILL_SQL, db_size, psql

WRITE_SQL = (
    "WITH c AS (INSERT INTO courses_course (title, slug, summary, created_at, updated_at) "
    "VALUES ('Load test {n}', 'pitrbench-{run}-{n}', 'written under load', now(), now()) "
    "RETURNING id), l AS (INSERT INTO courses_lesson (course_id, position, title, body) "
    "SELECT c.id, p, t, b FROM c, (VALUES (1, 'One', 'First.'), (2, 'Two', 'Second.')) "
    "AS v(p, t, b)) SELECT id FROM c;"
)


def loadavg() -> str:
    return " ".join(open("/proc/loadavg").read().split()[:3])


class AppWriter(threading.Thread):
    """The load test's write (a course + 2 lessons) through PgBouncer, `rate` a second, one
    session; the host time of each acknowledged commit by course id."""

    def __init__(self, stack, state, rate: float, run: str):
        super().__init__(daemon=True)
        self.stack, self.state, self.rate, self.run_tag = stack, state, rate, run
        self.acked: dict[int, float] = {}
        self.stop = threading.Event()

    def run(self) -> None:
        env = self.stack.environment("prod")
        secret = load_secrets(self.state.root, list(self.stack.environments), create=False)
        bouncer = self.stack.services.pgbouncer
        proc = subprocess.Popen(
            ["docker", "exec", "-i", "-e", "PGPASSWORD", self.stack.services.postgresql.container,
             "psql", "-X", "-q", "-At", "-v", "ON_ERROR_STOP=1", "-h", str(bouncer.address),
             "-p", str(bouncer.port), "-U", env.db_user, "-d", env.database],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
            bufsize=1, env={**os.environ, "PGPASSWORD": secret.environments["prod"].db_password},
        )  # fmt: skip
        n, start = 0, time.monotonic()
        try:
            while not self.stop.is_set():
                proc.stdin.write(WRITE_SQL.format(n=n, run=self.run_tag) + "\n")
                proc.stdin.flush()
                line = proc.stdout.readline()
                if not line.strip():
                    return
                self.acked[int(line)] = time.time()
                n += 1
                pause = start + n / self.rate - time.monotonic()
                if pause > 0:
                    time.sleep(pause)
        except (BrokenPipeError, OSError, ValueError):
            return
        finally:
            proc.kill()
            proc.wait()


class Memory(threading.Thread):
    """Peaks of the container's memory and of pgBackRest's processes' summed PSS."""

    def __init__(self, container: str):
        super().__init__(daemon=True)
        self.container, self.peak, self.pgbackrest = container, 0, 0
        self.stop_flag = threading.Event()

    def run(self) -> None:
        from aiia_ops.host.engine import Engine

        engine = Engine(LocalRunner())
        c = engine.inspect([self.container])[self.container]
        while not self.stop_flag.is_set():
            used = engine.usage({c.name: c.id}).get(c.name)
            if used is not None and used.memory_used is not None:
                self.peak = max(self.peak, used.memory_used)
            self.pgbackrest = max(self.pgbackrest, pgbackrest_pss(self.container))
            time.sleep(0.5)

    def __enter__(self) -> Memory:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop_flag.set()
        self.join(5)


def pgbackrest_pss(container: str) -> int:
    """Bytes: the summed PSS (shared pages split between their users, as the cgroup counts
    them once) of the container's pgbackrest processes, from /proc/PID/smaps_rollup."""
    argv = ["docker", "top", container, "-o", "pid,comm"]
    rows = subprocess.run(argv, capture_output=True, text=True).stdout.splitlines()[1:]
    total = 0
    for pid in (r.split()[0] for r in rows if r.split()[1:] == ["pgbackrest"]):
        try:
            text = Path(f"/proc/{pid}/smaps_rollup").read_text()
        except OSError:
            continue  # gone meanwhile
        total += sum(int(ln.split()[1]) for ln in text.splitlines() if ln.startswith("Pss:"))
    return total * 1024


def lsn_bytes(stack) -> int:
    """The WAL position: it jumps to the next 16 MB segment at every switch (archive_timeout
    closes a part-filled one), so its delta counts segment files, padding included."""
    return int(psql(stack, "postgres", "SELECT pg_current_wal_lsn() - '0/0'::pg_lsn;"))


def wal_record_bytes(stack) -> int:
    """Bytes of WAL records PostgreSQL generated (pg_stat_wal): what the writes cost."""
    return int(psql(stack, "postgres", "SELECT wal_bytes FROM pg_stat_wal;"))


def archive_bytes(stack) -> int:
    out = LocalRunner().run(
        pb.in_container(stack.services.postgresql.container, pb.repo_ls(stack)), timeout=120
    )
    return sum(
        e.get("size", 0) for k, e in json.loads(out.stdout).items() if k.startswith("archive/")
    )


def mb(n: float) -> str:
    return f"{n / 1024**2:.1f} MB"


def wait_up(stack, timeout=180) -> None:
    deadline = time.monotonic() + timeout
    while LocalRunner().query(bk.psql(stack), input="SELECT 1;").stdout.strip() != "1":
        if time.monotonic() > deadline:
            raise SystemExit("PostgreSQL did not come back")
        time.sleep(2)


def wal_and_memory(stack, state, runner, args, run: str, fig: dict) -> None:
    """WAL volume and memory under the write load; then a full backup under it."""
    pg = stack.services.postgresql
    flow.switch_and_wait(stack, runner)
    lsn0, rec0, arch0 = lsn_bytes(stack), wal_record_bytes(stack), archive_bytes(stack)
    t0 = time.monotonic()
    writer = AppWriter(stack, state, args.rate, f"{run}w")
    with Memory(pg.container) as m_load:
        writer.start()
        time.sleep(args.seconds)
        lsn1, rec1, dt = lsn_bytes(stack), wal_record_bytes(stack), time.monotonic() - t0
        # The repository's growth before the full backup: a full expires older WAL
        # (retention_full), which made the first run's figure negative.
        flow.switch_and_wait(stack, runner)
        arch1, dta = archive_bytes(stack), time.monotonic() - t0
    with Memory(pg.container) as m_backup:
        tb = time.monotonic()
        flow.base_backup(stack, runner, "full")
        fig["full_backup_s"] = round(time.monotonic() - tb, 1)
    writer.stop.set()
    writer.join(10)
    fig["writes"] = len(writer.acked)
    fig["writes_per_s"] = round(len(writer.acked) / (time.monotonic() - t0), 1)
    fig["wal_record_mb_per_h"] = round((rec1 - rec0) * 3600 / dt / 1024**2, 1)
    fig["wal_segment_mb_per_h"] = round((lsn1 - lsn0) * 3600 / dt / 1024**2, 1)
    fig["archive_mb_per_h"] = round((arch1 - arch0) * 3600 / dta / 1024**2, 1)
    fig["pg_mem_load_mb"] = round(m_load.peak / 1024**2, 1)
    fig["pgbackrest_pss_load_mb"] = round(m_load.pgbackrest / 1024**2, 1)
    fig["pg_mem_backup_mb"] = round(m_backup.peak / 1024**2, 1)
    fig["pgbackrest_pss_backup_mb"] = round(m_backup.pgbackrest / 1024**2, 1)


def rpo(stack, state, runner, args, run: str, fig: dict) -> None:
    """The server killed mid-load (SIGKILL of PostgreSQL), the repository alone restores."""
    pitr, pg, env = pb.require(stack), stack.services.postgresql, stack.environment(args.env)
    rpos = []
    for k in range(args.kills):
        w = AppWriter(stack, state, args.rate, f"{run}k{k}")
        w.start()
        time.sleep(2 * pitr.archive_timeout.seconds + 3 * k)  # the kill lands at various phases
        failed_at = time.time()
        runner.run(["docker", "kill", "--signal", "KILL", pg.container])
        w.join(30)
        try:
            with flow.scratch_copy(stack, state, None, runner) as copy:
                out = runner.run(bk.psql(copy, env.database), input=(
                    f"SELECT id FROM courses_course WHERE slug LIKE 'pitrbench-{run}k{k}-%';"
                )).stdout  # fmt: skip
            have = {int(x) for x in out.split()}
            lost = sorted(t for i, t in w.acked.items() if i not in have)
            rpos.append(round(failed_at - lost[0], 1) if lost else 0.0)
            print(f"kill {k}: {len(w.acked)} acknowledged, {len(lost)} lost, RPO {rpos[-1]}s",
                  flush=True)  # fmt: skip
        finally:
            runner.run(["docker", "start", pg.container])
            wait_up(stack)
    fig["rpo_s"] = rpos
    psql(
        stack,
        env.database,
        "DELETE FROM courses_lesson WHERE course_id IN (SELECT id FROM "
        "courses_course WHERE slug LIKE 'pitrbench-%'); DELETE FROM courses_course WHERE slug "
        "LIKE 'pitrbench-%';",
    )  # fmt: skip (lessons first: their foreign key has no cascade)


def pitr_time(stack, state, runner, args, run: str, fig: dict) -> None:
    """`backup.pitr --to latest` of a database of --size-mb, after a full base backup of it."""
    pg, env = stack.services.postgresql, stack.environment(args.env)
    target = int(args.size_mb * 1024**2)
    n, tf = 0, time.monotonic()
    while db_size(stack, env.database) < target:
        psql(stack, env.database, FILL_SQL, n=str(BATCH), tag=f"pb{run}-{n}")
        n += 1
    fig["db_mb"] = round(db_size(stack, env.database) / 1024**2)
    fig["fill_s"] = round(time.monotonic() - tf, 1)
    print(f"filled to {fig['db_mb']} MB in {fig['fill_s']}s", flush=True)
    with Memory(pg.container) as m_full:
        tb = time.monotonic()
        flow.base_backup(stack, runner, "full")
        fig["full_backup_db_s"] = round(time.monotonic() - tb, 1)
    fig["pg_mem_backup_db_mb"] = round(m_full.peak / 1024**2, 1)
    fig["pgbackrest_pss_backup_db_mb"] = round(m_full.pgbackrest / 1024**2, 1)
    print(json.dumps(fig), flush=True)
    with Memory(pg.container) as m_pitr:
        tp = time.monotonic()
        report = flow.pitr(stack, state, env.name, "latest", runner, yes=True)
        fig["pitr_s"] = round(time.monotonic() - tp, 1)
    fig["pitr_restore_s"] = report.get("restore_s")
    fig["pitr_switch_s"] = report.get("switch_s")
    fig["pg_mem_pitr_mb"] = round(m_pitr.peak / 1024**2, 1)
    psql(stack, env.database, "DELETE FROM courses_lesson WHERE title LIKE 'Lesson %';"
         "DELETE FROM courses_course WHERE slug LIKE 'bench-pb%';")  # fmt: skip


PARTS = {"wal": wal_and_memory, "rpo": rpo, "pitr": pitr_time}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--env", default="prod")
    ap.add_argument("--rate", type=float, default=13.4)
    ap.add_argument("--seconds", type=float, default=120)
    ap.add_argument("--kills", type=int, default=3)
    ap.add_argument("--size-mb", type=float, default=200)
    ap.add_argument("--parts", default="wal,rpo,pitr", help="any of wal, rpo, pitr (in order)")
    ap.add_argument("--json", type=Path, help="also write the figures there")
    args = ap.parse_args()
    parts = [p for p in args.parts.split(",") if p]
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        raise SystemExit(f"error: unknown part {unknown[0]!r}: expected some of wal, rpo, pitr")
    stack = load_stack()
    state = local_state_dir(stack)
    pitr = pb.require(stack)
    pg = stack.services.postgresql
    runner = LocalRunner()
    run = str(int(time.time()))
    fig: dict = {"started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
                 "load_start": loadavg(), "rate": args.rate,
                 "archive_timeout_s": pitr.archive_timeout.seconds,
                 "pg_limit_mb": pg.memory.limit.bytes // 1024**2,
                 "pgbackrest_budget_mb": pitr.memory.bytes // 1024**2}  # fmt: skip
    for part in parts:
        t0 = time.monotonic()
        PARTS[part](stack, state, runner, args, run, fig)
        fig[f"{part}_part_s"] = round(time.monotonic() - t0, 1)
        fig[f"load_after_{part}"] = loadavg()
        print(json.dumps(fig), flush=True)
        if args.json:
            args.json.write_text(json.dumps(fig, indent=2) + "\n")


if __name__ == "__main__":
    main()
