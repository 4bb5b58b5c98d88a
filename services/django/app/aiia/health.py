"""GET /health/: is this process able to serve? Used by the image's HEALTHCHECK and deploys.

200 {"status": "ok", ...} when PostgreSQL (through PgBouncer) and Redis both answer,
503 {"status": "error", ...} otherwise. The body never carries exception text (it may
name internal addresses); the full error goes to the log.

Each dependency is probed in its own long-lived helper thread and waited for with a
deadline (HEALTH_TIMEOUT, default 5 s, well inside the 10 s Docker timeout). That bounds
the answer even when a probe blocks somewhere no client timeout reaches, such as a query
queued inside PgBouncer behind a full pool. Requests that arrive while a probe is in flight share
its result instead of queueing another: under load, /health/ costs one probe at a time.
"""

from __future__ import annotations

import logging
import os
import queue
import socket
import threading
import time
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout

from django.conf import settings
from django.core.cache import cache
from django.db import connections, transaction
from django.http import HttpRequest, JsonResponse
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_safe

log = logging.getLogger(__name__)

HEALTH_TIMEOUT = float(os.environ.get("HEALTH_TIMEOUT", "5"))


def query_database() -> str:
    """Name of the database actually connected to (through PgBouncer: the real one)."""
    conn = connections["default"]
    # This thread serves no requests, so do what request_started does for a request
    # thread: drop the connection if it is broken or older than CONN_MAX_AGE.
    conn.close_if_unusable_or_obsolete()
    try:
        with transaction.atomic(using="default"), conn.cursor() as cursor:
            if conn.vendor == "postgresql":
                # SET LOCAL ends with the transaction: safe with PgBouncer's pooling.
                cursor.execute("SET LOCAL statement_timeout = '2s'")
                cursor.execute("SELECT current_database()")
                return cursor.fetchone()[0]
            cursor.execute("SELECT 1")
            return str(conn.settings_dict["NAME"])
    except Exception:
        conn.close()  # reconnect next time rather than reuse a broken connection
        raise


def query_cache() -> str:
    """Write and read back a key: proves Redis is reachable, authenticated and writable.

    The key is this process's own: its container's host name (the container id) and pid.
    A pid alone is not: the app containers of one environment share a Redis, and each
    container numbers its gunicorn workers alike (pid 20, 21 ...), so at level 3 (several
    instances) two workers wrote one key and read back each other's value (503s)."""
    key = f"health:{socket.gethostname()}:{os.getpid()}"
    token = str(time.time_ns())
    cache.set(key, token, 30)
    if cache.get(key) != token:
        raise RuntimeError("cache did not return the value just written")
    return settings.CACHES["default"]["BACKEND"].rsplit(".", 1)[-1]


class _Probe:
    """One dependency check served by its own daemon thread (one per process, made lazily).

    A daemon thread, not a ThreadPoolExecutor: a probe stuck in a blocking call must not
    hold up the worker's exit. The thread keeps its own (thread-local) DB connection and
    cache client between checks.
    """

    def __init__(self, name: str, func, detail_key: str):
        self.name = name
        self.func = func
        self.detail_key = detail_key
        self._queue: queue.SimpleQueue | None = None
        self._pid = 0
        self._pending: Future | None = None
        self._lock = threading.Lock()

    def submit(self) -> Future:
        with self._lock:
            # Started after gunicorn forks (threads do not survive a fork).
            if self._queue is None or self._pid != os.getpid():
                self._queue = queue.SimpleQueue()
                self._pid = os.getpid()
                self._pending = None
                threading.Thread(
                    target=self._serve, args=(self._queue,), name=f"health-{self.name}", daemon=True
                ).start()
            if self._pending is not None and not self._pending.done():
                # Overlapping requests share the probe in flight (bounded: one per process)
                # and each waits for it until its own deadline.
                return self._pending
            self._pending = Future()
            self._queue.put(self._pending)
            return self._pending

    def _serve(self, requests: queue.SimpleQueue) -> None:
        while True:
            future = requests.get()
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(self._timed())
            except BaseException as exc:
                future.set_exception(exc)

    def _timed(self) -> tuple[str, float]:
        start = time.monotonic()
        detail = self.func()
        return detail, (time.monotonic() - start) * 1000

    def result(self, future: Future, deadline: float) -> dict:
        try:
            detail, ms = future.result(timeout=max(0.0, deadline - time.monotonic()))
        except FutureTimeout:
            log.warning("health: %s check timed out", self.name)
            return {"ok": False, "error": "timeout"}
        except Exception as exc:
            log.warning("health: %s check failed: %s: %s", self.name, type(exc).__name__, exc)
            return {"ok": False, "error": type(exc).__name__}
        return {"ok": True, self.detail_key: detail, "latency_ms": round(ms, 1)}


# Lambdas look the functions up at call time, so tests can patch them.
PROBES = (
    _Probe("database", lambda: query_database(), "name"),
    _Probe("cache", lambda: query_cache(), "backend"),
)


@never_cache
@require_safe
def health(request: HttpRequest) -> JsonResponse:
    deadline = time.monotonic() + HEALTH_TIMEOUT
    futures = [(probe, probe.submit()) for probe in PROBES]
    checks = {probe.name: probe.result(future, deadline) for probe, future in futures}
    ok = all(check["ok"] for check in checks.values())
    body = {
        "status": "ok" if ok else "error",
        "version": settings.APP_VERSION,
        "environment": settings.AIIA_ENV,
        "checks": checks,
    }
    return JsonResponse(body, status=200 if ok else 503)
