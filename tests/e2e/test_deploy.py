"""Issue #4: zero-downtime, health-gated deploys with automatic switch-back and rollback.

Each test deploys real commits (made with git plumbing from HEAD) to the stack that
tests/e2e/conftest.py brought up, while a load generator on 127.0.0.1 watches prod.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from aiia_ops import REPO_ROOT
from aiia_ops.host.engine import Engine
from aiia_ops.host.lock import deploy_lock, lock_dir
from aiia_ops.host.releases import read_releases
from aiia_ops.host.runners import LocalRunner
from tests.conftest import run_invoke
from tests.e2e.deploys import Load, drop_refs, head_file, make_commit, ssh_stack_variant

pytestmark = [pytest.mark.docker, pytest.mark.e2e]

URLS = "services/django/app/aiia/urls.py"
HEALTH = "services/django/app/aiia/health.py"
MIGRATIONS = REPO_ROOT / "services/django/app/courses/migrations"
# The test migrations follow the app's newest one, whatever its number.
LATEST = sorted(p.stem for p in MIGRATIONS.glob("0[0-9][0-9][0-9]_*.py"))[-1]
N = int(LATEST[:4])
BOOM = f"services/django/app/courses/migrations/{N + 1:04d}_e2e_boom.py"


@pytest.fixture(scope="module")
def commits():
    """Three releases: a code change, one whose /health/ fails, one whose migration raises."""
    urls = head_file(URLS)
    changed = urls.replace(
        'path("health/", health.health, name="health"),',
        'path("health/", health.health, name="health"),\n'
        '    path("e2e-marker/", lambda request: JsonResponse({"marker": "e2e-change"})),',
    )
    assert changed != urls, "urls.py changed shape; update this test"
    changed = "from django.http import JsonResponse\n" + changed
    health = head_file(HEALTH)
    broken = health.replace(
        '    conn = connections["default"]\n',
        '    raise RuntimeError("e2e: a release whose health check fails")\n'
        '    conn = connections["default"]\n',
        1,
    )
    assert broken != health, "health.py changed shape; update this test"
    boom = (
        "from django.db import migrations, models\n\n\n"
        "def boom(apps, schema_editor):\n"
        '    raise RuntimeError("e2e: this migration fails on purpose")\n\n\n'
        "class Migration(migrations.Migration):\n"
        f'    dependencies = [("courses", "{LATEST}")]\n'
        "    operations = [\n"
        # nullable: the migration safety check accepts it, so `migrate` runs and raises
        '        migrations.AddField("course", "e2e_extra", models.IntegerField(null=True)),\n'
        "        migrations.RunPython(boom),\n"
        "    ]\n"
    )
    shas = {
        "change": make_commit("change", {URLS: changed}, "e2e: a code change"),
        "unhealthy": make_commit("unhealthy", {HEALTH: broken}, "e2e: broken health"),
        "boom": make_commit("boom", {BOOM: boom}, "e2e: a migration that raises"),
    }
    yield {k: v[:12] for k, v in shas.items()}
    drop_refs()


def deploy(env: str, ref: str | None = None, *extra: str):
    args = ["deploy", f"--env={env}", *extra] + ([f"--ref={ref}"] if ref else [])
    return run_invoke(*args, timeout=900)


def container_id(name: str) -> str:
    return Engine(LocalRunner()).inspect_raw([name])[name]["Id"]


def served_version(stack, env: str) -> str:
    from aiia_ops.flows.status import health_through_nginx

    data = health_through_nginx(
        stack.environment(env).domains[0], port=stack.local_host.published(443)
    )
    return data.get("version", "")


def load_on_prod(stack, clients: int = 50) -> Load:
    return Load(
        stack.environment("prod").domains[0],
        stack.local_host.published(443),
        clients=clients,
        # What users hit: the API (the app) and a static file (nginx alone).
        paths=("/api/courses/", "/api/courses/?page=1", "/static/admin/css/base.css"),
    )


def test_code_change_to_staging_leaves_prod_alone(stack_up, stack, commits):
    prod_before = container_id(stack.environment("prod").container)
    with load_on_prod(stack) as load:
        proc = deploy("staging", commits["change"])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert served_version(stack, "staging") == commits["change"]
    from aiia_ops.flows.status import https_get

    status, _, body = https_get(
        "staging.eduaiia.com", "/e2e-marker/", port=stack.local_host.published(443)
    )
    assert (status, json.loads(body)) == (200, {"marker": "e2e-change"})
    assert container_id(stack.environment("prod").container) == prod_before
    assert load.total > 100 and load.failures() == {}, (load.codes, load.errors)


def test_prod_deploy_under_load_every_response_is_2xx(stack_up, stack, commits):
    with load_on_prod(stack) as load:
        proc = deploy("prod", commits["change"])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert served_version(stack, "prod") == commits["change"]
    assert load.failures() == {}, (load.codes, load.errors)
    assert load.total > 100
    assert commits["change"] in load.versions  # the switch happened during the load
    for step in (
        "preflight",
        "lock prod",
        "migrations",
        "collectstatic",
        "switch nginx",
        "health through nginx",
        "drain and stop",
    ):
        assert step in proc.stdout
    assert "done in" in proc.stdout


def test_a_release_whose_health_fails_is_marked_bad_and_never_served(
    stack_up, stack, commits, e2e_state
):
    before = served_version(stack, "prod")
    with load_on_prod(stack) as load:
        proc = deploy("prod", commits["unhealthy"])
    assert proc.returncode == 1
    out = proc.stdout + proc.stderr
    assert "did not become healthy" in out
    assert "--- last log lines of" in out and "--- health check output ---" in out
    assert "Traceback" not in proc.stderr.split("--- last log lines")[0]
    assert served_version(stack, "prod") == before
    assert load.failures() == {}, (load.codes, load.errors)
    last = read_releases(e2e_state, "prod")[-1]
    assert (last["commit"], last["result"]) == (commits["unhealthy"], "bad")
    assert not lock_held(e2e_state, "prod")


def test_a_failing_migration_aborts_before_the_switch_schema_unchanged(
    stack_up, stack, commits, e2e_state
):
    def schema() -> str:
        pg = stack.services.postgresql
        return subprocess.run(
            [
                "docker",
                "exec",
                pg.container,
                "psql",
                "-U",
                "aiia",
                "-d",
                stack.environment("prod").database,
                "-tAc",
                "select string_agg(column_name, ',' order by column_name) from "
                "information_schema.columns where table_name = 'courses_course'; "
                "select count(*) from django_migrations where name like '%e2e_boom%'",
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stdout

    before, served = schema(), served_version(stack, "prod")
    proc = deploy("prod", commits["boom"])
    assert proc.returncode == 1
    assert "e2e: this migration fails on purpose" in proc.stdout + proc.stderr
    assert "start " not in proc.stdout.split("migrations (straight to PostgreSQL)")[1]
    assert schema() == before
    assert served_version(stack, "prod") == served
    assert read_releases(e2e_state, "prod")[-1]["result"] == "failed"


def lock_held(state, env: str) -> bool:

    return Path(lock_dir(str(state), deploy_lock(env))).exists()


def test_two_deploys_at_once_the_second_is_refused_naming_the_holder(
    stack_up, stack, commits, e2e_state
):
    first = subprocess.Popen(
        [sys.executable, "-m", "invoke", "deploy", "--env=staging", f"--ref={commits['change']}"],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.monotonic() + 60
    while not lock_held(e2e_state, "staging") and time.monotonic() < deadline:
        time.sleep(0.05)
    second = deploy("staging", commits["change"])
    out, _ = first.communicate(timeout=600)
    assert first.returncode == 0, out
    assert second.returncode == 1
    assert "staging is locked by" in second.stderr
    assert "@" in second.stderr.split("locked by", 1)[1]  # user@host of the holder
    assert "invoke lock.release --env=staging" in second.stderr


def test_rollback_brings_the_previous_good_release_back(stack_up, stack, commits, e2e_state):
    assert served_version(stack, "prod") == commits["change"]
    good = [r["commit"] for r in read_releases(e2e_state, "prod") if r["result"] == "good"]
    previous = next(c for c in reversed(good) if c != commits["change"])
    with load_on_prod(stack, clients=20) as load:
        proc = run_invoke("rollback", "--env=prod", timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert served_version(stack, "prod") == previous
    assert "database was not rolled back" in proc.stdout
    assert load.failures() == {}, (load.codes, load.errors)
    assert commits["unhealthy"] not in proc.stdout  # a bad release is never a target


def gunicorn_conf(container: str) -> str:
    """The gunicorn config the running container mounts (what its gunicorn read at start)."""
    proc = subprocess.run(
        ["docker", "exec", container, "cat", "/etc/aiia/gunicorn.conf.py"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return proc.stdout


def stack_variant(out_dir: Path, max_requests: int) -> Path:
    """The test stack with prod's gunicorn max_requests changed (nothing else)."""
    import yaml

    data = yaml.safe_load(Path(os.environ["AIIA_STACK"]).read_text())
    prod = data["environments"]["prod"]
    prod["gunicorn"] = {**(prod.get("gunicorn") or {}), "max_requests": max_requests}
    variant = out_dir / "stack-max-requests.yml"
    variant.write_text(yaml.safe_dump(data, sort_keys=False))
    return variant


