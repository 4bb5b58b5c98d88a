"""The hot read: pages of the course list, cached in Redis as ready-made JSON bytes.

Invalidation by generation: every page's entry carries the generation token it was built
under (a random value under one key). A write replaces the token, so pages of the old
generation are stale from then on (pagecache: one MGET reads the token and the entry
together), but a page built less than API_LIST_REBUILD_INTERVAL seconds ago is still
answered: under a stream of writes each page is rebuilt at most once per interval instead
of after every write (docs/performance.md, "Issue 17, fifth pass"), and a write is in
every page at most that long after its commit. While one request rebuilds a page of
the new generation, the others answer the page's previous bytes (pagecache.fetch: no
stampede). The total number of courses is kept under its own key by the writes
(COUNT_KEY), so a miss reads one page of rows, not the whole table.

QuerySet.update()/delete() send no signals: call invalidate() after them (PAGE_TIMEOUT
bounds the staleness anyway). Redis failures degrade to "no cache": logged once per
request, the page is built from the database.
"""

from __future__ import annotations

from collections.abc import Sequence

from django.conf import settings

from . import pagecache

GENERATION_KEY = "courses:list:generation"
COUNT_KEY = "courses:list:count"
KIND = "courses:list"
PAGE_TIMEOUT = pagecache.PAGE_TIMEOUT


def rebuild_interval() -> float:
    """settings.API_LIST_REBUILD_INTERVAL: a page is rebuilt at most once per this many
    seconds however often courses are written; a write shows in the list within it."""
    return getattr(settings, "API_LIST_REBUILD_INTERVAL", 0.0)


def fetch_page(page: int, size: int, build) -> tuple[int, bytes, str]:
    return pagecache.fetch(KIND, GENERATION_KEY, f"{page}:{size}", build, rebuild_interval())


def peek_page(page: int, size: int) -> bytes | None:
    """The page's fresh bytes, or None: for the WSGI fast path (aiia/fastpath.py)."""
    return pagecache.peek(KIND, GENERATION_KEY, f"{page}:{size}", rebuild_interval())


def course_count(recount) -> int:
    return pagecache.count(COUNT_KEY, recount)


def forget_count() -> None:
    """Drop the stored total: the next list miss counts (after bulk writes, no signals)."""
    from django.core.cache import cache

    cache.delete(COUNT_KEY)


def invalidate(delta: int = 0, *, also: Sequence[str] = (), forgets: Sequence[str] = ()) -> None:
    """After a commit: the total first, then the generation (whoever sees the new
    generation sees the new total), and `also`'s version keys (a course's detail) in the
    same round trip, then `forgets` (entry keys) deleted."""
    pagecache.after_write([GENERATION_KEY, *also], COUNT_KEY, delta, forgets)
