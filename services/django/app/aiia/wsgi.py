"""WSGI entry point: `gunicorn aiia.wsgi`."""

import os

from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "aiia.settings")

from aiia.fastpath import FastPath
from aiia.handlers import LeanWSGIHandler, dispatching_application

# /api/ and /health/ through settings.LEAN_MIDDLEWARE, the rest (admin) the full stack;
# before both, cached list pages and details answered from one Redis MGET (aiia/fastpath.py).
application = FastPath(dispatching_application(get_wsgi_application(), LeanWSGIHandler()))


def _warm_up() -> None:
    """Import now what the first requests would import later (no connection is opened).

    With gunicorn's preload_app this runs once in the master, so the workers share these
    modules copy-on-write instead of each importing its own copy on its first request.
    """
    import redis  # noqa: F401  (the cache backend imports it lazily)
    from courses import detailcache, listcache  # noqa: F401  (the fast path's lookups)
    from django.db import connections
    from django.urls import get_resolver

    connections["default"].ops  # noqa: B018  (imports the database backend and driver)
    get_resolver().url_patterns  # noqa: B018  (imports the URLconf and every view)


_warm_up()
