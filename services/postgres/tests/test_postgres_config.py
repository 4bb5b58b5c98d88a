"""postgresql.conf and pg_hba.conf as rendered from deploy/stack.yml; the image's contract.

Pure: no engine. The real model (aiia_ops.model) and renderer (aiia_ops.commands.render).
"""

from __future__ import annotations

import ipaddress
import subprocess
from pathlib import Path

import pytest
from datasvc_testkit import (
    dockerfile_healthcheck,
    fake_secrets,
    load_test_stack,
    parse_pg_conf,
    render_ours,
    run_linter,
    stack_data,
)

from aiia_ops.commands.render import TEMPLATES
from aiia_ops.commands.templating import pg_duration, pg_size

HERE = Path(__file__).resolve().parents[1]
SCRIPTS = HERE / "scripts"


@pytest.fixture(scope="module")
def stack():
    return load_test_stack()


@pytest.fixture(scope="module")
def files(stack):
    return render_ours(stack, fake_secrets(stack))


@pytest.fixture(scope="module")
def conf(files):
    return parse_pg_conf(files["postgresql/postgresql.conf"].text)


def hba_rows(text: str) -> list[list[str]]:
    return [line.split() for line in text.splitlines() if line.strip() and line[0] != "#"]


def hba_decision(rows, conn_type: str, database: str, user: str, address: str | None = None):
    """What PostgreSQL does with a connection: the method of the first matching row."""
    for row in rows:
        kind, db, role = row[:3]
        if kind != conn_type or db not in ("all", database) or role not in ("all", user):
            continue
        if kind == "local":
            return row[3]
        if ipaddress.ip_address(address) in ipaddress.ip_network(row[3]):
            return row[4]
    return "no entry (rejected)"


# --- postgresql.conf ----------------------------------------------------------------------


def test_figures_come_from_the_stack(stack, conf):
    s = stack.services.postgresql.settings
    assert conf["port"] == str(stack.services.postgresql.port) == "5432"
    assert conf["max_connections"] == str(s.max_connections) == "50"
    assert conf["shared_buffers"] == pg_size(s.shared_buffers) == "40MB"
    assert conf["effective_cache_size"] == pg_size(s.effective_cache_size) == "256MB"
    assert conf["work_mem"] == pg_size(s.work_mem) == "1MB"
    assert conf["maintenance_work_mem"] == pg_size(s.maintenance_work_mem) == "16MB"
    assert conf["autovacuum_naptime"] == pg_duration(s.autovacuum_naptime) == "10s"
    assert conf["default_statistics_target"] == str(s.default_statistics_target) == "10"


def test_a_changed_figure_reaches_the_file():
    data = stack_data()
    data["services"]["postgresql"]["settings"].update(
        shared_buffers="96MB", work_mem="2662KB", autovacuum_naptime="500ms"
    )
    stack = load_test_stack(data)
    conf = parse_pg_conf(render_ours(stack, fake_secrets(stack))["postgresql/postgresql.conf"].text)
    assert (conf["shared_buffers"], conf["work_mem"], conf["autovacuum_naptime"]) == (
        "96MB",
        "2662kB",
        "500ms",
    )


def test_files_listen_and_sockets(conf):
    assert conf["hba_file"] == "/etc/aiia/pg_hba.conf"
    assert conf["listen_addresses"] == "*"
    assert conf["unix_socket_directories"] == "/var/run/postgresql"
    assert conf["password_encryption"] == "scram-sha-256"
    assert "config_file" not in conf and "data_directory" not in conf  # the entrypoint's


def test_autovacuum_is_on_and_more_eager_than_the_defaults(conf):
    assert conf["autovacuum"] == "on"
    assert float(conf["autovacuum_vacuum_scale_factor"]) < 0.2
    assert float(conf["autovacuum_analyze_scale_factor"]) < 0.1
    assert float(conf["autovacuum_vacuum_insert_scale_factor"]) < 0.2


def test_pgbouncer_pools_fit_in_max_connections(stack, conf):
    """Every server connection PgBouncer may open, and still room for the superuser."""
    bouncer = stack.services.pgbouncer.settings
    server_conns = len(stack.environments) * (bouncer.default_pool_size + bouncer.reserve_pool_size)
    reserved = int(conf["superuser_reserved_connections"])
    assert server_conns <= stack.services.postgresql.settings.max_connections - reserved


def test_logs_go_to_stderr(conf):
    assert conf["log_destination"] == "stderr"
    assert conf["logging_collector"] == "off"


def test_every_stack_figure_cites_the_doc(files):
    lines = files["postgresql/postgresql.conf"].text.splitlines()
    for key in (
        "max_connections",
        "shared_buffers",
        "effective_cache_size",
        "work_mem",
        "maintenance_work_mem",
        "autovacuum_naptime",
        "default_statistics_target",
    ):
        i = next(i for i, line in enumerate(lines) if line.startswith(f"{key} ="))
        assert "doc §" in lines[i - 1], f"{key}: no doc citation above it"


def test_not_secret_but_hba_and_conf_are_rendered_where_the_image_reads(files):
    assert set(files) >= {"postgresql/postgresql.conf", "postgresql/pg_hba.conf"}
    secret = {t.output: t.secret for t in TEMPLATES if t.service == "postgres"}
    assert secret == {"postgresql/postgresql.conf": False, "postgresql/pg_hba.conf": False}


