"""Settings for the app's own test suite: no PostgreSQL, no Redis, no secret needed.

Everything else (HTTPS redirect, secure cookies, HSTS) stays as in production, so the
tests exercise the production behaviour; the test client talks to the app as nginx does
(X-Forwarded-Proto: https).
"""

import os

os.environ.setdefault("DJANGO_SECRET_KEY", "test-only-not-a-secret-" + "x" * 40)
os.environ.setdefault("AIIA_ENV", "test")
os.environ.setdefault("APP_VERSION", "test")
os.environ.setdefault("DB_ENGINE", "sqlite")
os.environ.setdefault("CACHE_BACKEND", "locmem")
os.environ.setdefault("API_WRITE_TOKEN", "test-token")
os.environ.setdefault("LOG_LEVEL", "CRITICAL")

from .settings import *  # noqa: F403

PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]  # fast tests
STORAGES["staticfiles"]["BACKEND"] = (  # noqa: F405
    "django.contrib.staticfiles.storage.StaticFilesStorage"
)
