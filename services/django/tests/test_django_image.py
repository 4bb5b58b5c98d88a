"""The aiia/django image: production settings, user, gunicorn on the rendered config, health.

The image: see django_testlib.django_image() (built once, or AIIA_DJANGO_IMAGE /
AIIA_TEST_IMAGE_TAG for a ready-made one).

Every container runs with `--network none`: no PostgreSQL or Redis is reachable, so the
app must answer /health/ with a well-formed 503. HTTP is spoken from inside the container
(docker exec), so no traffic leaves it.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import subprocess
import time
import uuid
from pathlib import Path

import pytest
from django_testlib import (
    BUILD_VERSION,
    BUILT_TAG,
    django_image,
    docker,
    image_env,
    render_gunicorn,
    stack,
)

pytestmark = pytest.mark.docker

MODEL = stack()
UID = "10001"
SECRET_KEY = secrets.token_urlsafe(50)  # throwaway, never leaves this test run


@pytest.fixture(scope="module")
def image() -> str:
    return django_image()


@pytest.fixture(scope="module")
def config_dirs(tmp_path_factory) -> dict[str, Path]:
    """{environment: directory holding its rendered gunicorn.conf.py}, as /etc/aiia sees it."""
    out = {}
    for name, text in render_gunicorn(MODEL).items():
        d = tmp_path_factory.mktemp(f"app-{name}")
        d.chmod(0o755)
        (d / "gunicorn.conf.py").write_text(text)
        (d / "gunicorn.conf.py").chmod(0o644)
        out[name] = d
    return out


def prod_env(name: str = "prod") -> list[str]:
    env = MODEL.environments[name]
    values = {
        "DJANGO_SECRET_KEY": SECRET_KEY,
        "AIIA_ENV": name,
        "ALLOWED_HOSTS": ",".join(env.domains),
        "API_WRITE_TOKEN": "pytest-token",
        "PORT": str(env.port),
    }
    return [arg for k, v in values.items() for arg in ("-e", f"{k}={v}")]


def run_once(image: str, *args: str, env: list[str] | None = None, extra=()) -> str:
    proc = docker(
        "run", "--rm", "--network", "none", *(env if env is not None else prod_env()),
        *extra, image, *args, timeout=300,
    )  # fmt: skip
    return proc.stdout + proc.stderr


class Container:
    def __init__(self, image: str, env_name: str, config_dir: Path | None):
        self.name = f"aiia-django-test-{uuid.uuid4().hex[:8]}"
        self.env = MODEL.environments[env_name]
        mounts = ["-v", f"{config_dir}:/etc/aiia:ro"] if config_dir else []
        limit = str(self.env.memory.limit.bytes)
        docker(
            "run", "-d", "--name", self.name, "--network", "none",
            "--memory", limit, "--memory-swap", limit,
            *prod_env(env_name), *mounts, image,
        )  # fmt: skip

    def exec(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return docker("exec", self.name, *args, check=check, timeout=60)

    def healthcheck(self) -> subprocess.CompletedProcess:
        """The image's own HEALTHCHECK command, as Docker runs it."""
        test = docker("inspect", "-f", "{{json .Config.Healthcheck.Test}}", self.name).stdout
        cmd = json.loads(test)
        assert cmd[0] == "CMD"
        return self.exec(*cmd[1:], check=False)

    def wait_answering(self, timeout: float = 30) -> subprocess.CompletedProcess:
        deadline = time.monotonic() + timeout
        while True:
            result = self.healthcheck()
            if re.match(r"\d{3} ", result.stdout):  # gunicorn answered (any status)
                return result
            if time.monotonic() > deadline:
                pytest.fail(f"no HTTP answer within {timeout}s: {result.stdout}\n{self.logs()}")
            time.sleep(0.3)

    def logs(self) -> str:
        proc = docker("logs", self.name, check=False)
        return proc.stdout + proc.stderr

    def gunicorn_processes(self) -> list[dict]:
        script = (
            "import os\n"
            "for p in filter(str.isdigit, os.listdir('/proc')):\n"
            "    cmd = open(f'/proc/{p}/cmdline').read().split(chr(0))\n"
            "    if 'gunicorn' in ' '.join(cmd[:2]):\n"
            "        st = dict(l.split(':', 1) for l in open(f'/proc/{p}/status'))\n"
            "        print(p, st['PPid'].strip(), st['Uid'].split()[0], st['VmRSS'].split()[0])\n"
        )
        out = self.exec("python3", "-I", "-c", script).stdout.split()
        return [
            {"pid": int(p), "ppid": int(pp), "uid": u, "rss_kb": int(r)}
            for p, pp, u, r in zip(out[::4], out[1::4], out[2::4], out[3::4], strict=True)
        ]

    def cgroup_rss(self) -> int:
        """Anonymous memory charged to the container: cgroup v1's total_rss, v2's anon."""
        for path, key in (
            ("/sys/fs/cgroup/memory/memory.stat", "total_rss"),
            ("/sys/fs/cgroup/memory.stat", "anon"),
        ):
            stat = self.exec("cat", path, check=False).stdout
            m = re.search(rf"^{key} (\d+)$", stat, re.M)
            if m:
                return int(m.group(1))
        pytest.fail("no memory.stat in the container (neither cgroup v1 nor v2)")

    def remove(self) -> None:
        docker("rm", "-f", self.name, check=False)


