"""Issue #13: `invoke backup.restore` of prod, under load from 127.0.0.1 (50 keep-alive
connections), killed with SIGKILL and with SIGTERM at each of its step boundaries.

After each kill: prod answers within the documented bound (backups.pause_limit plus one
request's time: a killed restore's pause is ended by the guard in the pgbouncer container),
PgBouncer is not left paused, the database is the old one or the restored one (a marker
table exists only in the old one; the restored one has exactly the backup's census), and a
re-run of the same command finishes. Restore and deploy of one environment exclude each
other, naming the holder.

The kill is made by the restore itself at the named boundary (AIIA_FAILPOINT,
host/faults.py): the journal is written, then the signal arrives, as it would from
`kill -9`, the OOM killer, CI cancelling the job or an SSH session hanging up.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml

from aiia_ops.commands import backups as bk
from aiia_ops.commands import restores as rj
from aiia_ops.flows import backup as backups
from aiia_ops.host import lock as locks
from aiia_ops.host.runners import LocalRunner
from aiia_ops.model.state import StateDir
from tests.conftest import ROOT, run_invoke
from tests.e2e.deploys import Load
from tests.e2e.test_backups import backup_id, census, databases, get, psql

pytestmark = [pytest.mark.docker, pytest.mark.e2e]

PAUSE_LIMIT = 10  # seconds: the test stack's backups.pause_limit (the real one: 30 s)
REQUEST_SLACK = 10  # one request's own time on top of the pause (2 shared cores)
BOUND = PAUSE_LIMIT + REQUEST_SLACK
POINTS = [rj.LOCKED, rj.SAFETY, rj.COPIED, rj.PAUSED, rj.SWAPPED, rj.RESUMED, rj.HEALTHY,
          rj.DONE]  # fmt: skip
MARKER = "aiia_fault_marker"


class TimedLoad(Load):
    """The deploy tests' load, with the slowest request kept and each answer that is not
    2xx counted by (the kill case under way, path, status)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.slowest = 0.0
        self.case = "-"
        self.bad: Counter = Counter()

    def _get(self, conn, path):
        t0 = time.monotonic()
        try:
            resp, body = super()._get(conn, path)
        finally:
            took = time.monotonic() - t0
            with self._lock:
                self.slowest = max(self.slowest, took)
        if not 200 <= resp.status < 300:
            with self._lock:
                self.bad[(self.case, path, resp.status)] += 1
        return resp, body


@pytest.fixture(scope="module")
def fault_stack(stack_up, e2e_state, tmp_path_factory) -> Path:
    """The test stack with a 10 s pause limit (the guard's delay), for the restore runs."""
    data = yaml.safe_load(Path(os.environ["AIIA_STACK"]).read_text())
    data["backups"]["pause_limit"] = f"{PAUSE_LIMIT}s"
    path = tmp_path_factory.mktemp("faults") / "stack.yml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def restore(fault_stack, backup_id, fault=None, timeout=300, **popen):
    env = {**os.environ, "AIIA_STACK": str(fault_stack)}
    env.pop("AIIA_FAILPOINT", None)
    if fault:
        env["AIIA_FAILPOINT"] = fault
    argv = [sys.executable, "-m", "invoke", "backup.restore", "--env", "prod", "--id",
            backup_id, "--yes"]  # fmt: skip
    if popen:
        return subprocess.Popen(argv, cwd=ROOT, env=env, text=True, **popen)
    return subprocess.run(argv, cwd=ROOT, env=env, text=True, capture_output=True,
                          timeout=timeout)  # fmt: skip


def paused(stack, database: str) -> bool | None:
    out = LocalRunner().query(rj.show_databases(stack))
    return rj.parse_paused(out.stdout, database) if out.ok else None


def set_marker(stack, database: str, n: int) -> None:
    psql(stack, database, f"CREATE TABLE IF NOT EXISTS {MARKER} (n int); "
                          f"TRUNCATE {MARKER}; INSERT INTO {MARKER} VALUES ({n});")  # fmt: skip


