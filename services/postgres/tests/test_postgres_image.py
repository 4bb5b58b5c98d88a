"""The postgres image running the rendered config: a real PostgreSQL 17 in Docker.

One server per module, on a private network, started as the stack starts it (memory
limit, config dir read-only at /etc/aiia, POSTGRES_PASSWORD) and set up as setup does
(`docker exec -i ... ensure-database DB ROLE`, password on stdin).
"""

from __future__ import annotations

import time
import uuid

import pytest
from datasvc_testkit import (
    SERVICE_UID,
    dexec,
    docker,
    image,
    process_uids,
    wait_healthy,
)

from aiia_ops.commands.templating import pg_duration, pg_size

pytestmark = pytest.mark.docker


def psql(server, sql: str, db: str = "postgres", **kw):
    """As the superuser over the socket inside the container (peer auth, no password)."""
    return dexec(
        server.name, "psql", "-X", "-At", "-v", "ON_ERROR_STOP=1", "-d", db, "-c", sql, **kw
    )


def psql_tcp(server, user: str, password: str, db: str, sql: str = "SELECT current_user"):
    """Over TCP from the container's own stack address: pg_hba's `host` rows apply."""
    conninfo = f"host={server.address} port=5432 dbname={db} user={user} connect_timeout=5"
    return dexec(
        server.name,
        "psql",
        "-X",
        "-At",
        conninfo,
        "-c",
        sql,
        env={"PGPASSWORD": password},
        check=False,
    )


def test_becomes_healthy_with_the_stack_healthcheck(postgres_server):
    assert wait_healthy(postgres_server.name) >= 0
    hc = docker("inspect", "-f", "{{json .Config.Healthcheck.Test}}", postgres_server.name)
    assert hc.stdout.strip() == '["CMD","pg-health"]'


def test_archive_timeout_closes_the_wal_segment_after_each_crash_restart(containers, rendered):
    """PostgreSQL 17's checkpointer can plan a sleep of checkpoint_timeout (5 min) without
    archive_timeout around the end of recovery, and nothing wakes it: measured without
    pg-health, 2 of 4 starts (first boot, crash restarts) left the segment open for > 26 s
    with archive_timeout 10 s, so the archive lost everything written since the restart.
    The image's health check (pg-health) reloads once per checkpointer, which wakes it."""
    name = containers.run(
        image("postgres"), "pgcrash", env={"POSTGRES_PASSWORD": "not-a-secret"},
        config_dir=rendered / "postgresql",
        args=["postgres", "-c", "archive_mode=on", "-c", "archive_command=true",
              "-c", "archive_timeout=5s"],
    )  # fmt: skip

    def sql(text: str) -> str:
        return dexec(name, "psql", "-X", "-At", "-U", "aiia", "-d", "postgres", "-c", text,
                     check=False).stdout.strip()  # fmt: skip

    wait_healthy(name)
    sql("CREATE TABLE crash_probe (x int)")
    for start in range(4):  # the first boot, then three crash restarts
        if start:
            docker("kill", name)
            docker("start", name)
            deadline = time.monotonic() + 60
            while sql("SELECT 1") != "1" and time.monotonic() < deadline:
                time.sleep(0.5)
        began, first = time.monotonic(), sql("SELECT pg_walfile_name(pg_current_wal_lsn())")
        switched = None
        while time.monotonic() - began < 40:  # health every 10 s + archive_timeout 5 s + slack
            sql("INSERT INTO crash_probe VALUES (1)")
            if sql("SELECT pg_walfile_name(pg_current_wal_lsn())") != first:
                switched = time.monotonic() - began
                break
            time.sleep(0.5)
        assert switched is not None, f"start {start}: segment {first} still open after 40 s"
        pid = sql(
            "SELECT pg_postmaster_start_time() || ' ' || pid FROM pg_stat_activity "
            "WHERE backend_type = 'checkpointer'"
        )  # pg-health's key of this start
        deadline, woken = time.monotonic() + 25, ""
        while time.monotonic() < deadline:  # pg-health wakes this start's checkpointer once
            marker = "/var/run/postgresql/.aiia-woken-checkpointer"
            woken = dexec(name, "cat", marker, check=False).stdout.strip()
            if woken == pid:
                break
            time.sleep(1)
        assert woken == pid, (woken, pid)


def test_every_process_runs_as_uid_10001(postgres_server):
    uids = process_uids(postgres_server.name)
    assert len(uids) >= 5  # postmaster, checkpointer, bgwriter, walwriter, autovacuum ...
    assert set(uids.values()) == {str(SERVICE_UID)}


