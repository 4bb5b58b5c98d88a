"""Reads to a replica, writes to the primary, and read-your-writes (level 4: docs/patroni.md).

On when DB_REPLICA_HOST is set (settings.py then adds the `replica` database: HAProxy's read
port, which sends each connection to a streaming replica within the lag limit). Off, the
router answers None everywhere and every query goes to `default` exactly as before.

Read-your-writes, because a replica may be up to `replica_max_lag` behind:
- within a request: once anything is written (or the method is not GET/HEAD/OPTIONS),
  every later read of that request goes to the primary;
- across requests: a response to such a request sets a short cookie (DB_STICKY_SECONDS,
  default 5 s: far above the lag measured on the lab, milliseconds) and requests carrying
  it read from the primary, so the page after a POST shows what was just written.
The pin lives in a context variable, reset at the start of every request by the middleware
(gthread workers reuse threads between requests).
"""

from __future__ import annotations

import contextvars
import os

from django.conf import settings

REPLICA = "replica"
PRIMARY = "default"
COOKIE = "aiia_rw"
STICKY_SECONDS = int(os.environ.get("DB_STICKY_SECONDS", "5"))
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})

_pinned: contextvars.ContextVar[bool] = contextvars.ContextVar("aiia_db_pinned", default=False)
_wrote: contextvars.ContextVar[bool] = contextvars.ContextVar("aiia_db_wrote", default=False)


def replica_enabled() -> bool:
    return REPLICA in settings.DATABASES


def pin() -> None:
    """Send every further read of this request (and of the sticky window) to the primary."""
    _pinned.set(True)


def pinned() -> bool:
    return _pinned.get()


class PrimaryReplicaRouter:
    """settings.DATABASE_ROUTERS entry: reads -> replica unless pinned, writes -> primary."""

    def db_for_read(self, model, **hints):
        if not replica_enabled() or pinned():
            return PRIMARY if replica_enabled() else None
        return REPLICA

    def db_for_write(self, model, **hints):
        if not replica_enabled():
            return None
        pin()
        _wrote.set(True)
        return PRIMARY

    def allow_relation(self, obj1, obj2, **hints):
        return True  # one database, two ways in

    def allow_migrate(self, db, app_label, model_name=None, **hints):
        return db == PRIMARY  # the replica follows the primary's schema by replication


class ReadYourWritesMiddleware:
    """First in settings.MIDDLEWARE and LEAN_MIDDLEWARE when the replica is on."""

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        unsafe = request.method not in SAFE_METHODS
        pinned_token = _pinned.set(unsafe or COOKIE in request.COOKIES)
        wrote_token = _wrote.set(False)
        try:
            response = self.get_response(request)
            if unsafe or _wrote.get():
                response.set_cookie(COOKIE, "1", max_age=STICKY_SECONDS, secure=True,
                                    httponly=True, samesite="Lax")  # fmt: skip
            return response
        finally:
            _pinned.reset(pinned_token)
            _wrote.reset(wrote_token)
