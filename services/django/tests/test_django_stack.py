"""The app image against the real data-service images: PostgreSQL, PgBouncer (transaction
pooling), Redis, each on its rendered config, on a private `--internal` network whose
addresses mirror the stack's (the data services' test kit, services/postgres/tests).

The app gets exactly the variables the compose file gives it (`compose.app_environment`
and its secret env file), migrations run as the deploy runs them (a one-off container
straight to PostgreSQL), then: health 200 naming the real database, the JSON API through
PgBouncer, the list cache in Redis, a PgBouncer restart and a Redis outage survived.
"""

from __future__ import annotations

import json
import time
import uuid

import pytest
from datasvc_testkit import image, wait_healthy  # on sys.path through conftest.py
from django_testlib import django_image, docker, render_gunicorn

from aiia_ops.commands.compose import app_environment, env_files, service_key

pytestmark = pytest.mark.docker

TOKEN = "stack-test-token"


@pytest.fixture(scope="module")
def bouncer(containers, postgres_server, rendered):
    svc = postgres_server.stack.services.pgbouncer
    name = containers.run(
        image("pgbouncer"),
        "pgbouncer",
        ip=str(svc.address),
        config_dir=rendered / "pgbouncer",
        memory=svc.memory.limit.bytes,
    )
    wait_healthy(name)
    return name


@pytest.fixture(scope="module")
def redis(containers, net_stack, net_secrets, rendered):
    svc = net_stack.services.redis
    name = containers.run(
        image("redis"),
        "redis",
        ip=str(svc.address),
        env={"REDISCLI_AUTH": net_secrets.redis_password},
        config_dir=rendered / "redis",
        memory=svc.memory.limit.bytes,
    )
    wait_healthy(name)
    return name


def app_env(net_stack, net_secrets, env_name: str, version: str) -> dict[str, str]:
    env = net_stack.environment(env_name)
    return {
        **app_environment(net_stack, env, version),
        **env_files(net_stack, net_secrets)[service_key(env)],
        "API_WRITE_TOKEN": TOKEN,
    }


class App:
    """One app container on the test network, spoken to from inside (docker exec)."""

    def __init__(self, name: str, port: int, domain: str):
        self.name, self.port, self.domain = name, port, domain

    def request(
        self, method: str, path: str, body: dict | None = None, *, raw: bool = False
    ) -> tuple[int, dict, dict]:
        """(status, headers, JSON body) of one request as nginx would forward it (with
        raw=True the body's text, unparsed)."""
        script = (
            "import json, sys, urllib.request, urllib.error\n"
            "method, url, host, token, body = sys.argv[1:6]\n"
            "headers = {'Host': host, 'X-Forwarded-Proto': 'https',\n"
            "           'Authorization': 'Bearer ' + token, 'Content-Type': 'application/json'}\n"
            "req = urllib.request.Request(url, data=body.encode() if body else None,\n"
            "                             method=method, headers=headers)\n"
            "op = urllib.request.build_opener(urllib.request.ProxyHandler({}))\n"
            "try:\n"
            "    r = op.open(req, timeout=15)\n"
            "except urllib.error.HTTPError as e:\n"
            "    r = e\n"
            "print(json.dumps([r.status, dict(r.headers), r.read().decode()]))\n"
        )
        url = f"http://127.0.0.1:{self.port}{path}"
        payload = json.dumps(body) if body is not None else ""
        out = docker(
            "exec", self.name, "python3", "-I", "-c", script,
            method, url, self.domain, TOKEN, payload, timeout=60,
        ).stdout  # fmt: skip
        status, headers, text = json.loads(out)
        if raw:
            return status, headers, text
        return status, headers, json.loads(text) if text else {}

    def health(self) -> tuple[int, dict]:
        status, _, body = self.request("GET", "/health/")
        return status, body


