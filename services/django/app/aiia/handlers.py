"""A lean middleware stack for the JSON API and /health/.

The full stack (settings.MIDDLEWARE) runs sessions, CSRF, auth and messages for every
request; the API and /health/ use none of them (writes are authorised by a bearer token,
the views are CSRF-exempt, nothing reads request.user or messages), and on a cached list
read they were ~11% of the worker's CPU. Requests under /api/ and to /health/ go through
settings.LEAN_MIDDLEWARE instead: SecurityMiddleware (HTTPS redirect, HSTS, nosniff,
Referrer-Policy, COOP), CommonMiddleware (ALLOWED_HOSTS through request.get_host()) and
XFrameOptionsMiddleware, so their answers carry the same headers. Everything else (the
admin) keeps the full stack.
"""

from __future__ import annotations

from django.conf import settings
from django.core.handlers.wsgi import WSGIHandler


def is_lean_path(path: str) -> bool:
    return path.startswith("/api/") or path == "/health/"


class LeanMiddlewareMixin:
    """A handler that loads settings.LEAN_MIDDLEWARE instead of settings.MIDDLEWARE."""

    def load_middleware(self, is_async=False):
        full = settings.MIDDLEWARE
        settings.MIDDLEWARE = settings.LEAN_MIDDLEWARE
        try:
            super().load_middleware(is_async)
        finally:
            settings.MIDDLEWARE = full


class LeanWSGIHandler(LeanMiddlewareMixin, WSGIHandler):
    pass


def dispatching_application(full: WSGIHandler, lean: WSGIHandler):
    """One WSGI callable: the lean handler for the API and /health/, the full one else."""

    def application(environ, start_response):
        handler = lean if is_lean_path(environ.get("PATH_INFO", "")) else full
        return handler(environ, start_response)

    return application
