"""The compose file and the docker commands, as data: exact values from the model."""

import yaml

from aiia_ops.commands import app
from aiia_ops.commands import docker as cmd
from aiia_ops.commands.compose import compose_data, dump, env_files
from aiia_ops.model import load_stack
from aiia_ops.model.secrets import EnvSecrets, Secrets

STACK = load_stack()
TAGS = {"nginx": "n1", "postgresql": "p1", "pgbouncer": "b1", "redis": "r1"}
SECRETS = Secrets(
    "pg-secret-1",
    "redis-secret-2",
    "admin-secret-3",
    {
        "prod": EnvSecrets("prod-db-4", "prod-key-5", "prod-token-8"),
        "staging": EnvSecrets("stg-db-6", "stg-key-7", "stg-token-9"),
    },
)


def test_every_shared_service_gets_the_stacks_limits_address_and_healthcheck():
    data = compose_data(STACK, "/var/lib/aiia", TAGS)
    by_name = {s["container_name"]: s for s in data["services"].values()}
    assert set(data["services"]) == {"nginx", "postgresql", "pgbouncer", "redis"}
    for item in STACK.services.all():
        svc = by_name[item.container]
        assert svc["mem_limit"] == item.memory.limit.bytes
        assert svc["mem_reservation"] == item.memory.reservation.bytes
        assert svc["cpus"] == item.cpu.limit
        assert svc["networks"]["aiia_network"]["ipv4_address"] == str(item.address)
        assert svc["healthcheck"]["interval"] == str(item.healthcheck.interval)
        assert svc["healthcheck"]["retries"] == item.healthcheck.retries
    assert data["networks"]["aiia_network"]["ipam"]["config"] == [{"subnet": "172.20.0.0/16"}]


def test_only_nginx_publishes_ports():
    data = compose_data(STACK, "/var/lib/aiia", TAGS)
    published = {k: s["ports"] for k, s in data["services"].items() if "ports" in s}
    assert published == {"nginx": ["0.0.0.0:80:80", "0.0.0.0:443:443"]}


def test_command_healthchecks_match_the_document():
    services = compose_data(STACK, "/var/lib/aiia", TAGS)["services"]
    assert services["postgresql"]["healthcheck"] == {
        "interval": "10s",
        "timeout": "5s",
        "retries": 5,
        "test": ["CMD", "pg_isready", "-U", "aiia"],
    }
    assert services["redis"]["healthcheck"]["test"] == ["CMD", "redis-cli", "-e", "ping"]


def test_app_releases_get_the_environments_limits_settings_and_address():
    prod = app.run_release(
        STACK,
        STACK.environment("prod"),
        "/var/lib/aiia",
        "abc",
        "172.20.0.13",
        "aiia_django_prod-next",
    )
    assert prod[:6] == ["docker", "run", "--detach", "--name", "aiia_django_prod-next", "--restart"]
    assert prod[prod.index("--ip") + 1] == "172.20.0.13"
    assert prod[prod.index("--memory") + 1] == str(120 * 1024**2)
    assert prod[prod.index("--cpus") + 1] == "1"
    assert prod[prod.index("--health-interval") + 1] == "30s"
    assert prod[-1] == "aiia/django:abc"
    settings = {
        a.split("=", 1)[0]: a.split("=", 1)[1]
        for a, flag in zip(prod[1:], prod, strict=False)
        if flag == "--env"
    }
    assert (
        settings["DB_HOST"],
        settings["DB_PORT"],
        settings["DB_NAME"],
        settings["REDIS_DB"],
    ) == ("172.20.0.5", "6432", "aiia_prod", "0")
    staging = app.run_release(STACK, STACK.environment("staging"), "/s", "abc", "172.20.0.4", "x")
    assert "REDIS_DB=1" in staging and "DB_USER=aiia_staging" in staging
    assert staging[staging.index("--memory") + 1] == str(88 * 1024**2)
    for value in SECRETS.values():
        assert value not in " ".join(prod)


def test_a_new_release_takes_the_slot_the_live_one_does_not_hold():
    env = STACK.environment("prod")
    live = app.Running("aiia_django_prod", True, "abc", "172.20.0.3", "healthy")
    assert app.free_slot(env, live) == "172.20.0.13"
    assert app.free_slot(env, live.__class__("x", True, "abc", "172.20.0.13", "healthy")) == (
        "172.20.0.3"
    )
    assert app.free_slot(env, None) == "172.20.0.3"


def test_no_secret_in_the_compose_file_only_in_env_files():
    text = dump(compose_data(STACK, "/var/lib/aiia", TAGS))
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


def test_each_app_gets_its_own_redis_user_and_password():
    secrets = Secrets(
        "pg",
        "redis-default",
        "bouncer",
        {e: EnvSecrets("db", "key", "tok", f"redis-{e}") for e in ("prod", "staging")},
        "redis-admin",
    )
    files = env_files(STACK, secrets)
    for env in ("prod", "staging"):
        app_env = files[f"django_{env}"]
        assert app_env["REDIS_USERNAME"] == f"app-{env}"
        assert app_env["REDIS_PASSWORD"] == f"redis-{env}"
    # The default user's password stays in Redis' own container (health check, monitor);
    # the admin password is in no container at all.
    assert files["redis"] == {"REDISCLI_AUTH": "redis-default"}
    assert "redis-admin" not in yaml.safe_dump(files)
