"""Each course's detail page, cached in Redis as the ready-made JSON bytes.

Versioned per course (a token under `courses:detail:version:<slug>`): a write to a course
or its lessons replaces that course's token only, so the other courses' cached details
stay valid. Misses rebuild one at a time, the others answer the previous bytes
(pagecache.fetch). A deleted course loses its entry (the previous bytes) as well.
"""

from __future__ import annotations

from . import pagecache

KIND = "courses:detail"


def version_key(slug: str) -> str:
    return f"{KIND}:version:{slug}"


def entry(slug: str) -> str:
    return pagecache.entry_key(KIND, slug)


def fetch(slug: str, build) -> tuple[int, bytes, str]:
    return pagecache.fetch(KIND, version_key(slug), slug, build)


def peek(slug: str) -> bytes | None:
    """The course's fresh bytes, or None: for the WSGI fast path (aiia/fastpath.py)."""
    return pagecache.peek(KIND, version_key(slug), slug)


def invalidate(slug: str, *, deleted: bool = False) -> None:
    pagecache.after_write([version_key(slug)], forgets=[entry(slug)] if deleted else [])