@pytest.fixture(scope="module")
def apps(containers, net_stack, net_secrets, rendered, postgres_server, bouncer, redis):
    """{env name: App}: both environments migrated and serving, as `invoke setup` does."""
    ref = django_image()
    version = f"stack-test-{uuid.uuid4().hex[:6]}"
    pg = net_stack.services.postgresql
    configs = render_gunicorn(net_stack)
    out = {}
    for name, env in net_stack.environments.items():
        config_dir = rendered / f"app-{name}"
        config_dir.mkdir(mode=0o755, exist_ok=True)
        (config_dir / "gunicorn.conf.py").write_text(configs[name])
        (config_dir / "gunicorn.conf.py").chmod(0o644)
        values = app_env(net_stack, net_secrets, name, version)
        storage = {f"aiia-test-storage-{name}-{uuid.uuid4().hex[:6]}": env.volumes["storage"]}
        for command in (["migrate", "--noinput"], ["collectstatic", "--noinput"]):
            migrated = containers.run(
                ref,
                f"{name}-oneoff",
                env={**values, "DB_HOST": str(pg.address), "DB_PORT": str(pg.port)},
                config_dir=config_dir,
                memory=env.memory.limit.bytes,
                volumes=storage,
                args=command,
                detach=False,
                timeout=300,
            )
            assert migrated.returncode == 0, migrated.stdout + migrated.stderr
        container = containers.run(
            ref,
            f"django-{name}",
            ip=str(env.address),
            env=values,
            config_dir=config_dir,
            memory=env.memory.limit.bytes,
            volumes=storage,
        )
        out[name] = App(container, env.port, env.domains[0])
    for app in out.values():
        status, body = _wait_ok(app)
        assert status == 200, body
    return out


def _wait_ok(app: App, timeout: float = 60) -> tuple[int, dict]:
    deadline = time.monotonic() + timeout
    while True:
        try:
            status, body = app.health()
        except Exception as exc:  # not listening yet
            status, body = 0, {"error": str(exc)}
        if status == 200 or time.monotonic() > deadline:
            return status, body
        time.sleep(0.5)


@pytest.mark.parametrize("name", ["prod", "staging"])
def test_health_names_the_real_database_through_pgbouncer(apps, net_stack, name):
    status, body = apps[name].health()
    assert status == 200, body
    assert body["status"] == "ok"
    assert body["environment"] == name
    assert body["version"].startswith("stack-test-")
    assert body["checks"]["database"]["name"] == net_stack.environment(name).database
    assert body["checks"]["cache"]["ok"] is True


def test_the_docker_healthcheck_passes(apps):
    probe = docker("exec", apps["prod"].name, "python3", "-I", "/app/bin/healthcheck", check=False)
    assert probe.returncode == 0, probe.stdout


def test_api_through_pgbouncer_with_the_list_cache_in_redis(apps):
    app = apps["prod"]
    slug = f"course-{uuid.uuid4().hex[:6]}"
    status, headers, body = app.request(
        "POST", "/api/courses/", {"title": "Pooling", "slug": slug, "lessons": [{"title": "L1"}]}
    )
    assert status == 201, body
    assert headers["Location"] == f"/api/courses/{slug}/"

    built = time.monotonic()  # the page is built after this
    first = app.request("GET", "/api/courses/?page_size=5")
    second = app.request("GET", "/api/courses/?page_size=5")
    assert (first[1]["X-Cache"], second[1]["X-Cache"]) == ("miss", "hit")
    assert first[2] == second[2]
    assert first[2]["results"][0]["slug"] == slug

    # The same statement many times over pooled server connections: would fail if psycopg
    # prepared statements (per server connection) behind PgBouncer's transaction pooling.
    for _ in range(12):
        status, _, detail = app.request("GET", f"/api/courses/{slug}/")
        assert status == 200, detail
    assert detail["lessons"] == [{"position": 1, "title": "L1", "body": ""}]

    status, _, body = app.request("POST", "/api/courses/", {"title": "Second", "slug": slug + "-2"})
    assert status == 201, body
    # The page was built less than API_LIST_REBUILD_INTERVAL (1 s) ago: it is answered as it
    # was until then (one rebuild per interval, however many writes), then rebuilt.
    soon = app.request("GET", "/api/courses/?page_size=5")
    if time.monotonic() - built < 1.0:  # else a busy machine took the interval: a rebuild
        assert (soon[1]["X-Cache"], soon[2]) == ("hit", first[2])
    if soon[1]["X-Cache"] == "hit":
        assert soon[2] == first[2]
        time.sleep(1.0)
        after = app.request("GET", "/api/courses/?page_size=5")
    else:
        after = soon  # the interval had passed: this read rebuilt the page
    assert after[1]["X-Cache"] == "miss"
    assert after[2]["results"][0]["slug"] == slug + "-2"

    status, _, body = app.request("POST", "/api/courses/", {"title": "Again", "slug": slug})
    assert status == 400 and "slug" in body["fields"]