@pytest.fixture
def app_containers():
    started: list[Container] = []

    def start(image: str, env_name: str = "prod", config_dir: Path | None = None) -> Container:
        c = Container(image, env_name, config_dir)
        started.append(c)
        return c

    yield start
    for c in started:
        c.remove()


# --- the image as built -------------------------------------------------------------------


def test_image_metadata(image):
    cfg = json.loads(docker("inspect", "-f", "{{json .Config}}", image).stdout)
    assert cfg["User"] == f"{UID}:{UID}"
    assert cfg["Entrypoint"] == ["/app/bin/docker-entrypoint"]
    assert cfg["Cmd"] == ["gunicorn", "-c", "/etc/aiia/gunicorn.conf.py", "aiia.wsgi"]
    hc = cfg["Healthcheck"]
    assert (hc["Interval"], hc["Timeout"], hc["Retries"]) == (30 * 10**9, 10 * 10**9, 3)
    env = image_env(image)
    assert env["APP_VERSION"]
    if image == BUILT_TAG:
        assert env["APP_VERSION"] == BUILD_VERSION


def test_no_pip_and_no_compilers_in_the_image(image):
    out = run_once(image, "sh", "-c", "ls /app/venv/bin; command -v pip pip3 gcc cc || true")
    assert "pip" not in out
    assert "gcc" not in out


def test_check_deploy_is_clean_with_production_settings(image):
    out = run_once(image, "manage.py", "check", "--deploy", "--fail-level", "WARNING")
    assert "System check identified no issues (0 silenced)." in out


def test_refuses_to_start_without_a_secret_key(image):
    proc = docker("run", "--rm", "--network", "none", image, "manage.py", "check", check=False)
    assert proc.returncode != 0
    assert "DJANGO_SECRET_KEY is required" in proc.stderr


def test_app_test_suite_passes_inside_the_image(image):
    # With the production variables set: the test settings must override them all.
    out = run_once(image, "manage.py", "test", "--settings=aiia.settings_test", "--noinput")
    assert re.search(r"^OK$", out, re.M), out


# --- gunicorn on the rendered config ------------------------------------------------------


@pytest.mark.parametrize("name", sorted(MODEL.environments))
def test_gunicorn_check_config_with_the_rendered_config(image, config_dirs, name):
    out = run_once(
        image, "gunicorn", "--check-config", "-c", "/etc/aiia/gunicorn.conf.py", "aiia.wsgi",
        env=prod_env(name), extra=("-v", f"{config_dirs[name]}:/etc/aiia:ro"),
    )  # fmt: skip
    assert "Error" not in out, out


