"""CPU of one fast-path cache read in-process: Django's cache + redis-py vs aiia/redisread.py.

    AIIA_STACK=/tmp/perf/stack.yml AIIA_STATE_DIR=/tmp/perf/state \
        PYTHONPATH=src python benchmarks/peek_bench.py --env prod --calls 3000

The host's Python with the app's code (services/django/app) and settings, against the
running stack's Redis (the environment's ACL user and database): `courses.pagecache.peek`
of list page 1 (the entry the app built; run a list read first) N times through each
client, process CPU time per call. No gunicorn, no network hop beyond Redis' bridge.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT), str(ROOT / "services" / "django" / "app")]

from aiia_ops.commands.redis_acl import app_user  # noqa: E402
from aiia_ops.host.secrets import load_secrets  # noqa: E402
from aiia_ops.model import load_stack  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--env", default="prod")
    parser.add_argument("--calls", type=int, default=3000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    stack = load_stack()
    env = stack.environment(args.env)
    state = os.environ.get("AIIA_STATE_DIR")
    if not state:
        sys.exit("peek_bench: set AIIA_STATE_DIR to the stack's state directory")
    secret = load_secrets(Path(state), [env.name], create=False).environments[env.name]
    redis = stack.services.redis
    os.environ.update(
        DJANGO_SETTINGS_MODULE="aiia.settings",
        DJANGO_SECRET_KEY="peek-bench-" + "x" * 40,
        AIIA_ENV=env.name,
        DB_ENGINE="sqlite",
        DB_NAME=":memory:",
        REDIS_HOST=str(redis.address),
        REDIS_PORT=str(redis.port),
        REDIS_DB=str(env.redis_db),
        REDIS_USERNAME=app_user(env),
        REDIS_PASSWORD=secret.redis_password,
    )
    import django

    django.setup()
    from aiia import cache as aiia_cache
    from courses import listcache, pagecache

    lean = aiia_cache.lean_reader()
    if lean[0] is None:
        sys.exit("peek_bench: the settings' cache is not aiia.cache.RedisCache")
    clients = {"django cache + redis-py": (None, None), "aiia/redisread.py": lean}
    got = None
    for name, reader in clients.items():
        aiia_cache._reader = reader
        got = pagecache.peek(listcache.KIND, listcache.GENERATION_KEY, "1:20")  # connect
        if got is None:
            sys.exit("peek_bench: no fresh list page 1 in Redis: read /api/courses/ first")
        best = None
        for _ in range(args.repeat):
            start = time.process_time()
            for _ in range(args.calls):
                pagecache.peek(listcache.KIND, listcache.GENERATION_KEY, "1:20")
            used = (time.process_time() - start) / args.calls * 1e6
            best = used if best is None else min(best, used)
        print(f"{name:<26} {best:7.1f} µs CPU per peek (best of {args.repeat} x {args.calls}, "
              f"{len(got)} bytes)")  # fmt: skip
    print("load average", " ".join(Path("/proc/loadavg").read_text().split()[:3]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
