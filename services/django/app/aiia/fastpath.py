"""The WSGI fast path: a cached course-list page or course detail answered before Django.

On a cache hit the lean stack (aiia/handlers.py) still cost ~0.5 ms of a worker's CPU per
request for work whose answer was already known: the request object, three middleware,
URL resolution, the view, the response object, the request signals
(docs/performance.md, "Issue 17, third pass"). Here a `GET` of

    /api/courses/[?page=N][&page_size=M]      (N, M plain positive integers, M <= 100)
    /api/courses/<slug>/                      (Django's slug converter: [-a-zA-Z0-9_]+)

that arrives over HTTPS (SECURE_PROXY_SSL_HEADER exactly) for a host in ALLOWED_HOSTS is
looked up with ONE Redis MGET (courses/pagecache.peek: the version token and the entry
together) and, when the entry is fresh, answered with the same status, headers (in the
same order) and bytes the view and the lean middleware would send: X-Cache: hit,
Content-Type, X-Frame-Options, Content-Length, HSTS, nosniff, Referrer-Policy, COOP
(tests: FastPathTests compares the two answer for answer). Everything else — a miss, a
stale entry, HEAD, any other query, plain HTTP (Django redirects it), an unknown host
(Django's 400), a write — goes to Django unchanged.

It engages only when the settings are the ones it reproduces (LEAN_MIDDLEWARE as below, no
X-Forwarded-Host, no PREPEND_WWW, no DISALLOWED_USER_AGENTS) and API_FAST_PATH is on. A
Redis error turns it off for OFF_AFTER_ERROR seconds, so a missing Redis costs a request
one timeout (Django's), not two.
"""

from __future__ import annotations

import logging
import re
import time

from django.conf import settings
from django.http.request import split_domain_port, validate_host

log = logging.getLogger("aiia.fastpath")

LIST_PATH = "/api/courses/"
SLUG = re.compile(r"[-a-zA-Z0-9_]+")
NUMBER = re.compile(r"[1-9][0-9]{0,8}")
REPRODUCED_MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]
OFF_AFTER_ERROR = 5.0  # seconds
MAX_KNOWN_HOSTS = 64  # Host headers remembered as allowed (a scanner cannot grow it past)


def _query(qs: str) -> tuple[int, int] | None:
    """(page, page_size) of a plain query, None for anything Django should parse."""
    page, size = 1, 20  # courses.views: PAGE_SIZE_DEFAULT
    seen = set()
    for part in qs.split("&") if qs else ():
        name, eq, value = part.partition("=")
        if not eq or name in seen or name not in ("page", "page_size"):
            return None
        if not NUMBER.fullmatch(value):
            return None
        seen.add(name)
        if name == "page":
            page = int(value)
        else:
            size = int(value)
    return (page, size) if size <= 100 else None  # courses.views: PAGE_SIZE_MAX


class FastPath:
    def __init__(self, app):
        self.app = app
        self.enabled = self.reproducible()
        self.off_until = 0.0
        self.known_hosts: set[str] = set()
        self.headers_after = self._security_headers()

    @staticmethod
    def reproducible() -> bool:
        return (
            getattr(settings, "API_FAST_PATH", False)
            and list(settings.LEAN_MIDDLEWARE) == REPRODUCED_MIDDLEWARE
            and not settings.USE_X_FORWARDED_HOST
            and not settings.PREPEND_WWW
            and not settings.DISALLOWED_USER_AGENTS
            and settings.SECURE_PROXY_SSL_HEADER is not None
        )

    @staticmethod
    def _security_headers() -> list[tuple[str, str]]:
        """What SecurityMiddleware adds to an HTTPS answer (django/middleware/security.py)."""
        out = []
        if settings.SECURE_HSTS_SECONDS:
            sts = f"max-age={settings.SECURE_HSTS_SECONDS}"
            if settings.SECURE_HSTS_INCLUDE_SUBDOMAINS:
                sts += "; includeSubDomains"
            if settings.SECURE_HSTS_PRELOAD:
                sts += "; preload"
            out.append(("Strict-Transport-Security", sts))
        if settings.SECURE_CONTENT_TYPE_NOSNIFF:
            out.append(("X-Content-Type-Options", "nosniff"))
        policy = settings.SECURE_REFERRER_POLICY
        if policy:
            if isinstance(policy, str):
                policy = [v.strip() for v in policy.split(",")]
            out.append(("Referrer-Policy", ",".join(policy)))
        if settings.SECURE_CROSS_ORIGIN_OPENER_POLICY:
            out.append(("Cross-Origin-Opener-Policy", settings.SECURE_CROSS_ORIGIN_OPENER_POLICY))
        return out

    def _host_allowed(self, host: str) -> bool:
        if host in self.known_hosts:
            return True
        domain, _port = split_domain_port(host)
        if not (domain and validate_host(domain, settings.ALLOWED_HOSTS)):
            return False
        if len(self.known_hosts) < MAX_KNOWN_HOSTS:
            self.known_hosts.add(host)
        return True

    def lookup(self, environ) -> bytes | None:
        if environ.get("REQUEST_METHOD") != "GET" or not environ.get("PATH_INFO", "").startswith(
            LIST_PATH
        ):
            return None
        header, secure = settings.SECURE_PROXY_SSL_HEADER
        host = environ.get("HTTP_HOST")
        if environ.get(header) != secure or not host or not self._host_allowed(host):
            return None
        path = environ["PATH_INFO"]
        if path == LIST_PATH:
            query = _query(environ.get("QUERY_STRING", ""))
            if query is None:
                return None
            from courses import listcache

            return listcache.peek_page(*query)
        slug = path[len(LIST_PATH) : -1]
        if not path.endswith("/") or not SLUG.fullmatch(slug) or environ.get("QUERY_STRING"):
            return None
        from courses import detailcache

        return detailcache.peek(slug)

    def __call__(self, environ, start_response):
        body = None
        if self.enabled and time.monotonic() >= self.off_until:
            try:
                body = self.lookup(environ)
            except Exception as exc:
                self.off_until = time.monotonic() + OFF_AFTER_ERROR
                log.warning(
                    "fast path off for %ss: %s: %s", OFF_AFTER_ERROR, type(exc).__name__, exc
                )
        if body is None:
            return self.app(environ, start_response)
        start_response(
            "200 OK",
            [
                ("X-Cache", "hit"),
                ("Content-Type", "application/json"),
                ("X-Frame-Options", settings.X_FRAME_OPTIONS.upper()),
                ("Content-Length", str(len(body))),
                *self.headers_after,
            ],
        )
        return [body]
