"""Issue #2: `invoke config.render` writes every file, and each one is accepted by the real
program that will run it, in the very image (Debian 13 versions) that will carry it.

Each service folder's own tests go deeper (services/*/tests); this one checks what the
task writes, as a person would run it.
"""

from __future__ import annotations

import subprocess
import time
import uuid

import pytest

from aiia_ops.host.git import image_tag
from aiia_ops.host.secrets import load_secrets
from aiia_ops.model import load_stack
from tests.conftest import run_invoke

pytestmark = pytest.mark.docker

SHARED = [
    "compose.yml",
    "nginx/nginx.conf",
    "nginx/conf.d/00-default.conf",
    "nginx/conf.d/prod.conf",
    "nginx/conf.d/staging.conf",
    "nginx/conf.d/status.conf",
    "pgbouncer/pgbouncer.ini",
    "pgbouncer/userlist.txt",
    "postgresql/postgresql.conf",
    "postgresql/pg_hba.conf",
    "redis/redis.conf",
]


def docker(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"docker {' '.join(args)}:\n{proc.stdout}\n{proc.stderr}")
    return proc


def image(folder: str) -> str:
    name = f"aiia/{folder}:{image_tag(folder)}"
    if docker("image", "inspect", name, check=False).returncode != 0:
        pytest.fail(f"{name} is not built: run invoke build (nox -s tests does)")
    return name


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    state = tmp_path_factory.mktemp("render-state")
    out = {}
    for env in ("prod", "staging"):
        target = state / f"out-{env}"
        proc = run_invoke(
            "config.render",
            f"--env={env}",
            "--out",
            str(target),
            env={"AIIA_STATE_DIR": str(state)},
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
        out[env] = target
    secrets = load_secrets(state, list(load_stack().environments), create=False)
    return out, secrets


@pytest.mark.parametrize("env", ["prod", "staging"])
def test_render_writes_every_file(rendered, env):
    out, _ = rendered
    for rel in [*SHARED, f"app-{env}/gunicorn.conf.py"]:
        assert (out[env] / rel).is_file(), rel
    other = "staging" if env == "prod" else "prod"
    assert not (out[env] / f"app-{other}").exists()


def run_daemon(name: str, img: str, mount: str, *args: str, env: dict | None = None) -> None:
    envs = [x for k, v in (env or {}).items() for x in ("--env", f"{k}={v}")]
    docker(
        "run",
        "--detach",
        "--name",
        name,
        "--network",
        "none",
        "--mount",
        f"type=bind,source={mount},target=/etc/aiia,readonly",
        *envs,
        img,
        *args,
    )


def wait_for(check, what: str, name: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        state = docker("inspect", "--format", "{{.State.Status}}", name, check=False).stdout
        if state.strip() in ("exited", "dead"):
            break
        time.sleep(0.5)
    logs = docker("logs", "--tail", "30", name, check=False)
    pytest.fail(f"{what} did not come up:\n{logs.stdout}{logs.stderr}")


@pytest.fixture
def container():
    names = []

    def make(prefix: str) -> str:
        names.append(f"aiia-cfgtest-{prefix}-{uuid.uuid4().hex[:8]}")
        return names[-1]

    yield make
    for name in names:
        docker("rm", "--force", name, check=False)


def test_compose_file_passes_docker_compose_config(rendered):
    out, _ = rendered
    proc = docker(
        "compose", "--file", str(out["prod"] / "compose.yml"), "config", "--quiet", check=False
    )
    assert proc.returncode == 0, proc.stderr


def test_nginx_accepts_its_config(rendered):
    out, _ = rendered
    # Through the image's entrypoint: it makes the placeholder certificates nginx -t needs.
    proc = docker(
        "run",
        "--rm",
        "--network",
        "none",
        "--mount",
        f"type=bind,source={out['prod'] / 'nginx'},target=/etc/aiia,readonly",
        image("nginx"),
        "nginx",
        "-t",
        "-c",
        "/etc/aiia/nginx.conf",
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "test is successful" in proc.stderr


@pytest.mark.parametrize("env", ["prod", "staging"])
def test_gunicorn_accepts_its_config(rendered, env):
    out, _ = rendered
    proc = docker(
        "run",
        "--rm",
        "--network",
        "none",
        "--env",
        "DJANGO_SECRET_KEY=" + "x" * 50,
        "--mount",
        f"type=bind,source={out[env] / f'app-{env}'},target=/etc/aiia,readonly",
        image("django"),
        "gunicorn",
        "--check-config",
        "-c",
        "/etc/aiia/gunicorn.conf.py",
        "aiia.wsgi",
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_postgresql_starts_with_its_config(rendered, container):
    out, secrets = rendered
    name = container("pg")
    run_daemon(
        name,
        image("postgres"),
        str(out["prod"] / "postgresql"),
        env={"POSTGRES_PASSWORD": secrets.postgres_password},
    )

    def ready() -> bool:
        return docker("exec", name, "pg_isready", "-U", "aiia", check=False).returncode == 0

    wait_for(ready, "PostgreSQL", name)
    shown = docker("exec", name, "psql", "-U", "aiia", "-tAc", "show shared_buffers").stdout
    assert shown.strip() == str(load_stack().services.postgresql.settings.shared_buffers)


def test_pgbouncer_starts_with_its_config(rendered, container):
    out, _ = rendered
    name = container("pgb")
    run_daemon(name, image("pgbouncer"), str(out["prod"] / "pgbouncer"))
    port = str(load_stack().services.pgbouncer.port)

    def listening() -> bool:
        return docker(
            "exec", name, "pg_isready", "-h", "127.0.0.1", "-p", port, check=False
        ).returncode in (0, 1)  # 1: answering, server not reachable

    wait_for(listening, "PgBouncer", name)


def test_redis_starts_with_its_config(rendered, container):
    out, secrets = rendered
    name = container("redis")
    run_daemon(name, image("redis"), str(out["prod"] / "redis"))

    def pong() -> bool:
        proc = docker(
            "exec",
            "--env",
            f"REDISCLI_AUTH={secrets.redis_password}",
            name,
            "redis-cli",
            "ping",
            check=False,
        )
        return proc.stdout.strip() == "PONG"

    wait_for(pong, "Redis", name)
    unauth = docker("exec", name, "redis-cli", "ping", check=False)
    assert "NOAUTH" in unauth.stdout + unauth.stderr
