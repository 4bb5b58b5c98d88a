"""The compose file and the docker commands, as data: exact values from the model."""

import yaml

from aiia_ops import commands as cmd
from aiia_ops.compose import compose_data, dump, env_files
from aiia_ops.model import load_stack
from aiia_ops.secrets import EnvSecrets, Secrets

STACK = load_stack()
SECRETS = Secrets(
    "pg-secret-1",
    "redis-secret-2",
    "admin-secret-3",
    {"prod": EnvSecrets("prod-db-4", "prod-key-5"), "staging": EnvSecrets("stg-db-6", "stg-key-7")},
)


def test_every_container_gets_the_stacks_limits_address_and_healthcheck():
    data = compose_data(STACK, "/var/lib/aiia", "abc123")
    by_name = {s["container_name"]: s for s in data["services"].values()}
    for item in STACK.containers():
        svc = by_name[item.container]
        assert svc["mem_limit"] == item.memory.limit.bytes
        assert svc["mem_reservation"] == item.memory.reservation.bytes
        assert svc["cpus"] == item.cpu.limit
        assert svc["networks"]["aiia_network"]["ipv4_address"] == str(item.address)
        assert svc["healthcheck"]["interval"] == str(item.healthcheck.interval)
        assert svc["healthcheck"]["retries"] == item.healthcheck.retries
    assert data["networks"]["aiia_network"]["ipam"]["config"] == [{"subnet": "172.20.0.0/16"}]


def test_only_nginx_publishes_ports():
    data = compose_data(STACK, "/var/lib/aiia", "abc123")
    published = {k: s["ports"] for k, s in data["services"].items() if "ports" in s}
    assert published == {"nginx": ["0.0.0.0:80:80", "0.0.0.0:443:443"]}


def test_command_healthchecks_match_the_document():
    services = compose_data(STACK, "/var/lib/aiia", "t")["services"]
    assert services["postgresql"]["healthcheck"] == {
        "interval": "10s",
        "timeout": "5s",
        "retries": 5,
        "test": ["CMD", "pg_isready", "-U", "aiia"],
    }
    assert services["redis"]["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]


def test_apps_reach_the_database_through_pgbouncer_and_their_own_redis_db():
    services = compose_data(STACK, "/var/lib/aiia", "t")["services"]
    prod, staging = (
        services["django_prod"]["environment"],
        services["django_staging"]["environment"],
    )
    assert (prod["DB_HOST"], prod["DB_PORT"], prod["DB_NAME"], prod["REDIS_DB"]) == (
        "172.20.0.5",
        "6432",
        "aiia_prod",
        "0",
    )
    assert (staging["DB_NAME"], staging["DB_USER"], staging["REDIS_DB"]) == (
        "aiia_staging",
        "aiia_staging",
        "1",
    )


def test_no_secret_in_the_compose_file_only_in_env_files():
    text = dump(compose_data(STACK, "/var/lib/aiia", "t"))
    for value in SECRETS.values():
        assert value not in text
    files = env_files(STACK, SECRETS)
    assert files["django_staging"]["DB_PASSWORD"] == "stg-db-6"
    assert "prod-db-4" not in yaml.safe_dump(files["django_staging"])
    assert "&id" not in text  # no YAML anchors: each service reads whole


def test_migrations_run_straight_to_postgresql_not_through_the_pooler():
    argv = cmd.one_off_app(
        STACK, STACK.environment("prod"), "/var/lib/aiia", "abc", ["migrate", "--noinput"]
    )
    assert "DB_HOST=172.20.0.6" in argv and "DB_PORT=5432" in argv
    assert argv[-3:] == ["aiia/django:abc", "migrate", "--noinput"]
    assert argv[argv.index("--memory") + 1] == str(120 * 1024**2)


def test_build_command_tags_with_the_commit():
    assert cmd.build_image(STACK, "postgres", "abc", "abc")[:6] == [
        "docker",
        "build",
        "--tag",
        "aiia/postgres:abc",
        "--tag",
        "aiia/postgres:latest",
    ]


def test_nginx_reload_tests_the_config_first():
    check, reload = cmd.nginx_reload(STACK)
    assert check == [
        "docker",
        "exec",
        "aiia_nginx",
        "nginx",
        "-t",
        "-q",
        "-c",
        "/etc/aiia/nginx.conf",
    ]
    assert reload[-4:] == ["-s", "reload", "-c", "/etc/aiia/nginx.conf"]
