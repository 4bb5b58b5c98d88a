"""The CI test phase of the architecture document (§6), as commands run in the built app image.

`invoke test --env=ENV` runs five phases, each in a throwaway container of
`aiia/django:<tag>` (the image `invoke build` made for this commit):

1. checks      - `check --deploy --fail-level WARNING --database default`: production
                 settings (DEBUG off, the environment's hosts), with the database checks
2. migrations  - `makemigrations --check --dry-run`: models and migrations agree
3. safety      - `migration_safety --all`: no migration of the project's apps breaks
                 the release running beside it during a deploy, unless marked staged
                 (`aiia_safe = "contract: ..."`; the deploy runs the same check on the new
                 migrations only, against the live database)
4. tests       - the app's own suite, its test settings (aiia.settings_test) with the
                 database swapped for PostgreSQL (a settings overlay, SETTINGS_OVERLAY)
5. static      - `collectstatic` into the throwaway container's own filesystem: nothing is
                 kept, but the manifest post-processing runs (a `--dry-run` skips it, and it
                 is what fails in production when a stylesheet names a missing file)

The database is a throwaway container of `aiia/postgres:<tag>` on a private `--internal`
network made for this run: never the live stack's network, database or volumes. Its role
is made by the image's own `ensure-database`, as `invoke setup` makes the real ones.

Pure: this module builds argv lists and file contents; `aiia_ops.tasks.apptest` runs them.
Secrets (the throwaway database password, the throwaway Django key) are never in an argv:
containers get `--env NAME` and the runner passes the value in its environment.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import PurePosixPath

from aiia_ops.commands.compose import app_environment
from aiia_ops.commands.hardening import run_flags
from aiia_ops.model import Environment, Stack

PREFIX = "aiia-apptest"  # never aiia_*: those names belong to the live stack
LABEL = "org.eduaiia.apptest"
DB_NAME = "aiia_apptest"  # the database and its role (ensure-database makes both)
DB_PORT = 5432
PG_CONFIG_MOUNT = "/etc/aiia"
APP_STORAGE = "/app/storage"  # STORAGE_DIR of the app image
OVERLAY_MOUNT = "/opt/aiia-apptest"
OVERLAY_MODULE = "apptest_settings"
# Secret values the containers read from the runner's environment (never from argv).
DB_PASSWORD_VAR = "DB_PASSWORD"
SECRET_KEY_VAR = "DJANGO_SECRET_KEY"
PG_PASSWORD_VAR = "POSTGRES_PASSWORD"
SECRET_VARS = (PG_PASSWORD_VAR, DB_PASSWORD_VAR, SECRET_KEY_VAR)

# The phases' commands (the image's entrypoint runs `manage.py ...` and `collectstatic`).
CHECK_ARGS = ["manage.py", "check", "--deploy", "--fail-level", "WARNING", "--database", "default"]
MIGRATIONS_ARGS = ["manage.py", "makemigrations", "--check", "--dry-run", "--no-input"]
SAFETY_ARGS = ["manage.py", "migration_safety", "--all"]
TEST_ARGS = ["manage.py", "test", f"--settings={OVERLAY_MODULE}", "--keepdb", "--no-input",
             "--verbosity", "2"]  # fmt: skip
STATIC_ARGS = ["collectstatic", "--noinput"]

POSTGRESQL_CONF = f"""\
# Throwaway server of `invoke test` (aiia_ops.commands.apptest), not the stack's configuration:
# it lives for one test run, so durability is traded for speed.
listen_addresses = '*'
port = {DB_PORT}
hba_file = '{PG_CONFIG_MOUNT}/pg_hba.conf'
max_connections = 20
shared_buffers = 16MB
fsync = off
synchronous_commit = off
full_page_writes = off
"""

PG_HBA_CONF = f"""\
# Throwaway server of `invoke test`: the superuser over the socket (ensure-database), the
# app's role from the run's private network only (it also reads `postgres` to find its
# test database), nothing else.
local   all             aiia                                    peer
local   all             all                                     reject
host    all             {DB_NAME}            samenet                 scram-sha-256
host    all             all                  0.0.0.0/0               reject
host    all             all                  ::/0                    reject
"""

SETTINGS_OVERLAY = '''\
"""Settings of `invoke test` (aiia_ops.commands.apptest): the app's test settings on PostgreSQL.

aiia.settings_test pins SQLite; everything else it sets is kept. The database is the one
the production settings build (same engine options: no server-side cursors, no prepared
statements), pointed by DB_HOST/DB_PORT/DB_USER/DB_PASSWORD at the run's throwaway server.
The suite runs in that database itself (TEST NAME = NAME, with --keepdb), so the role
needs no CREATEDB: it has exactly the rights `ensure-database` gives the real ones.
"""

import importlib.util
import os

from aiia.settings_test import *  # noqa: F403

# A second, private copy of the production settings module (sys.modules is not touched).
os.environ.update(DB_ENGINE="postgresql", DB_NAME=os.environ["AIIA_APPTEST_DB_NAME"])
_spec = importlib.util.find_spec("aiia.settings")
_production = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_production)
DATABASES = _production.DATABASES
DATABASES["default"]["TEST"] = {"NAME": DATABASES["default"]["NAME"]}
'''


@dataclass(frozen=True)
class Phase:
    name: str
    description: str
    argv: list[str]


@dataclass(frozen=True)
class AppTestPlan:
    """Everything one run does: set up, the phases, tear down (always, even after a failure)."""

    env: str
    image: str
    network: str
    db_container: str
    create_network: list[str]
    start_db: list[str]
    db_ready: list[str]
    ensure_db: list[str]
    phases: list[Phase]
    teardown: list[list[str]]


def names(run_id: str) -> dict[str, str]:
    return {
        "network": f"{PREFIX}-{run_id}",
        "db": f"{PREFIX}-{run_id}-db",
        "app": f"{PREFIX}-{run_id}-app",
    }


def app_settings(stack: Stack, env: Environment, version: str, db_host: str) -> dict[str, str]:
    """The environment's production settings, with the database moved to the throwaway one."""
    settings = app_environment(stack, env, version)
    settings.update(DB_HOST=db_host, DB_PORT=str(DB_PORT), DB_NAME=DB_NAME, DB_USER=DB_NAME)
    return settings