def which_database(stack, database: str, restored: dict) -> str:
    """'old' (the marker is there) or 'restored' (exactly the backup's census)."""
    pg = stack.services.postgresql.container
    out = subprocess.run(
        ["docker", "exec", "-i", pg, "psql", "-X", "-At", "-d", database, "-c",
         f"SELECT n FROM {MARKER}"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    if out.returncode == 0:
        return f"old:{out.stdout.strip()}"
    assert "does not exist" in out.stderr, out.stderr
    assert census(stack, database) == restored
    return "restored"


def wait_answering(stack, env, limit: float) -> tuple[float, float]:
    """(seconds until PgBouncer has the database resumed, seconds until /health/ is 200)."""
    t0 = time.monotonic()
    resumed = answered = None
    while time.monotonic() - t0 < limit + 5:
        if resumed is None and paused(stack, env.database) is False:
            resumed = time.monotonic() - t0
        if answered is None:
            try:
                if get(stack, env, "/health/")[0] == 200:
                    answered = time.monotonic() - t0
            except OSError:
                pass
        if resumed is not None and answered is not None:
            return resumed, answered
        time.sleep(0.2)
    raise AssertionError(f"prod not back within {limit}s: resumed={resumed} answered={answered}")


def test_a_restore_killed_at_every_step_leaves_prod_serving_and_a_rerun_finishes(
    fault_stack, stack, e2e_state
):
    env = stack.environment("prod")
    state = StateDir(e2e_state)
    taken = run_invoke("backup", "--env", env.name, check=True)
    record = backups.find_record(state, backup_id(taken))
    restored = {k: tuple(v) for k, v in record.manifest["tables"].items()}
    journal = Path(rj.journal_path(str(e2e_state), env.name))
    rows = []
    paths = ("/health/", "/api/courses/?page_size=5")
    port = stack.local_host.published(443)
    with TimedLoad(env.domains[0], port, clients=50, paths=paths, max_seconds=900) as load:
        for n, point in enumerate(POINTS):
            for sig in ("KILL", "TERM"):
                case = f"{point}:{sig}"
                print(f"\n-- {case}", flush=True)
                load.case = case
                set_marker(stack, env.database, n * 2 + (sig == "TERM"))
                t0 = time.monotonic()
                killed = restore(fault_stack, record.id, f"restore:{case}")
                took = time.monotonic() - t0
                if sig == "KILL":
                    assert killed.returncode == -signal.SIGKILL, (
                        case,
                        killed.stdout,
                        killed.stderr,
                    )
                else:
                    assert killed.returncode == 1, (case, killed.stdout, killed.stderr)
                    assert "interrupted by SIGTERM" in killed.stderr, (case, killed.stderr)
                    assert "Traceback" not in killed.stderr
                resumed, answered = wait_answering(stack, env, BOUND)
                if sig == "TERM":
                    assert resumed < 2, (case, resumed)  # the recovery RESUMEd at once
                assert paused(stack, env.database) is False, case
                which = which_database(stack, env.database, restored)
                rerun = restore(fault_stack, record.id)
                assert rerun.returncode == 0, (case, rerun.stdout, rerun.stderr)
                assert "/health/ answers 200" in rerun.stdout
                assert which_database(stack, env.database, restored) == "restored", case
                assert paused(stack, env.database) is False, case
                assert not journal.exists(), case
                left = sorted(d for d in databases(stack) if d.startswith(f"{env.database}__"))
                assert left == [], (case, left)
                assert locks.held_locks(LocalRunner(), str(e2e_state)) == {}, case
                rows.append((case, round(took, 1), which, round(resumed, 1), round(answered, 1)))
    print("\nkill point        killed after  database after the kill  resumed  answering")
    for case, took, which, resumed, answered in rows:
        print(f"{case:<17} {took:>9.1f}s  {which:<24} {resumed:>6.1f}s  {answered:>8.1f}s")
    print(f"load: {load.total} requests, statuses {dict(load.codes)}, errors "
          f"{dict(load.errors)}, retried {load.retried}, slowest {load.slowest:.1f}s")  # fmt: skip
    assert len(rows) == 2 * len(POINTS)
    assert load.slowest <= BOUND, load.slowest
    print(f"answers other than 2xx: {dict(load.bad)}")
    assert load.errors == {}, load.errors  # every request was answered
    # Users' requests (the API) all answered 2xx: they wait out a pause in PgBouncer. Only
    # /health/ may say 503: it gives its database probe HEALTH_TIMEOUT (5 s) and then says
    # so, truthfully, while a pool is paused (10 s after a SIGKILL inside the pause; on 2
    # busy shared cores even a normal swap's pause can outlast a probe already waiting).
    assert {path for _, path, _ in load.bad} <= {"/health/"}, dict(load.bad)
    assert {status for _, _, status in load.bad} <= {503}, dict(load.bad)
    assert sum(load.bad.values()) <= load.total / 1000, dict(load.bad)  # at most 0.1 %
    assert load.total >= 500


def test_restore_and_deploy_of_one_environment_exclude_each_other_naming_the_holder(
    fault_stack, stack, e2e_state
):
    env = stack.environment("prod")
    state = StateDir(e2e_state)
    newest = backups.latest_record(state, env.name).id
    # A deploy holds prod's lock (the deploy's own lock call, as `invoke deploy` makes it).
    runner, root = LocalRunner(), str(e2e_state)
    locks.acquire(runner, root, locks.deploy_lock(env.name), version="v-e2e", action="deploy")
    try:
        refused = restore(fault_stack, newest)
    finally:
        locks.release(runner, root, locks.deploy_lock(env.name))
    assert refused.returncode == 1, refused.stdout + refused.stderr
    assert f"cannot restore {env.name} now: deploy-{env.name} is locked by" in refused.stderr
    assert "(deploy of v-e2e, pid" in refused.stderr and "Nothing was changed" in refused.stderr
    assert not Path(rj.journal_path(root, env.name)).exists()

    # A real restore, frozen after its copy (SIGSTOP: alive, holding its locks): a real
    # deploy of prod is refused, naming it; the restore then goes on and finishes.
    frozen = restore(fault_stack, newest, "restore:copied:STOP",
                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    try:
        deadline = time.monotonic() + 180
        while Path(rj.journal_path(root, env.name)).exists() is False or (
            rj.parse_journal(Path(rj.journal_path(root, env.name)).read_text()).phase != rj.COPIED
        ):
            assert frozen.poll() is None and time.monotonic() < deadline
            time.sleep(0.5)
        deploy = run_invoke("deploy", "--env", env.name, timeout=600)
        assert deploy.returncode != 0, deploy.stdout + deploy.stderr
        text = deploy.stdout + deploy.stderr
        assert f"deploy-{env.name} is locked by" in text, text
        assert f"backup.restore {newest}" in text, text
    finally:
        frozen.send_signal(signal.SIGCONT)
        out, err = frozen.communicate(timeout=300)
    assert frozen.returncode == 0, out + err
    assert get(stack, env, "/health/")[0] == 200
    assert bk.scratch_name(env.database, "restore", newest) not in databases(stack)
