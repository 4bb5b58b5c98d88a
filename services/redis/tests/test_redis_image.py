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


def cli(
    redis,
    *args: str,
    check: bool = True,
    auth: str | None = None,
    db: int = 0,
    user: str | None = None,
):
    """redis-cli -e (exit 1 on an error reply) inside the container; as the default user
    with the container's REDISCLI_AUTH unless `user` (and its password `auth`) is given."""
    env = {"REDISCLI_AUTH": auth} if auth is not None else None
    who = ["--user", user] if user else []
    out = dexec(redis, "redis-cli", *who, "-e", "-n", str(db), *args, env=env, check=False)
    if check:
        assert out.returncode == 0, out.stdout + out.stderr
    return out


@pytest.fixture(scope="module")
def admin(redis, net_secrets):
    """cli() as the admin user (its password is in no container: the test passes it)."""

    def run(*args, **kw):
        return cli(redis, *args, user="admin", auth=net_secrets.redis_admin_password, **kw)

    run.password = net_secrets.redis_admin_password
    run.cli = lambda *args, **kw: cli(redis, *args, **kw)
    return run


@pytest.fixture(scope="module")
def as_env(redis, net_secrets, net_stack):
    """cli() as an environment's own ACL user, on its own database unless `db` says."""

    def run(name, *args, db=None, **kw):
        env = net_stack.environment(name)
        password = net_secrets.environments[name].redis_password
        db = env.redis_db if db is None else db
        return cli(redis, *args, user=f"app-{name}", auth=password, db=db, **kw)

    return run


def refused(out) -> str:
    text = out.stdout + out.stderr
    assert out.returncode == 1 and ("NOPERM" in text or "NOAUTH" in text), text
    return text


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


def test_settings_are_the_stacks(admin, net_stack):
    s = net_stack.services.redis.settings

    def get(key):  # CONFIG is the admin user's (the apps' and the default user's: no)
        return admin("config", "get", key).stdout.splitlines()[1]

    assert get("maxmemory") == str(s.maxmemory.bytes)
    assert get("maxmemory-policy") == s.maxmemory_policy
    assert get("databases") == str(s.databases)
    assert get("appendonly") == "yes"
    assert get("appendfsync") == "everysec"
    assert get("dir") == "/data"
    assert get("save") == ""


def test_one_database_per_environment(redis, net_stack, as_env):
    # Each environment's own user, in its own database, under its own key prefix.
    for env in net_stack.environments.values():
        key = f"aiia:{env.name}:owner"
        assert as_env(env.name, "set", key, env.name).stdout.strip() == "OK"
    for env in net_stack.environments.values():
        assert as_env(env.name, "get", f"aiia:{env.name}:owner").stdout.strip() == env.name
    beyond = cli(redis, "ping", db=net_stack.services.redis.settings.databases, check=False)
    assert "DB index is out of range" in beyond.stderr


def test_flushall_is_disabled_and_flushdb_is_not(redis, admin, as_env):
    for run in (lambda *a: cli(redis, *a, check=False), lambda *a: admin(*a, check=False)):
        flushall = run("flushall")
        assert flushall.returncode == 1 and "unknown command" in flushall.stdout + flushall.stderr
    as_env("staging", "set", "aiia:staging:doomed", "1")
    # The restore's FLUSHDB (default user, REDISCLI_AUTH of the container) still works.
    assert cli(redis, "flushdb", db=1).stdout.strip() == "OK"
    assert admin("dbsize", db=1).stdout.strip() == "0"


def test_data_persists_in_the_append_only_file(redis, admin):
    admin("set", "survivor", "yes")
    files = dexec(redis, "stat", "-c", "%u %n", "/data/appendonlydir").stdout.split()
    assert files[0] == str(SERVICE_UID)
    docker("stop", redis)
    assert docker("inspect", "-f", "{{.State.ExitCode}}", redis).stdout.strip() == "0"
    docker("start", redis)
    wait_healthy(redis)
    assert admin("get", "survivor").stdout.strip() == "yes"


def info(redis, section: str) -> dict[str, str]:
    lines = cli(redis, "info", section).stdout.splitlines()
    return dict(line.strip().split(":", 1) for line in lines if ":" in line)


