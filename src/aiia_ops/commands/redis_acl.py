"""Redis ACL users: one per environment, confined to its database and its key prefix.

Redis ACLs know commands, keys and channels, not databases (redis/redis#8099, closed:
"ACL is database-agnostic"). So each app user gets two fences, and neither alone holds:
- SELECT only of its own database (`-select +select|<db>`): the user on db 0 can never
  reach db 1. But every connection starts on db 0, so the user of db 1 can always run
  commands there before (or instead of) selecting its own.
- Keys only under its own Django KEY_PREFIX (`aiia:<env>:`, services/django settings),
  which also covers db 0 for the db-1 user: prod's keys are `aiia:prod:...`, so staging
  can neither read nor write them on any database.
Keyless commands that act on a whole database (FLUSHDB, SWAPDB, KEYS, SCAN, RANDOMKEY,
DBSIZE) are refused to the db-1 user; the db-0 user keeps FLUSHDB (Django's
cache.clear()), which SELECT confines to db 0. See services/redis/README.md, "ACL".

Passwords go into redis.conf only as SHA-256 hashes (`#<hex>`): nothing in the file can
be replayed. An empty password renders the user `off` (it cannot log in), never open.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from aiia_ops.model import Environment, Stack
from aiia_ops.model.secrets import Secrets

ADMIN_USER = "admin"

# What every app user may run: reads and writes of its own keys, transactions (redis-py's
# pipeline is MULTI/EXEC) and its own connection's housekeeping. Then away with what acts
# outside the user's keys: whole-database and server commands (@dangerous), scripts and
# functions (server-wide), HyperLogLog (Redis 8.0's PFMERGE with only a destination key
# skips the key check: a test pins this down), and the keyless whole-database readers.
APP_COMMANDS = (
    "-@all", "+@read", "+@write", "+@transaction",
    "-@dangerous", "-@scripting", "-@hyperloglog", "-@pubsub",
    "-scan", "-randomkey", "-dbsize", "-lolwut",
    "+ping", "+echo", "+hello",
    "+client|setinfo", "+client|setname", "+client|getname", "+client|id",
)  # fmt: skip

# The default user serves what authenticates with a bare password inside the container:
# the health check (PING), the monitor (INFO memory) and the restore (SELECT n, FLUSHDB).
OPS_COMMANDS = ("-@all", "+ping", "+info", "+select", "+flushdb")


def app_user(env: Environment) -> str:
    return f"app-{env.name}"


def key_prefix(env: Environment) -> str:
    """Django's KEY_PREFIX (services/django/app/aiia/settings.py) plus its ':' separator."""
    return f"aiia:{env.name}:"


def _glob_escape(text: str) -> str:
    return re.sub(r"([*?\[\]\\])", r"\\\1", text)


def password_rule(password: str) -> list[str]:
    if not password:
        return ["off", "resetpass"]
    return ["on", "resetpass", "#" + hashlib.sha256(password.encode()).hexdigest()]


@dataclass(frozen=True)
class User:
    name: str
    rules: tuple[str, ...]
    why: str


def users(stack: Stack, secrets: Secrets) -> list[User]:
    out = [
        User(
            "default",
            (*password_rule(secrets.redis_password), "resetkeys", "resetchannels", *OPS_COMMANDS),
            "health check, monitor (INFO), restore (FLUSHDB): REDISCLI_AUTH in the container",
        ),
        User(
            ADMIN_USER,
            (*password_rule(secrets.redis_admin_password), "allkeys", "allchannels", "+@all"),
            "people and tests: its password is only in the host's secrets, in no container",
        ),
    ]
    for env in stack.environments.values():
        own = secrets.environments.get(env.name)
        rules = (
            *password_rule(own.redis_password if own else ""),
            "resetkeys",
            f"~{_glob_escape(key_prefix(env))}*",
            "resetchannels",
            *APP_COMMANDS,
            *(("+flushdb",) if env.redis_db == 0 else ()),  # SELECT keeps it on db 0
            "-select",
            f"+select|{env.redis_db}",
        )
        why = f"{env.name}: db {env.redis_db}, keys {key_prefix(env)}*"
        out.append(User(app_user(env), rules, why))
    return out


def conf_quote(arg: str) -> str:
    """One argument as Redis' config parser (sdssplitargs) reads it back."""
    if arg and re.fullmatch(r"[A-Za-z0-9_.:@|#~%&*+\-]+", arg):
        return arg
    escaped = arg.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{escaped}"'


def conf_lines(stack: Stack, secrets: Secrets) -> list[str]:
    return [
        f"# {u.why}\nuser {conf_quote(u.name)} {' '.join(conf_quote(r) for r in u.rules)}"
        for u in users(stack, secrets)
    ]
