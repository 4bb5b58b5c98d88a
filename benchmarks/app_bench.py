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
served from the Redis-cached bytes), detail (GET /api/courses/<slug>/: two queries),
write (POST /api/courses/ with two lessons, a unique slug each time).

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
        return resp.status, resp.read()


def course(slug: str) -> bytes:
    lessons = [{"title": f"Lesson {i}", "body": "Body text. " * 20} for i in (1, 2)]
    return json.dumps({"title": f"Course {slug}", "slug": slug, "summary": "S" * 200,
                       "lessons": lessons}).encode()  # fmt: skip


PATHS = {
    "health": lambda i: ("GET", "/health/", None, 200),
    "list-hit": lambda i: ("GET", "/api/courses/", None, 200),
    "detail": lambda i: ("GET", f"/api/courses/{DETAIL_SLUG}/", None, 200),
    "write": lambda i: ("POST", "/api/courses/", course(f"bench-{uuid.uuid4().hex[:16]}"), 201),
}


def run_path(target: Target, cid: str, name: str, n: int, concurrency: int, warmup: int) -> dict:
    make = PATHS[name]
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
                status, data = target.request(conn, method, path, body)
                if status != want:
                    errors.append(f"{method} {path}: {status} {data[:120]!r}")
        finally:
            conn.close()

    worker(warmup)  # caches filled, connections open, code paths warm
    before, start = cpu_ns(cid), time.perf_counter()
    threads = [threading.Thread(target=worker, args=(None,)) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall, cpu = time.perf_counter() - start, cpu_ns(cid) - before
    return {
        "path": name,
        "requests": n,
        "concurrency": concurrency,
        "errors": len(errors),
        "first_error": errors[0] if errors else None,
        "cpu_ms_per_request": round(cpu / n / 1e6, 3),
        "requests_per_s": round(n / wall, 1),
        "cpu_cores": round(cpu / 1e9 / wall, 2),
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

    conn = target.connect()  # the course the detail reads, once
    status, body = target.request(conn, "GET", f"/api/courses/{DETAIL_SLUG}/")
    if status == 404:
        status, body = target.request(conn, "POST", "/api/courses/", course(DETAIL_SLUG))
        if status != 201:
            sys.exit(f"app_bench: could not create {DETAIL_SLUG}: {status} {body[:200]!r}")
    conn.close()

    version = docker("inspect", "-f", "{{.Config.Image}}", env.container).strip()
    results = []
    for name in args.paths.split(","):
        runs = [run_path(target, cid, name, args.requests, args.concurrency, args.warmup)
                for _ in range(args.repeat)]  # fmt: skip
        best = min(runs, key=lambda r: r["cpu_ms_per_request"])
        best |= {"image": version, "loadavg": Path("/proc/loadavg").read_text().split()[:3],
                 "all_cpu_ms": [r["cpu_ms_per_request"] for r in runs]}  # fmt: skip
        results.append(best)
        print(json.dumps(best), flush=True)
    print(f"\n{'path':<10} {'CPU ms/req':>10} {'req/s':>8} {'cores':>6} {'errors':>6}")
    for r in results:
        print(f"{r['path']:<10} {r['cpu_ms_per_request']:>10.3f} {r['requests_per_s']:>8.1f} "
              f"{r['cpu_cores']:>6.2f} {r['errors']:>6}")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 1 if any(r["errors"] for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
