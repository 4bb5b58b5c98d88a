"""Ready-made answers in Redis: one entry per answer, its version inside, one rebuild at a time.

Used for the course list pages (versioned by listcache's generation) and for each course's
detail page (versioned by a token per slug, so a write invalidates that course only).

    version key  (listcache.GENERATION_KEY, detailcache.version_key(slug))  a random token
    entry key    <kind>:entry:<ident>   (token, built_at, bytes) of the last answer built
    lock key     <kind>:lock:<ident>    held (SET NX EX) by the one request rebuilding

The hit path is ONE round trip: MGET of the version key and the entry; the entry is fresh
when it was built under the current token and less than PAGE_TIMEOUT ago. Otherwise it is
the previous bytes: a miss takes the lock and rebuilds, requests that miss while the lock
is held answer those previous bytes (`X-Cache: stale`) instead of all rebuilding at once
(a stampede), and rebuild themselves only when there is no entry at all. A version token
is random, not a counter: if Redis (allkeys-lru) evicts it, the next token cannot collide
with an entry built under an earlier one, and a reader that built its page from rows
older than a write stores it under the token it read before the write, which no longer
matches (the next reader rebuilds).

Redis failures degrade to "no cache": logged, the answer is built from the database.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable, Sequence

from aiia.cache import lean_reader
from aiia.redisread import command
from django.core.cache import cache

log = logging.getLogger("courses.cache")

PAGE_TIMEOUT = 300  # an entry is fresh this long (bounds what a write without signals leaves)
STALE_TIMEOUT = 3600  # an entry is kept this long: the previous bytes, answered while one rebuilds
LOCK_TIMEOUT = 5  # seconds; a rebuild takes milliseconds, this only bounds a crashed one
COUNT_TIMEOUT = 3600  # the list's course count, kept by the writes; recounted after this

Build = Callable[[], tuple[int, bytes]]


def new_token() -> str:
    return secrets.token_hex(8)


def entry_key(kind: str, ident: str) -> str:
    return f"{kind}:entry:{ident}"


def _fresh(entry, token, coalesce: float = 0.0) -> bool:
    """Built under the current token and less than PAGE_TIMEOUT ago; or, whatever the token,
    less than `coalesce` seconds ago (see fetch: at most one rebuild per interval)."""
    if entry is None:
        return False
    age = time.time() - entry[1]
    return age < coalesce or (token is not None and entry[0] == token and age < PAGE_TIMEOUT)


# Entries read by peek with `coalesce` > 0, in this process: entry key -> (built_at, bytes).
# Such an entry is answered for `coalesce` seconds after it was built whatever the token
# (fetch), so a copy answers exactly what Redis would within that time, without the round
# trip (docs/performance.md, "Issue 17, sixth pass"). Bounded: a scanner asking for
# many pages empties it rather than growing it.
_recent: dict[str, tuple[float, bytes]] = {}
RECENT_MAX = 256


def peek(kind: str, version_key: str, ident: str, coalesce: float = 0.0) -> bytes | None:
    """The fresh cached bytes, or None (a miss, a stale entry, no cache): one MGET, or
    none while this process holds a copy younger than `coalesce` seconds.

    For the WSGI fast path (aiia/fastpath.py), which answers a hit without Django's
    request handling and leaves everything else to the view (fetch below). On the
    Redis backend it reads through aiia/redisread.py's lean client (one socket per
    thread), elsewhere (the tests' local memory) through the cache."""
    entry = entry_key(kind, ident)
    if coalesce > 0:
        recent = _recent.get(entry)
        if recent is not None and time.time() - recent[0] < coalesce:
            return recent[1]
    reader, make_key, _dumps = lean_reader()
    if reader is None:
        found = cache.get_many([version_key, entry])
        token, got = found.get(version_key), found.get(entry)
    else:  # the same MGET and values without Django's cache and redis-py (~half the CPU)
        token, got = reader.mget([make_key(version_key).encode(), make_key(entry).encode()])
    if not _fresh(got, token, coalesce):
        return None
    if coalesce > 0:
        if len(_recent) >= RECENT_MAX:
            _recent.clear()
        _recent[entry] = (got[1], got[2])
    return got[2]


def fetch(
    kind: str, version_key: str, ident: str, build: Build, coalesce: float = 0.0
) -> tuple[int, bytes, str]:
    """(status, body, "hit" | "stale" | "miss"); only 200 answers are cached.

    `coalesce` > 0: an entry built less than that many seconds ago is answered even after a
    write (a newer token), so a page is rebuilt at most once per interval however often it
    is written; a write is visible in it at most `coalesce` seconds after its commit. The
    entry's time is taken BEFORE its token and rows are read, so it never claims rows newer
    than they are: a write missing from an entry committed after that time."""
    entry, lock = entry_key(kind, ident), f"{kind}:lock:{ident}"
    started = time.time()
    try:
        found = cache.get_many([version_key, entry])
        token, got = found.get(version_key), found.get(entry)
        if _fresh(got, token, coalesce):
            return 200, got[2], "hit"
        if token is None:
            cache.add(version_key, new_token(), timeout=None)  # add: the first one wins
            token = cache.get(version_key)
        locked = cache.add(lock, 1, LOCK_TIMEOUT)
    except Exception as exc:
        log.warning("cache read failed: %s: %s", type(exc).__name__, exc)
        return (*build(), "miss")
    if not locked and got is not None:
        return 200, got[2], "stale"
    try:
        status, body = build()
    finally:
        if locked:
            _quietly(cache.delete, lock)
    if status == 200 and token is not None:
        _quietly(cache.set, entry, (token, started, body), STALE_TIMEOUT)
    return status, body, "miss"


def after_write(
    bumps: Sequence[str], count_key: str | None = None, delta: int = 0, forgets: Sequence[str] = ()
) -> None:
    """After a commit: the stored count adjusted by `delta` (only if it is stored: a missing
    one is recounted by the next list miss), then a new token for each of `bumps`, then
    `forgets` (entry keys) deleted: in this order, so whoever sees a new token sees the
    new count.

    On the lean client that is one round trip (two when a count changes: EXISTS first,
    as Django's incr does), with the values Django's cache would store; through Django's
    cache and redis-py it was four or five, most of a write's cache work
    (docs/performance.md, "Issue 17, sixth pass"). Elsewhere (the tests' local memory)
    through the cache, one call each. If Redis fails, the count is dropped (which of the
    commands ran is unknown) and it is logged: cached answers age out within PAGE_TIMEOUT.
    """
    reader, make_key, dumps = lean_reader()
    if reader is None:
        if count_key is not None and delta:
            adjust(count_key, delta)
        for key in bumps:
            bump(key)
        for key in forgets:
            _quietly(cache.delete, key)
        return
    commands = []
    try:
        if count_key is not None and delta:
            count = make_key(count_key).encode()
            (stored,) = reader.pipeline([command(b"EXISTS", count)])
            if stored == 1:
                commands.append(command(b"INCRBY", count, str(delta).encode()))
        for key in bumps:
            commands.append(command(b"SET", make_key(key).encode(), dumps(new_token())))
        for key in forgets:
            commands.append(command(b"DEL", make_key(key).encode()))
        failed = [r for r in reader.pipeline(commands) if isinstance(r, Exception)]
        if failed:
            raise failed[0]
    except Exception as exc:
        log.error("cache invalidation failed: %s: %s", type(exc).__name__, exc)
        if count_key is not None:
            try:
                reader.pipeline([command(b"DEL", make_key(count_key).encode())])
            except Exception as again:
                log.warning("cache write failed: %s: %s", type(again).__name__, again)


def bump(key: str) -> None:
    """A new token: every entry built under the old one is stale from now on."""
    try:
        cache.set(key, new_token(), timeout=None)
    except Exception as exc:
        # Nothing better to do: cached answers age out within PAGE_TIMEOUT.
        log.error("cache invalidation of %s failed: %s: %s", key, type(exc).__name__, exc)


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