def test_cached_answers_are_the_uncached_bytes_and_headers(apps):
    """Issue 17: a hit (answered by aiia/fastpath.py before Django) is the miss' exact bytes
    and headers; the list's raw-SQL rows equal the detail's ORM values on PostgreSQL."""
    app = apps["prod"]
    slug = f"same-{uuid.uuid4().hex[:6]}"
    course = {
        "title": "Bytes ✓",
        "slug": slug,
        "summary": "Ünïcode",
        "lessons": [{"title": "L"}, {"title": "M", "body": "b"}],
    }
    status, _, created = app.request("POST", "/api/courses/", course)
    assert status == 201, created
    for path in (f"/api/courses/{slug}/", "/api/courses/?page_size=3", "/api/courses/?page=1"):
        miss = app.request("GET", path, raw=True)
        hit = app.request("GET", path, raw=True)
        assert (miss[0], miss[1]["X-Cache"], hit[0], hit[1]["X-Cache"]) == (200, "miss", 200, "hit")
        assert hit[2] == miss[2], path
        drop = {"X-Cache", "Date", "Server"}  # Date/Server: gunicorn's, per answer
        assert [h for h in hit[1].items() if h[0] not in drop] == [
            h for h in miss[1].items() if h[0] not in drop
        ], path
    detail = json.loads(app.request("GET", f"/api/courses/{slug}/", raw=True)[2])
    listed = json.loads(app.request("GET", "/api/courses/?page_size=3", raw=True)[2])["results"][0]
    assert {k: listed[k] for k in detail if k != "lessons"} == {
        k: v for k, v in detail.items() if k != "lessons"
    }
    assert listed["lesson_count"] == 2 and detail["created_at"].endswith("+00:00")
    # The write's answer (views._insert: one statement on PostgreSQL, nothing read back) is
    # what the database holds.
    assert created == detail


def test_environments_are_isolated(apps):
    app_prod, app_staging = apps["prod"], apps["staging"]
    slug = f"only-prod-{uuid.uuid4().hex[:6]}"
    assert app_prod.request("POST", "/api/courses/", {"title": "P", "slug": slug})[0] == 201
    assert app_staging.request("GET", f"/api/courses/{slug}/")[0] == 404


def test_survives_a_pgbouncer_restart(apps, bouncer):
    app = apps["prod"]
    assert app.request("GET", "/api/courses/nope/")[0] == 404  # a persistent connection now
    docker("restart", "-t", "5", bouncer, timeout=60)
    wait_healthy(bouncer)
    # CONN_HEALTH_CHECKS: the broken persistent connection is replaced, no 500.
    for _ in range(4):
        status, _, body = app.request("GET", "/api/courses/nope/")
        assert status == 404, body
    assert app.health()[0] == 200


def test_redis_outage_is_503_but_reads_still_served(apps, redis):
    app = apps["prod"]
    docker("stop", "-t", "5", redis, timeout=60)
    try:
        status, body = app.health()
        assert status == 503
        assert body["checks"]["database"]["ok"] is True
        assert body["checks"]["cache"]["ok"] is False
        status, headers, listing = app.request("GET", "/api/courses/")
        assert status == 200, listing
        assert headers["X-Cache"] == "miss"
    finally:
        docker("start", redis, timeout=60)
        wait_healthy(redis)
    assert _wait_ok(app, timeout=30)[0] == 200