@pytest.mark.parametrize("name", sorted(MODEL.environments))
def test_serves_health_503_without_database_and_cache(image, config_dirs, app_containers, name):
    c = app_containers(image, name, config_dirs[name])
    result = c.wait_answering()
    assert result.returncode == 1, "503 must make the HEALTHCHECK fail"
    status, _, body = result.stdout.partition(" ")
    assert status == "503"
    data = json.loads(body)
    assert data["status"] == "error"
    assert data["environment"] == name
    assert data["version"] == image_env(image)["APP_VERSION"]
    assert data["checks"]["database"]["ok"] is False
    assert data["checks"]["cache"]["ok"] is False
    assert set(data["checks"]["database"]) == {"ok", "error"}  # the class name, no message

    procs = c.gunicorn_processes()
    assert {p["uid"] for p in procs} == {UID}
    workers = [p for p in procs if p["ppid"] != 0 and any(q["pid"] == p["ppid"] for q in procs)]
    assert len(workers) == c.env.gunicorn.workers
    logs = c.logs()
    assert f"Listening at: http://0.0.0.0:{c.env.port}" in logs
    assert "baked default" not in logs
    # The access line only with stack.yml's app.gunicorn.access_log (off: nginx logs them).
    access_line = re.search(r'"GET /health/ HTTP/1.1" 503 \d+ \d+ms', logs)
    assert bool(access_line) is c.env.gunicorn.access_log, logs


def test_without_a_rendered_config_the_baked_default_serves(image, app_containers):
    c = app_containers(image, "prod", None)
    assert c.wait_answering().stdout.startswith("503 ")
    assert "using the baked default /app/etc/gunicorn.conf.py" in c.logs()


@pytest.mark.parametrize("name", sorted(MODEL.environments))
def test_fits_its_memory_limit_after_traffic(image, config_dirs, app_containers, name):
    c = app_containers(image, name, config_dirs[name])
    c.wait_answering()
    traffic = (
        "import urllib.request, urllib.error\n"
        "op = urllib.request.build_opener(urllib.request.ProxyHandler({}))\n"
        "for i in range(200):\n"
        "    for path in ('/health/', '/api/courses/', '/api/courses/x/', '/nope/'):\n"
        f"        r = urllib.request.Request('http://127.0.0.1:{c.env.port}' + path,\n"
        "                                   headers={'X-Forwarded-Proto': 'https'})\n"
        "        try: op.open(r, timeout=10).read()\n"
        "        except urllib.error.HTTPError as e: e.read()\n"
    )
    c.exec("python3", "-I", "-c", traffic)
    rss = c.cgroup_rss()
    limit = c.env.memory.limit.bytes
    print(f"{name}: {rss / 2**20:.1f} MB resident of {limit / 2**20:.0f} MB")
    assert rss < 0.97 * limit


# --- one-off commands: the entrypoint contract -------------------------------------------


def test_migrate_collectstatic_and_manage(image):
    volume = f"aiia-django-test-{uuid.uuid4().hex[:8]}"
    env = [*prod_env(), "-e", "DB_ENGINE=sqlite", "-e", "DB_NAME=/app/storage/db.sqlite3"]
    mount = ("--mount", f"type=volume,source={volume},target=/app/storage")
    try:
        out = run_once(image, "migrate", "--noinput", env=env, extra=mount)
        assert "Applying courses.0001_initial... OK" in out
        out = run_once(image, "collectstatic", env=env, extra=mount)
        assert re.search(r"\d+ static files copied", out), out
        out = run_once(image, "manage.py", "showmigrations", "courses", env=env, extra=mount)
        assert "[X] 0001_initial" in out
        out = run_once(
            image, "sh", "-c",
            "stat -c '%u %n' /app/storage/static/staticfiles.json /app/storage/db.sqlite3;"
            " ls /app/storage/static/admin/css | grep -c '\\.[0-9a-f]\\{12\\}\\.css$'",
            env=env, extra=mount,
        )  # fmt: skip
        lines = out.split()
        assert lines[0] == UID and lines[2] == UID  # the volume belongs to the app user
        assert int(lines[-1]) > 0  # hashed names for nginx' long cache
    finally:
        docker("volume", "rm", "-f", volume, check=False)


