"""`invoke test --env=ENV`: the exact commands of one run (aiia_ops.commands.apptest), no engine."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import PurePosixPath

import pytest

from aiia_ops import DEFAULT_STACK, SERVICES_DIR
from aiia_ops.commands import apptest
from aiia_ops.commands.argv import quote
from aiia_ops.commands.hardening import run_flags
from aiia_ops.model import load_stack

STACK = load_stack(DEFAULT_STACK)
STAGING = STACK.environments["staging"]
PG = STACK.services.postgresql
PLAN = apptest.plan(STACK, "staging", "abc123def456", "r1", "/tmp/t/postgresql", "/tmp/t/overlay")
MB = {"app": STAGING.memory.limit.bytes, "pg": PG.memory.limit.bytes}

APP_ENV = (
    "--env AIIA_ENV=staging --env APP_VERSION=abc123def456 "
    "--env ALLOWED_HOSTS=staging.eduaiia.com,localhost,127.0.0.1,"
    f"{STAGING.address},{STAGING.standby_address} "
    "--env DB_HOST=aiia-apptest-r1-db --env DB_PORT=5432 --env DB_NAME=aiia_apptest "
    "--env DB_USER=aiia_apptest "
    f"--env REDIS_HOST={STACK.services.redis.address} --env REDIS_PORT=6379 --env REDIS_DB=1 "
    "--env STORAGE_DIR=/app/storage --env PORT=8001 "
    "--env DB_PASSWORD --env DJANGO_SECRET_KEY"
)


# The stack's own hardening profiles (commands/hardening.py), as `docker run` flags.
APP_HARDENING = quote(run_flags("app"))
PG_HARDENING = quote(run_flags("postgresql"))


def one_off(phase: str) -> str:
    return (
        f"docker run --rm --name aiia-apptest-r1-app-{phase} --network aiia-apptest-r1 "
        f"--label org.eduaiia.apptest=r1 --memory {MB['app']} --memory-swap {MB['app']} "
        f"--cpus {STAGING.cpu.limit:g} {APP_HARDENING} "
        f"--mount type=volume,target=/app/storage {APP_ENV}"
    )


def test_setup_commands():
    assert quote(PLAN.create_network) == (
        "docker network create --internal --label org.eduaiia.apptest=r1 aiia-apptest-r1"
    )
    assert quote(PLAN.start_db) == (
        "docker run --detach --name aiia-apptest-r1-db --network aiia-apptest-r1 "
        f"--label org.eduaiia.apptest=r1 --memory {MB['pg']} --memory-swap {MB['pg']} "
        f"{PG_HARDENING} --env POSTGRES_PASSWORD "
        "--mount type=bind,source=/tmp/t/postgresql,target=/etc/aiia,readonly "
        "aiia/postgres:abc123def456"
    )
    assert quote(PLAN.db_ready) == "docker exec aiia-apptest-r1-db pg_isready -q -U aiia"
    assert quote(PLAN.ensure_db) == (
        "docker exec --interactive aiia-apptest-r1-db ensure-database aiia_apptest aiia_apptest"
    )


def test_the_phases_of_the_documents_test_phase_and_the_migration_safety_check():
    assert [(p.name, quote(p.argv)) for p in PLAN.phases] == [
        (
            "checks",
            f"{one_off('checks')} aiia/django:abc123def456 "
            "manage.py check --deploy --fail-level WARNING --database default",
        ),
        (
            "migrations",
            f"{one_off('migrations')} aiia/django:abc123def456 "
            "manage.py makemigrations --check --dry-run --no-input",
        ),
        (
            "safety",
            f"{one_off('safety')} aiia/django:abc123def456 manage.py migration_safety --all",
        ),
        (
            "tests",
            f"{one_off('tests')} --env AIIA_APPTEST_DB_NAME=aiia_apptest "
            "--env PYTHONPATH=/opt/aiia-apptest "
            "--mount type=bind,source=/tmp/t/overlay,target=/opt/aiia-apptest,readonly "
            "--env TMPDIR=/app/storage aiia/django:abc123def456 "
            "manage.py test --settings=apptest_settings --keepdb --no-input --verbosity 2",
        ),
        (
            "static",
            f"{one_off('static')} aiia/django:abc123def456 collectstatic --noinput",
        ),
    ]


def test_teardown_removes_everything_the_run_made_and_nothing_else():
    named = {PLAN.start_db[PLAN.start_db.index("--name") + 1]}
    named |= {p.argv[p.argv.index("--name") + 1] for p in PLAN.phases}
    removed = {argv[-1] for argv in PLAN.teardown if argv[:2] == ["docker", "rm"]}
    assert removed == named
    assert PLAN.teardown[-1] == ["docker", "network", "rm", "aiia-apptest-r1"]


def test_the_production_environment_gets_its_own_settings_and_limits():
    prod = STACK.environments["prod"]
    plan = apptest.plan(STACK, "prod", "t", "r2", "/a", "/b")
    argv = plan.phases[0].argv
    assert "AIIA_ENV=prod" in argv
    assert f"ALLOWED_HOSTS=eduaiia.com,www.eduaiia.com,localhost,127.0.0.1,{prod.address}," in (
        " ".join(argv)
    )
    assert argv[argv.index("--memory") + 1] == str(prod.memory.limit.bytes)
    assert argv[argv.index("--cpus") + 1] == f"{prod.cpu.limit:g}"
    assert plan.image == "aiia/django:t"
    assert apptest.images(STACK, "prod", "t") == ["aiia/django:t", "aiia/postgres:t"]


def test_nothing_touches_the_live_stack():
    everything = [PLAN.create_network, PLAN.start_db, *(p.argv for p in PLAN.phases)]
    text = " ".join(" ".join(a) for a in everything)
    assert STACK.network.name not in text  # aiia_network
    assert not any(t.startswith("aiia_") for a in everything for t in a if "=" not in t)
    for argv in everything[1:]:
        assert argv[argv.index("--network") + 1] == "aiia-apptest-r1"
        # No volume of the stack, no data kept: only anonymous volumes, removed with their
        # container (the app's storage under a read-only root; PGDATA is the image's VOLUME).
        for mount in (t for t in argv if t.startswith("type=volume")):
            assert "source=" not in mount and "src=" not in mount, mount


def test_secrets_are_passed_by_name_never_by_value():
    for argv in [PLAN.start_db, *(p.argv for p in PLAN.phases)]:
        for i, token in enumerate(argv):
            if token == "--env" and argv[i + 1].split("=")[0] in apptest.SECRET_VARS:
                assert "=" not in argv[i + 1], f"secret value on a command line: {argv[i + 1]}"


def test_unknown_environment_is_a_clear_error():
    with pytest.raises(Exception, match="unknown environment 'qa'; expected one of: prod, staging"):
        apptest.plan(STACK, "qa", "t", "r", "/a", "/b")


def test_files_mounted_by_the_plan():
    files = apptest.files(PurePosixPath("/x/postgresql"), PurePosixPath("/x/overlay"))
    assert sorted(files) == [
        "/x/overlay/apptest_settings.py",
        "/x/postgresql/pg_hba.conf",
        "/x/postgresql/postgresql.conf",
    ]
    conf = files["/x/postgresql/postgresql.conf"]
    assert "hba_file = '/etc/aiia/pg_hba.conf'" in conf
    assert "listen_addresses = '*'" in conf
    hba = [
        line.split()
        for line in files["/x/postgresql/pg_hba.conf"].splitlines()
        if line and not line.startswith("#")
    ]
    assert hba == [
        ["local", "all", "aiia", "peer"],
        ["local", "all", "all", "reject"],
        ["host", "all", "aiia_apptest", "samenet", "scram-sha-256"],
        ["host", "all", "all", "0.0.0.0/0", "reject"],
        ["host", "all", "all", "::/0", "reject"],
    ]


def test_the_settings_overlay_keeps_the_test_settings_and_uses_postgresql(tmp_path):
    """The overlay on the real app (Django on the host, as `nox -s unit` installs it), in a
    subprocess: aiia.settings_test writes os.environ."""
    pytest.importorskip("django")
    (tmp_path / "apptest_settings.py").write_text(apptest.SETTINGS_OVERLAY)
    probe = (
        "import json, apptest_settings as s; "
        "print(json.dumps({'db': s.DATABASES['default'], 'cache': s.CACHES['default']['BACKEND'],"
        " 'version': s.APP_VERSION, 'env': s.AIIA_ENV, 'token': s.API_WRITE_TOKEN}, default=str))"
    )
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(tmp_path), str(SERVICES_DIR / "django" / "app")]),
        "AIIA_APPTEST_DB_NAME": "aiia_apptest",
        "DB_HOST": "aiia-apptest-r1-db",
        "DB_PORT": "5432",
        "DB_USER": "aiia_apptest",
        "DB_PASSWORD": "pw-from-the-environment",
    }
    proc = subprocess.run(
        [sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""  # no warning (e.g. a module run twice)
    out = json.loads(proc.stdout)
    db = out["db"]
    assert db["ENGINE"] == "django.db.backends.postgresql"
    assert (db["HOST"], db["PORT"], db["NAME"], db["USER"], db["PASSWORD"]) == (
        "aiia-apptest-r1-db",
        5432,
        "aiia_apptest",
        "aiia_apptest",
        "pw-from-the-environment",
    )
    assert db["TEST"] == {"NAME": "aiia_apptest"}  # the suite runs in it: no CREATEDB needed
    assert db["DISABLE_SERVER_SIDE_CURSORS"] is True  # as in production (PgBouncer)
    assert db["OPTIONS"]["prepare_threshold"] is None
    # Everything else as aiia.settings_test pins it.
    assert out["cache"].endswith("LocMemCache")
    assert (out["version"], out["env"], out["token"]) == ("test", "test", "test-token")


def test_the_task_is_registered_with_its_options():
    from aiia_ops.tasks import namespace

    task = namespace["test"]
    assert {a.name for a in task.get_arguments()} == {"env", "tag", "stack"}
    assert task.body.__module__ == "aiia_ops.tasks.apptest"


# --- the procedure against a recording runner (nothing runs) ---------------------------------


def test_the_procedure_runs_every_phase_then_removes_everything(monkeypatch):
    import uuid

    from aiia_ops.commands.argv import Result
    from aiia_ops.flows import apptest as flow
    from aiia_ops.host.runners import RecordingRunner
    from aiia_ops.model import load_stack

    monkeypatch.setattr(flow.uuid, "uuid4", lambda: uuid.UUID(int=0xABCDEF12 << 96))
    stack = load_stack(DEFAULT_STACK)
    runner = RecordingRunner({"mktemp": "/tmp/aiia-apptest-x\n"})
    lines: list[str] = []
    results = flow.test(stack, "prod", "abc", runner, out=lines.append)
    assert [name for name, ok, _ in results if ok] == [p.name for p in _phases()]
    assert runner.commands[0][:3] == ["docker", "image", "inspect"]
    assert sorted(runner.files) == [
        "/tmp/aiia-apptest-x/overlay/apptest_settings.py",
        "/tmp/aiia-apptest-x/postgresql/pg_hba.conf",
        "/tmp/aiia-apptest-x/postgresql/postgresql.conf",
    ]
    plan = apptest.plan(stack, "prod", "abc", "abcdef12", "/p", "/o")
    assert runner.commands[-len(plan.teardown) - 1 : -1] == plan.teardown
    assert runner.commands[-1] == ["rm", "-rf", "/tmp/aiia-apptest-x"]
    assert lines[-1].startswith(f"all {len(results)} phases passed in ")

    failing = RecordingRunner({"mktemp": "/tmp/t\n", "docker run --rm": Result([], 1)})
    with pytest.raises(flow.OpsError, match=r"phases failed \(.*\) for aiia/django:abc"):
        flow.test(stack, "prod", "abc", failing, out=lines.append)
    assert failing.commands[-1] == ["rm", "-rf", "/tmp/t"]


def _phases():
    from aiia_ops.model import load_stack

    return apptest.plan(load_stack(DEFAULT_STACK), "prod", "abc", "x", "/p", "/o").phases
