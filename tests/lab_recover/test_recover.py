"""Issue #14, the off-site drill: prod on lab18 with WAL archiving to the S3 store on lab20,
courses written through the app (POST /api/courses/ through nginx), media in prod's storage
volume, copied off-site by `invoke backup.media`; the secrets exported. Then lab18 is
destroyed (`lab.down`: its namespace, engine, volumes, containers and state dir), and
`invoke recover --host lab19` brings prod back on the bare lab19 from the store alone:
every course committed up to the last archived segment (count + content hash), the media
byte for byte, /health/ 200. No packet goes to lab18's address during the recovery. Bad
input first (unknown host, wrong passphrase, store down): clear errors, lab19 untouched.

Slow (about 5-8 min): a release image, the server's setup, a full base backup, the recovery.
  flock /tmp/aiia-docker-tests.lock env PYTHONPATH=src /work/venv/bin/python -m pytest \
      tests/lab_recover -x -q -p no:cacheprovider --durations=10
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import socket
import ssl
import subprocess
import time
from pathlib import Path

import pytest

from aiia_ops.flows.deploy import build_release_image
from aiia_ops.host.git import resolve_ref, shared_image_tags
from aiia_ops.host.http import health_through_nginx, https_get
from aiia_ops.host.runners import LocalRunner
from aiia_ops.host.secrets import load_secrets
from aiia_ops.model import load_stack
from tests.conftest import run_invoke
from tests.lab_recover.conftest import (
    ADDRESS,
    LAB_DIR,
    NEW,
    PASSPHRASE,
    SERVER,
    STORE,
    on_server,
    ssh,
    state_of,
)
from tests.stackfiles import trust_store_ca

pytestmark = [pytest.mark.docker, pytest.mark.e2e]
DOMAIN = "eduaiia.com"
MEDIA_FILES = 5
RULE = "aiia-recover-no-contact"
# `AIIA_RECOVER_DB_MB=1024 pytest tests/lab_recover`: the drill as the RTO benchmark
BENCH_MB = int(os.environ.get("AIIA_RECOVER_DB_MB", "0"))


def post_course(address: str, token: str, n: int) -> int:
    body = json.dumps(
        {
            "title": f"Drill course {n}",
            "slug": f"drill-{n}",
            "summary": f"written before the loss, #{n}",
        }
    )
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    raw = socket.create_connection((address, 443), timeout=10)
    conn = http.client.HTTPSConnection(address, 443, timeout=10, context=context)
    conn.sock = context.wrap_socket(raw, server_hostname=DOMAIN)
    try:
        conn.request(
            "POST",
            "/api/courses/",
            body=body,
            headers={
                "Host": DOMAIN,
                "Content-Type": "application/json",
                "Authorization": f"Bearer {token}",
            },
        )
        resp = conn.getresponse()
        resp.read()
        return resp.status
    finally:
        conn.close()


CENSUS = (
    "SELECT count(*) || '|' || coalesce(md5(string_agg(id || ':' || slug || ':' || title || ':' "
    "|| summary, ',' ORDER BY id)), '') FROM courses_course;"
)


def census(host: str, stack) -> tuple[int, str]:
    pg = stack.services.postgresql.container
    db = stack.environment("prod").database
    out = ssh(host, f"docker exec -i {pg} psql -XAtq -d {db}", input=CENSUS).stdout.strip()
    n, digest = out.split("|")
    return int(n), digest


def media_digest(host: str, stack) -> str:
    image = f"{stack.services.postgresql.image}:{shared_image_tags(stack)['postgresql']}"
    volume = f"{stack.project}_storage_prod"
    line = (
        f"docker run --rm --user 0:0 -v {volume}:/s:ro --entrypoint sh {image} -c "
        "'cd /s/media && find . -type f | sort | xargs sha256sum; stat -c %u:%g:%a /s'"
    )
    return ssh(host, line).stdout


def lab19_is_untouched(stack) -> None:
    out = ssh(NEW, "docker ps -aq | wc -l; docker volume ls -q | wc -l").stdout.split()
    assert out == ["0", "0"], f"lab19 was changed: {out}"
    assert not state_of(NEW).exists()


def bench_database(stack) -> None:
    """The RTO benchmark: about BENCH_MB MB more in prod's database, written while archiving
    (as a real server grows), then a full base backup that holds it all, so `recover`
    restores a base backup of that size. The rows are hex digests (md5 of distinct
    values, 992 characters a row, stored inline: no TOAST compression), which compress
    about as well as real text does, not 30 times as a repeated string would."""
    db = stack.environment("prod").database
    pg = stack.services.postgresql.container
    rows = BENCH_MB * 1024 * 1024 // 1170  # 7 rows per 8 kB page, + the primary key's index
    t0 = time.monotonic()
    out = ssh(
        SERVER,
        f"docker exec -i {pg} psql -XAtq -d {db}",
        input="CREATE TABLE bench (id int PRIMARY KEY, pad text); INSERT INTO bench SELECT g, "
        "(SELECT string_agg(md5(g::text || ':' || i), '') FROM generate_series(1, 31) i) "
        f"FROM generate_series(1, {rows}) g; "
        "SELECT pg_database_size(current_database()) / 1048576;",
        timeout=3600,
    ).stdout.strip()
    size_mb = int(out.split()[-1])
    print(f"\nbench: {rows} rows, prod's database {size_mb} MB, in "
          f"{time.monotonic() - t0:.0f}s", flush=True)  # fmt: skip
    assert size_mb >= 0.9 * BENCH_MB, f"the database is {size_mb} MB, not ~{BENCH_MB} MB"
    t0 = time.monotonic()
    print(on_server("backup.base", "--kind", "full", timeout=3600).stdout.strip(), flush=True)
    print(f"bench: full base backup in {time.monotonic() - t0:.0f}s", flush=True)
    print(on_server("backup.list").stdout[-3000:], flush=True)


@pytest.fixture(scope="module")
def server(drill):
    """prod on lab18, archiving to lab20; courses through the app; media copied off-site;
    the secrets exported; the last segment archived. Returns what was committed."""
    t0 = time.monotonic()
    stack = load_stack()
    commit, tag = resolve_ref(None)
    build_release_image(stack, stack.environment("prod"), commit, tag, LocalRunner())
    images = [
        f"{getattr(stack.services, n).image}:{t}" for n, t in shared_image_tags(stack).items()
    ]
    for image in [
        "debian:trixie-slim",
        "aiia/base:trixie",
        *images,
        f"{stack.environment('prod').image}:{tag}",
    ]:
        run_invoke("lab.load", "--image", image, "--hosts", SERVER, check=True, timeout=600)
    run_invoke("offsite.up", "--host", STORE, check=True)  # makes the store's keys and CA
    trust_store_ca(drill["stack_file"], Path(LAB_DIR) / STORE / "offsite")
    (state_of(SERVER) / "secrets").mkdir(parents=True, mode=0o700)
    for f in (drill["root"] / "store-state" / "secrets").iterdir():  # the server's S3 keys
        shutil.copy2(f, state_of(SERVER) / "secrets" / f.name)
    on_server("setup", "--env=prod", "--skip-build", timeout=1800)
    on_server("backup.pitr-init", timeout=3600)
    if BENCH_MB:
        bench_database(stack)
    secrets = load_secrets(state_of(SERVER), list(stack.environments), create=False)
    token = secrets.environments["prod"].api_write_token
    for n in range(1, 41):
        assert post_course(ADDRESS[SERVER], token, n) == 201
    app = stack.environment("prod").container
    ssh(
        SERVER,
        f"docker ps --format '{{{{.Names}}}}' | grep -x '{app}.*' | head -1 | xargs -I@ "
        "docker exec @ sh -c 'mkdir -p /app/storage/media/uploads && for i in $(seq 1 "
        f"{MEDIA_FILES}); do head -c 300000 /dev/urandom > /app/storage/media/uploads/f$i.bin; "
        "done'",
    )
    out = on_server("backup.media").stdout
    assert "off-site copy" in out, out
    export = drill["root"] / "secrets.aiia"
    on_server("secrets.export", "--out", str(export), env={"AIIA_EXPORT_PASSPHRASE": PASSPHRASE})
    for n in range(41, 61):  # after the media copy: only the WAL has these
        assert post_course(ADDRESS[SERVER], token, n) == 201
    pg = stack.services.postgresql.container
    # Close the segment of the last commit. pg_switch_wal() answers the end + 1 of the
    # segment it closed (a boundary: its name would be the next, empty segment's), or, with
    # nothing to switch, the current segment's start: the byte before is the right one.
    segment = ssh(
        SERVER,
        f"docker exec -i {pg} psql -XAtq",
        input="SELECT pg_walfile_name(pg_switch_wal() - 1);",
    ).stdout.strip()
    deadline = time.monotonic() + 90
    while True:
        last = ssh(
            SERVER,
            f"docker exec -i {pg} psql -XAtq",
            input="SELECT last_archived_wal FROM pg_stat_archiver;",
        ).stdout.strip()
        if last >= segment:
            break
        assert time.monotonic() < deadline, f"{segment} not archived (last {last})"
        time.sleep(1)
    committed = census(SERVER, stack)
    media = media_digest(SERVER, stack)
    assert committed[0] == 60 and media.count("f") >= MEDIA_FILES
    print(f"\nserver up, 60 courses, media copied, in {time.monotonic() - t0:.0f}s", flush=True)
    return {"stack": stack, "committed": committed, "media": media, "export": export}


@pytest.fixture(scope="module")
def lost(server):
    """lab18 destroyed: namespace, engine (containers, volumes), state dir."""
    run_invoke("lab.down", "--hosts", SERVER, check=True, timeout=300)
    assert not state_of(SERVER).exists()
    assert subprocess.run(["ip", "netns", "pids", SERVER], capture_output=True).returncode != 0
    return server


def recover(*args: str, passphrase: str = PASSPHRASE, timeout: float = 1800):
    return run_invoke("recover", *args, env={"AIIA_EXPORT_PASSPHRASE": passphrase}, timeout=timeout)


def test_bad_input_is_a_clear_error_and_changes_nothing_on_lab19(lost):
    export = str(lost["export"])
    cases = [
        (("--host", "lab99", "--secrets", export, "--yes"), PASSPHRASE, "unknown host 'lab99'"),
        (("--host", NEW, "--secrets", export, "--yes"), "not the passphrase", "wrong passphrase"),
        (("--host", NEW, "--secrets", "/nonexistent", "--yes"), PASSPHRASE, "no such file"),
    ]
    for args, passphrase, says in cases:
        proc = recover(*args, passphrase=passphrase)
        assert proc.returncode == 1, proc.stdout + proc.stderr
        assert says in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    run_invoke("offsite.down", "--host", STORE, check=True)
    try:
        proc = recover("--host", NEW, "--secrets", export, "--yes")
        assert proc.returncode == 1 and "does not answer" in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr
    finally:
        run_invoke("offsite.up", "--host", STORE, check=True)
    lab19_is_untouched(lost["stack"])


def _counters(netns: str | None) -> int:
    prefix = ["nsenter", f"--net=/var/run/netns/{netns}"] if netns else []
    total = 0
    for chain in ("OUTPUT", "FORWARD"):
        out = subprocess.run(
            [*prefix, "iptables", "-w", "-L", chain, "-v", "-n", "-x"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        total += sum(int(ln.split()[0]) for ln in out.splitlines() if RULE in ln)
    return total


def _rules(action: str) -> None:
    for netns in (None, NEW, STORE):
        prefix = ["nsenter", f"--net=/var/run/netns/{netns}"] if netns else []
        for chain in ("OUTPUT", "FORWARD"):
            subprocess.run(
                [
                    *prefix,
                    "iptables",
                    "-w",
                    action,
                    chain,
                    "-d",
                    ADDRESS[SERVER],
                    "-m",
                    "comment",
                    "--comment",
                    RULE,
                    "-j",
                    "REJECT",
                ],
                check=action == "-I",
                capture_output=True,
            )


def test_recover_brings_prod_back_on_lab19_from_the_store_alone(lost):
    stack = lost["stack"]
    _rules("-D")  # a run killed inside the window left them: lab18 would not answer again
    _rules("-I")  # any packet to lab18's address, from here, lab19 or lab20, is counted
    try:
        t0 = time.monotonic()
        proc = recover("--host", NEW, "--secrets", str(lost["export"]), "--yes")
        seconds = time.monotonic() - t0
        assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-3000:]
        contacts = sum(_counters(n) for n in (None, NEW, STORE))
    finally:
        _rules("-D")
    print(
        proc.stdout[-4000:],
        f"\nrecover took {seconds:.0f}s (db {BENCH_MB or 'small'} MB); load {os.getloadavg()}",
        flush=True,
    )
    assert contacts == 0, f"{contacts} packets went to lab18's address during the recovery"
    assert "recovered onto lab19" in proc.stdout
    assert census(NEW, stack) == lost["committed"]  # every committed course, same content
    assert media_digest(NEW, stack) == lost["media"]  # byte for byte, owners and mode too
    data = health_through_nginx(DOMAIN, ADDRESS[NEW], 443)
    assert data["http_status"] == 200 and data["environment"] == "prod", data
    status, _, body = https_get(DOMAIN, "/media/uploads/f1.bin", ADDRESS[NEW], 443)
    assert status == 200 and len(body) == 300000
    status, _, body = https_get(DOMAIN, "/api/courses/drill-60/", ADDRESS[NEW], 443)
    assert status == 200 and b"written before the loss, #60" in body
