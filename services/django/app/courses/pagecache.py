"""Ready-made answers in Redis: fresh bytes per version, a stale copy, one rebuild at a time.

Used for the course list pages (versioned by listcache's generation) and for each course's
detail page (versioned by a token per slug, so a write invalidates that course only).

    fresh key   <kind>:<version>:<ident>   the answer of this version, PAGE_TIMEOUT
    stale key   <kind>:stale:<ident>       the last answer built, whatever its version
    lock key    <kind>:lock:<ident>        held (SET NX EX) by the one request rebuilding

A miss takes the lock and rebuilds; requests that miss while the lock is held answer the
stale copy (the previous bytes) instead of all rebuilding at once (a stampede), and
rebuild themselves only when there is no copy at all. The hit path is one MGET (fresh and
stale together). A version token is random, not a counter: if Redis (allkeys-lru) evicts
it, the next token cannot collide with pages cached under an earlier one, and a reader
that built its page from rows older than a write stores it under the version it read
before the write, which nobody reads again.

Redis failures degrade to "no cache": logged, the answer is built from the database.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable

from django.core.cache import cache

log = logging.getLogger("courses.cache")

PAGE_TIMEOUT = 300  # fresh copies
STALE_TIMEOUT = 3600  # the previous bytes, answered while one request rebuilds
LOCK_TIMEOUT = 5  # seconds; a rebuild takes milliseconds, this only bounds a crashed one
COUNT_TIMEOUT = 3600  # the list's course count, kept by the writes; recounted after this

Build = Callable[[], tuple[int, bytes]]


def new_token() -> str:
    return secrets.token_hex(8)


def version(key: str) -> str | None:
    """The current token under `key` (made on first use), or None if the cache is down."""
    try:
        token = cache.get(key)
        if token is None:
            cache.add(key, new_token(), timeout=None)  # add: the first one wins
            token = cache.get(key)
        return token
    except Exception as exc:
        log.warning("cache unavailable: %s: %s", type(exc).__name__, exc)
        return None


def bump(key: str) -> None:
    """A new token: every answer cached under the old one is never read again."""
    try:
        cache.set(key, new_token(), timeout=None)
    except Exception as exc:
        # Nothing better to do: cached answers age out within PAGE_TIMEOUT.
        log.error("cache invalidation of %s failed: %s: %s", key, type(exc).__name__, exc)


def fetch(kind: str, token: str | None, ident: str, build: Build) -> tuple[int, bytes, str]:
    """(status, body, "hit" | "stale" | "miss"); only 200 answers are cached."""
    if token is None:
        return (*build(), "miss")
    fresh, stale, lock = f"{kind}:{token}:{ident}", f"{kind}:stale:{ident}", f"{kind}:lock:{ident}"
    try:
        found = cache.get_many([fresh, stale])
        if fresh in found:
            return 200, found[fresh], "hit"
        locked = cache.add(lock, 1, LOCK_TIMEOUT)
    except Exception as exc:
        log.warning("cache read failed: %s: %s", type(exc).__name__, exc)
        return (*build(), "miss")
    if not locked and stale in found:
        return 200, found[stale], "stale"
    try:
        status, body = build()
    finally:
        if locked:
            _quietly(cache.delete, lock)
    if status == 200:
        _quietly(cache.set_many, {fresh: body}, PAGE_TIMEOUT)
        _quietly(cache.set_many, {stale: body}, STALE_TIMEOUT)
    return status, body, "miss"


def forget_stale(kind: str, ident: str) -> None:
    """Drop the stale copy too (the thing is gone: no previous bytes to answer)."""
    _quietly(cache.delete, f"{kind}:stale:{ident}")


def _quietly(call, *args) -> None:
    try:
        call(*args)
    except Exception as exc:
        log.warning("cache write failed: %s: %s", type(exc).__name__, exc)


# --- the list's total: kept by the writes instead of counted on every miss -------------


def count(key: str, recount: Callable[[], int]) -> int:
    """The number under `key`, or recount() stored there when it is missing.

    Writes add/subtract after their commit (adjust); a missing key (cold start, eviction,
    COUNT_TIMEOUT) is recounted from the database. A write that commits while a recount
    reads its snapshot may be lost from the stored figure until the key expires: the list's
    total is then off by one for at most COUNT_TIMEOUT; its pages are not affected.
    """
    try:
        value = cache.get(key)
    except Exception as exc:
        log.warning("cache read failed: %s: %s", type(exc).__name__, exc)
        return recount()
    if value is None:
        value = recount()
        _quietly(cache.add, key, value, COUNT_TIMEOUT)
    return int(value)


def adjust(key: str, delta: int) -> None:
    try:
        cache.incr(key, delta)
    except ValueError:
        pass  # not stored: the next list miss counts
    except Exception as exc:
        log.error("cache count update failed: %s: %s", type(exc).__name__, exc)
        _quietly(cache.delete, key)