def test_a_full_cache_evicts_and_rewrites_its_aof_within_the_limit(redis, net_stack, net_secrets):
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
    # EVAL and BGREWRITEAOF are the admin user's: redis-cli --user admin, its password.
    as_admin = {"REDISCLI_AUTH": net_secrets.redis_admin_password}
    fill = fill.replace("redis-cli -e", "redis-cli --user admin -e")
    writer_env = {"LUA": lua, **as_admin}
    dexec(redis, "bash", "-c", fill, env=writer_env)
    assert int(info(redis, "stats")["evicted_keys"]) > 0
    assert int(info(redis, "memory")["used_memory"]) <= s.maxmemory.bytes * 1.05

    rewrites = int(info(redis, "persistence")["aof_rewrites"])
    writer = (
        'redis-cli -e bgrewriteaof >/dev/null; v=$(printf "%01000d" 0); '
        'for i in $(seq 300); do echo "SET slow:$i $v"; sleep 0.01; done | redis-cli -e >/dev/null'
    )
    dexec(redis, "bash", "-c", writer.replace("redis-cli -e", "redis-cli --user admin -e"),
          env=as_admin)  # fmt: skip
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


# --- ACL: each environment fenced to its own database and keys (issue 13) ----------------


def test_staging_cannot_read_write_or_flush_productions_keys(as_env, admin):
    admin("set", "aiia:prod:1:page", "prod-answer", db=0)
    # Every connection starts on db 0: staging's user there, without selecting anything.
    refused(as_env("staging", "get", "aiia:prod:1:page", db=0, check=False))
    refused(as_env("staging", "set", "aiia:prod:1:page", "staging-answer", db=0, check=False))
    refused(as_env("staging", "set", "anything", "x", db=0, check=False))
    refused(as_env("staging", "del", "aiia:prod:1:page", db=0, check=False))
    for whole_db in (["flushdb"], ["keys", "*"], ["scan", "0"], ["randomkey"], ["dbsize"],
                     ["swapdb", "0", "1"], ["flushall"]):  # fmt: skip
        out = as_env("staging", *whole_db, db=0, check=False)
        assert out.returncode == 1, whole_db  # NOPERM (flushall: renamed away)
    # Moving its own key into prod's database, or prod's out: the key fence holds.
    as_env("staging", "set", "aiia:staging:1:mine", "x")
    refused(as_env("staging", "copy", "aiia:prod:1:page", "aiia:staging:1:c", "db", "1",
                   db=0, check=False))  # fmt: skip
    refused(as_env("staging", "rename", "aiia:staging:1:mine", "aiia:prod:1:page",
                   check=False))  # fmt: skip
    # Scripts run server-wide; HyperLogLog's PFMERGE skips the key check (below).
    refused(as_env("staging", "eval", "return redis.call('get', KEYS[1])", "1",
                   "aiia:prod:1:page", db=0, check=False))  # fmt: skip
    refused(as_env("staging", "pfmerge", "aiia:prod:1:page", db=0, check=False))
    refused(as_env("staging", "function", "flush", check=False))
    refused(as_env("staging", "publish", "aiia:prod", "x", check=False))
    # SELECT of prod's database: refused; redis-cli -n 0 from db 1 likewise.
    assert "'select'" in refused(as_env("staging", "select", "0", check=False))
    assert admin("get", "aiia:prod:1:page", db=0).stdout.strip() == "prod-answer"


def test_staging_works_in_its_own_database(redis, as_env, admin, net_secrets, net_stack):
    assert as_env("staging", "set", "aiia:staging:1:k", "v", "ex", "30").stdout.strip() == "OK"
    assert as_env("staging", "get", "aiia:staging:1:k").stdout.strip() == "v"
    assert admin("get", "aiia:staging:1:k", db=1).stdout.strip() == "v"
    assert admin("exists", "aiia:staging:1:k", db=0).stdout.strip() == "0"
    # Django's cache calls: SET NX, MGET, EXPIRE, PERSIST, INCRBY, DEL, MULTI/EXEC.
    script = (
        "SET aiia:staging:1:n 1 NX\nMGET aiia:staging:1:k aiia:staging:1:n\n"
        "EXPIRE aiia:staging:1:n 30\nPERSIST aiia:staging:1:n\nINCRBY aiia:staging:1:n 2\n"
        "MULTI\nMSET aiia:staging:1:a 1\nEXEC\nDEL aiia:staging:1:a\nPING\n"
    )
    out = piped(redis, "staging", script, net_secrets, net_stack)
    assert "NOPERM" not in out and "ERR" not in out, out
    assert out.split() == ["OK", "v", "1", "1", "1", "3", "OK", "QUEUED", "OK", "1", "PONG"]


def piped(redis, name, script, secrets, stack) -> str:
    """Commands on stdin to one redis-cli session as the environment's user."""
    env = stack.environment(name)
    auth = {"REDISCLI_AUTH": secrets.environments[name].redis_password}
    argv = ["redis-cli", "--user", f"app-{name}", "-n", str(env.redis_db)]
    return dexec(redis, *argv, input=script, env=auth).stdout


