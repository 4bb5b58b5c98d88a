"""The hot read: pages of the course list, cached in Redis as ready-made JSON bytes.

Invalidation by generation: every page key contains the current generation token (a
random value under one key). A write replaces the token, so pages of the old generation
are never read again and expire after PAGE_TIMEOUT. A random token rather than a counter:
if Redis (allkeys-lru) evicts the generation key, the fresh token cannot collide with
pages cached under an earlier one.

QuerySet.update()/delete() send no signals: call invalidate() after them (PAGE_TIMEOUT
bounds the staleness anyway). Redis failures degrade to "no cache": logged once per
request, the page is built from the database.
"""

from __future__ import annotations

import logging
import secrets

from django.core.cache import cache

log = logging.getLogger(__name__)

GENERATION_KEY = "courses:list:generation"
PAGE_TIMEOUT = 300


def _new_token() -> str:
    return secrets.token_hex(8)


def generation() -> str | None:
    """The current generation token, or None when the cache cannot be used."""
    try:
        token = cache.get(GENERATION_KEY)
        if token is None:
            cache.add(GENERATION_KEY, _new_token(), timeout=None)  # add: first writer wins
            token = cache.get(GENERATION_KEY)
        return token
    except Exception as exc:
        log.warning("course list cache unavailable: %s: %s", type(exc).__name__, exc)
        return None


def page_key(token: str, page: int, size: int) -> str:
    return f"courses:list:{token}:{page}:{size}"


def get_page(token: str, page: int, size: int) -> bytes | None:
    try:
        return cache.get(page_key(token, page, size))
    except Exception as exc:
        log.warning("course list cache read failed: %s: %s", type(exc).__name__, exc)
        return None


def put_page(token: str, page: int, size: int, body: bytes) -> None:
    try:
        cache.set(page_key(token, page, size), body, PAGE_TIMEOUT)
    except Exception as exc:
        log.warning("course list cache write failed: %s: %s", type(exc).__name__, exc)


def invalidate() -> None:
    try:
        cache.set(GENERATION_KEY, _new_token(), timeout=None)
    except Exception as exc:
        # Nothing better to do: cached pages age out within PAGE_TIMEOUT.
        log.error("course list cache invalidation failed: %s: %s", type(exc).__name__, exc)
