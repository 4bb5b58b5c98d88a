"""Settings for the app's own test suite: no PostgreSQL, no Redis, no secret needed.

Everything else (HTTPS redirect, secure cookies, HSTS) stays as in production, so the
tests exercise the production behaviour; the test client talks to the app as nginx does
(X-Forwarded-Proto: https).
"""

import os

# Set, not defaulted: the suite must behave the same wherever it runs (host, CI, or inside
# a container that carries production variables).
os.environ.update(
    DJANGO_SECRET_KEY="test-only-not-a-secret-" + "x" * 40,
    DJANGO_DEBUG="0",
    AIIA_ENV="test",
    APP_VERSION="test",
    DB_ENGINE="sqlite",
    DB_NAME=":memory:",
    CACHE_BACKEND="locmem",
    API_WRITE_TOKEN="test-token",
    ALLOWED_HOSTS="",
    DJANGO_SSL_REDIRECT="1",
    DJANGO_HSTS_SECONDS="31536000",
    LOG_LEVEL="CRITICAL",
)

from .settings import *  # noqa: F403

PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]  # fast tests
STORAGES["staticfiles"]["BACKEND"] = (  # noqa: F405
    "django.contrib.staticfiles.storage.StaticFilesStorage"
)

# The suite checks every write's effect on the list at once; CoalescedRebuildTests set the
# production interval (settings.py) and check what it changes.
API_LIST_REBUILD_INTERVAL = 0.0