def test_settings_are_the_stacks(postgres_server):
    s = postgres_server.stack.services.postgresql.settings
    expected = {
        "shared_buffers": pg_size(s.shared_buffers),
        "effective_cache_size": pg_size(s.effective_cache_size),
        "work_mem": pg_size(s.work_mem),
        "maintenance_work_mem": pg_size(s.maintenance_work_mem),
        "max_connections": str(s.max_connections),
        "autovacuum": "on",
        "autovacuum_naptime": pg_duration(s.autovacuum_naptime),
        "default_statistics_target": str(s.default_statistics_target),
        "config_file": "/etc/aiia/postgresql.conf",
        "hba_file": "/etc/aiia/pg_hba.conf",
        "data_directory": "/var/lib/postgresql/data",
        "port": "5432",
        "listen_addresses": "*",
        "data_checksums": "on",
        "password_encryption": "scram-sha-256",
        "log_destination": "stderr",
        "jit": "off",
        "server_version_num": None,  # checked below
    }
    actual = {name: psql(postgres_server, f"SHOW {name}").stdout.strip() for name in expected}
    assert actual.pop("server_version_num").startswith("17")
    expected.pop("server_version_num")
    assert actual == expected


def test_the_config_loaded_without_errors(postgres_server):
    errors = psql(
        postgres_server, "SELECT count(*) FROM pg_file_settings WHERE error IS NOT NULL"
    ).stdout
    assert errors.strip() == "0"
    assert (
        psql(
            postgres_server, "SELECT count(*) FROM pg_hba_file_rules WHERE error IS NOT NULL"
        ).stdout.strip()
        == "0"
    )


def test_superuser_is_aiia_with_a_scram_password(postgres_server):
    row = psql(
        postgres_server,
        "SELECT rolsuper, left(rolpassword, 14) FROM pg_authid WHERE rolname = 'aiia'",
    ).stdout.strip()
    assert row == "t|SCRAM-SHA-256$"
    assert psql(postgres_server, "SELECT current_user").stdout.strip() == "aiia"


def test_ensure_database_is_idempotent(postgres_server):
    prod = postgres_server.stack.environments["prod"]
    password = postgres_server.secrets.environments["prod"].db_password
    again = dexec(
        postgres_server.name, "ensure-database", prod.database, prod.db_user, input=password + "\n"
    )
    assert again.stdout.splitlines() == [
        "ensure-database: role aiia_prod exists, password set",
        "ensure-database: database aiia_prod exists, owned by aiia_prod",
        "ensure-database: CONNECT revoked from PUBLIC; schema public owned by aiia_prod",
    ]
    rows = psql(
        postgres_server,
        "SELECT datname, pg_get_userbyid(datdba), datacl::text "
        "FROM pg_database WHERE datname LIKE 'aiia_%' ORDER BY 1",
    ).stdout.split()
    assert rows == [
        "aiia_prod|aiia_prod|{aiia_prod=CTc/aiia_prod}",
        "aiia_staging|aiia_staging|{aiia_staging=CTc/aiia_staging}",
    ]
    schema = psql(
        postgres_server,
        "SELECT pg_get_userbyid(nspowner), nspacl::text FROM pg_namespace WHERE nspname = 'public'",
        db="aiia_prod",
    ).stdout.strip()
    assert schema == "aiia_prod|{aiia_prod=UC/aiia_prod}"
    role = psql(
        postgres_server,
        "SELECT rolcanlogin, rolsuper, rolcreatedb, rolcreaterole "
        "FROM pg_roles WHERE rolname = 'aiia_prod'",
    ).stdout.strip()
    assert role == "t|f|f|f"
    # The password never reaches the server log.
    assert password not in docker("logs", postgres_server.name).stderr


def test_ensure_database_takes_the_password_from_the_environment(postgres_server):
    out = dexec(
        postgres_server.name,
        "ensure-database",
        "aiia_envtest",
        "aiia_envtest",
        env={"DB_PASSWORD": "from-the-env-0123456789"},
    )
    assert "role aiia_envtest created" in out.stdout
    ok = psql_tcp(postgres_server, "aiia_envtest", "from-the-env-0123456789", "aiia_envtest")
    # No pg_hba row for this role: the database exists but the network cannot reach it.
    assert ok.returncode != 0 and "pg_hba.conf rejects connection" in ok.stderr


