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
        "test": ["CMD", "pg-health"],
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


# --- hardening (issue 13, item 6): every container, from the one table -------------------

HARDENED = ("--cap-drop", "ALL", "--security-opt", "no-new-privileges:true", "--read-only")


def test_every_shared_service_drops_every_capability_and_runs_read_only():
    services = compose_data(STACK, "/var/lib/aiia", TAGS)["services"]
    for key, svc in services.items():
        assert svc["cap_drop"] == ["ALL"], key
        assert "cap_add" not in svc, key  # no program of the stack needs one
        assert svc["security_opt"] == ["no-new-privileges:true"], key
        assert svc["read_only"] is True, key
        assert svc["pids_limit"] > 0, key
        assert svc["ulimits"]["nofile"]["soft"] == svc["ulimits"]["nofile"]["hard"] > 0, key
    assert services["postgresql"]["tmpfs"] == [
        "/run/postgresql:rw,noexec,nosuid,nodev,size=64k,mode=0755,uid=10001,gid=10001",
        "/tmp:rw,noexec,nosuid,nodev,size=256k,mode=1777",
    ]
    assert services["pgbouncer"]["tmpfs"] == ["/tmp:rw,noexec,nosuid,nodev,size=256k,mode=1777"]
    assert "tmpfs" not in services["redis"]  # it writes only its /data volume
    assert "tmpfs" not in services["nginx"]  # its /tmp is a disk volume (below)
    assert services["nginx"]["sysctls"] == {"net.ipv4.ip_unprivileged_port_start": 0}


def test_nginx_spills_to_a_disk_volume_not_to_memory():
    data = compose_data(STACK, "/var/lib/aiia", TAGS)
    temp = [v for v in data["services"]["nginx"]["volumes"] if v["target"] == "/tmp"]
    assert temp == [
        {"type": "volume", "source": "nginx_temp", "target": "/tmp", "read_only": False}
    ]
    assert data["volumes"]["nginx_temp"] == {"name": "aiia_nginx_temp"}


def _flags_after(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == flag]


def test_app_releases_and_one_offs_run_hardened():
    env = STACK.environment("prod")
    release = app.run_release(STACK, env, "/var/lib/aiia", "abc", "172.20.0.13", "x-next")
    one_off = cmd.one_off_app(STACK, env, "/var/lib/aiia", "abc", ["migrate"])
    for argv in (release, one_off):
        image = argv.index("aiia/django:abc")
        flags = argv[:image]  # docker's own flags, before the image
        for a, b in zip(HARDENED[::2], HARDENED[1::2], strict=False):
            assert b in _flags_after(flags, a), (a, b)
        assert "--read-only" in flags
        assert _flags_after(flags, "--tmpfs") == [
            "/tmp:rw,noexec,nosuid,nodev,size=4096k,mode=1777"
        ]
        assert _flags_after(flags, "--pids-limit") == ["64"]
        assert _flags_after(flags, "--ulimit") == ["nofile=1024:1024"]
        assert "--cap-add" not in flags and "--privileged" not in flags


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
