"""redis.conf as rendered from deploy/stack.yml; the image's contract.

Pure: no engine. The real model (aiia_ops.model) and renderer (aiia_ops.commands.render).
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import pytest
from datasvc_testkit import (
    dockerfile_healthcheck,
    fake_secrets,
    load_test_stack,
    parse_redis_conf,
    render_ours,
    run_linter,
    split_redis_args,
    stack_data,
)

from aiia_ops.commands.redis_acl import conf_quote
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


def conf_of(stack, secrets):
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


def test_passwords_are_hashed_and_never_in_the_file(stack, secrets):
    """Was: requirepass held the one shared password, quoted. Now every user's password is
    a SHA-256 hash (issue 13): nothing in redis.conf can be replayed, quoting or not."""
    text = render_ours(stack, secrets)["redis/redis.conf"].text
    conf = parse_redis_conf(text)
    assert "requirepass" not in conf
    assert '"' in secrets.redis_password and "\\" in secrets.redis_password
    users = {args[0]: args[1:] for args in conf["user"]}
    expected = {
        "default": secrets.redis_password,
        "admin": secrets.redis_admin_password,
        **{f"app-{n}": e.redis_password for n, e in secrets.environments.items()},
    }
    assert set(users) == set(expected)
    for name, password in expected.items():
        assert "#" + hashlib.sha256(password.encode()).hexdigest() in users[name], name
        assert users[name][0] == "on"
    assert not [v for v in secrets.values() if v in text]


def test_each_environment_user_is_fenced_to_its_db_and_prefix(stack, secrets):
    users = {args[0]: args[1:] for args in conf_of(stack, secrets)["user"]}
    for env in stack.environments.values():
        rules = users[f"app-{env.name}"]
        assert [r for r in rules if r.startswith("~")] == [f"~aiia:{env.name}:*"]
        assert rules[-2:] == ["-select", f"+select|{env.redis_db}"]
        assert ("+flushdb" in rules) == (env.redis_db == 0)
        assert "resetchannels" in rules and "-@dangerous" in rules
    assert users["default"][-5:] == ["-@all", "+ping", "+info", "+select", "+flushdb"]
    assert not [r for r in users["default"] if r.startswith("~")]  # no key at all


def test_a_missing_password_renders_the_user_off():
    stack = load_test_stack()
    bare = fake_secrets(stack)
    bare = dataclasses.replace(
        bare,
        redis_admin_password="",
        environments={
            n: dataclasses.replace(e, redis_password="") for n, e in bare.environments.items()
        },
    )
    users = {args[0]: args[1:] for args in conf_of(stack, bare)["user"]}
    for name in ("admin", *(f"app-{n}" for n in stack.environments)):
        assert users[name][:2] == ["off", "resetpass"]
        assert not [r for r in users[name] if r.startswith(("#", ">"))]


@pytest.mark.parametrize("arg", ['a"b', "a\\b", "two words", "", "~aiia:x:*", "+select|1"])
def test_acl_arguments_survive_redis_quoting(arg):
    assert split_redis_args(f"user {conf_quote(arg)} on") == ["user", arg, "on"]


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
