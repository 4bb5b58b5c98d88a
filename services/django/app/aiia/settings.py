"""Settings of the AI-IA Django app: every value comes from the environment.

Defaults are the production ones (DEBUG off, HTTPS-only cookies, HSTS, PostgreSQL through
PgBouncer, Redis cache), so a container that is missing a variable fails closed rather
than open. The only variable without a usable default is DJANGO_SECRET_KEY.

Development and tests without PostgreSQL/Redis:
    DJANGO_DEBUG=1 DB_ENGINE=sqlite CACHE_BACKEND=locmem python manage.py runserver
    python manage.py test --settings=aiia.settings_test
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

from django.core.exceptions import ImproperlyConfigured

BASE_DIR = Path(__file__).resolve().parent.parent


def env(name: str, default: str = "") -> str:
    return os.environ.get(name, default).strip()


def env_bool(name: str, default: bool) -> bool:
    value = env(name).lower()
    if not value:
        return default
    if value in {"1", "true", "yes", "on"}:
        return True
    if value in {"0", "false", "no", "off"}:
        return False
    raise ImproperlyConfigured(f"{name} must be a boolean (1/0, true/false), got {value!r}")


def env_int(name: str, default: int) -> int:
    value = env(name)
    if not value:
        return default
    try:
        return int(value)
    except ValueError:
        raise ImproperlyConfigured(f"{name} must be an integer, got {value!r}") from None


def env_float(name: str, default: float) -> float:
    value = env(name)
    if not value:
        return default
    try:
        number = float(value)
    except ValueError:
        number = -1.0
    if not 0 <= number <= 60:
        raise ImproperlyConfigured(f"{name} must be a number of seconds 0-60, got {value!r}")
    return number


def env_list(name: str) -> list[str]:
    return [item.strip() for item in env(name).split(",") if item.strip()]


# --- Identity -------------------------------------------------------------------------

DEBUG = env_bool("DJANGO_DEBUG", False)

AIIA_ENV = env("AIIA_ENV", "prod")
if AIIA_ENV not in {"prod", "staging", "dev", "test"}:
    raise ImproperlyConfigured(f"AIIA_ENV must be prod, staging, dev or test, got {AIIA_ENV!r}")

APP_VERSION = env("APP_VERSION", "unknown")

SECRET_KEY = env("DJANGO_SECRET_KEY")
if not SECRET_KEY:
    if not DEBUG:
        raise ImproperlyConfigured(
            "DJANGO_SECRET_KEY is required (only DJANGO_DEBUG=1 runs with a throwaway key)"
        )
    from django.core.management.utils import get_random_secret_key

    SECRET_KEY = get_random_secret_key()


def _own_names() -> set[str]:
    """Loopback plus this container's hostname and addresses.

    The image's HEALTHCHECK probes http://127.0.0.1:$PORT/health/ and a deploy may probe
    the container's own (standby) address: neither must depend on ALLOWED_HOSTS, which
    lists the public domains only. Resolving our own hostname reads /etc/hosts.
    """
    names = {"localhost", "127.0.0.1", "[::1]"}
    try:
        hostname = socket.gethostname()
        names.add(hostname)
        names.update(socket.gethostbyname_ex(hostname)[2])
    except OSError:
        pass
    return names


ALLOWED_HOSTS = [*env_list("ALLOWED_HOSTS"), *sorted(_own_names())]

# --- Application ----------------------------------------------------------------------

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "courses",
    "migration_safety",
]

# The stock stack minus what a small JSON app behind nginx does not need (no GZip: nginx
# compresses; no Locale: one language). Sessions/auth/messages are what the admin needs.
MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

# /api/ and /health/ (aiia/handlers.py): no sessions, CSRF, auth or messages, which they
# never use; the same security headers and ALLOWED_HOSTS check as the full stack.
LEAN_MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "aiia.urls"
WSGI_APPLICATION = "aiia.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

# --- Database -------------------------------------------------------------------------

DB_ENGINE = env("DB_ENGINE", "postgresql")
if DB_ENGINE == "postgresql":
    _db_name = env("DB_NAME", f"aiia_{AIIA_ENV}")
    DATABASES = {
        "default": {
            "ENGINE": "django.db.backends.postgresql",
            # Normally PgBouncer (transaction pooling); the one-off migrate container
            # points DB_HOST/DB_PORT at PostgreSQL itself.
            "HOST": env("DB_HOST", "172.20.0.5"),
            "PORT": env_int("DB_PORT", 6432),
            "NAME": _db_name,
            "USER": env("DB_USER", _db_name),
            "PASSWORD": env("DB_PASSWORD"),
            # PgBouncer in transaction mode hands each *transaction* to whichever server
            # connection is free, so nothing may outlive a transaction on the server side:
            # - server-side cursors (DECLARE ... WITH HOLD) would be lost -> disabled;
            # - prepared statements are per server connection -> psycopg's automatic
            #   preparation is off (prepare_threshold=None); Django binds client-side anyway;
            # - no session SETs: Django only sets TimeZone, which PgBouncer tracks and
            #   replays per client, and the health check uses SET LOCAL (transaction-scoped).
            # Keeping our *client* connection to PgBouncer open is cheap and saves a TCP +
            # auth round trip per request: 60 s, with a health check before reuse so a
            # PgBouncer restart costs one reconnect instead of a 500.
            "CONN_MAX_AGE": env_int("DB_CONN_MAX_AGE", 60),
            "CONN_HEALTH_CHECKS": True,
            "DISABLE_SERVER_SIDE_CURSORS": True,
            "OPTIONS": {
                "connect_timeout": env_int("DB_CONNECT_TIMEOUT", 3),
                "prepare_threshold": None,
                "application_name": f"aiia-django-{AIIA_ENV}",
                # A database host that vanishes without a reset (power or network cut):
                # unacknowledged data fails after tcp_user_timeout and an idle pooled
                # connection after the keepalive probes (5 + 3 x 2 s), so the request
                # errs in seconds and the next connection goes elsewhere, instead of TCP's
                # ~15 min of retransmits (gunicorn's timeout would kill the worker first).
                "keepalives": 1,
                "keepalives_idle": env_int("DB_KEEPALIVES_IDLE", 5),
                "keepalives_interval": 2,
                "keepalives_count": 3,
                "tcp_user_timeout": env_int("DB_TCP_USER_TIMEOUT_MS", 10000),
            },
        }
    }
    # Level 4: DB_HOST lists every database host's HAProxy; "random" spreads the
    # connections over them (libpq >= 16), so a lost host holds a third of them, not all.
    if env("DB_LOAD_BALANCE_HOSTS", ""):
        DATABASES["default"]["OPTIONS"]["load_balance_hosts"] = env("DB_LOAD_BALANCE_HOSTS")
    # Level 4 (docs/patroni.md): DB_REPLICA_HOST names the read port of the replicated
    # database (HAProxy -> a streaming replica); read-only queries go there through
    # aiia/dbrouter.py, with read-your-writes. Unset: one database, exactly as before.
    _replica_host = env("DB_REPLICA_HOST", "")
    if _replica_host:
        DATABASES["replica"] = {
            **DATABASES["default"],
            "HOST": _replica_host,
            "PORT": env_int("DB_REPLICA_PORT", 5001),
            "OPTIONS": {**DATABASES["default"]["OPTIONS"],
                        "application_name": f"aiia-django-{AIIA_ENV}-replica"},
            "TEST": {"MIRROR": "default"},
        }  # fmt: skip
        DATABASE_ROUTERS = ["aiia.dbrouter.PrimaryReplicaRouter"]
        MIDDLEWARE.insert(0, "aiia.dbrouter.ReadYourWritesMiddleware")
        LEAN_MIDDLEWARE.insert(0, "aiia.dbrouter.ReadYourWritesMiddleware")
elif DB_ENGINE == "sqlite":
    DATABASES = {
        "default": {
            "ENGINE": "django.db.backends.sqlite3",
            "NAME": env("DB_NAME", str(BASE_DIR / "db.sqlite3")),
        }
    }
else:
    raise ImproperlyConfigured(f"DB_ENGINE must be postgresql or sqlite, got {DB_ENGINE!r}")

DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# --- Cache and sessions ---------------------------------------------------------------

CACHE_BACKEND = env("CACHE_BACKEND", "redis")
if CACHE_BACKEND == "redis":
    _redis_db = env_int("REDIS_DB", {"prod": 0, "staging": 1}.get(AIIA_ENV, 0))
    CACHES = {
        "default": {
            # Django's RedisCache, with one client per process (aiia/cache.py).
            "BACKEND": "aiia.cache.RedisCache",
            "LOCATION": f"redis://{env('REDIS_HOST', '172.20.0.7')}:"
            f"{env_int('REDIS_PORT', 6379)}/{_redis_db}",
            # A separate Redis database per environment already isolates them; the prefix
            # makes a mis-set REDIS_DB harmless.
            "KEY_PREFIX": f"aiia:{AIIA_ENV}",
            "TIMEOUT": 300,
            "OPTIONS": {
                # Passed as an option, not in the URL, so no quoting of the password.
                # The environment's own Redis ACL user (db and key prefix fenced in).
                "username": env("REDIS_USERNAME") or None,
                "password": env("REDIS_PASSWORD") or None,
                # Short timeouts: a missing Redis must cost a request at most ~2 s,
                # and redis-py does not retry on a pool given to it (0 retries).
                "socket_connect_timeout": 2,
                "socket_timeout": 2,
                "health_check_interval": 30,
            },
        }
    }
elif CACHE_BACKEND == "locmem":
    CACHES = {
        "default": {
            "BACKEND": "django.core.cache.backends.locmem.LocMemCache",
            "KEY_PREFIX": f"aiia:{AIIA_ENV}",
        }
    }
else:
    raise ImproperlyConfigured(f"CACHE_BACKEND must be redis or locmem, got {CACHE_BACKEND!r}")

# Reads from Redis, writes through to PostgreSQL: Redis runs allkeys-lru with a small
# maxmemory, so a pure cache session could be evicted (a random logout).
SESSION_ENGINE = "django.contrib.sessions.backends.cached_db"

# --- HTTPS behind nginx ---------------------------------------------------------------

# nginx terminates TLS and sets X-Forwarded-Proto itself (overwriting what clients send);
# only nginx can reach the app on the bridge network.
SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
SECURE_SSL_REDIRECT = env_bool("DJANGO_SSL_REDIRECT", not DEBUG)
# The container healthcheck and deploy probes speak plain HTTP to the container.
SECURE_REDIRECT_EXEMPT = [r"^health/$"]
# HSTS belongs to nginx (stack.yml tls.hsts_max_age; it hides the app's header with
# proxy_hide_header). Django's own values only matter if something reaches the app
# without nginx, and they keep `check --deploy` clean.
SECURE_HSTS_SECONDS = env_int("DJANGO_HSTS_SECONDS", 0 if DEBUG else 31536000)
SECURE_HSTS_INCLUDE_SUBDOMAINS = True
SECURE_HSTS_PRELOAD = True
SESSION_COOKIE_SECURE = not DEBUG
CSRF_COOKIE_SECURE = not DEBUG
SESSION_COOKIE_HTTPONLY = True
X_FRAME_OPTIONS = "DENY"
CSRF_TRUSTED_ORIGINS = env_list("CSRF_TRUSTED_ORIGINS")

# Writes to the JSON API need `Authorization: Bearer <API_WRITE_TOKEN>`. Without a token,
# writes are refused (except with DJANGO_DEBUG=1), so a forgotten variable fails closed.
API_WRITE_TOKEN = env("API_WRITE_TOKEN")
# Cached list pages and details answered before Django's request handling (aiia/fastpath.py):
# the same bytes and headers, ~half the CPU of a hit. Off: every request through Django.
API_FAST_PATH = env_bool("API_FAST_PATH", True)
# A course-list page is rebuilt at most once per this many seconds, however often courses
# are written (courses/listcache.py): under a stream of writes, every write used to make
# every page's readers rebuild it. A write shows in every list page at most this long
# after its commit, as nginx's edge cache already allows anonymous readers (stack.yml
# api_cache: 1s). Details are unaffected (a write to a course shows in its detail at once).
# 0: every write rebuilds the pages at once.
API_LIST_REBUILD_INTERVAL = env_float("API_LIST_REBUILD_INTERVAL", 1.0)

# --- Passwords ------------------------------------------------------------------------

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]

# --- Internationalisation -------------------------------------------------------------

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = False  # one language: no translation catalogs loaded per worker
USE_TZ = True

# --- Static and media: collected into STORAGE_DIR, served by nginx --------------------

STORAGE_DIR = Path(env("STORAGE_DIR", "/app/storage"))
STATIC_URL = "/static/"
STATIC_ROOT = STORAGE_DIR / "static"
MEDIA_URL = "/media/"
MEDIA_ROOT = STORAGE_DIR / "media"
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    # Hashed names: nginx may cache static files for 30 days.
    "staticfiles": {
        # + FILE.gz beside each text file, for nginx's gzip_static (aiia/storage.py).
        "BACKEND": "aiia.storage.GzipManifestStaticFilesStorage"
        if not DEBUG
        else "django.contrib.staticfiles.storage.StaticFilesStorage"
    },
}

# --- Logging: one line per record on stdout (docker logs) -----------------------------

LOG_LEVEL = env("LOG_LEVEL", "INFO").upper()
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {
        "line": {"format": "%(asctime)s %(levelname)s %(process)d %(name)s: %(message)s"},
    },
    # 4xx answers at INFO, at most 10 lines a minute per process (aiia/logfilters.py).
    "filters": {"client_errors": {"()": "aiia.logfilters.ClientErrorFilter"}},
    "handlers": {
        "stdout": {
            "class": "logging.StreamHandler",
            "stream": "ext://sys.stdout",
            "formatter": "line",
            "filters": ["client_errors"],
        },
    },
    "root": {"handlers": ["stdout"], "level": LOG_LEVEL},
    "loggers": {
        # Replaces Django's default (console only when DEBUG, mail_admins otherwise).
        "django": {"handlers": ["stdout"], "level": LOG_LEVEL, "propagate": False},
    },
}
