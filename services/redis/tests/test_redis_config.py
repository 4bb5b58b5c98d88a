"""redis.conf as rendered from deploy/stack.yml; the image's contract.

Pure: no engine. The real model (aiia_ops.model) and renderer (aiia_ops.commands.render).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from datasvc_testkit import (
    dockerfile_healthcheck,
    fake_secrets,
    load_test_stack,
    parse_redis_conf,
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
def conf(stack, secrets):
    return parse_redis_conf(render_ours(stack, secrets)["redis/redis.conf"].text)


def one(conf, key: str) -> str:
    (args,) = conf[key]
    return " ".join(args)


def test_figures_come_from_the_stack(stack, conf):
    s = stack.services.redis.settings
    assert one(conf, "port") == str(stack.services.redis.port) == "6379"
    assert one(conf, "maxmemory") == str(s.maxmemory.bytes) == str(22 * 1024 * 1024)
    assert one(conf, "maxmemory-policy") == s.maxmemory_policy == "allkeys-lru"
    assert one(conf, "databases") == str(s.databases) == "2"
    assert one(conf, "appendonly") == "yes"
    assert one(conf, "appendfsync") == "everysec"


def test_every_environment_db_exists(stack, conf):
    assert all(e.redis_db < int(one(conf, "databases")) for e in stack.environments.values())


def test_network_process_and_files(conf):
    assert one(conf, "bind") == "0.0.0.0"
    assert one(conf, "daemonize") == "no"
    assert conf["logfile"] == [[""]]  # stdout
    assert one(conf, "dir") == "/data"
    assert conf["save"] == [[""]]  # the AOF is the persistence: no RDB forks beside it


def test_password_survives_quoting(conf, secrets):
    assert '"' in secrets.redis_password and "\\" in secrets.redis_password
    assert conf["requirepass"] == [[secrets.redis_password]]


def test_commands_that_cross_environments_are_gone(conf):
    assert ["FLUSHALL", ""] in conf["rename-command"]
    assert ["SHUTDOWN", ""] in conf["rename-command"]
    assert one(conf, "enable-debug-command") == "no"


def test_without_appendonly_rdb_snapshots_take_over():
    data = stack_data()
    data["services"]["redis"]["settings"]["appendonly"] = False
    stack = load_test_stack(data)
    conf = parse_redis_conf(render_ours(stack, fake_secrets(stack))["redis/redis.conf"].text)
    assert one(conf, "appendonly") == "no"
    assert conf["save"] == [["3600", "1", "300", "100", "60", "10000"]]
    assert "appendfsync" not in conf


def test_a_changed_maxmemory_reaches_the_file():
    data = stack_data()
    data["services"]["redis"]["settings"]["maxmemory"] = "20MB"
    stack = load_test_stack(data)
    conf = parse_redis_conf(render_ours(stack, fake_secrets(stack))["redis/redis.conf"].text)
    assert one(conf, "maxmemory") == str(20 * 1024 * 1024)


def test_the_conf_is_rendered_as_a_secret():
    assert {t.output: t.secret for t in TEMPLATES if t.service == "redis"} == {
        "redis/redis.conf": True
    }


def test_dockerfile_healthcheck_is_the_stacks(stack):
    hc = stack.services.redis.healthcheck
    assert dockerfile_healthcheck(HERE / "Dockerfile") == {
        "interval": str(hc.interval),
        "timeout": str(hc.timeout),
        "retries": hc.retries,
        "command": hc.command,
    }


def test_dockerfile_runs_as_10001_from_the_base():
    text = (HERE / "Dockerfile").read_text()
    assert text.startswith("# aiia/redis") and "\nFROM aiia/base:trixie\n" in text
    assert "\nUSER 10001:10001\n" in text
    assert 'CMD ["redis-server", "/etc/aiia/redis.conf"]' in text


def test_dockerfile_passes_hadolint():
    run_linter("hadolint", HERE / "Dockerfile")
