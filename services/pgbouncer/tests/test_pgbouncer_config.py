"""pgbouncer.ini and userlist.txt as rendered from deploy/stack.yml; the image's contract.

Pure: no engine. The real model (aiia_ops.model) and renderer (aiia_ops.commands.render).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from datasvc_testkit import (
    dockerfile_healthcheck,
    fake_secrets,
    load_test_stack,
    parse_ini,
    render_ours,
    run_linter,
    stack_data,
)

from aiia_ops.commands.render import TEMPLATES

HERE = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def stack():
    return load_test_stack()


@pytest.fixture(scope="module")
def secrets(stack):
    return fake_secrets(stack, tricky=True)


@pytest.fixture(scope="module")
def files(stack, secrets):
    return render_ours(stack, secrets)


@pytest.fixture(scope="module")
def ini(files):
    return parse_ini(files["pgbouncer/pgbouncer.ini"].text)


def parse_userlist(text: str) -> dict[str, str]:
    """PgBouncer's auth_file: "user" "password" per line, "" inside quotes is one quote."""
    out = {}
    for line in text.splitlines():
        if not line.strip():
            continue
        m = re.fullmatch(r'"((?:[^"]|"")*)"\s+"((?:[^"]|"")*)"', line)
        assert m, f"not an auth_file line: {line!r}"
        out[m.group(1).replace('""', '"')] = m.group(2).replace('""', '"')
    return out


def test_one_database_per_environment_at_postgresql(ini):
    assert dict(ini["databases"]) == {
        "aiia_prod": "host=172.20.0.6 port=5432 dbname=aiia_prod",
        "aiia_staging": "host=172.20.0.6 port=5432 dbname=aiia_staging",
    }


def test_pool_figures_come_from_the_stack(stack, ini):
    s, p = stack.services.pgbouncer.settings, ini["pgbouncer"]
    assert p["listen_addr"] == "0.0.0.0"
    assert p["listen_port"] == str(stack.services.pgbouncer.port) == "6432"
    assert p["pool_mode"] == s.pool_mode == "transaction"
    assert p["max_client_conn"] == str(s.max_client_conn) == "100"
    assert p["default_pool_size"] == str(s.default_pool_size) == "10"
    assert p["reserve_pool_size"] == str(s.reserve_pool_size) == "2"
    assert p["server_idle_timeout"] == str(s.server_idle_timeout.whole_seconds) == "60"


def test_auth_admin_and_logging(ini):
    p = ini["pgbouncer"]
    assert p["auth_type"] == "scram-sha-256"
    assert p["auth_file"] == "/etc/aiia/userlist.txt"
    assert p["admin_users"] == "pgbouncer_admin"
    assert p["server_reset_query"] == ""  # transaction pooling: nothing to reset
    assert "extra_float_digits" in p["ignore_startup_parameters"].split(",")
    assert p["logfile"] == "" and p["syslog"] == "0"
    assert "pidfile" not in p


def test_a_new_environment_gets_its_own_pool_and_user():
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
    files = render_ours(stack, fake_secrets(stack))
    assert parse_ini(files["pgbouncer/pgbouncer.ini"].text)["databases"]["aiia_qa"] == (
        "host=172.20.0.6 port=5432 dbname=aiia_qa"
    )
    assert "aiia_qa" in parse_userlist(files["pgbouncer/userlist.txt"].text)


def test_userlist_holds_each_role_and_the_admin(files, secrets):
    users = parse_userlist(files["pgbouncer/userlist.txt"].text)
    assert users == {
        "aiia_prod": secrets.environments["prod"].db_password,
        "aiia_staging": secrets.environments["staging"].db_password,
        "pgbouncer_admin": secrets.pgbouncer_admin_password,
    }
    assert '"' in secrets.pgbouncer_admin_password  # the quoting was exercised


def test_userlist_is_rendered_as_a_secret_and_the_ini_is_not():
    secret = {t.output: t.secret for t in TEMPLATES if t.service == "pgbouncer"}
    assert secret == {"pgbouncer/pgbouncer.ini": False, "pgbouncer/userlist.txt": True}


def test_dockerfile_healthcheck_is_the_stacks(stack):
    hc = stack.services.pgbouncer.healthcheck
    assert dockerfile_healthcheck(HERE / "Dockerfile") == {
        "interval": str(hc.interval),
        "timeout": str(hc.timeout),
        "retries": hc.retries,
        "command": hc.command,
    }


def test_dockerfile_runs_as_10001_from_the_base():
    text = (HERE / "Dockerfile").read_text()
    assert text.count("FROM aiia/base:trixie") == 2
    assert "\nUSER 10001:10001\n" in text
    assert 'CMD ["pgbouncer", "/etc/aiia/pgbouncer.ini"]' in text


def test_dockerfile_passes_hadolint():
    run_linter("hadolint", HERE / "Dockerfile")
