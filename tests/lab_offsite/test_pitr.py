"""Issue #14: continuous encrypted WAL archiving to a real S3 store on another host
(SeaweedFS on lab9), and `backup.pitr` to a moment, on a real stack (project aiiapitr).

Rows go in through PgBouncer as the environment's own role; `--to T` must give exactly the
rows committed at T (count and content hash), `--to latest` every committed row."""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from pathlib import Path

import pytest

from aiia_ops.commands import backups as bk
from aiia_ops.commands import monitor as m
from aiia_ops.commands import pgbackrest as pb
from aiia_ops.flows import pitr as pitr_flow
from aiia_ops.host.runners import LocalRunner
from aiia_ops.host.secrets import load_secrets
from aiia_ops.model.load import load_stack
from aiia_ops.model.state import StateDir
from tests.conftest import run_invoke
from tests.lab_offsite.conftest import STORE_HOST
from tests.stackfiles import trust_store_ca

pytestmark = [pytest.mark.docker, pytest.mark.e2e]
MARK = "pitr-probe-row"
PUSH_S = 5.0  # seconds a closed WAL segment may take to reach the store (compress, encrypt, PUT)


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
    trust_store_ca(Path(os.environ["AIIA_STACK"]), offsite["store_data"].parent)
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


def test_the_stores_certificate_is_verified_against_the_stacks_ca(prod, tmp_path):
    """TLS to the store is checked for real: the stack's pgBackRest reads the repository
    through the store's CA (repo1.ca), and the same config with a CA that did not sign the
    store's certificate is refused by the TLS handshake."""
    stack, _ = prod
    pg = stack.services.postgresql.container
    conf = subprocess.run(["docker", "exec", pg, "cat", pb.CONFIG], capture_output=True,
                          text=True, check=True).stdout  # fmt: skip
    assert "\nrepo1-storage-verify-tls=y\n" in conf
    assert f"\nrepo1-storage-ca-file={pb.CA_FILE}\n" in conf

    def info(config: str) -> str:
        # io-timeout 5 s: pgBackRest retries a failed handshake until it runs out (60 s)
        proc = subprocess.run(["docker", "exec", pg, "pgbackrest", f"--config={config}",
                               f"--stanza={stack.backups.pitr.stanza}", "--io-timeout=5",
                               "info"],
                              capture_output=True, text=True, timeout=120)  # fmt: skip
        return proc.stdout + proc.stderr

    assert "status: ok" in info(pb.CONFIG)
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-keyout", str(tmp_path / "k.pem"), "-out", str(tmp_path / "other.pem"),
                    "-subj", "/CN=not the store's CA"],
                   capture_output=True, check=True)  # fmt: skip
    other = conf.replace(pb.CA_FILE, "/tmp/other-ca.pem")
    for path, text in (("/tmp/other-ca.pem", (tmp_path / "other.pem").read_text()),
                       ("/tmp/other.conf", other)):  # fmt: skip
        subprocess.run(["docker", "exec", "-i", pg, "sh", "-c", f"cat > {path}"], input=text,
                       text=True, check=True)  # fmt: skip
    refused = info("/tmp/other.conf")
    assert "status: ok" not in refused, refused
    assert "unable to verify certificate presented by '10.77.0.19:8443'" in refused, refused


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
        page = json.loads((state / "status" / "status.json").read_text())
        cards = {c["subject"]: c for c in page["shared"]}
        lag_row = next(c for c in cards["postgresql"]["checks"] if c["metric"] == "archive_lag")
        assert lag_row["state"] == m.CRIT  # the status page shows the stalled archive
        repo = {c["metric"]: c for c in cards["repo1"]["checks"]}
        assert set(repo) == {"base_backup_age", "repository"}
        html = (state / "status" / "index.html").read_text()
        assert "off-site backups (repo1)" in html and "WAL archive lag" in html
    finally:
        invoke("offsite.up", "--host", STORE_HOST)
    deadline = time.monotonic() + 120
    while (pitr_flow.archiver(stack, runner)["last_wal"] or "") < stuck:
        assert time.monotonic() < deadline, "the backlog did not drain after the store came back"
        time.sleep(2)
    assert m.archive_checks(pitr_flow.status(stack, runner), policy)[0].state == m.OK


