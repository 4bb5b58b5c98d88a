"""A bounded HTTPS load on the lab's load balancer (10.77.0.11:443) from this machine, that
keeps every request's outcome with its time: failures are counted, and the failure window
(first to last failed request) is measured, not guessed.

A client is one keep-alive connection sending GETs back to back (no think time). A GET on
a keep-alive connection that the server closed while it went out (nginx's old workers do
on a graceful reload) is retried once on a new connection, like a browser does, and
counted apart (`retried`); every other error or non-2xx answer is a failure.
Targets: only the lab's addresses (10.77.0.x) and 127.0.0.1.
"""

from __future__ import annotations

import http.client
import socket
import ssl
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

# The API reads users make. nginx caches anonymous API reads (api_cache); a session cookie
# (an unknown one: Django treats the request as anonymous) bypasses that cache, so every
# request reaches an app instance. Static files are not served by lb1 at level 3 (they
# live on the app hosts' storage: the CDN's origin), so they are not loaded here.
APP_PATHS = ("/api/courses/", "/api/courses/?page=1")
BYPASS_CACHE = {"Cookie": "sessionid=lab3-load"}


def _allowed(address: str) -> None:
    if not (address == "127.0.0.1" or address.startswith("10.77.0.")):
        raise ValueError(f"load only goes to 127.0.0.1 or the lab (10.77.0.x), not {address}")


@dataclass
class Event:
    t: float  # time.monotonic() when the request ended
    outcome: str  # "200", "503", "ConnectionRefusedError" ...
    seconds: float


@dataclass
class Load:
    address: str
    domain: str
    port: int = 443
    clients: int = 50
    paths: tuple[str, ...] = APP_PATHS
    headers: dict = field(default_factory=lambda: dict(BYPASS_CACHE))
    max_seconds: float = 600
    timeout: float = 30
    events: list[Event] = field(default_factory=list)
    retried: int = 0

    def __post_init__(self):
        _allowed(self.address)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self.started = self.ended = 0.0

    def _connect(self) -> http.client.HTTPSConnection:
        ctx = ssl.create_default_context()
        ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
        conn = http.client.HTTPSConnection(self.address, self.port, timeout=self.timeout)
        raw = socket.create_connection((self.address, self.port), self.timeout)
        conn.sock = ctx.wrap_socket(raw, server_hostname=self.domain)
        return conn

    def _get(self, conn, path: str) -> int:
        conn.request("GET", path, headers={"Host": self.domain, **self.headers})
        resp = conn.getresponse()
        resp.read()
        if resp.getheader("Connection", "").lower() == "close":
            conn.close()
            raise _Closed(resp.status)
        return resp.status

    def _record(self, outcome: str, began: float) -> None:
        now = time.monotonic()
        with self._lock:
            self.events.append(Event(now, outcome, now - began))

    def _client(self, n: int) -> None:
        deadline = time.monotonic() + self.max_seconds
        conn, i = None, n
        while not self._stop.is_set() and time.monotonic() < deadline:
            path = self.paths[i % len(self.paths)]
            i += 1
            began = time.monotonic()
            try:
                if conn is None:
                    conn = self._connect()
                    status = self._get(conn, path)
                else:
                    try:
                        status = self._get(conn, path)
                    except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
                        conn.close()
                        with self._lock:
                            self.retried += 1
                        conn = self._connect()
                        status = self._get(conn, path)
                self._record(str(status), began)
            except _Closed as closed:
                self._record(str(closed.status), began)
                conn = None
            except (OSError, http.client.HTTPException) as exc:
                self._record(exc.__class__.__name__, began)
                if conn:
                    conn.close()
                conn = None
                time.sleep(0.05)
        if conn:
            conn.close()

    def __enter__(self) -> Load:
        self.started = time.monotonic()
        for n in range(self.clients):
            t = threading.Thread(target=self._client, args=(n,), daemon=True)
            t.start()
            self._threads.append(t)
        time.sleep(1)
        return self

    def __exit__(self, *exc) -> None:
        time.sleep(1)
        self._stop.set()
        for t in self._threads:
            t.join(timeout=self.timeout + 10)
        self.ended = time.monotonic()

    # -- what it saw --------------------------------------------------------------------

    @property
    def total(self) -> int:
        return len(self.events)

    @property
    def outcomes(self) -> Counter:
        return Counter(e.outcome for e in self.events)

    def failed(self) -> list[Event]:
        return [e for e in self.events if not e.outcome.startswith("2")]

    def failures(self) -> dict[str, int]:
        return dict(Counter(e.outcome for e in self.failed()))

    def failure_window(self) -> float:
        """Seconds from the first failed request to the last (0 when none failed)."""
        bad = self.failed()
        if not bad:
            return 0.0
        return max(e.t for e in bad) - min(e.t - e.seconds for e in bad)

    def slowest(self, since: float = 0.0) -> float:
        return max((e.seconds for e in self.events if e.t >= since), default=0.0)

    def throughput(self) -> float:
        span = (self.ended or time.monotonic()) - self.started
        return self.total / span if span > 0 else 0.0

    def p95(self) -> float:
        ok = sorted(e.seconds for e in self.events if e.outcome.startswith("2"))
        return ok[min(len(ok) - 1, int(0.95 * len(ok)))] if ok else 0.0

    def summary(self) -> dict:
        return {
            "requests": self.total,
            "outcomes": dict(self.outcomes),
            "retried": self.retried,
            "failure_window_s": round(self.failure_window(), 2),
            "slowest_s": round(self.slowest(), 2),
        }


class _Closed(Exception):
    def __init__(self, status: int):
        self.status = status
