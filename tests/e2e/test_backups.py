"""Issue #5: backups of a running stack, verified by restores, restored under load.

Everything is derived from the stack file (AIIA_STACK): names, databases, ports. The e2e
fixtures write it (tests/e2e/conftest.py): an isolated stack beside the real one.
"""

from __future__ import annotations

import concurrent.futures
import http.client
import json
import os
import shutil
import socket
import ssl
import subprocess
import threading
import time
from pathlib import Path

import pytest

from aiia_ops.commands import backups as bk
from aiia_ops.flows import backup as backups
from aiia_ops.flows.status import https_get
from aiia_ops.host.runners import LocalRunner
from aiia_ops.model.state import StateDir
from tests.conftest import run_invoke

pytestmark = [pytest.mark.docker, pytest.mark.e2e]
TOKEN_FOR_TESTS = "e2e-backup-write-token"


# --- helpers -----------------------------------------------------------------------------


def invoke(*args: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess:
    return run_invoke(*args, check=check, timeout=timeout)


def psql(stack, database: str, sql: str) -> str:
    pg = stack.services.postgresql.container
    out = subprocess.run(
        [
            "docker",
            "exec",
            "-i",
            pg,
            "psql",
            "-X",
            "-q",
            "-At",
            "-v",
            "ON_ERROR_STOP=1",
            "-d",
            database,
        ],
        input=sql,
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout.strip()


def census(stack, database: str) -> dict:
    out = LocalRunner().run(bk.census(stack, database), input=bk.BACKUP_SCRIPT.read_bytes())
    return bk.parse_census(out.stdout).tables


def databases(stack) -> set[str]:
    return set(psql(stack, "postgres", "SELECT datname FROM pg_database;").split())


def get(stack, env, path: str) -> tuple[int, bytes]:
    status, _, body = https_get(env.domains[0], path, port=stack.local_host.published(443))
    return status, body


def https_connection(stack, domain: str, timeout: float = 10) -> http.client.HTTPSConnection:
    """A connection to nginx on 127.0.0.1 with SNI = `domain` (nginx refuses a handshake
    for a name it does not serve). The certificate may be the self-signed placeholder."""
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    port = stack.local_host.published(443)
    conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=timeout, context=ctx)
    raw = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    conn.sock = ctx.wrap_socket(raw, server_hostname=domain)
    return conn


def app_token(env) -> str | None:
    """The app's own write token, when the stack gives it one."""
    out = subprocess.run(
        ["docker", "inspect", "--format", "{{json .Config.Env}}", env.container],
        capture_output=True,
        text=True,
    )
    for item in json.loads(out.stdout or "[]") or []:
        if item.startswith("API_WRITE_TOKEN=") and item.split("=", 1)[1]:
            return item.split("=", 1)[1]
    return None


_IN_APP_POST = """
import json, os, sys
import django
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "aiia.settings")
django.setup()
from django.test import Client
client, token = Client(), os.environ["API_WRITE_TOKEN"]
for payload in json.loads(sys.stdin.readline()):
    r = client.post("/api/courses/", json.dumps(payload), content_type="application/json",
                    HTTP_AUTHORIZATION="Bearer " + token, HTTP_HOST="localhost", secure=True)
    print(r.status_code)
"""


def write_courses(stack, env, payloads: list[dict]) -> None:
    """POST /api/courses/ of the running app. Over HTTPS through nginx when the app has a
    write token; otherwise the same view, in the app container, through Django's client with
    a token given to that one process (the stack gives the apps no write token yet)."""
    token = app_token(env)
    if token:
        for payload in payloads:
            conn = https_connection(stack, env.domains[0])
            conn.request("POST", "/api/courses/", json.dumps(payload), {
                "Host": env.domains[0], "Content-Type": "application/json",
                "Authorization": f"Bearer {token}",
            })  # fmt: skip
            assert conn.getresponse().status == 201
            conn.close()
        return
    out = subprocess.run(
        [
            "docker",
            "exec",
            "-i",
            "-e",
            f"API_WRITE_TOKEN={TOKEN_FOR_TESTS}",
            env.container,
            "python",
            "-c",
            _IN_APP_POST,
        ],
        input=json.dumps(payloads) + "\n",
        capture_output=True,
        text=True,
    )
    assert out.stdout.split() == ["201"] * len(payloads), out.stderr[-2000:]


def backup_id(proc: subprocess.CompletedProcess) -> str:
    return Path(proc.stdout.strip().splitlines()[-1]).name


def state_dir(e2e_state) -> StateDir:
    return StateDir(Path(e2e_state))


def set_dirs(e2e_state, env: str) -> set[str]:
    folder = Path(e2e_state) / "backups" / env
    return {p.name for p in folder.iterdir() if p.is_dir()} if folder.exists() else set()


def wait_healthy(stack, env, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if get(stack, env, "/health/")[0] == 200:
                return
        except OSError:
            pass
        time.sleep(1)
    raise AssertionError(f"{env.name} not healthy within {timeout}s")


# --- the done-when of the issue ----------------------------------------------------------


def test_retention_keeps_exactly_the_documented_number_of_each(stack_up, stack, e2e_state):
    env = stack.environment("staging")
    r = stack.backups.retention
    for kind, keep in (("pre-deploy", r.pre_deploy), ("daily", r.daily), ("manual", r.manual)):
        for _ in range(keep + 1):
            invoke("backup", "--env", env.name, "--kind", kind)
    invoke("backup.prune")
    records = backups.list_records(state_dir(e2e_state), env.name)
    counts = {k: sum(x.kind == k for x in records) for k in bk.KINDS}
    assert counts == {"pre-deploy": r.pre_deploy, "daily": r.daily, "manual": r.manual}
    assert sum(bk.MEDIA in x.files for x in records) == r.media
    assert sum(bk.CONFIG in x.files for x in records) == r.config
    newest = records[-1]
    assert bk.MEDIA in newest.files and bk.CONFIG in newest.files
    # The daily run is logged where backup.list and the monitor see it.
    last = json.loads((Path(e2e_state) / "backups" / env.name / bk.LAST_RUN).read_text())
    newest_daily = [x for x in records if x.kind == "daily"][-1]
    assert last["daily"]["ok"] is True and last["daily"]["id"] == newest_daily.id
    listing = invoke("backup.list", "--env", env.name).stdout
    assert "last daily run of staging: ok" in listing
    assert listing.splitlines()[0].split() == [
        "id", "kind", "environment", "size", "age", "last", "verified", "files",
    ]  # fmt: skip


def test_rows_written_through_the_app_come_back_after_the_database_is_dropped(
    stack_up, stack, e2e_state
):
    env = stack.environment("prod")
    payloads = [
        {"title": f"Backup course {i} – ünïcode", "summary": "x" * (i * 50),
         "lessons": [{"title": f"L{j}", "body": f"body {i}.{j}"} for j in range(3)]}
        for i in range(12)
    ]  # fmt: skip
    write_courses(stack, env, payloads)
    before = census(stack, env.database)
    assert before["public.courses_course"][0] >= 12

    taken = invoke("backup", "--env", env.name)
    record = backups.find_record(state_dir(e2e_state), backup_id(taken))
    assert set(record.files) == {bk.DUMP, bk.MEDIA, bk.CONFIG, bk.MANIFEST}
    assert {k: tuple(v) for k, v in record.manifest["tables"].items()} == before
    secrets = backups.secret_values(state_dir(e2e_state), stack)
    for name in (bk.CONFIG, bk.MANIFEST):
        data = (Path(record.path) / name).read_bytes()
        if name == bk.CONFIG:
            data = subprocess.run(
                ["tar", "-xzOf", str(Path(record.path) / name)], capture_output=True, check=True
            ).stdout
        assert not [k for k, v in secrets.items() if v.encode() in data], name

    psql(stack, "postgres", f"DROP DATABASE {env.database} WITH (FORCE);")
    assert env.database not in databases(stack)

    restored = invoke("backup.restore", "--env", env.name, "--id", record.id, "--yes")
    assert "/health/ answers 200" in restored.stdout
    assert census(stack, env.database) == before  # same tables, rows and content hashes
    status, body = get(stack, env, "/api/courses/?page_size=100")
    assert status == 200
    titles = {c["title"] for c in json.loads(body)["results"]}
    assert {p["title"] for p in payloads} <= titles
    assert get(stack, env, "/health/")[0] == 200
    left_over = [d for d in databases(stack) if d.startswith(f"{env.database}__")]
    assert left_over == []


def test_corrupted_or_truncated_backups_are_refused_by_verify_and_restore(
    stack_up, stack, e2e_state
):
    env = stack.environment("prod")
    good = backup_id(invoke("backup", "--env", env.name))
    ok = invoke("backup.verify", "--id", good)
    assert f"{good}: ok" in ok.stdout
    assert "last verified" in invoke("backup.list").stdout
    assert backups.find_record(state_dir(e2e_state), good).verified_ok

    corrupted = backup_id(invoke("backup", "--env", env.name))
    truncated = backup_id(invoke("backup", "--env", env.name))
    folder = Path(e2e_state) / "backups" / env.name
    dump = folder / corrupted / bk.DUMP
    data = bytearray(dump.read_bytes())
    data[len(data) // 2] ^= 0xFF
    dump.write_bytes(bytes(data))
    dump = folder / truncated / bk.DUMP
    dump.write_bytes(dump.read_bytes()[: dump.stat().st_size // 2])

    before, dbs = census(stack, env.database), databases(stack)
    for bad, why in ((corrupted, "sha256 differs"), (truncated, "bytes, the manifest says")):
        v = invoke("backup.verify", "--id", bad, check=False)
        assert v.returncode == 1 and why in v.stdout, v.stdout + v.stderr
        assert backups.find_record(state_dir(e2e_state), bad).verify_failed
        r = invoke("backup.restore", "--env", env.name, "--id", bad, "--yes", check=False)
        assert r.returncode == 1
        assert "does not match its manifest, refusing to restore it" in r.stderr
        assert "Nothing was changed" in r.stderr
    # A truncated dump whose manifest was rewritten to match: the restore itself catches it.
    record = backups.find_record(state_dir(e2e_state), truncated)
    record.manifest["files"][bk.DUMP] = backups.file_facts(
        LocalRunner(), folder / truncated, [bk.DUMP]
    )[bk.DUMP]
    (folder / truncated / bk.MANIFEST).write_text(bk.render_manifest(record.manifest))
    (folder / truncated / bk.VERIFY).unlink()
    v = invoke("backup.verify", "--id", truncated, check=False)
    assert v.returncode == 1 and "damaged or truncated" in v.stdout, v.stdout
    r = invoke(
        "backup.restore", "--env", env.name, "--id", truncated, "--yes", "--no-safety-backup",
        check=False,
    )  # fmt: skip
    assert r.returncode == 1 and "damaged or truncated" in r.stderr, r.stdout + r.stderr
    assert census(stack, env.database) == before and databases(stack) == dbs
    assert get(stack, env, "/health/")[0] == 200
    # Retention never deletes a set for a failed verification (issue 13): the newest sets of
    # the kind stay whatever verify said, the verified one too, and the failures are alerted.
    invoke("backup.prune", "--env", env.name)
    left = set_dirs(e2e_state, env.name)
    assert {good, corrupted, truncated} <= left
    listing = invoke("backup.list").stdout
    assert f"ALERT {env.name}: 2 backup(s) failed verification" in listing, listing
    assert corrupted in listing and truncated in listing


def test_bad_input_is_a_clear_error_and_changes_nothing(stack_up, stack, e2e_state):
    env = stack.environment("prod")
    unknown = invoke("backup.restore", "--env", env.name, "--id",
                     "20000101T000000Z-prod-manual", "--yes", check=False)  # fmt: skip
    assert unknown.returncode == 1 and "no backup '20000101T000000Z-prod-manual'" in unknown.stderr
    garbage = invoke("backup.verify", "--id", "latest-and-greatest", check=False)
    assert garbage.returncode == 1 and "is not a backup id" in garbage.stderr
    kind = invoke("backup", "--kind", "weekly", check=False)
    assert kind.returncode == 1 and "unknown kind 'weekly'" in kind.stderr

    staging = backups.list_records(state_dir(e2e_state), "staging")[-1]
    other = invoke("backup.restore", "--env", env.name, "--id", staging.id, "--yes", check=False)
    assert other.returncode == 1
    assert f"{staging.id} is a backup of staging, not prod" in other.stderr
    assert "--allow-other-env" in other.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root")
def test_a_full_disk_is_refused_before_anything_is_written(stack_up, stack, e2e_state):
    env = stack.environment("staging")
    folder = Path(e2e_state) / "backups" / env.name
    moved = folder.with_name(f"{env.name}.away")
    os.rename(folder, moved)
    folder.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(folder)], check=True)
    try:
        out = invoke("backup", "--env", env.name, check=False)
        assert out.returncode == 1
        assert "not enough free disk for backup" in out.stderr
        assert "nothing was written" in out.stderr
        assert {p.name for p in folder.iterdir()} == {bk.LAST_RUN}  # the lock: <state>/locks
        last = json.loads((folder / bk.LAST_RUN).read_text())
        assert last["manual"]["ok"] is False
        assert last["manual"]["error"].startswith("not enough free disk for backup")
    finally:
        subprocess.run(["umount", str(folder)], check=True)
        folder.rmdir()
        os.rename(moved, folder)


def test_a_prod_backup_and_a_staging_restore_under_prod_load_cost_prod_nothing(
    stack_up, stack, e2e_state
):
    prod, staging = stack.environment("prod"), stack.environment("staging")
    write_courses(stack, staging, [{"title": f"Staging course {i}"} for i in range(5)])
    source = backup_id(invoke("backup", "--env", staging.name))
    statuses: list[int] = []
    errors: list[str] = []
    stop = threading.Event()
    lock = threading.Lock()

    def client(n: int) -> None:
        conn = None
        deadline = time.monotonic() + 180
        for i in range(400):  # bounded in count and in time
            if stop.is_set() or time.monotonic() > deadline:
                break
            try:
                if conn is None:
                    conn = https_connection(stack, prod.domains[0], timeout=15)
                path = "/health/" if i % 2 else f"/api/courses/?page={1 + i % 2}&page_size=5"
                conn.request("GET", path, headers={"Host": prod.domains[0]})
                resp = conn.getresponse()
                resp.read()
                with lock:
                    statuses.append(resp.status)
                if resp.getheader("Connection", "").lower() == "close":
                    conn.close()
                    conn = None
            except (OSError, http.client.HTTPException) as exc:
                with lock:
                    errors.append(f"{n}: {type(exc).__name__}: {exc}")
                conn = None
        if conn is not None:
            conn.close()

    with concurrent.futures.ThreadPoolExecutor(max_workers=24) as pool:
        futures = [pool.submit(client, n) for n in range(24)]
        time.sleep(2)
        try:
            # A backup of prod itself, under the same load: no request blocked or failed.
            during = invoke("backup", "--env", prod.name, check=False)
            restored = invoke("backup.restore", "--env", staging.name, "--id", source, "--yes",
                              check=False)  # fmt: skip
        finally:
            stop.set()
        for f in futures:
            f.result()
    assert during.returncode == 0, during.stdout + during.stderr
    assert restored.returncode == 0, restored.stdout + restored.stderr
    print(f"prod under load: {len(statuses)} responses from 24 connections, statuses "
          f"{sorted(set(statuses))}, {len(errors)} errors")  # fmt: skip
    assert errors == []
    assert len(statuses) >= 100
    assert {s for s in statuses if not 200 <= s < 300} == set(), sorted(set(statuses))
    assert get(stack, staging, "/health/")[0] == 200


def test_postgres_down_is_a_clear_error_and_nothing_is_written(stack_up, stack, e2e_state):
    env = stack.environment("prod")
    pg = stack.services.postgresql.container
    before = set_dirs(e2e_state, env.name)
    newest = backups.list_records(state_dir(e2e_state), env.name)[-1].id
    subprocess.run(["docker", "stop", pg], check=True, capture_output=True)
    try:
        out = invoke("backup", "--env", env.name, check=False)
        assert out.returncode == 1
        assert f"PostgreSQL ({pg}) is not running; start it (invoke up)" in out.stderr
        r = invoke("backup.restore", "--env", env.name, "--id", newest, "--yes", check=False)
        assert r.returncode == 1 and "is not running" in r.stderr
        assert set_dirs(e2e_state, env.name) == before
    finally:
        subprocess.run(["docker", "start", pg], check=True, capture_output=True)
    for e in stack.environments.values():
        wait_healthy(stack, e, 120)


def test_backup_dir_is_not_readable_by_others(stack_up, e2e_state):
    folder = Path(e2e_state) / "backups"
    for env_dir in folder.iterdir():
        if env_dir.is_dir():
            for set_dir in env_dir.iterdir():
                if set_dir.is_dir():
                    assert set_dir.stat().st_mode & 0o077 == 0, set_dir
    assert shutil.disk_usage(folder).free > 0