class Writer(threading.Thread):
    """The app's write path under load: one row per transaction through PgBouncer as the
    environment's role, one psql session, `rate` a second; records the host time each
    commit was acknowledged. Stops when told or when the server dies under it."""

    def __init__(self, stack, state: Path, first: int, rate: float = 20.0):
        super().__init__(daemon=True)
        self.stack, self.state, self.next, self.rate = stack, state, first, rate
        self.acked: dict[int, float] = {}
        self.stop = threading.Event()

    def run(self) -> None:
        env = self.stack.environment("prod")
        password = load_secrets(self.state, list(self.stack.environments), create=False)
        bouncer = self.stack.services.pgbouncer
        proc = subprocess.Popen(
            ["docker", "exec", "-i", "-e", "PGPASSWORD", self.stack.services.postgresql.container,
             "psql", "-X", "-q", "-At", "-v", "ON_ERROR_STOP=1", "-h", str(bouncer.address),
             "-p", str(bouncer.port), "-U", env.db_user, "-d", env.database],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
            bufsize=1, env={**os.environ, "PGPASSWORD": password.environments["prod"].db_password},
        )  # fmt: skip
        try:
            while not self.stop.is_set():
                i = self.next
                proc.stdin.write(
                    f"INSERT INTO load VALUES ({i}, repeat(md5('{i}'), 32)) RETURNING id;\n"
                )
                proc.stdin.flush()
                line = proc.stdout.readline()
                if not line.strip():
                    return  # the server (or the connection) died
                self.acked[int(line)] = time.time()
                self.next += 1
                time.sleep(1 / self.rate)
        except (BrokenPipeError, OSError, ValueError):
            return
        finally:
            proc.kill()
            proc.wait()


def load_ids(stack) -> set[int]:
    out = LocalRunner().run(bk.psql(stack, stack.environment("prod").database),
                            input="SELECT id FROM load;").stdout  # fmt: skip
    return {int(x) for x in out.split()}


def test_server_killed_mid_load_the_repository_loses_only_the_last_archive_timeout(prod):
    """The server dies (SIGKILL of PostgreSQL's container) under 20 writes/s. From the
    repository alone (the server's disk counted as lost) the newest moment has every row
    acknowledged more than archive_timeout before the failure; with the server back,
    `backup.pitr --to latest` has every acknowledged row, and the outage's rows (no gap)."""
    stack, state = prod
    runner = LocalRunner()
    pg = stack.services.postgresql.container
    timeout = stack.backups.pitr.archive_timeout.seconds
    through_bouncer(stack, state, "CREATE TABLE load (id int PRIMARY KEY, payload text);")
    pitr_flow.switch_and_wait(stack, runner)
    writer = Writer(stack, state, 1)
    writer.start()
    time.sleep(3 * timeout)
    failed_at = time.time()
    runner.run(["docker", "kill", "--signal", "KILL", pg])
    writer.join(30)
    acked = dict(writer.acked)
    assert len(acked) > 100, f"only {len(acked)} writes acknowledged"
    try:
        with pitr_flow.scratch_copy(stack, StateDir(state), None, runner) as copy:
            restored = load_ids(copy)
        lost = sorted(t for i, t in acked.items() if i not in restored)
        rpo = failed_at - lost[0] if lost else 0.0
        print(f"\nkilled after {len(acked)} acknowledged writes; the repository alone has "
              f"{len(restored)}: {len(lost)} lost, RPO {rpo:.1f}s (archive_timeout {timeout:.0f}s)",
              flush=True)  # fmt: skip
        # The bound: archive_timeout closes the open segment, then its push takes a moment
        # (PUSH_S); a kill inside that moment loses the segment before too.
        assert rpo <= timeout + PUSH_S, f"writes older than archive_timeout were lost: {rpo:.1f}s"
        assert len(restored - set(acked)) <= 1  # at most the one commit in flight at the kill
    finally:
        runner.run(["docker", "start", pg])
        deadline = time.monotonic() + 120
        while runner.query(bk.psql(stack), input="SELECT 1;").stdout.strip() != "1":
            assert time.monotonic() < deadline, "PostgreSQL did not come back after docker start"
            time.sleep(2)
    # The server back with its disk: its unarchived WAL goes now; latest has every write.
    expected = census(stack, state)
    invoke("backup.pitr", "--env", "prod", "--to", "latest", "--yes")
    assert set(acked) <= load_ids(stack)
    assert census(stack, state) == expected
    outage = through_bouncer(
        stack, state, "SELECT count(*) FROM probe WHERE id BETWEEN 2000 AND 2200;"
    )
    assert outage == "201"  # written while the store was down: replayed, no gap