def test_ensure_database_refuses_root_and_missing_passwords(postgres_server):
    no_pw = dexec(
        postgres_server.name, "ensure-database", "aiia_x", "aiia_x", input="", check=False
    )
    assert no_pw.returncode == 1 and "no password: pipe it on stdin" in no_pw.stderr
    as_root = dexec(
        postgres_server.name,
        "ensure-database",
        "aiia_x",
        "aiia_x",
        input="long-enough-password\n",
        user="0",
        check=False,
    )
    assert as_root.returncode == 1 and "run as the container's user aiia" in as_root.stderr


def test_each_environment_reaches_only_its_own_database(postgres_server):
    secrets = postgres_server.secrets.environments
    prod, staging = secrets["prod"].db_password, secrets["staging"].db_password

    ok = psql_tcp(postgres_server, "aiia_staging", staging, "aiia_staging")
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.strip() == "aiia_staging"
    assert psql_tcp(postgres_server, "aiia_prod", prod, "aiia_prod").stdout.strip() == "aiia_prod"

    for user, password, db in [
        ("aiia_staging", staging, "aiia_prod"),
        ("aiia_prod", prod, "aiia_staging"),
        ("aiia_staging", staging, "postgres"),
    ]:
        denied = psql_tcp(postgres_server, user, password, db)
        assert denied.returncode != 0
        assert (
            f'pg_hba.conf rejects connection for host "{postgres_server.address}", user "{user}", '
            f'database "{db}"' in denied.stderr
        )


def test_revoked_connect_holds_even_where_pg_hba_would_allow(postgres_server):
    """Defence in depth: without CONNECT, pg_hba.conf alone does not decide."""
    out = dexec(
        postgres_server.name,
        "psql",
        "-X",
        "-At",
        "-d",
        "postgres",
        "-c",
        "SELECT has_database_privilege('aiia_staging', 'aiia_prod', 'CONNECT')",
    )
    assert out.stdout.strip() == "f"


def test_wrong_password_is_refused(postgres_server):
    denied = psql_tcp(postgres_server, "aiia_prod", "not-the-password", "aiia_prod")
    assert denied.returncode != 0
    assert 'password authentication failed for user "aiia_prod"' in denied.stderr


def test_superuser_over_the_network_needs_its_password(postgres_server):
    ok = psql_tcp(postgres_server, "aiia", postgres_server.secrets.postgres_password, "aiia_prod")
    assert ok.returncode == 0 and ok.stdout.strip() == "aiia"
    assert psql_tcp(postgres_server, "aiia", "wrong", "aiia_prod").returncode != 0


def test_password_is_not_in_the_servers_environment(postgres_server):
    environ = dexec(postgres_server.name, "cat", "/proc/1/environ").stdout
    assert "POSTGRES_PASSWORD" not in environ


def cgroup_memory(name: str) -> dict[str, int]:
    """The container's memory as its cgroup (v1 on this engine, v2 elsewhere) counts it."""
    v1 = docker("exec", name, "cat", "/sys/fs/cgroup/memory/memory.stat", check=False)
    if v1.returncode == 0:
        stat = dict(line.split() for line in v1.stdout.splitlines())
        usage = docker("exec", name, "cat", "/sys/fs/cgroup/memory/memory.usage_in_bytes")
        return {"usage": int(usage.stdout), "rss": int(stat["rss"]), "shmem": int(stat["shmem"])}
    stat = dict(
        line.split()
        for line in docker("exec", name, "cat", "/sys/fs/cgroup/memory.stat").stdout.splitlines()
    )
    usage = docker("exec", name, "cat", "/sys/fs/cgroup/memory.current")
    return {"usage": int(usage.stdout), "rss": int(stat["anon"]), "shmem": int(stat["shmem"])}