def test_a_rollback_starts_its_release_with_the_config_it_was_deployed_with(
    stack_up, stack, commits, e2e_state, tmp_path
):
    """A stack.yml change deployed with a new release does not follow a rollback to the
    release before it: that one mounts its own copy again (commands/release_config.py)."""
    container = stack.environment("prod").container
    previous = served_version(stack, "prod")
    kept = gunicorn_conf(container)
    assert "max_requests = 19999" not in kept
    changed = {"AIIA_STACK": str(stack_variant(tmp_path, 19999))}
    proc = run_invoke("deploy", "--env=prod", f"--ref={commits['change']}", env=changed)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert served_version(stack, "prod") == commits["change"]
    assert "max_requests = 19999" in gunicorn_conf(container)
    with load_on_prod(stack, clients=20) as load:
        back = run_invoke("rollback", "--env=prod", env=changed, timeout=600)
    assert back.returncode == 0, back.stdout + back.stderr
    assert served_version(stack, "prod") == previous
    assert "its own config, kept since its deploy" in back.stdout
    assert gunicorn_conf(container) == kept
    assert load.failures() == {}, (load.codes, load.errors)
    # the stack's own rendering is the changed one: the next deploy gets it
    current = e2e_state / "config" / "app-prod" / "gunicorn.conf.py"
    assert "max_requests = 19999" in current.read_text()