def repository(stack) -> dict[str, int]:
    """Every object of the repository and its size (pgbackrest repo-ls)."""
    out = LocalRunner().run(
        pb.in_container(stack.services.postgresql.container, pb.repo_ls(stack)), timeout=120
    )
    return {name: entry.get("size", 0) for name, entry in json.loads(out.stdout).items()}


def one_line_error(proc: subprocess.CompletedProcess, says: str) -> str:
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert says in lines[0], lines[0]
    return lines[0]


def test_a_full_disk_on_the_store_is_a_clear_error_that_changes_nothing(prod, offsite):
    stack, state = prod
    runner = LocalRunner()
    pitr_flow.switch_and_wait(stack, runner)
    filler = offsite["store_data"] / "filler"
    subprocess.run(["dd", "if=/dev/zero", f"of={filler}", "bs=1M"], capture_output=True)
    try:
        assert os.statvfs(offsite["store_data"]).f_bavail == 0
        objects, rows = repository(stack), census(stack, state)
        t0 = time.monotonic()
        proc = invoke("backup.base", "--kind", "full", check=False)
        line = one_line_error(proc, "is its disk full?")
        print(f"\nfull store disk: refused in {time.monotonic() - t0:.0f}s: {line}", flush=True)
        assert repository(stack) == objects  # no partial backup left in the store
        assert census(stack, state) == rows
        insert(stack, state, 4000, 4010)  # PostgreSQL keeps serving; its WAL waits
    finally:
        filler.unlink()
    invoke("offsite.up", "--host", STORE_HOST)  # no-op while it runs; back if it gave up
    pitr_flow.switch_and_wait(stack, runner, timeout=180)  # the backlog drains by itself


def test_bad_targets_and_a_wrong_key_are_clear_errors_that_change_nothing(prod):
    stack, state = prod
    before, objects = census(stack, state), repository(stack)
    for to, says in (("2000-01-01 00:00:00", "outside the recoverable window"),
                     ("2099-01-01 00:00:00", "outside the recoverable window"),
                     ("yesterday", "is not a moment")):  # fmt: skip
        proc = invoke("backup.pitr", "--env", "prod", "--to", to, "--yes", check=False)
        one_line_error(proc, says)
    # The key a restore would use (the state's env file) is not the repository's.
    env_file = state / "env" / "postgresql.env"
    saved = env_file.read_text()
    assert "PGBACKREST_REPO1_CIPHER_PASS=" in saved
    env_file.write_text(
        "\n".join(
            "PGBACKREST_REPO1_CIPHER_PASS=not-the-key"
            if ln.startswith("PGBACKREST_REPO1_CIPHER_PASS=")
            else ln
            for ln in saved.splitlines()
        )
        + "\n"
    )
    try:
        proc = invoke("backup.pitr", "--env", "prod", "--to", "latest", "--yes", check=False)
        line = one_line_error(proc, "cannot be read with this key")
        assert "not-the-key" not in proc.stdout + proc.stderr
        print(f"\nwrong key: {line}", flush=True)
    finally:
        env_file.write_text(saved)
    assert census(stack, state) == before
    after = repository(stack)
    assert {k: v for k, v in after.items() if not k.startswith("archive/")} == {
        k: v for k, v in objects.items() if not k.startswith("archive/")
    }  # no backup touched; (pitr's own WAL switch adds a segment under archive/)