# --- pg_hba.conf --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hba(files):
    return hba_rows(files["postgresql/pg_hba.conf"].text)


def test_hba_rows(hba):
    assert hba == [
        ["local", "all", "aiia", "peer"],
        ["local", "all", "all", "reject"],
        ["host", "aiia_prod", "aiia_prod", "172.20.0.0/16", "scram-sha-256"],
        ["host", "aiia_staging", "aiia_staging", "172.20.0.0/16", "scram-sha-256"],
        ["host", "all", "aiia", "172.20.0.0/16", "scram-sha-256"],
        ["host", "all", "all", "0.0.0.0/0", "reject"],
        ["host", "all", "all", "::/0", "reject"],
    ]


@pytest.mark.parametrize(
    ("conn", "database", "user", "address", "expected"),
    [
        ("host", "aiia_prod", "aiia_prod", "172.20.0.5", "scram-sha-256"),
        ("host", "aiia_staging", "aiia_staging", "172.20.0.5", "scram-sha-256"),
        ("host", "aiia_prod", "aiia_staging", "172.20.0.5", "reject"),
        ("host", "aiia_staging", "aiia_prod", "172.20.0.5", "reject"),
        ("host", "postgres", "aiia_prod", "172.20.0.5", "reject"),
        ("host", "aiia_prod", "aiia_prod", "10.1.2.3", "reject"),
        ("host", "aiia_prod", "aiia", "172.20.0.6", "scram-sha-256"),
        ("host", "aiia_prod", "aiia", "192.168.1.10", "reject"),
        ("local", "aiia_prod", "aiia", None, "peer"),
        ("local", "aiia_prod", "aiia_prod", None, "reject"),
    ],
)
def test_hba_decisions(hba, conn, database, user, address, expected):
    assert hba_decision(hba, conn, database, user, address) == expected


def test_a_new_environment_gets_its_own_row():
    data = stack_data()
    data["environments"]["qa"] = {
        **data["environments"]["staging"],
        "container": "aiia_django_qa",
        "address": "172.20.0.8",
        "standby_address": "172.20.0.18",
        "port": 8002,
        "domains": ["qa.eduaiia.com"],
        "database": "aiia_qa",
        "redis_db": 1,
    }
    stack = load_test_stack(data)
    rows = hba_rows(render_ours(stack, fake_secrets(stack))["postgresql/pg_hba.conf"].text)
    assert ["host", "aiia_qa", "aiia_qa", "172.20.0.0/16", "scram-sha-256"] in rows
    assert hba_decision(rows, "host", "aiia_prod", "aiia_qa", "172.20.0.4") == "reject"


# --- the image ----------------------------------------------------------------------------


def test_dockerfile_healthcheck_is_the_stacks(stack):
    hc = stack.services.postgresql.healthcheck
    assert dockerfile_healthcheck(HERE / "Dockerfile") == {
        "interval": str(hc.interval),
        "timeout": str(hc.timeout),
        "retries": hc.retries,
        "command": hc.command,
    }
    assert hc.command == ["pg-health"]  # pg_isready -U aiia, and the checkpointer wake-up


def test_dockerfile_runs_as_10001_from_the_base():
    text = (HERE / "Dockerfile").read_text()
    assert text.count("FROM aiia/base:trixie") == 2
    assert "\nUSER 10001:10001\n" in text


@pytest.mark.parametrize("script", sorted(p.name for p in SCRIPTS.iterdir()))
def test_scripts_are_strict_bash(script):
    path = SCRIPTS / script
    assert path.stat().st_mode & 0o111, f"{script} is not executable"
    text = path.read_text()
    assert text.startswith("#!/bin/bash\n") and "set -Eeuo pipefail" in text
    subprocess.run(["bash", "-n", str(path)], check=True)


@pytest.mark.parametrize(
    ("args", "stdin", "message"),
    [
        ([], "", "expected 2 arguments, got 0"),
        (["aiia_prod"], "", "expected 2 arguments, got 1"),
        (["Prod-DB", "aiia_prod"], "", "database name 'Prod-DB' is not a plain"),
        (["aiia_prod", "x; DROP"], "", "role name 'x; DROP' is not a plain"),
        (["template1", "aiia_prod"], "", "refusing to take over the system database"),
        (["aiia_prod", "aiia"], "", "refusing to manage 'aiia'"),
        (["aiia_prod", "pg_monitor"], "", "refusing to manage 'pg_monitor'"),
        (["aiia_prod", "aiia_prod"], "", "no password: pipe it on stdin"),
        (["aiia_prod", "aiia_prod"], "short\n", "is 5 characters; use at least 12"),
    ],
)
def test_ensure_database_refuses_clearly(args, stdin, message):
    proc = subprocess.run(
        ["bash", str(SCRIPTS / "ensure-database"), *args],
        input=stdin,
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 1
    assert proc.stderr.startswith("ensure-database: ") and message in proc.stderr
    assert proc.stdout == ""


def test_dockerfile_passes_hadolint():
    run_linter("hadolint", HERE / "Dockerfile")


def test_scripts_pass_shellcheck():
    run_linter("shellcheck", *sorted(SCRIPTS.iterdir()))