def test_pfmerge_skips_the_key_check_in_this_redis(admin):
    """Why the app users lose @hyperloglog: a user allowed @write and only its own prefix
    may still PFMERGE into any key when no source key is given (Redis 8.0.2)."""
    admin("acl", "setuser", "probe", "on", ">probe-pw", "resetkeys", "~aiia:staging:*",
          "-@all", "+@write", "+@read")  # fmt: skip
    try:
        out = cli_as(admin, "probe", "probe-pw", "pfmerge", "aiia:prod:1:hll")
        assert out.returncode == 0 and out.stdout.strip() == "OK", out.stdout + out.stderr
        assert admin("type", "aiia:prod:1:hll").stdout.strip() == "string"
        out = cli_as(admin, "probe", "probe-pw", "set", "aiia:prod:1:hll", "x")
        assert "NOPERM" in out.stdout + out.stderr  # the same key, by SET: fenced
    finally:
        admin("acl", "deluser", "probe")
        admin("del", "aiia:prod:1:hll")


def cli_as(admin, user, password, *args):
    return admin.cli(*args, user=user, auth=password, check=False)


def test_prod_is_confined_to_db_0(as_env, admin):
    assert as_env("prod", "set", "aiia:prod:1:x", "1").stdout.strip() == "OK"
    assert "'select'" in refused(as_env("prod", "select", "1", check=False))
    refused(as_env("prod", "get", "aiia:staging:1:k", check=False))
    admin("set", "aiia:staging:1:keep", "1", db=1)
    # FLUSHDB (Django's cache.clear()) is prod's, and SELECT keeps it on db 0.
    assert as_env("prod", "flushdb").stdout.strip() == "OK"
    assert admin("exists", "aiia:prod:1:x", db=0).stdout.strip() == "0"
    assert admin("exists", "aiia:staging:1:keep", db=1).stdout.strip() == "1"


def test_the_default_user_needs_its_password_and_does_only_its_jobs(redis, net_secrets):
    bare = dexec(redis, "env", "-u", "REDISCLI_AUTH", "redis-cli", "-e", "ping", check=False)
    assert bare.returncode == 1 and "NOAUTH" in bare.stdout + bare.stderr
    empty = cli(redis, "ping", auth="", check=False)
    assert empty.returncode == 1
    for user in ("default", "app-prod", "app-staging", "admin"):
        wrong = cli(redis, "ping", user=user, auth="not-the-password", check=False)
        assert wrong.returncode == 1 and "WRONGPASS" in wrong.stdout + wrong.stderr, user
    # Its jobs: health check, monitor's INFO memory, the restore's FLUSHDB; nothing else.
    assert cli(redis, "ping").stdout.strip() == "PONG"
    assert "used_memory:" in cli(redis, "info", "memory").stdout
    for other in (["get", "aiia:prod:1:page"], ["set", "k", "v"], ["config", "get", "dir"],
                  ["keys", "*"], ["acl", "list"]):  # fmt: skip
        refused(cli(redis, *other, check=False))


def test_keyless_commands_an_app_user_may_run_are_only_these(redis, admin):
    """Every command of this Redis, asked with ACL DRYRUN and a key outside the users'
    prefixes: what passes runs on any database whatever the key fence says."""
    info = json.loads(admin("--json", "command", "info").stdout)

    def walk(entries):
        for e in entries:
            yield e
            yield from walk(e[9])

    names, lines = [], []
    for e in walk(info):
        words = e[0].split("|")
        arity = abs(e[1])
        names.append(e[0])
        lines.append(" ".join(words + ["x"] * max(0, arity - len(words))))
    harmless = {
        "auth",
        "hello",
        "ping",
        "echo",
        "quit",
        "reset",
        "multi",
        "exec",
        "discard",
        "unwatch",
        "client|setinfo",
        "client|setname",
        "client|getname",
        "client|id",
    }
    # Commands whose keys follow a count or a keyword: "x" is no key to them, so DRYRUN
    # cannot see one; with real arguments their keys are checked (tested above: COPY).
    movable = {"blmpop", "bzmpop", "lmpop", "zmpop", "sintercard", "zintercard", "xread",
               "xreadgroup", "zdiff", "zdiffstore", "zinter", "zinterstore", "zunion",
               "zunionstore"}  # fmt: skip
    for user in ("app-prod", "app-staging"):
        script = "".join(f"ACL DRYRUN {user} {line}\nECHO @@\n" for line in lines)
        auth = {"REDISCLI_AUTH": admin.password}
        out = dexec(redis, "redis-cli", "--user", "admin", input=script, env=auth).stdout
        replies = [r.strip() for r in out.split("@@\n")][: len(names)]
        allowed = {n for n, r in zip(names, replies, strict=True) if r == "OK"}
        extra = {"flushdb"} if user == "app-prod" else set()
        assert allowed - movable == harmless | extra, user
