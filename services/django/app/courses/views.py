"""A small JSON API without DRF.

GET  /api/courses/?page=N&page_size=M   paginated list (cached, see listcache)
POST /api/courses/                      create; JSON body, `Authorization: Bearer <token>`
GET  /api/courses/<slug>/               one course with its lessons
"""

from __future__ import annotations

import contextlib
import functools
import hmac
import json
from datetime import UTC, datetime

from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import IntegrityError, connection, transaction
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.utils import timezone
from django.utils.text import slugify
from django.views.decorators.csrf import csrf_exempt

from . import detailcache, listcache, signals
from .models import Course, Lesson

PAGE_SIZE_DEFAULT = 20
PAGE_SIZE_MAX = 100
COURSE_FIELDS = {"title", "slug", "summary", "lessons"}
LESSON_FIELDS = {"title", "body"}


def json_error(status: int, message: str, fields: dict | None = None, **headers) -> JsonResponse:
    body: dict = {"error": message}
    if fields:
        body["fields"] = fields
    return JsonResponse(body, status=status, headers=headers or None)


def _method_not_allowed(*allowed: str) -> JsonResponse:
    return json_error(405, "method not allowed", Allow=", ".join(allowed))


# CSRF-exempt: an API for programs, authenticated by a bearer token, not by a cookie.
@csrf_exempt
def courses(request: HttpRequest) -> HttpResponse:
    if request.method in ("GET", "HEAD"):
        return course_list(request)
    if request.method == "POST":
        return course_create(request)
    return _method_not_allowed("GET", "HEAD", "POST")


def _positive_int(request: HttpRequest, name: str, default: int) -> int | None:
    try:
        value = int(request.GET.get(name, default))
    except ValueError:
        return None
    return value if value >= 1 else None


def course_list(request: HttpRequest) -> HttpResponse:
    page = _positive_int(request, "page", 1)
    size = _positive_int(request, "page_size", PAGE_SIZE_DEFAULT)
    if page is None:
        return json_error(400, "page must be a positive integer")
    if size is None or size > PAGE_SIZE_MAX:
        return json_error(400, f"page_size must be an integer from 1 to {PAGE_SIZE_MAX}")

    status, body, how = listcache.fetch_page(page, size, lambda: _build_page(page, size))
    return HttpResponse(
        body, status=status, content_type="application/json", headers={"X-Cache": how}
    )


LIST_FIELDS = ("id", "slug", "title", "summary", "created_at", "updated_at")
_PAGE_SQL: str | None = None


def _page_sql() -> str:
    """One statement for a page: its rows by the (created_at, id) index (LIMIT/OFFSET) and
    each row's lesson count (a correlated COUNT over the lessons' course_id index, for
    those rows only). Raw SQL: building the two ORM queries it replaced was most of a
    miss' CPU (docs/performance.md)."""
    global _PAGE_SQL
    if _PAGE_SQL is None:
        q = connection.ops.quote_name
        courses, lessons = q(Course._meta.db_table), q(Lesson._meta.db_table)
        columns = ", ".join(f"c.{q(name)}" for name in LIST_FIELDS)
        _PAGE_SQL = (
            f"SELECT {columns}, (SELECT COUNT(*) FROM {lessons} l WHERE l.{q('course_id')} "
            f"= c.{q('id')}) FROM {courses} c ORDER BY c.{q('created_at')} DESC, "
            f"c.{q('id')} DESC LIMIT %s OFFSET %s"
        )
    return _PAGE_SQL


def _iso(value) -> str:
    # PostgreSQL (psycopg) gives aware datetimes; SQLite's converter naive UTC ones: the
    # ORM made both aware UTC, and so does this.
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.isoformat()


