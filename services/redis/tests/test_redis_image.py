"""The redis image with the rendered config: a real Redis 8 in Docker.

Started as the stack starts it: memory limit, config dir read-only at /etc/aiia,
REDISCLI_AUTH in the environment (for the health check), a named volume at /data.
"""

from __future__ import annotations

import json
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

from aiia_ops.model import load_stack

pytestmark = pytest.mark.docker


@pytest.fixture(scope="module")
def volume(docker_engine):
    """A named volume for /data; `containers` removes it after the container."""
    return f"aiia-test-redis-data-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def redis(containers, net_stack, net_secrets, rendered, volume):
    svc = net_stack.services.redis
    name = containers.run(
        image("redis"),
        "redis",
        ip=str(svc.address),
        env={"REDISCLI_AUTH": net_secrets.redis_password},
        config_dir=rendered / "redis",
        memory=svc.memory.limit.bytes,
        volumes={volume: "/data"},
    )
    wait_healthy(name)
    return name


def cli(redis, *args: str, check: bool = True, auth: str | None = None, db: int = 0):
    """redis-cli -e (exit 1 on an error reply) inside the container."""
    env = {"REDISCLI_AUTH": auth} if auth is not None else None
    out = dexec(redis, "redis-cli", "-e", "-n", str(db), *args, env=env, check=False)
    if check:
        assert out.returncode == 0, out.stdout + out.stderr
    return out


def test_becomes_healthy_with_the_stack_healthcheck(redis):
    hc = docker("inspect", "-f", "{{json .Config.Healthcheck.Test}}", redis).stdout.strip()
    command = load_stack().services.redis.healthcheck.command
    assert json.loads(hc) == ["CMD", *command] == ["CMD", "redis-cli", "-e", "ping"]
    assert docker("inspect", "-f", "{{.State.Health.Status}}", redis).stdout.strip() == "healthy"


def test_runs_as_uid_10001(redis):
    assert set(process_uids(redis).values()) == {str(SERVICE_UID)}


def test_requires_the_password(redis, net_secrets):
    assert cli(redis, "ping").stdout.strip() == "PONG"
    # Without a password, or with a wrong one, every command is refused.
    no_auth = dexec(redis, "env", "-u", "REDISCLI_AUTH", "redis-cli", "-e", "get", "k", check=False)
    assert no_auth.returncode == 1 and "NOAUTH" in no_auth.stdout + no_auth.stderr
    wrong = cli(redis, "ping", auth="not-the-password", check=False)
    assert wrong.returncode == 1 and "WRONGPASS" in wrong.stdout + wrong.stderr
    assert '"' in net_secrets.redis_password  # the quoting in redis.conf held


def test_the_stack_healthcheck_only_proves_redis_answers(redis):
    """`redis-cli ping` exits 0 even on a NOAUTH error reply, so the stack's check cannot
    notice a wrong password; `redis-cli -e ping` could (see README)."""
    plain = dexec(redis, "env", "-u", "REDISCLI_AUTH", "redis-cli", "ping", check=False)
    assert plain.returncode == 0 and "NOAUTH" in plain.stdout
    strict = dexec(redis, "env", "-u", "REDISCLI_AUTH", "redis-cli", "-e", "ping", check=False)
    assert strict.returncode == 1


def test_settings_are_the_stacks(redis, net_stack):
    s = net_stack.services.redis.settings

    def get(key):
        return cli(redis, "config", "get", key).stdout.splitlines()[1]

    assert get("maxmemory") == str(s.maxmemory.bytes)
    assert get("maxmemory-policy") == s.maxmemory_policy
    assert get("databases") == str(s.databases)
    assert get("appendonly") == "yes"
    assert get("appendfsync") == "everysec"
    assert get("dir") == "/data"
    assert get("save") == ""