def test_dry_run_prints_the_commands_and_changes_nothing(stack_up, stack, commits, e2e_state):
    before = container_id(stack.environment("prod").container)
    releases = read_releases(e2e_state, "prod")
    proc = deploy("prod", commits["change"], "--dry-run")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    container = stack.environment("prod").container
    assert f"[local] docker run --detach --name {container}-next" in proc.stdout
    assert "nginx -s reload" in proc.stdout
    assert "migrate --noinput" in proc.stdout
    assert container_id(stack.environment("prod").container) == before
    assert read_releases(e2e_state, "prod") == releases
    for value in (e2e_state / "secrets").glob("*.env"):
        for line in value.read_text().splitlines():
            if "=" in line and not line.startswith("#"):
                assert line.split("=", 1)[1] not in proc.stdout


def test_the_same_deploy_over_ssh_to_a_real_openssh_server(
    stack_up, stack, e2e_state, sshd_host, tmp_path
):
    """Same plan, SSH runner: sshd on 127.0.0.1 (key login set up by the fixture); its
    `docker` is this machine's engine and its state dir the stack's own."""
    from tests.e2e.deploys import git

    variant = ssh_stack_variant(tmp_path, sshd_host.spec, e2e_state)
    head = git("rev-parse", "HEAD")[:12]
    env = {
        "AIIA_STACK": str(variant),
        "AIIA_SSH_KEY": str(sshd_host.key_path),
        "AIIA_SSH_KNOWN_HOSTS": str(sshd_host.known_hosts_path),
    }
    # The dry run over SSH first: the host's facts, read over the connection; nothing changed.
    releases = read_releases(e2e_state, "staging")
    dry = run_invoke(
        "deploy", "--env=staging", "--host=sshbox", f"--ref={head}", "--dry-run", env=env
    )
    assert dry.returncode == 0, dry.stdout + dry.stderr
    staging, nginx = stack.environment("staging").container, stack.services.nginx.container
    assert f"[sshbox] docker run --detach --name {staging}-next" in dry.stdout
    assert f"[sshbox] docker exec {nginx} nginx -s reload" in dry.stdout
    assert read_releases(e2e_state, "staging") == releases
    with load_on_prod(stack, clients=10) as load:
        proc = run_invoke(
            "deploy", "--env=staging", "--host=sshbox", f"--ref={head}", env=env, timeout=900
        )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert served_version(stack, "staging") == head
    assert load.failures() == {}
    last = read_releases(e2e_state, "staging")[-1]
    assert (last["commit"], last["result"]) == (head, "good")
    assert "Accepted publickey for root" in sshd_host.log()  # it really went over SSH


