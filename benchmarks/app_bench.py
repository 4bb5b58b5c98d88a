"""Per-request CPU of the Django app's hot paths, against a running stack (issue 17).

    AIIA_STACK=/tmp/perf/stack.yml AIIA_STATE_DIR=/tmp/perf/state \
        PYTHONPATH=src python benchmarks/app_bench.py --env prod --requests 2000

Talks HTTP straight to the environment's gunicorn container on the stack's bridge network
(as nginx does: Host = the environment's domain, X-Forwarded-Proto: https), so nginx's
TLS and edge cache are not measured; the app runs against the stack's real PostgreSQL
(through PgBouncer) and Redis. For each path: a warm-up, then N requests from C
keep-alive connections; the container's CPU is read from its cgroup (cpuacct.usage,
cgroup v1, or cpu.stat on v2) before and after, so "CPU ms/request" is everything the
container spent (gunicorn, Django, psycopg, redis-py), divided by N.

Paths: health (GET /health/: database + Redis probes), list-hit (GET /api/courses/,
served from the Redis-cached bytes), list-miss (the same after the list's generation key
was deleted in Redis: every request rebuilds page 1 from the database, one connection so
no request is answered another's stale copy), detail (GET /api/courses/<slug>/: cached
per course since issue 17, two queries before), detail-miss (the same after that course's
version key was deleted: two queries), write (POST /api/courses/ with two lessons, a
unique slug each time), mix (the `app` load test's mix: 60% list pages 1-3, 36% detail,
1% health, 3% writes, so what a write costs the list's readers is in it). The database's
and Redis' CPU per request (their containers' cgroups, same counters) are reported beside
the app's: a list miss is mostly PostgreSQL.

The writes stay in the database: run it on a throwaway isolated stack
(tests/stackfiles.py write_isolated_stack); it refuses the committed stack's project.
Prints one JSON line per path and a table; --json FILE writes them all.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT)]

from aiia_ops.commands.redis_acl import app_user  # noqa: E402
from aiia_ops.host.secrets import load_secrets  # noqa: E402
from aiia_ops.model import load_stack  # noqa: E402

DETAIL_SLUG = "bench-detail-course"


def docker(*args: str) -> str:
    return subprocess.run(["docker", *args], capture_output=True, text=True, check=True).stdout


def container_facts(name: str) -> tuple[str, str]:
    """(full id, IPv4 address) of a running container."""
    fmt = "{{.Id}} {{range .NetworkSettings.Networks}}{{.IPAddress}} {{end}}"
    out = docker("inspect", "-f", fmt, name)
    cid, address, *_ = out.split()
    return cid, address


def cpu_ns(cid: str) -> int:
    for path in (
        f"/sys/fs/cgroup/cpuacct/docker/{cid}/cpuacct.usage",
        f"/sys/fs/cgroup/cpu,cpuacct/docker/{cid}/cpuacct.usage",
    ):
        if os.path.exists(path):
            return int(Path(path).read_text())
    for path in (f"/sys/fs/cgroup/system.slice/docker-{cid}.scope/cpu.stat",
                 f"/sys/fs/cgroup/docker/{cid}/cpu.stat"):  # fmt: skip
        if os.path.exists(path):
            stats = dict(line.split() for line in Path(path).read_text().splitlines())
            return int(stats["usage_usec"]) * 1000
    sys.exit(f"app_bench: no cgroup CPU counter found for container {cid[:12]}")


class Target:
    def __init__(self, address: str, port: int, domain: str, token: str):
        self.address, self.port, self.domain, self.token = address, port, domain, token

    def connect(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection(self.address, self.port, timeout=30)

    def request(self, conn, method: str, path: str, body: bytes | None = None) -> tuple[int, bytes]:
        headers = {"Host": self.domain, "X-Forwarded-Proto": "https"}
        if body is not None:
            headers |= {"Content-Type": "application/json", "Authorization": f"Bearer {self.token}"}
        conn.request(method, path, body=body, headers=headers)
        resp = conn.getresponse()
        return resp.status, resp.read(), resp.getheader("X-Cache", "-")


def course(slug: str) -> bytes:
    lessons = [{"title": f"Lesson {i}", "body": "Body text. " * 20} for i in (1, 2)]
    return json.dumps({"title": f"Course {slug}", "slug": slug, "summary": "S" * 200,
                       "lessons": lessons}).encode()  # fmt: skip


PATHS = {
    "health": lambda i: ("GET", "/health/", None, 200),
    "list-hit": lambda i: ("GET", "/api/courses/", None, 200),
    "list-miss": lambda i: ("GET", "/api/courses/", None, 200),
    "detail": lambda i: ("GET", f"/api/courses/{DETAIL_SLUG}/", None, 200),
    "detail-miss": lambda i: ("GET", f"/api/courses/{DETAIL_SLUG}/", None, 200),
    "write": lambda i: ("POST", "/api/courses/", course(f"bench-{uuid.uuid4().hex[:16]}"), 201),
    "mix": lambda i: _mix(i),
}


def _mix(i: int) -> tuple:
    """The `app` load test scenario's mix (commands/loadtest.py), in every 100 requests:
    60 list reads (pages 1-3), 36 details, 1 /health/, 3 writes."""
    k = i % 100
    if k in (1, 33, 66):
        return PATHS["write"](i)
    if k == 3:
        return PATHS["health"](i)
    if k % 5 in (1, 3):  # 40 of the 100, less the 4 above
        return PATHS["detail"](i)
    return ("GET", f"/api/courses/?page={1 + k % 3}", None, 200)


# Deleted in Redis before each request of a *-miss path (Django's key: prefix:version:key).
# The list's entry too: a page built less than API_LIST_REBUILD_INTERVAL ago is answered
# whatever its generation (fifth pass), so only a page with no entry is a miss every time.
MISS_KEYS = {
    "list-miss": ("courses:list:generation", "courses:list:entry:1:20"),
    "detail-miss": (f"courses:detail:version:{DETAIL_SLUG}",),
}


def run_path(target: Target, cids: dict, name: str, n: int, concurrency: int, warmup: int,
             before_each=None) -> dict:  # fmt: skip
    make = PATHS[name]
    if before_each is not None:
        concurrency = 1  # each request a real miss, never another one's stale copy
    caches: dict[str, int] = {}
    counter = iter(range(n))
    lock = threading.Lock()
    errors: list[str] = []

    def worker(count: int | None):
        conn = target.connect()
        try:
            while True:
                if count is not None:
                    if count <= 0:
                        return
                    count -= 1
                    i = 0
                else:
                    with lock:
                        i = next(counter, None)
                    if i is None:
                        return
                method, path, body, want = make(i)
                if before_each is not None:
                    before_each()
                status, data, how = target.request(conn, method, path, body)
                caches[how] = caches.get(how, 0) + 1
                if status != want:
                    errors.append(f"{method} {path}: {status} {data[:120]!r}")
        finally:
            conn.close()

    worker(warmup)  # caches filled, connections open, code paths warm
    caches.clear()
    before, start = {k: cpu_ns(c) for k, c in cids.items()}, time.perf_counter()
    threads = [threading.Thread(target=worker, args=(None,)) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    used = {k: cpu_ns(c) - before[k] for k, c in cids.items()}
    cpu = used["app"]
    return {
        "path": name,
        "requests": n,
        "concurrency": concurrency,
        "errors": len(errors),
        "first_error": errors[0] if errors else None,
        "cpu_ms_per_request": round(cpu / n / 1e6, 3),
        "requests_per_s": round(n / wall, 1),
        "cpu_cores": round(cpu / 1e9 / wall, 2),
        "db_cpu_ms_per_request": round((used["postgresql"] + used["pgbouncer"]) / n / 1e6, 3),
        "redis_cpu_ms_per_request": round(used["redis"] / n / 1e6, 3),
        "x_cache": caches,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--env", default="prod")
    parser.add_argument("--requests", type=int, default=2000, help="per path")
    parser.add_argument("--concurrency", type=int, default=8, help="keep-alive connections")
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--paths", default=",".join(PATHS))
    parser.add_argument("--repeat", type=int, default=1, help="runs per path (the best is kept)")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()

    stack = load_stack()
    from tests.stackfiles import committed_project

    if stack.project == committed_project():
        sys.exit("app_bench: its writes stay in the database; run it on an isolated stack "
                 "(AIIA_STACK=..., tests/stackfiles.py write_isolated_stack)")  # fmt: skip
    env = stack.environment(args.env)
    state = os.environ.get("AIIA_STATE_DIR")
    if not state:
        sys.exit("app_bench: set AIIA_STATE_DIR to the stack's state directory (its token)")
    token = load_secrets(Path(state), [env.name], create=False).environments[env.name]
    cid, address = container_facts(env.container)
    target = Target(address, env.port, env.domains[0], token.api_write_token)
    svc = stack.services
    cids = {"app": cid}
    for key, service in (("postgresql", svc.postgresql), ("pgbouncer", svc.pgbouncer),
                         ("redis", svc.redis)):  # fmt: skip
        cids[key] = container_facts(service.container)[0]
    import redis

    rc = redis.Redis(host=container_facts(svc.redis.container)[1], port=svc.redis.port,
                     db=env.redis_db, username=app_user(env),
                     password=token.redis_password)  # fmt: skip
    prefix = f"aiia:{env.name}:1:"

    conn = target.connect()  # the course the detail reads, once
    status, body, _ = target.request(conn, "GET", f"/api/courses/{DETAIL_SLUG}/")
    if status == 404:
        status, body, _ = target.request(conn, "POST", "/api/courses/", course(DETAIL_SLUG))
        if status != 201:
            sys.exit(f"app_bench: could not create {DETAIL_SLUG}: {status} {body[:200]!r}")
    conn.close()

    version = docker("inspect", "-f", "{{.Config.Image}}", env.container).strip()
    results = []
    for name in args.paths.split(","):
        keys = [prefix + key for key in MISS_KEYS.get(name, ())]
        before_each = (lambda k=keys: rc.delete(*k)) if keys else None
        runs = [run_path(target, cids, name, args.requests, args.concurrency, args.warmup,
                         before_each) for _ in range(args.repeat)]  # fmt: skip
        best = min(runs, key=lambda r: r["cpu_ms_per_request"])
        best |= {"image": version, "loadavg": Path("/proc/loadavg").read_text().split()[:3],
                 "all_cpu_ms": [r["cpu_ms_per_request"] for r in runs]}  # fmt: skip
        results.append(best)
        print(json.dumps(best), flush=True)
    print(f"\n{'path':<12} {'CPU ms/req':>10} {'DB ms/req':>9} {'Redis':>6} {'req/s':>8} "
          f"{'cores':>6} {'errors':>6}  X-Cache")  # fmt: skip
    for r in results:
        print(f"{r['path']:<12} {r['cpu_ms_per_request']:>10.3f} "
              f"{r['db_cpu_ms_per_request']:>9.3f} {r['redis_cpu_ms_per_request']:>6.3f} "
              f"{r['requests_per_s']:>8.1f} {r['cpu_cores']:>6.2f} {r['errors']:>6}  "
              f"{r['x_cache']}")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 1 if any(r["errors"] for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