def plan(
    stack: Stack,
    env_name: str,
    tag: str,
    run_id: str,
    pg_config_dir: str,
    overlay_dir: str,
) -> AppTestPlan:
    """The commands of one `invoke test --env=ENV` run.

    `pg_config_dir` holds POSTGRESQL_CONF and PG_HBA_CONF (as postgresql.conf, pg_hba.conf);
    `overlay_dir` holds SETTINGS_OVERLAY (as apptest_settings.py); both readable by UID 10001.
    """
    env = stack.environment(env_name)
    n = names(run_id)
    pg = stack.services.postgresql
    pg_image = f"{pg.image}:{tag}"
    app_image = f"{env.image}:{tag}"
    label = f"{LABEL}={run_id}"

    create_network = ["docker", "network", "create", "--internal", "--label", label, n["network"]]
    start_db = [
        "docker", "run", "--detach", "--name", n["db"],
        "--network", n["network"], "--label", label,
        "--memory", str(pg.memory.limit.bytes), "--memory-swap", str(pg.memory.limit.bytes),
        *run_flags("postgresql"),  # the stack's own hardening; PGDATA is the image's VOLUME
        "--env", PG_PASSWORD_VAR,
        "--mount", f"type=bind,source={pg_config_dir},target={PG_CONFIG_MOUNT},readonly",
        pg_image,
    ]  # fmt: skip
    db_ready = ["docker", "exec", n["db"], "pg_isready", "-q", "-U", "aiia"]
    ensure_db = ["docker", "exec", "--interactive", n["db"], "ensure-database", DB_NAME, DB_NAME]

    def one_off(phase: str, args: list[str], extra: tuple[str, ...] | list[str] = ()) -> list[str]:
        argv = [
            "docker", "run", "--rm", "--name", f"{n['app']}-{phase}",
            "--network", n["network"], "--label", label,
            "--memory", str(env.memory.limit.bytes), "--memory-swap", str(env.memory.limit.bytes),
            "--cpus", f"{env.cpu.limit:g}",
            *run_flags("app"),
            # Read-only root: collectstatic writes into an anonymous volume (a copy of the
            # image's /app/storage), removed with the container (--rm).
            "--mount", f"type=volume,target={APP_STORAGE}",
        ]  # fmt: skip
        for key, value in app_settings(stack, env, tag, n["db"]).items():
            argv += ["--env", f"{key}={value}"]
        argv += ["--env", DB_PASSWORD_VAR, "--env", SECRET_KEY_VAR, *extra, app_image, *args]
        return argv

    overlay = [
        "--env", f"AIIA_APPTEST_DB_NAME={DB_NAME}",
        "--env", f"PYTHONPATH={OVERLAY_MOUNT}",
        "--mount", f"type=bind,source={overlay_dir},target={OVERLAY_MOUNT},readonly",
    ]  # fmt: skip
    phases = [
        Phase("checks", "Django system checks, production settings (check --deploy)",
              one_off("checks", CHECK_ARGS)),
        Phase("migrations", "models and migrations agree (makemigrations --check --dry-run)",
              one_off("migrations", MIGRATIONS_ARGS)),
        Phase("safety", "no migration breaks the release running beside it (migration_safety)",
              one_off("safety", SAFETY_ARGS)),
        # Its collectstatic test writes a whole static tree: into the storage volume, not
        # the 4 MB /tmp tmpfs of the app profile.
        Phase("tests", "the app's test suite on PostgreSQL",
              one_off("tests", TEST_ARGS, [*overlay, "--env", f"TMPDIR={APP_STORAGE}"])),
        Phase("static", "collectstatic with the manifest, into the throwaway container",
              one_off("static", STATIC_ARGS)),
    ]  # fmt: skip
    teardown = [
        *(["docker", "rm", "--force", "--volumes", f"{n['app']}-{p.name}"] for p in phases),
        ["docker", "rm", "--force", "--volumes", n["db"]],
        ["docker", "network", "rm", n["network"]],
    ]
    return AppTestPlan(
        env=env.name,
        image=app_image,
        network=n["network"],
        db_container=n["db"],
        create_network=create_network,
        start_db=start_db,
        db_ready=db_ready,
        ensure_db=ensure_db,
        phases=phases,
        teardown=teardown,
    )


def images(stack: Stack, env_name: str, tag: str) -> list[str]:
    """The images a run needs, both made by `invoke build` for the same commit."""
    app = stack.environment(env_name).image
    return [f"{app}:{tag}", f"{stack.services.postgresql.image}:{tag}"]


def files(pg_config_dir: PurePosixPath, overlay_dir: PurePosixPath) -> dict[str, str]:
    """{path: content} of the files the plan mounts."""
    return {
        str(pg_config_dir / "postgresql.conf"): POSTGRESQL_CONF,
        str(pg_config_dir / "pg_hba.conf"): PG_HBA_CONF,
        str(overlay_dir / f"{OVERLAY_MODULE}.py"): SETTINGS_OVERLAY,
    }