MODELS = "services/django/app/courses/models.py"
LEGACY_NAME = f"{N + 1:04d}_e2e_legacy"
LEGACY = f"services/django/app/courses/migrations/{LEGACY_NAME}.py"
DROP_NAME = f"{N + 2:04d}_e2e_drop"
DROP = f"services/django/app/courses/migrations/{DROP_NAME}.py"


def course_columns(stack) -> list[str]:
    pg = stack.services.postgresql
    sql = (
        "select column_name from information_schema.columns "
        "where table_name = 'courses_course' order by column_name"
    )
    out = subprocess.run(
        ["docker", "exec", pg.container, "psql", "-U", "aiia", "-d",
         stack.environment("prod").database, "-tAc", sql],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    return out.split()


def test_a_migration_dropping_a_column_the_live_release_reads_is_refused_unless_marked(
    stack_up, stack, e2e_state
):
    """Issue #13 item 7. Release A adds a nullable column and reads it (every Course query
    selects it); release B drops it: refused before anything changed, A keeps serving; the
    same migration marked as a staged contract step deploys."""
    from tests.e2e.deploys import git

    models = head_file(MODELS)
    reading = models.replace(
        "    updated_at = models.DateTimeField(auto_now=True)\n",
        "    updated_at = models.DateTimeField(auto_now=True)\n"
        "    e2e_legacy = models.IntegerField(null=True)\n",
        1,
    )
    assert reading != models, "courses/models.py changed shape; update this test"
    legacy = (
        "from django.db import migrations, models\n\n\n"
        "class Migration(migrations.Migration):\n"
        f'    dependencies = [("courses", "{LATEST}")]\n'
        "    operations = [\n"
        '        migrations.AddField("course", "e2e_legacy", models.IntegerField(null=True)),\n'
        "    ]\n"
    )

    def drop(mark: str = "") -> str:
        return (
            "from django.db import migrations\n\n\n"
            "class Migration(migrations.Migration):\n"
            + (f"    aiia_safe = {mark!r}\n" if mark else "")
            + f'    dependencies = [("courses", "{LEGACY_NAME}")]\n'
            '    operations = [migrations.RemoveField("course", "e2e_legacy")]\n'
        )

    mark = "contract: course.e2e_legacy unused since the release before"
    shas = {
        "legacy": make_commit("legacy", {MODELS: reading, LEGACY: legacy}, "e2e: add a column"),
        "drop": make_commit("drop", {LEGACY: legacy, DROP: drop()}, "e2e: drop it"),
        "drop-safe": make_commit(
            "drop-safe", {LEGACY: legacy, DROP: drop(mark)}, "e2e: drop it, marked safe"
        ),
    }
    a, b, c = (shas[k][:12] for k in ("legacy", "drop", "drop-safe"))
    try:
        # A: a nullable AddField is accepted; the live release now reads e2e_legacy.
        proc = deploy("prod", a)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert f"migration safety: ok (pending migrations checked: courses.{LEGACY_NAME})" in (
            proc.stdout
        )
        assert served_version(stack, "prod") == a and "e2e_legacy" in course_columns(stack)

        # B: drops the column A reads: refused before migrate, A untouched and serving.
        before = container_id(stack.environment("prod").container)
        with load_on_prod(stack, clients=20) as load:
            proc = deploy("prod", b)
        out = proc.stdout + proc.stderr
        assert proc.returncode == 1, out
        assert (
            f"error: migration safety refused {b}: courses.{DROP_NAME}: RemoveField "
            "course.e2e_legacy drops column courses_course.e2e_legacy, which breaks the "
            "release still running during the deploy"
        ) in proc.stderr
        assert "split it: release N (expand)" in proc.stderr
        assert "migrations (straight to PostgreSQL)" not in proc.stdout
        assert "e2e_legacy" in course_columns(stack)
        assert served_version(stack, "prod") == a
        assert container_id(stack.environment("prod").container) == before
        assert load.failures() == {}, (load.codes, load.errors)
        last = read_releases(e2e_state, "prod")[-1]
        assert (last["commit"], last["result"]) == (b, "failed")
        assert "RemoveField course.e2e_legacy" in last["detail"]
        assert not lock_held(e2e_state, "prod")

        # The same migration marked as the contract step of a staged change: deployed.
        proc = deploy("prod", c)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert f"courses.{DROP_NAME} is breaking but marked safe: {mark}" in proc.stdout
        assert served_version(stack, "prod") == c
        assert "e2e_legacy" not in course_columns(stack)
        assert read_releases(e2e_state, "prod")[-1]["result"] == "good"
    finally:
        for name in shas:
            git("update-ref", "-d", f"refs/aiia-e2e/{name}")