def _build_page(page: int, size: int) -> tuple[int, bytes]:
    """One page from the database at a cost independent of the table's size: the total
    from the cache (kept by the writes), the page's rows with their lesson counts in one
    statement (_page_sql). The same bytes as the Paginator over
    Course.objects.annotate(lesson_count=Count("lessons")) it replaced (ListMissTests)."""
    count = listcache.course_count(lambda: Course.objects.order_by().count())
    num_pages = max(1, -(-count // size))  # an empty list still has its (empty) page 1
    if page > num_pages:
        return 404, json_error(404, f"no page {page} (there are {num_pages})").content
    with connection.cursor() as cursor:
        cursor.execute(_page_sql(), [size, (page - 1) * size])
        rows = [
            {
                "id": id_,
                "slug": slug,
                "title": title,
                "summary": summary,
                "created_at": _iso(created),
                "updated_at": _iso(updated),
                "lesson_count": lesson_count,
            }
            for id_, slug, title, summary, created, updated, lesson_count in cursor.fetchall()
        ]
    data = {
        "count": count,
        "page": page,
        "page_size": size,
        "num_pages": num_pages,
        "next": page + 1 if page < num_pages else None,
        "previous": page - 1 if page > 1 else None,
        "results": rows,
    }
    return 200, json.dumps(data, separators=(",", ":")).encode()


DETAIL_FIELDS = ("id", "slug", "title", "summary", "created_at", "updated_at")


# CSRF-exempt like `courses`: without it a POST/PUT/DELETE here met Django's HTML CSRF 403
# before the view could answer its JSON 405.
@csrf_exempt
def course_detail(request: HttpRequest, slug: str) -> HttpResponse:
    if request.method not in ("GET", "HEAD"):
        return _method_not_allowed("GET", "HEAD")
    status, body, how = detailcache.fetch(slug, lambda: _build_detail(slug))
    return HttpResponse(
        body, status=status, content_type="application/json", headers={"X-Cache": how}
    )


def _build_detail(slug: str) -> tuple[int, bytes]:
    # Plain rows, no model objects: the same dict as Course.as_dict(lessons=True).
    rows = list(Course.objects.filter(slug=slug).order_by().values(*DETAIL_FIELDS)[:1])
    if not rows:
        return 404, json_error(404, f"no course {slug!r}").content
    data = rows[0]
    data["created_at"] = data["created_at"].isoformat()
    data["updated_at"] = data["updated_at"].isoformat()
    data["lessons"] = list(
        Lesson.objects.filter(course_id=data["id"])
        .order_by("position")
        .values("position", "title", "body")
    )
    return 200, JsonResponse(data).content


def _write_denied(request: HttpRequest) -> JsonResponse | None:
    token = settings.API_WRITE_TOKEN
    if not token:
        if settings.DEBUG:
            return None
        return json_error(403, "writes are disabled: API_WRITE_TOKEN is not set")
    given = request.headers.get("Authorization", "")
    if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
        return json_error(401, "missing or wrong bearer token", **{"WWW-Authenticate": "Bearer"})
    return None


def _text(payload: dict, name: str, errors: dict, key: str, *, required: bool = False) -> str:
    value = payload.get(name, "")
    if not isinstance(value, str):
        errors[key] = ["Must be a string."]
        return ""
    if required and not value.strip():
        errors[key] = ["This field is required."]
    return value.strip()


def _parse(payload: dict) -> tuple[Course, list[Lesson], dict]:
    """Build unsaved objects from the payload; errors maps field paths to messages."""
    errors: dict[str, list[str]] = {}
    for name in sorted(set(payload) - COURSE_FIELDS):
        errors[name] = ["Unknown field."]
    title = _text(payload, "title", errors, "title", required=True)
    slug = _text(payload, "slug", errors, "slug") or slugify(title)
    summary = _text(payload, "summary", errors, "summary")
    course = Course(title=title, slug=slug, summary=summary)
    try:
        # No uniqueness SELECT: the INSERT's IntegrityError answers a taken slug with the
        # same message (course_create), one round trip fewer per write.
        course.full_clean(validate_unique=False)
    except ValidationError as exc:
        for name, messages in exc.message_dict.items():
            errors.setdefault(name, messages)

    lessons: list[Lesson] = []
    raw_lessons = payload.get("lessons", [])
    if not isinstance(raw_lessons, list):
        errors["lessons"] = ["Must be a list of {title, body} objects."]
        raw_lessons = []
    for i, raw in enumerate(raw_lessons):
        where = f"lessons[{i}]"
        if not isinstance(raw, dict):
            errors[where] = ["Must be an object with title and body."]
            continue
        for name in sorted(set(raw) - LESSON_FIELDS):
            errors[f"{where}.{name}"] = ["Unknown field."]
        lesson = Lesson(
            position=i + 1,
            title=_text(raw, "title", errors, f"{where}.title", required=True),
            body=_text(raw, "body", errors, f"{where}.body"),
        )
        try:
            lesson.full_clean(exclude=["course"], validate_unique=False)
        except ValidationError as exc:
            for name, messages in exc.message_dict.items():
                errors.setdefault(f"{where}.{name}", messages)
        lessons.append(lesson)
    return course, lessons, errors


@functools.lru_cache(maxsize=16)
def _insert_sql(lessons: int) -> str:
    """The course and its lessons in ONE statement (data-modifying CTEs: one snapshot, all
    or nothing without BEGIN/COMMIT); made once per number of lessons."""
    q = connection.ops.quote_name
    courses, lesson_table = q(Course._meta.db_table), q(Lesson._meta.db_table)
    columns = ", ".join(q(c) for c in ("title", "slug", "summary", "created_at", "updated_at"))
    sql = (
        f"WITH c AS (INSERT INTO {courses} ({columns}) VALUES (%s, %s, %s, %s, %s)"
        f" RETURNING {q('id')})"
    )
    if lessons:
        rows = ", ".join(["(%s::integer, %s::text, %s::text)"] * lessons)
        lesson_columns = ", ".join(q(c) for c in ("course_id", "position", "title", "body"))
        sql += (
            f", l AS (INSERT INTO {lesson_table} ({lesson_columns})"
            f" SELECT c.{q('id')}, v.p, v.t, v.b FROM c, (VALUES {rows}) AS v(p, t, b))"
        )
    return sql + f" SELECT {q('id')} FROM c"


def _insert(course: Course, lessons: list[Lesson]) -> None:
    """What course.save() and Lesson.objects.bulk_create() in transaction.atomic() did, in
    one round trip (PostgreSQL): the ORM's statements, the transaction's BEGIN/COMMIT and
    its autocommit switches were most of a write's CPU (docs/performance.md, "Issue 17,
    sixth pass"). Sends no model signals, so the caches are invalidated here, after the
    commit (at once in autocommit), as courses/signals.py does for the ORM's writes."""
    now = timezone.now()
    params = [course.title, course.slug, course.summary, now, now]
    for lesson in lessons:
        params += [lesson.position, lesson.title, lesson.body]
    # In autocommit (a request) the statement is its own transaction. Inside a caller's
    # transaction (tests, scripts) a savepoint keeps a failed INSERT (a taken slug) from
    # aborting that transaction, as the ORM path's atomic() does.
    inner = transaction.atomic() if connection.in_atomic_block else contextlib.nullcontext()
    with inner, connection.cursor() as cursor:
        cursor.execute(_insert_sql(len(lessons)), params)
        (course.id,) = cursor.fetchone()
    course.created_at = course.updated_at = now
    course._state.adding = False
    for lesson in lessons:
        lesson.course = course
    transaction.on_commit(
        functools.partial(signals.after_course_write, 1, course.slug, None, False)
    )


def course_create(request: HttpRequest) -> HttpResponse:
    denied = _write_denied(request)
    if denied is not None:
        return denied
    if request.content_type != "application/json":
        return json_error(415, "send the course as application/json")
    try:
        payload = json.loads(request.body)
    except (ValueError, UnicodeDecodeError):
        return json_error(400, "the body is not valid JSON")
    if not isinstance(payload, dict):
        return json_error(400, "expected a JSON object")

    course, lessons, errors = _parse(payload)
    if errors:
        return json_error(400, "invalid course", errors)
    try:
        if connection.vendor == "postgresql":
            _insert(course, lessons)
        else:  # SQLite (the app's test suite): the ORM, in a transaction
            with transaction.atomic():
                course.save()
                for lesson in lessons:
                    lesson.course = course
                Lesson.objects.bulk_create(lessons)
    except IntegrityError:
        # Lost a race with another request creating the same slug.
        return json_error(
            400, "invalid course", {"slug": ["Course with this Slug already exists."]}
        )
    # The answer from what was just written, not read back (the lessons were one more
    # SELECT): the same dict as Course.as_dict(lessons=True).
    data = course.as_dict()
    data["lessons"] = [lesson.as_dict() for lesson in lessons]
    return JsonResponse(
        data,
        status=201,
        headers={"Location": f"/api/courses/{course.slug}/"},
    )