def test_one_database_per_environment(redis, net_stack):
    for env in net_stack.environments.values():
        assert cli(redis, "set", "owner", env.name, db=env.redis_db).stdout.strip() == "OK"
    for env in net_stack.environments.values():
        assert cli(redis, "get", "owner", db=env.redis_db).stdout.strip() == env.name
    beyond = cli(redis, "ping", db=net_stack.services.redis.settings.databases, check=False)
    assert "DB index is out of range" in beyond.stderr


def test_flushall_is_disabled_and_flushdb_is_not(redis):
    flushall = cli(redis, "flushall", check=False)
    assert flushall.returncode == 1 and "unknown command" in flushall.stdout + flushall.stderr
    cli(redis, "set", "doomed", "1", db=1)
    assert cli(redis, "flushdb", db=1).stdout.strip() == "OK"
    assert cli(redis, "dbsize", db=1).stdout.strip() == "0"


def test_data_persists_in_the_append_only_file(redis):
    cli(redis, "set", "survivor", "yes")
    files = dexec(redis, "stat", "-c", "%u %n", "/data/appendonlydir").stdout.split()
    assert files[0] == str(SERVICE_UID)
    docker("stop", redis)
    assert docker("inspect", "-f", "{{.State.ExitCode}}", redis).stdout.strip() == "0"
    docker("start", redis)
    wait_healthy(redis)
    assert cli(redis, "get", "survivor").stdout.strip() == "yes"


def info(redis, section: str) -> dict[str, str]:
    lines = cli(redis, "info", section).stdout.splitlines()
    return dict(line.strip().split(":", 1) for line in lines if ":" in line)


def test_a_full_cache_evicts_and_rewrites_its_aof_within_the_limit(redis, net_stack):
    """Fill past maxmemory (1 KiB values, as sessions are): allkeys-lru evicts and writes
    never fail. Then an AOF rewrite forks while the apps keep writing at a normal rate:
    copy-on-write stays small and the container lives. (A burst of 2 x maxmemory during
    a rewrite is another matter: see README, "Memory".)"""
    s = net_stack.services.redis.settings
    batch = 1000
    batches = int(1.2 * s.maxmemory.bytes) // (1024 * batch) + 1
    lua = (
        "for i = tonumber(ARGV[1]), tonumber(ARGV[2]) do "
        "redis.call('set', 'fill:' .. i, string.rep('x', 1024)) end"
    )
    fill = (
        f"for b in $(seq 0 {batches - 1}); do "
        f'redis-cli -e eval "$LUA" 0 $((b*{batch}+1)) $((b*{batch}+{batch})) >/dev/null '
        "|| exit 1; done"
    )
    dexec(redis, "bash", "-c", fill, env={"LUA": lua})
    assert int(info(redis, "stats")["evicted_keys"]) > 0
    assert int(info(redis, "memory")["used_memory"]) <= s.maxmemory.bytes * 1.05

    rewrites = int(info(redis, "persistence")["aof_rewrites"])
    writer = (
        'redis-cli -e bgrewriteaof >/dev/null; v=$(printf "%01000d" 0); '
        'for i in $(seq 300); do echo "SET slow:$i $v"; sleep 0.01; done | redis-cli -e >/dev/null'
    )
    dexec(redis, "bash", "-c", writer)
    for _ in range(30):
        persistence = info(redis, "persistence")
        if persistence["aof_rewrite_in_progress"] == "0":
            break
        time.sleep(0.5)
    assert int(persistence["aof_rewrites"]) == rewrites + 1
    assert persistence["aof_last_bgrewrite_status"] == "ok"
    cow = [line for line in docker("logs", redis).stdout.splitlines() if "Fork CoW" in line]
    memory = info(redis, "memory")
    print(
        f"\nredis, full cache: used {int(memory['used_memory']) / 2**20:.1f} MiB, "
        f"rss {int(memory['used_memory_rss']) / 2**20:.1f} MiB; {cow[-1].split('* ')[-1]}"
    )
    assert docker("inspect", "-f", "{{.State.OOMKilled}}", redis).stdout.strip() == "false"
    cli(redis, "flushdb")
