"""The pgbouncer image with the rendered config, in front of the real postgres image.

Both on a private network at the stack's addresses (moved to the test subnet), started as
the stack starts them (memory limits, config dir read-only at /etc/aiia).
"""

from __future__ import annotations

import time

import pytest
from datasvc_testkit import (
    SERVICE_UID,
    dexec,
    docker,
    image,
    process_uids,
    wait_healthy,
)

pytestmark = pytest.mark.docker


@pytest.fixture(scope="module")
def bouncer(containers, postgres_server, rendered):
    svc = postgres_server.stack.services.pgbouncer
    name = containers.run(
        image("pgbouncer"),
        "pgbouncer",
        ip=str(svc.address),
        config_dir=rendered / "pgbouncer",
        memory=svc.memory.limit.bytes,
    )
    wait_healthy(name)
    return name


def client(bouncer, user: str, password: str, db: str, sql: str):
    """A client of PgBouncer over TCP, as the apps are (from inside its container)."""
    conninfo = f"host=127.0.0.1 port=6432 dbname={db} user={user} connect_timeout=5"
    return dexec(
        bouncer, "psql", "-X", "-At", conninfo, "-c", sql, env={"PGPASSWORD": password}, check=False
    )


def admin(bouncer, postgres_server, sql: str) -> list[dict[str, str]]:
    """The admin console as pgbouncer_admin, with its password, over TCP: rows as dicts."""
    out = dexec(
        bouncer,
        "psql",
        "-X",
        "-A",
        "-P",
        "footer=off",
        "host=127.0.0.1 port=6432 dbname=pgbouncer user=pgbouncer_admin",
        "-c",
        sql,
        env={"PGPASSWORD": postgres_server.secrets.pgbouncer_admin_password},
        check=False,
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    if not lines:
        return []
    cols = lines[0].split("|")
    return [dict(zip(cols, line.split("|"), strict=True)) for line in lines[1:]]


def test_becomes_healthy_with_the_stack_healthcheck(bouncer):
    hc = docker("inspect", "-f", "{{json .Config.Healthcheck.Test}}", bouncer).stdout.strip()
    assert hc == '["CMD","pg_isready","-h","127.0.0.1","-p","6432"]'
    assert docker("inspect", "-f", "{{.State.Health.Status}}", bouncer).stdout.strip() == "healthy"


def test_runs_as_uid_10001(bouncer):
    assert set(process_uids(bouncer).values()) == {str(SERVICE_UID)}


def test_each_environment_reaches_its_own_database(bouncer, postgres_server):
    for env in postgres_server.stack.environments.values():
        password = postgres_server.secrets.environments[env.name].db_password
        out = client(
            bouncer,
            env.db_user,
            password,
            env.database,
            "SELECT current_database(), current_user, host(inet_server_addr())",
        )
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == f"{env.database}|{env.db_user}|{postgres_server.address}"


def test_staging_cannot_reach_prod_through_pgbouncer(bouncer, postgres_server):
    staging = postgres_server.secrets.environments["staging"].db_password
    out = client(bouncer, "aiia_staging", staging, "aiia_prod", "SELECT 1")
    assert out.returncode != 0
    assert "pg_hba.conf rejects connection for host" in out.stderr
    assert 'user "aiia_staging", database "aiia_prod"' in out.stderr


def test_wrong_password_and_unknown_users_are_refused(bouncer):
    wrong = client(bouncer, "aiia_prod", "not-the-password", "aiia_prod", "SELECT 1")
    assert wrong.returncode != 0 and "SASL authentication failed" in wrong.stderr
    # The superuser is not in the auth_file: it cannot come through the pooler.
    su = client(bouncer, "aiia", "whatever", "aiia_prod", "SELECT 1")
    assert su.returncode != 0 and "SASL authentication failed" in su.stderr


def test_pools_run_in_transaction_mode(bouncer, postgres_server):
    prod = postgres_server.secrets.environments["prod"].db_password
    assert client(bouncer, "aiia_prod", prod, "aiia_prod", "SELECT 1").returncode == 0
    pools = {(p["database"], p["user"]): p for p in admin(bouncer, postgres_server, "SHOW POOLS")}
    assert pools["aiia_prod", "aiia_prod"]["pool_mode"] == "transaction"
    config = {c["key"]: c["value"] for c in admin(bouncer, postgres_server, "SHOW CONFIG")}
    assert config["pool_mode"] == "transaction"
    assert (config["default_pool_size"], config["max_client_conn"]) == ("10", "100")
    assert config["server_reset_query"] == ""


def test_a_server_connection_is_shared_between_clients(bouncer, postgres_server):
    """Transaction pooling: sequential clients' transactions run on the same server
    connection (one PostgreSQL backend), not one backend per client session."""
    prod = postgres_server.secrets.environments["prod"].db_password
    pids = set()
    for _ in range(3):
        out = client(bouncer, "aiia_prod", prod, "aiia_prod", "SELECT pg_backend_pid()")
        assert out.returncode == 0, out.stderr
        pids.add(out.stdout.strip())
    assert len(pids) == 1


def test_admin_can_pause_kill_and_resume_one_database(bouncer, postgres_server):
    """What a backup or restore does: stop one environment's traffic, leave the other's."""
    staging = postgres_server.secrets.environments["staging"].db_password
    prod = postgres_server.secrets.environments["prod"].db_password
    admin(bouncer, postgres_server, "PAUSE aiia_staging")
    by_name = {d["name"]: d for d in admin(bouncer, postgres_server, "SHOW DATABASES")}
    assert by_name["aiia_staging"]["paused"] == "1"
    assert by_name["aiia_prod"]["paused"] == "0"
    # The other environment goes on.
    assert client(bouncer, "aiia_prod", prod, "aiia_prod", "SELECT 1").returncode == 0
    admin(bouncer, postgres_server, "KILL aiia_staging")
    admin(bouncer, postgres_server, "RESUME aiia_staging")
    after = client(bouncer, "aiia_staging", staging, "aiia_staging", "SELECT 1")
    assert after.returncode == 0, after.stderr


def test_socket_admin_console_needs_no_password_inside_the_container(bouncer):
    """The backups' way in: `docker exec aiia_pgbouncer psql -h /tmp -p 6432 -U pgbouncer
    pgbouncer` (same UID as pgbouncer over its socket) gets the admin console."""

    def console(sql):
        argv = ["psql", "-X", "-q", "-At", "-h", "/tmp", "-p", "6432", "-U", "pgbouncer"]
        return dexec(bouncer, *argv, "pgbouncer", "-c", sql).stdout

    assert console("SHOW VERSION").startswith("PgBouncer 1.2")
    console("PAUSE aiia_staging")
    assert "aiia_staging" in console("SHOW DATABASES")
    console("RESUME aiia_staging")


def test_sighup_reloads_the_config(bouncer, postgres_server):
    """After a re-render, `docker kill -s HUP` makes PgBouncer re-read its files."""
    docker("kill", "-s", "HUP", bouncer)
    for _ in range(20):
        if "got SIGHUP, re-reading config" in docker("logs", bouncer).stderr:
            break
        time.sleep(0.2)
    else:
        raise AssertionError("no reload in the log")
    prod = postgres_server.secrets.environments["prod"].db_password
    assert client(bouncer, "aiia_prod", prod, "aiia_prod", "SELECT 1").returncode == 0


def test_stops_promptly_and_cleanly(containers, rendered, postgres_server):
    svc = postgres_server.stack.services.pgbouncer
    name = containers.run(
        image("pgbouncer"),
        "pgb-stop",
        config_dir=rendered / "pgbouncer",
        memory=svc.memory.limit.bytes,
    )
    docker("exec", name, "pg_isready", "-q", "-h", "127.0.0.1", "-p", "6432", check=False)
    docker("stop", "-t", "8", name)
    assert docker("inspect", "-f", "{{.State.ExitCode}}", name).stdout.strip() == "0"


def test_max_client_conn_clients_queue_for_the_pool_within_the_memory_limit(
    bouncer, postgres_server, containers
):
    """max_client_conn clients at once, each in a short transaction: PgBouncer serves them
    through default_pool_size + reserve_pool_size server connections, inside its limit."""
    stack = postgres_server.stack
    settings = stack.services.pgbouncer.settings
    bouncer_ip = str(stack.services.pgbouncer.address)
    conninfo = f"host={bouncer_ip} port=6432 dbname=aiia_prod user=aiia_prod"
    script = (
        # max_client_conn less 2: the admin console this test polls counts as a client too.
        f"for i in $(seq {settings.max_client_conn - 2}); do "
        f"psql -X -Atq '{conninfo}' -c 'SELECT pg_sleep(0.5)' 2>&1 >/dev/null "
        "| sed 's/^/FAILED: /' & done; "
        "wait"
    )
    client = containers.run(
        image("postgres"),
        "pgb-clients",
        env={"PGPASSWORD": postgres_server.secrets.environments["prod"].db_password},
        args=["bash", "-c", script],
    )
    peak_servers = 0
    for _ in range(20):
        pools = {
            (p["database"], p["user"]): p for p in admin(bouncer, postgres_server, "SHOW POOLS")
        }
        pool = pools.get(("aiia_prod", "aiia_prod"), {})
        peak_servers = max(
            peak_servers, int(pool.get("sv_active", 0)) + int(pool.get("sv_idle", 0))
        )
        time.sleep(0.3)
    assert docker("wait", client, timeout=120).stdout.strip() == "0"
    assert "FAILED" not in docker("logs", client).stdout
    assert 0 < peak_servers <= settings.default_pool_size + settings.reserve_pool_size
    peak = int(
        dexec(bouncer, "cat", "/sys/fs/cgroup/memory/memory.max_usage_in_bytes", check=False).stdout
        or 0
    )
    limit = stack.services.pgbouncer.memory.limit.bytes
    print(
        f"\npgbouncer, {settings.max_client_conn} clients: peak {peak / 2**20:.1f} MiB "
        f"of {limit / 2**20:.0f} MiB, {peak_servers} server connections"
    )
    assert peak < limit
    assert docker("inspect", "-f", "{{.State.OOMKilled}}", bouncer).stdout.strip() == "false"