def test_psycopg_runs_its_c_implementation(image):
    # psycopg-binary from the wheelhouse (issue 17): not the pure-Python implementation.
    out = run_once(image, "python", "-c", "import psycopg; print(psycopg.pq.__impl__)")
    assert out.strip().splitlines()[-1] in {"binary", "c"}, out


def test_collectstatic_writes_gzip_files_for_nginx(image):
    volume = f"aiia-django-test-{uuid.uuid4().hex[:8]}"
    env = [*prod_env(), "-e", "DB_ENGINE=sqlite", "-e", "DB_NAME=/app/storage/db.sqlite3"]
    mount = ("--mount", f"type=volume,source={volume},target=/app/storage")
    try:
        run_once(image, "collectstatic", env=env, extra=mount)
        out = run_once(
            image, "python", "-c",
            "import gzip, pathlib; p = pathlib.Path('/app/storage/static/admin/css/base.css');"
            " g = p.with_name(p.name + '.gz');"
            " print(gzip.decompress(g.read_bytes()) == p.read_bytes(), g.stat().st_size,"
            " p.stat().st_size, oct(g.stat().st_mode & 0o777))",
            env=env, extra=mount,
        )  # fmt: skip
        same, gz_size, size, mode = out.split()[-4:]
        assert same == "True"
        assert int(gz_size) < int(size) / 2
        assert mode == "0o644"  # nginx (another user) reads it
    finally:
        docker("volume", "rm", "-f", volume, check=False)


def _memory_cgroup(pid: int) -> tuple[Path, str]:
    """The memory cgroup of host process `pid` and its resettable high-water file."""
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):  # cgroup v1
            return Path("/sys/fs/cgroup/memory" + path), "memory.max_usage_in_bytes"
        if controllers == "":  # cgroup v2: memory.peak (resettable since Linux 6.12)
            return Path("/sys/fs/cgroup" + path), "memory.peak"
    pytest.fail(f"no memory cgroup for pid {pid}: {Path(f'/proc/{pid}/cgroup').read_text()}")


@pytest.mark.parametrize("name", sorted(MODEL.environments))
def test_retiring_workers_copy_no_memory(image, config_dirs, app_containers, name):
    # Every worker stopped at once, as a deploy's stop, a HUP or max_requests reached together
    # retire them: the interpreter's teardown used to write to every page a worker shared
    # with the master (~20 MB each), and two of them OOM-killed the master at 120 MB.
    c = app_containers(image, name, config_dirs[name])
    c.wait_answering()
    master = int(docker("inspect", "-f", "{{.State.Pid}}", c.name).stdout)
    workers = [int(p) for p in Path(f"/proc/{master}/task/{master}/children").read_text().split()]
    assert len(workers) == c.env.gunicorn.workers
    cgroup, peak_file = _memory_cgroup(master)
    usage_file = "memory.usage_in_bytes" if peak_file.startswith("memory.max") else "memory.current"
    before = int((cgroup / usage_file).read_text())
    (cgroup / peak_file).write_text("0")  # the high-water mark starts again from now
    for pid in workers:
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 30
    while any(Path(f"/proc/{pid}").exists() for pid in workers):
        assert time.monotonic() < deadline, "the workers did not exit within 30 s"
        time.sleep(0.05)
    peak = int((cgroup / peak_file).read_text())
    print(f"{name}: {before / 2**20:.1f} MB before, peak {peak / 2**20:.1f} MB while retiring")
    assert peak - before < 4 * 2**20, f"retiring the workers took {(peak - before) >> 20} MB more"
    assert c.wait_answering().stdout.startswith("503 ")  # new workers answer
    logs = c.logs()
    assert logs.count("Worker exiting") >= len(workers)  # logged before leaving (flushed)
    assert "exited with code" not in logs  # a clean 0, as gunicorn's own exit gives
