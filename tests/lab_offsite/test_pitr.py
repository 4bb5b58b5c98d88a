"""Issue #14: continuous encrypted WAL archiving to a real S3 store on another host
(SeaweedFS on lab9), and `backup.pitr` to a moment, on a real stack (project aiiapitr).

Rows go in through PgBouncer as the environment's own role; `--to T` must give exactly the
rows committed at T (count and content hash), `--to latest` every committed row."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from aiia_ops.commands import monitor as m
from aiia_ops.flows import pitr as pitr_flow
from aiia_ops.host.runners import LocalRunner
from aiia_ops.host.secrets import load_secrets
from aiia_ops.model.load import load_stack
from tests.conftest import run_invoke
from tests.lab_offsite.conftest import STORE_HOST

pytestmark = [pytest.mark.docker, pytest.mark.e2e]
MARK = "pitr-probe-row"


def invoke(*args: str, check: bool = True, timeout: float = 900) -> subprocess.CompletedProcess:
    return run_invoke(*args, check=check, timeout=timeout)


def through_bouncer(stack, state: Path, sql: str) -> str:
    """psql as aiia_prod to PgBouncer's address (the apps' path), run from the PostgreSQL
    container; the password through the environment, never on a command line."""
    env = stack.environment("prod")
    password = load_secrets(state, list(stack.environments), create=False)
    bouncer = stack.services.pgbouncer
    out = subprocess.run(
        ["docker", "exec", "-i", "-e", "PGPASSWORD", stack.services.postgresql.container,
         "psql", "-X", "-q", "-At", "-v", "ON_ERROR_STOP=1", "-h", str(bouncer.address),
         "-p", str(bouncer.port), "-U", env.db_user, "-d", env.database],
        input=sql, capture_output=True, text=True, timeout=60,
        env={**os.environ, "PGPASSWORD": password.environments["prod"].db_password},
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def census(stack, state) -> tuple[int, str]:
    out = through_bouncer(
        stack, state,
        "SELECT count(*), coalesce(md5(string_agg(id || ':' || payload, ',' ORDER BY id)), '') "
        "FROM probe;",
    )  # fmt: skip
    n, digest = out.split("|")
    return int(n), digest


def insert(stack, state, first: int, last: int) -> None:
    through_bouncer(
        stack, state,
        f"INSERT INTO probe SELECT g, '{MARK}-' || g FROM generate_series({first}, {last}) g;",
    )  # fmt: skip


@pytest.fixture(scope="module")
def prod(offsite):
    """prod set up with archiving to the store on lab9, the stanza made, a first full."""
    t0 = time.monotonic()
    invoke("offsite.up", "--host", STORE_HOST)
    invoke("setup", "--env=prod", timeout=1800)
    invoke("backup.pitr-init")
    stack = load_stack()
    through_bouncer(
        stack, offsite["state"], "CREATE TABLE probe (id int PRIMARY KEY, payload text);"
    )
    print(f"\nstack + store + first full in {time.monotonic() - t0:.0f}s", flush=True)
    return stack, offsite["state"]


def test_list_shows_the_window_and_the_archive_lag(prod):
    out = invoke("backup.list").stdout
    assert "recoverable window:" in out and "archive lag:" in out
    assert " full " in out  # the first full base backup


def test_pitr_to_a_moment_gives_exactly_the_rows_committed_then(prod):
    stack, state = prod
    insert(stack, state, 1, 50)
    expected = census(stack, state)
    time.sleep(1.5)
    moment = through_bouncer(stack, state, "SELECT to_char(clock_timestamp() AT TIME ZONE 'UTC', "
                             "'YYYY-MM-DD HH24:MI:SS.US');")  # fmt: skip
    time.sleep(1.5)
    insert(stack, state, 51, 80)
    assert census(stack, state)[0] == 80
    out = invoke("backup.pitr", "--env", "prod", "--to", moment, "--yes").stdout
    assert "restored to" in out
    assert census(stack, state) == expected == (50, expected[1])


def test_objects_in_the_store_are_unreadable_without_the_key(prod):
    stack, state = prod
    insert(stack, state, 1000, 1010)
    pitr_flow.switch_and_wait(stack, LocalRunner())
    data = Path("/var/lib/aiia-lab") / STORE_HOST / "offsite" / "data"
    blobs = [p for p in data.rglob("*") if p.is_file() and p.suffix == ".dat"]
    assert blobs, f"no volume files under {data}"
    raw = b"".join(p.read_bytes() for p in blobs)
    assert len(raw) > 1_000_000  # WAL segments and a full backup are in there
    assert MARK.encode() not in raw  # plaintext WAL would hold the rows
    assert b"Salted__" in raw  # OpenSSL-format aes-256-cbc objects (pgBackRest's cipher)


def test_store_down_stalls_archiving_serves_on_goes_critical_then_drains(prod):
    stack, state = prod
    runner = LocalRunner()
    policy = stack.backups.pitr
    invoke("offsite.down", "--host", STORE_HOST)
    try:
        insert(stack, state, 2000, 2100)  # PostgreSQL keeps serving
        out = runner.run(["docker", "exec", "-i", stack.services.postgresql.container, "psql",
                          "-XAtq"], input="SELECT pg_walfile_name(pg_switch_wal());")  # fmt: skip
        stuck = out.stdout.strip()
        deadline = time.monotonic() + 90
        while True:
            facts = pitr_flow.status(stack, runner)
            lag = m.archive_checks(facts, policy)[0]
            if lag.state == m.CRIT:
                break
            assert time.monotonic() < deadline, f"archive lag never went CRITICAL: {lag}"
            time.sleep(3)
        assert (facts["last_archived_wal"] or "") < stuck
        insert(stack, state, 2101, 2200)
        report = invoke("monitor", check=False).stdout
        assert "WAL archive lag" in report and "CRIT" in report.upper()
    finally:
        invoke("offsite.up", "--host", STORE_HOST)
    deadline = time.monotonic() + 120
    while (pitr_flow.archiver(stack, runner)["last_wal"] or "") < stuck:
        assert time.monotonic() < deadline, "the backlog did not drain after the store came back"
        time.sleep(2)
    assert m.archive_checks(pitr_flow.status(stack, runner), policy)[0].state == m.OK


def test_pitr_to_latest_loses_no_committed_row_and_no_gap(prod):
    stack, state = prod
    insert(stack, state, 3000, 3020)
    expected = census(stack, state)
    invoke("backup.pitr", "--env", "prod", "--to", "latest", "--yes")
    assert census(stack, state) == expected  # replayed across the outage: no gap


def test_bad_targets_and_a_wrong_key_are_clear_errors_that_change_nothing(prod):
    stack, state = prod
    before = census(stack, state)
    for to, says in (("2000-01-01 00:00:00", "outside the recoverable window"),
                     ("yesterday", "is not a moment")):  # fmt: skip
        proc = invoke("backup.pitr", "--env", "prod", "--to", to, "--yes", check=False)
        assert proc.returncode != 0 and says in proc.stderr + proc.stdout
        assert "Traceback" not in proc.stderr
    wrong = subprocess.run(
        ["docker", "exec", "-e", "PGBACKREST_REPO1_CIPHER_PASS=not-the-key",
         stack.services.postgresql.container, "pgbackrest", "--config=/etc/aiia/pgbackrest.conf",
         "--stanza=aiia", "info"], capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert "unable to" in (wrong.stdout + wrong.stderr).lower() or "error" in wrong.stdout.lower()
    assert census(stack, state) == before