def test_all_pgbouncer_pools_busy_fit_in_the_memory_limit(postgres_server, containers):
    """Every server connection PgBouncer may open (environments x (pool + reserve)) at
    once, each sorting up to work_mem: the container stays under its limit, nothing dies."""
    stack = postgres_server.stack
    bouncer = stack.services.pgbouncer.settings
    per_env = bouncer.default_pool_size + bouncer.reserve_pool_size
    sql = (
        "SELECT count(*) FROM (SELECT md5(g::text) FROM generate_series(1, 20000) g "
        "ORDER BY 1) s, pg_sleep(4)"
    )
    jobs, env_vars = [], {}
    for env in stack.environments.values():
        env_vars[f"PW_{env.name}"] = postgres_server.secrets.environments[env.name].db_password
        conninfo = f"host={postgres_server.address} dbname={env.database} user={env.db_user}"
        jobs.append(
            f'for i in $(seq {per_env}); do PGPASSWORD="$PW_{env.name}" '
            f"psql -X -Atq '{conninfo}' -c \"{sql}\" >/dev/null & done"
        )
    script = "; ".join(jobs) + "; wait"
    client = containers.run(
        image("postgres"), "pgclient", env=env_vars, args=["bash", "-c", script]
    )
    peak: dict[str, int] = {}
    conns = "0"
    for _ in range(8):  # while every backend sleeps after its sort
        time.sleep(0.5)
        now = cgroup_memory(postgres_server.name)
        if now["rss"] + now["shmem"] > peak.get("rss", 0) + peak.get("shmem", 0):
            peak = now
        conns = max(
            conns,
            psql(
                postgres_server,
                "SELECT count(*) FROM pg_stat_activity WHERE usename LIKE 'aiia\\_%'",
            ).stdout.strip(),
            key=int,
        )
    assert docker("wait", client, timeout=60).stdout.strip() == "0", docker("logs", client).stderr
    assert int(conns) == per_env * len(stack.environments)
    limit = stack.services.postgresql.memory.limit.bytes
    mib = 2**20
    print(
        f"\npostgres, {conns} app connections busy: rss {peak['rss'] / mib:.1f} MiB + shmem "
        f"{peak['shmem'] / mib:.1f} MiB (cgroup usage {peak['usage'] / mib:.1f} MiB) "
        f"of {limit / mib:.0f} MiB"
    )
    assert peak["rss"] + peak["shmem"] < limit
    assert docker(
        "inspect", "-f", "{{.State.OOMKilled}} {{.RestartCount}}", postgres_server.name
    ).stdout.split() == ["false", "0"]


# --- the entrypoint ---------------------------------------------------------------------------


def test_refuses_to_initialise_without_a_password(containers, rendered):
    proc = containers.run(
        image("postgres"), "pg-nopw", config_dir=rendered / "postgresql", detach=False
    )
    assert proc.returncode == 1
    assert "holds no database yet and POSTGRES_PASSWORD is not set" in proc.stderr


def test_refuses_to_start_without_the_config(containers):
    proc = containers.run(
        image("postgres"), "pg-noconf", env={"POSTGRES_PASSWORD": "x" * 16}, detach=False
    )
    assert proc.returncode == 1
    assert "/etc/aiia/postgresql.conf is missing" in proc.stderr
    assert "mount the rendered postgresql/ config dir read-only at /etc/aiia" in proc.stderr


def test_restart_keeps_the_data_and_does_not_initialise_again(containers, net_secrets, rendered):
    """A named volume, as the stack mounts pgdata: stop, start a new container on it."""
    volume = f"aiia-test-pgdata-{uuid.uuid4().hex[:8]}"
    mount = {volume: "/var/lib/postgresql/data"}
    started = []
    try:
        first = containers.run(
            image("postgres"),
            "pg-vol1",
            volumes=mount,
            env={"POSTGRES_PASSWORD": net_secrets.postgres_password},
            config_dir=rendered / "postgresql",
        )
        started.append(first)
        wait_healthy(first)
        dexec(first, "psql", "-X", "-d", "postgres", "-c", "CREATE DATABASE kept")
        docker("stop", first)
        assert "database system is shut down" in docker("logs", first).stderr
        # No password this time: it is only needed to initialise.
        second = containers.run(
            image("postgres"), "pg-vol2", volumes=mount, config_dir=rendered / "postgresql"
        )
        started.append(second)
        wait_healthy(second)
        assert dexec(second, "psql", "-X", "-At", "-d", "kept", "-c", "SELECT 1").stdout == "1\n"
        logs = docker("logs", second)
        assert "initialising" not in logs.stdout + logs.stderr
    finally:
        for name in started:
            docker("rm", "-fv", name, check=False)
        docker("volume", "rm", "-f", volume, check=False)


def test_pgbackrest_and_restic_have_the_public_cas_to_verify_a_store():
    """repo1.verify_tls (on by default) checks a real store's certificate against the
    system's CAs: without ca-certificates in the image every TLS handshake would fail."""
    proc = docker(
        "run", "--rm", "--entrypoint", "sh", image("postgres"), "-c",
        "grep -c 'BEGIN CERTIFICATE' /etc/ssl/certs/ca-certificates.crt",
    )  # fmt: skip
    assert int(proc.stdout.strip()) >= 100, proc.stdout
