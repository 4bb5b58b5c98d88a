"""The JSON API and the course-list cache with its invalidation."""

import json
from typing import ClassVar
from unittest import mock

from django.core.cache import cache
from django.db import connection
from django.test import Client, TestCase, override_settings

from . import listcache
from .models import Course, Lesson

AUTH = {"HTTP_AUTHORIZATION": "Bearer test-token"}
REDIS_NOWHERE = {
    "default": {
        "BACKEND": "django.core.cache.backends.redis.RedisCache",
        "LOCATION": "redis://127.0.0.1:1/0",
        "OPTIONS": {"socket_connect_timeout": 1, "socket_timeout": 1},
    }
}


class ApiTestCase(TestCase):
    def setUp(self):
        cache.clear()
        # Talk to the app as nginx does: TLS terminated, X-Forwarded-Proto set.
        self.client = Client(HTTP_X_FORWARDED_PROTO="https")

    def post(self, payload, *, raw=None, content_type="application/json", **extra):
        headers = {**AUTH, **extra}
        body = raw if raw is not None else json.dumps(payload)
        return self.client.post("/api/courses/", body, content_type=content_type, **headers)

    def create(self, payload):
        with self.captureOnCommitCallbacks(execute=True):
            response = self.post(payload)
        self.assertEqual(response.status_code, 201, response.content)
        return response

    def list(self, query=""):
        return self.client.get(f"/api/courses/{query}")


class CreateAndReadTests(ApiTestCase):
    def test_create_then_detail(self):
        response = self.create(
            {
                "title": "Intro to Neural Networks",
                "summary": "Perceptrons to backprop.",
                "lessons": [{"title": "Perceptron", "body": "w.x + b"}, {"title": "Backprop"}],
            }
        )
        self.assertEqual(response["Location"], "/api/courses/intro-to-neural-networks/")
        body = response.json()
        self.assertEqual(body["slug"], "intro-to-neural-networks")
        self.assertEqual([lesson["position"] for lesson in body["lessons"]], [1, 2])

        detail = self.client.get("/api/courses/intro-to-neural-networks/")
        self.assertEqual(detail.status_code, 200)
        self.assertEqual(
            detail.json()["lessons"][0], {"position": 1, "title": "Perceptron", "body": "w.x + b"}
        )
        self.assertEqual(Lesson.objects.count(), 2)

    def test_explicit_slug(self):
        body = self.create({"title": "Statistics", "slug": "stats-101"}).json()
        self.assertEqual(body["slug"], "stats-101")

    def test_detail_404_is_json(self):
        response = self.client.get("/api/courses/nope/")
        self.assertEqual(response.status_code, 404)
        self.assertIn("error", response.json())

    def test_plain_http_is_redirected_to_https(self):
        response = Client().get("/api/courses/")
        self.assertEqual(response.status_code, 301)
        self.assertTrue(response["Location"].startswith("https://"))

    def test_https_responses_carry_hsts_and_nosniff(self):
        response = self.list()
        self.assertIn("max-age=31536000", response["Strict-Transport-Security"])
        self.assertEqual(response["X-Content-Type-Options"], "nosniff")

    def test_method_not_allowed(self):
        response = self.client.delete("/api/courses/")
        self.assertEqual(response.status_code, 405)
        self.assertEqual(response["Allow"], "GET, HEAD, POST")
        self.assertEqual(self.client.post("/api/courses/x/", **AUTH).status_code, 405)


class BadInputTests(ApiTestCase):
    def assertBad(self, response, *fields, status=400):
        self.assertEqual(response.status_code, status, response.content)
        body = response.json()
        self.assertIn("error", body)
        for field in fields:
            self.assertIn(field, body["fields"])
        self.assertEqual(Course.objects.count(), 0)

    def test_not_json(self):
        self.assertBad(self.post(None, raw="{title: nope"))

    def test_not_an_object(self):
        self.assertBad(self.post(["a"]))

    def test_wrong_content_type(self):
        self.assertBad(self.post(None, raw="title=x", content_type="text/plain"), status=415)

    def test_missing_title(self):
        self.assertBad(self.post({"summary": "no title"}), "title")

    def test_wrong_types_and_unknown_fields(self):
        response = self.post({"title": 3, "summary": [], "colour": "red"})
        self.assertBad(response, "title", "summary", "colour")

    def test_bad_slug(self):
        self.assertBad(self.post({"title": "X", "slug": "not a slug!"}), "slug")

    def test_title_too_long(self):
        self.assertBad(self.post({"title": "x" * 201}), "title")

    def test_bad_lessons(self):
        self.assertBad(self.post({"title": "X", "lessons": "one"}), "lessons")
        response = self.post(
            {"title": "X", "lessons": [{"body": "no title"}, 4, {"title": "ok", "x": 1}]}
        )
        self.assertBad(response, "lessons[0].title", "lessons[1]", "lessons[2].x")

    def test_duplicate_slug(self):
        self.create({"title": "Dup"})
        response = self.post({"title": "Dup"})
        self.assertEqual(response.status_code, 400)
        taken = {"slug": ["Course with this Slug already exists."]}
        self.assertEqual(response.json(), {"error": "invalid course", "fields": taken})
        self.assertEqual(Course.objects.count(), 1)

    def test_token_required(self):
        self.assertBad(self.post({"title": "X"}, HTTP_AUTHORIZATION=""), status=401)
        self.assertBad(self.post({"title": "X"}, HTTP_AUTHORIZATION="Bearer wrong"), status=401)

    @override_settings(API_WRITE_TOKEN="")
    def test_writes_refused_without_a_configured_token(self):
        self.assertBad(self.post({"title": "X"}), status=403)


class PaginationTests(ApiTestCase):
    def setUp(self):
        super().setUp()
        for i in range(25):
            Course.objects.create(title=f"Course {i}", slug=f"course-{i}")

    def test_pages(self):
        first = self.list("?page_size=10").json()
        self.assertEqual((first["count"], first["num_pages"], first["next"]), (25, 3, 2))
        self.assertIsNone(first["previous"])
        self.assertEqual(len(first["results"]), 10)
        self.assertEqual(first["results"][0]["slug"], "course-24")  # newest first
        last = self.list("?page=3&page_size=10").json()
        self.assertEqual((len(last["results"]), last["next"], last["previous"]), (5, None, 2))

    def test_default_page_size(self):
        self.assertEqual(len(self.list().json()["results"]), 20)

    def test_bad_pages(self):
        self.assertEqual(self.list("?page=4&page_size=10").status_code, 404)
        for query in ("?page=0", "?page=abc", "?page_size=0", "?page_size=101"):
            self.assertEqual(self.list(query).status_code, 400, query)


class ListCacheTests(ApiTestCase):
    def test_second_read_is_a_hit(self):
        Course.objects.create(title="A", slug="a")
        first, second = self.list(), self.list()
        self.assertEqual((first["X-Cache"], second["X-Cache"]), ("miss", "hit"))
        self.assertEqual(first.content, second.content)
        with self.assertNumQueries(0):
            self.assertEqual(self.list()["X-Cache"], "hit")

    def test_pages_and_sizes_are_cached_separately(self):
        self.list("?page_size=5")
        self.assertEqual(self.list("?page_size=6")["X-Cache"], "miss")

    def test_create_invalidates(self):
        self.assertEqual(self.list().json()["count"], 0)
        self.assertEqual(self.list()["X-Cache"], "hit")
        self.create({"title": "New"})
        response = self.list()
        self.assertEqual(response["X-Cache"], "miss")
        self.assertEqual(response.json()["results"][0]["slug"], "new")

    def test_invalidation_waits_for_commit(self):
        self.list()
        with self.captureOnCommitCallbacks(execute=False) as callbacks:
            self.post({"title": "Pending"})
            # Not committed yet: readers keep the old generation.
            self.assertEqual(self.list()["X-Cache"], "hit")
        self.assertEqual(len(callbacks), 1)
        callbacks[0]()
        self.assertEqual(self.list()["X-Cache"], "miss")

    def test_update_delete_and_lessons_invalidate(self):
        with self.captureOnCommitCallbacks(execute=True):
            course = Course.objects.create(title="A", slug="a")
        self.list()
        with self.captureOnCommitCallbacks(execute=True):
            course.title = "A, revised"
            course.save()
        response = self.list()
        self.assertEqual(
            (response["X-Cache"], response.json()["results"][0]["title"]), ("miss", "A, revised")
        )

        with self.captureOnCommitCallbacks(execute=True):
            Lesson.objects.create(course=course, position=1, title="L1")
        response = self.list()
        self.assertEqual(
            (response["X-Cache"], response.json()["results"][0]["lesson_count"]), ("miss", 1)
        )

        with self.captureOnCommitCallbacks(execute=True):
            course.delete()
        response = self.list()
        self.assertEqual((response["X-Cache"], response.json()["count"]), ("miss", 0))

    def test_evicted_generation_key_starts_a_fresh_generation(self):
        self.list()
        cache.delete(listcache.GENERATION_KEY)  # as Redis' allkeys-lru may do
        self.assertEqual(self.list()["X-Cache"], "miss")
        self.assertEqual(self.list()["X-Cache"], "hit")

    def test_cache_down_serves_from_the_database(self):
        Course.objects.create(title="A", slug="a")
        with override_settings(CACHES=REDIS_NOWHERE), self.assertLogs("courses", "WARNING"):
            response = self.list()
        self.assertEqual(response.status_code, 200)
        self.assertEqual(response["X-Cache"], "miss")
        self.assertEqual(response.json()["count"], 1)


def _old_detail_bytes(slug):
    """The detail answer as the view built it before issue 17 (model objects + as_dict)."""
    from django.http import JsonResponse

    course = Course.objects.prefetch_related("lessons").get(slug=slug)
    return JsonResponse(course.as_dict(lessons=True)).content


class SameAnswerTests(ApiTestCase):
    """Issue 17: the cheaper paths answer byte for byte what the old ones did."""

    PAYLOAD: ClassVar[dict] = {
        "title": "Übung: Attention",
        "summary": "Queries, keys, values.",
        "lessons": [{"title": "Dot product", "body": "q·k"}, {"title": "Softmax"}],
    }

    def test_detail_from_values_equals_the_model_answer(self):
        self.create(self.PAYLOAD)
        with self.captureOnCommitCallbacks(execute=True):
            other = Course.objects.create(title="Other", slug="other")
            Lesson.objects.create(course=other, position=1, title="O1")
        response = self.client.get("/api/courses/ubung-attention/")
        self.assertEqual(response.status_code, 200)
        self.assertEqual(response.content, _old_detail_bytes("ubung-attention"))
        self.assertEqual(response["Content-Type"], "application/json")

    def test_create_answers_what_a_later_read_returns_without_reading_back(self):
        # SAVEPOINT, the INSERTs (course, lessons; one statement on PostgreSQL), RELEASE: no
        # SELECT of the lessons just written, no slug uniqueness SELECT (the INSERT's
        # IntegrityError answers that).
        queries = 3 if connection.vendor == "postgresql" else 4
        with self.captureOnCommitCallbacks(execute=True), self.assertNumQueries(queries):
            created = self.post(self.PAYLOAD)
        self.assertEqual(created.status_code, 201, created.content)
        detail = self.client.get(created["Location"])
        self.assertEqual(created.content, detail.content)

    def test_cached_and_uncached_pages_are_byte_identical(self):
        self.create(self.PAYLOAD)
        self.create({"title": "Second", "lessons": [{"title": "x"}]})
        miss, hit = self.list(), self.list()
        self.assertEqual((miss["X-Cache"], hit["X-Cache"]), ("miss", "hit"))
        self.assertEqual(miss.content, hit.content)
        # The detail page, as the edge cache stores it, equals a fresh build of it.
        first = self.client.get("/api/courses/second/").content
        self.assertEqual(first, self.client.get("/api/courses/second/").content)
        self.assertEqual(first, _old_detail_bytes("second"))

    def test_detail_costs_two_queries_and_lesson_queries_join_nothing(self):
        self.create(self.PAYLOAD)
        with self.assertNumQueries(2) as ctx:
            self.client.get("/api/courses/ubung-attention/")
        for query in ctx.captured_queries:
            self.assertNotIn("JOIN", query["sql"].upper())
        lessons_sql = str(Lesson.objects.all().query).upper()
        self.assertNotIn("JOIN", lessons_sql)
        self.assertIn('ORDER BY "COURSES_LESSON"."COURSE_ID" ASC', lessons_sql)


class DetailWritesTests(ApiTestCase):
    """Issue 17: writes to a course's URL answer JSON 405 even with CSRF enforced, as a
    real client meets them (the default test client skips the CSRF check)."""

    def test_writes_to_detail_are_json_405_with_csrf_enforced(self):
        Course.objects.create(title="A", slug="a")
        client = Client(enforce_csrf_checks=True, HTTP_X_FORWARDED_PROTO="https")
        for method in ("post", "put", "patch", "delete"):
            response = getattr(client, method)("/api/courses/a/", **AUTH)
            self.assertEqual(response.status_code, 405, (method, response.content[:200]))
            self.assertEqual(response["Content-Type"], "application/json")
            self.assertEqual(response.json(), {"error": "method not allowed"})
            self.assertEqual(response["Allow"], "GET, HEAD")
        self.assertTrue(Course.objects.filter(slug="a").exists())


class LeanMiddlewareTests(ApiTestCase):
    """Issue 17: /api/ and /health/ through settings.LEAN_MIDDLEWARE answer with the same
    status, body and headers as through the full stack."""

    def lean_client(self, **defaults):
        from aiia.handlers import LeanMiddlewareMixin
        from django.test.client import ClientHandler

        class LeanClientHandler(LeanMiddlewareMixin, ClientHandler):
            pass

        client = Client(**defaults)
        client.handler = LeanClientHandler(enforce_csrf_checks=False)
        return client

    def test_same_answers_and_headers_as_the_full_stack(self):
        self.create({"title": "A", "lessons": [{"title": "L"}]})
        full = Client(HTTP_X_FORWARDED_PROTO="https")
        lean = self.lean_client(HTTP_X_FORWARDED_PROTO="https")
        requests = [
            ("get", "/api/courses/", {}),
            ("get", "/api/courses/a/", {}),
            ("get", "/api/courses/nope/", {}),
            ("get", "/api/courses/?page=9", {}),
            ("delete", "/api/courses/a/", {}),
            ("post", "/api/courses/", {"data": "{}", "content_type": "application/json"}),
            ("get", "/health/", {}),
        ]
        for method, path, kw in requests:
            a = getattr(full, method)(path, **kw)
            b = getattr(lean, method)(path, **kw)
            self.assertEqual(a.status_code, b.status_code, path)
            if path != "/health/":  # its body carries each probe's latency
                self.assertEqual(a.content, b.content, path)
            a_headers, b_headers = dict(a.headers), dict(b.headers)
            a_headers.pop("X-Cache", None), b_headers.pop("X-Cache", None)  # miss, then hit
            if path == "/health/":  # latency digits change its length; Expires may tick over
                for h in (a_headers, b_headers):
                    h.pop("Content-Length", None), h.pop("Expires", None)
            self.assertEqual(a_headers, b_headers, path)
        response = lean.get("/api/courses/")
        self.assertIn("max-age=31536000", response["Strict-Transport-Security"])
        self.assertEqual(response["X-Content-Type-Options"], "nosniff")
        self.assertEqual(response["X-Frame-Options"], "DENY")
        self.assertEqual(response["Referrer-Policy"], "same-origin")

    def test_lean_stack_redirects_plain_http_and_checks_allowed_hosts(self):
        lean = self.lean_client()
        self.assertEqual(lean.get("/api/courses/").status_code, 301)
        with override_settings(ALLOWED_HOSTS=["eduaiia.com"]):
            https = self.lean_client(HTTP_X_FORWARDED_PROTO="https")
            self.assertEqual(https.get("/api/courses/", HTTP_HOST="evil.example").status_code, 400)
            self.assertEqual(https.get("/api/courses/", HTTP_HOST="eduaiia.com").status_code, 200)

    def test_only_the_api_and_health_take_the_lean_stack(self):
        from aiia.handlers import is_lean_path

        self.assertTrue(is_lean_path("/api/courses/"))
        self.assertTrue(is_lean_path("/health/"))
        for path in ("/admin/", "/admin/login/", "/api", "/health", "/healthz/", "/"):
            self.assertFalse(is_lean_path(path), path)


def _old_list_bytes(page=1, size=20):
    """A list page as the view built it before the list-miss rewrite (Paginator over the
    annotated queryset, the whole table aggregated)."""
    from django.core.paginator import Paginator
    from django.core.serializers.json import DjangoJSONEncoder
    from django.db.models import Count

    queryset = Course.objects.annotate(lesson_count=Count("lessons")).order_by("-created_at", "-id")
    paginator = Paginator(queryset, size)
    current = paginator.page(page)
    data = {
        "count": paginator.count,
        "page": page,
        "page_size": size,
        "num_pages": paginator.num_pages,
        "next": page + 1 if current.has_next() else None,
        "previous": page - 1 if current.has_previous() else None,
        "results": [course.as_dict() for course in current.object_list],
    }
    return json.dumps(data, cls=DjangoJSONEncoder, separators=(",", ":")).encode()


class ListMissTests(ApiTestCase):
    """Issue 17: a list miss reads one page of rows and that page's lesson counts; the
    total is kept by the writes; the bytes are the old Paginator's."""

    def setUp(self):
        super().setUp()
        with self.captureOnCommitCallbacks(execute=True):
            for i in range(45):
                course = Course.objects.create(title=f"Course {i}", slug=f"course-{i}")
                for p in range(i % 3):
                    Lesson.objects.create(course=course, position=p + 1, title=f"L{p}")

    def test_pages_equal_the_old_paginator_bytes(self):
        for page, size in ((1, 20), (2, 20), (3, 20), (1, 7), (7, 7), (1, 100)):
            miss = self.list(f"?page={page}&page_size={size}")
            self.assertEqual(miss["X-Cache"], "miss")
            self.assertEqual(miss.content, _old_list_bytes(page, size), (page, size))
            hit = self.list(f"?page={page}&page_size={size}")
            self.assertEqual((hit["X-Cache"], hit.content), ("hit", miss.content))

    def test_a_miss_costs_one_query_and_no_whole_table_aggregate(self):
        self.list()  # the total is now stored
        cache.delete(listcache.GENERATION_KEY)
        with self.assertNumQueries(1) as ctx:
            self.assertEqual(self.list("?page=2")["X-Cache"], "miss")
        page_sql = ctx.captured_queries[0]["sql"].upper()
        self.assertIn("LIMIT 20 OFFSET 20", page_sql)
        # The lessons are counted per row of the page (correlated), never GROUPed over all.
        self.assertEqual(page_sql.count("COUNT("), 1)
        self.assertIn('WHERE L."COURSE_ID" = C."ID"', page_sql)
        self.assertNotIn("GROUP BY", page_sql)

    def test_writes_keep_the_total_without_a_recount(self):
        self.assertEqual(self.list().json()["count"], 45)
        self.create({"title": "Newer"})
        with self.assertNumQueries(1):  # the page with its lesson counts: no recount
            self.assertEqual(self.list().json()["count"], 46)
        with self.captureOnCommitCallbacks(execute=True):
            Course.objects.filter(slug__in=["course-1", "course-2"]).delete()
        response = self.list()
        self.assertEqual(response.json()["count"], 44)
        self.assertEqual(response.content, _old_list_bytes())

    def test_a_lost_total_is_recounted(self):
        self.list()
        cache.delete(listcache.COUNT_KEY)
        cache.delete(listcache.GENERATION_KEY)
        with self.assertNumQueries(2):  # the recount, then the page
            self.assertEqual(self.list().json()["count"], 45)

    def test_page_past_the_end_is_404_and_not_cached(self):
        response = self.list("?page=4")
        self.assertEqual(response.status_code, 404)
        self.assertEqual(response.json(), {"error": "no page 4 (there are 3)"})
        self.assertEqual(self.list("?page=4")["X-Cache"], "miss")


class StampedeTests(ApiTestCase):
    """Issue 17: while one request rebuilds a page, the others answer its previous bytes."""

    def test_list_miss_while_another_rebuilds_answers_the_previous_bytes(self):
        with self.captureOnCommitCallbacks(execute=True):
            Course.objects.create(title="A", slug="a")
        before = self.list().content
        self.create({"title": "B"})  # new generation
        cache.add("courses:list:lock:1:20", 1, 5)  # someone else is rebuilding page 1
        with self.assertNumQueries(0):
            stale = self.list()
        self.assertEqual((stale["X-Cache"], stale.content), ("stale", before))
        cache.delete("courses:list:lock:1:20")
        fresh = self.list()
        self.assertEqual(fresh["X-Cache"], "miss")
        self.assertEqual(fresh.json()["results"][0]["slug"], "b")
        self.assertEqual(self.list()["X-Cache"], "hit")

    def test_no_previous_bytes_builds_without_waiting(self):
        Course.objects.create(title="A", slug="a")
        cache.add("courses:list:lock:1:20", 1, 5)
        response = self.list()
        self.assertEqual((response.status_code, response["X-Cache"]), (200, "miss"))
        self.assertEqual(response.json()["count"], 1)

    def test_detail_miss_while_another_rebuilds_answers_the_previous_bytes(self):
        with self.captureOnCommitCallbacks(execute=True):
            course = Course.objects.create(title="A", slug="a")
        before = self.client.get("/api/courses/a/").content
        with self.captureOnCommitCallbacks(execute=True):
            Lesson.objects.create(course=course, position=1, title="L1")
        cache.add("courses:detail:lock:a", 1, 5)
        with self.assertNumQueries(0):
            stale = self.client.get("/api/courses/a/")
        self.assertEqual((stale["X-Cache"], stale.content), ("stale", before))
        cache.delete("courses:detail:lock:a")
        self.assertEqual(len(self.client.get("/api/courses/a/").json()["lessons"]), 1)


class DetailCacheTests(ApiTestCase):
    """Issue 17: details cached per course; a write invalidates that course only."""

    def setUp(self):
        super().setUp()
        self.create({"title": "A", "lessons": [{"title": "La", "body": "x"}]})
        self.create({"title": "B", "summary": "Ünïcode ✓", "lessons": [{"title": "Lb"}]})

    def get(self, slug):
        return self.client.get(f"/api/courses/{slug}/")

    def test_cached_and_uncached_detail_are_byte_identical(self):
        miss = self.get("b")
        with self.assertNumQueries(0):
            hit = self.get("b")
        self.assertEqual((miss["X-Cache"], hit["X-Cache"]), ("miss", "hit"))
        self.assertEqual(miss.content, hit.content)
        self.assertEqual(hit.content, _old_detail_bytes("b"))
        self.assertEqual(hit["Content-Type"], miss["Content-Type"])
        self.assertEqual(hit["Content-Type"], "application/json")

    def test_a_write_invalidates_only_its_course(self):
        self.get("a"), self.get("b")
        with self.captureOnCommitCallbacks(execute=True):
            course = Course.objects.get(slug="a")
            course.summary = "revised"
            course.save()
        a, b = self.get("a"), self.get("b")
        self.assertEqual((a["X-Cache"], b["X-Cache"]), ("miss", "hit"))
        self.assertEqual(a.json()["summary"], "revised")
        self.assertEqual(a.content, _old_detail_bytes("a"))

    def test_lesson_writes_invalidate_their_course(self):
        self.get("a"), self.get("b")
        with self.captureOnCommitCallbacks(execute=True):
            lesson = Lesson.objects.get(course__slug="b")
            lesson.title = "Lb, revised"
            lesson.save()
        b = self.get("b")
        self.assertEqual((b["X-Cache"], self.get("a")["X-Cache"]), ("miss", "hit"))
        self.assertEqual(b.json()["lessons"][0]["title"], "Lb, revised")
        with self.captureOnCommitCallbacks(execute=True):
            lesson.delete()
        self.assertEqual(self.get("b").json()["lessons"], [])

    def test_a_deleted_course_is_404_not_its_previous_bytes(self):
        self.get("a")
        with self.captureOnCommitCallbacks(execute=True):
            Course.objects.filter(slug="a").delete()
        cache.add("courses:detail:lock:a", 1, 5)  # even while "another" request rebuilds
        self.assertEqual(self.get("a").status_code, 404)
        self.assertEqual(self.get("a").status_code, 404)

    def test_a_renamed_course_drops_its_old_slug(self):
        self.get("a")
        with self.captureOnCommitCallbacks(execute=True):
            course = Course.objects.get(slug="a")
            course.slug = "a2"
            course.save()
        self.assertEqual(self.get("a").status_code, 404)
        self.assertEqual(self.get("a2").status_code, 200)

    def test_404_is_not_cached(self):
        self.assertEqual(self.get("later").status_code, 404)
        self.create({"title": "Later"})
        self.assertEqual(self.get("later").status_code, 200)

    def test_cache_down_serves_the_detail_from_the_database(self):
        with override_settings(CACHES=REDIS_NOWHERE), self.assertLogs("courses", "WARNING"):
            response = self.get("a")
        self.assertEqual((response.status_code, response["X-Cache"]), (200, "miss"))
        self.assertEqual(response.content, _old_detail_bytes("a"))


class SeedCommandTests(ApiTestCase):
    """Issue 17: `manage.py seed_courses N` makes the catalogue N courses big."""

    def seed(self, *args):
        from io import StringIO

        from django.core.management import call_command

        out = StringIO()
        call_command("seed_courses", *map(str, args), stdout=out)
        return out.getvalue()

    def test_seeds_idempotently_in_batches_and_removes(self):
        self.create({"title": "Mine"})
        self.assertEqual(self.list().json()["count"], 1)
        self.assertIn("created 30 courses (0 were there)", self.seed(30, "--batch", "7"))
        self.assertEqual(Course.objects.filter(slug__startswith="seed-").count(), 30)
        self.assertEqual(Lesson.objects.filter(course__slug="seed-000030").count(), 2)
        response = self.list()  # bulk writes sent no signals: the command reset the cache
        self.assertEqual((response["X-Cache"], response.json()["count"]), ("miss", 31))
        self.assertEqual(response.content, _old_list_bytes())
        self.assertIn("created 5 courses (30 were there)", self.seed(35, "--lessons", "0"))
        self.assertEqual(self.list().json()["count"], 36)
        self.assertIn("removed 35 seeded courses", self.seed(0))
        self.assertEqual(list(Course.objects.values_list("slug", flat=True)), ["mine"])
        self.assertEqual(Lesson.objects.count(), 0)
        self.assertEqual(self.list().json()["count"], 1)

    def test_bad_arguments_are_refused_and_change_nothing(self):
        from django.core.management.base import CommandError

        for args, message in (
            ((-1,), "count must be from 0"),
            ((10, "--lessons", "51"), "--lessons must be"),
            ((10, "--batch", "0"), "--batch must be"),
            ((10, "--prefix", "a b"), "--prefix must be"),
        ):
            with self.assertRaisesMessage(CommandError, message):
                self.seed(*args)
        self.assertEqual(Course.objects.count(), 0)


class FastPathTests(ApiTestCase):
    """Issue 17: cached pages answered before Django, with Django's exact answer."""

    def setUp(self):
        super().setUp()
        import io

        from aiia.fastpath import FastPath
        from aiia.handlers import LeanWSGIHandler

        self.io = io
        self.django = LeanWSGIHandler()
        self.calls = 0

        def counted(environ, start_response):
            self.calls += 1
            return self.django(environ, start_response)

        self.fast = FastPath(counted)
        self.assertTrue(self.fast.enabled)
        self.create({"title": "A", "lessons": [{"title": "La", "body": "x"}]})
        self.create({"title": "B", "summary": "Ünïcode ✓", "lessons": [{"title": "Lb"}]})

    def call(self, app, path, qs="", method="GET", **extra):
        environ = {
            "REQUEST_METHOD": method,
            "PATH_INFO": path,
            "QUERY_STRING": qs,
            "SERVER_NAME": "testserver",
            "SERVER_PORT": "80",
            "HTTP_HOST": "localhost",
            "HTTP_X_FORWARDED_PROTO": "https",
            "wsgi.input": self.io.BytesIO(),
            "wsgi.url_scheme": "http",
            "wsgi.errors": self.io.StringIO(),
            **extra,
        }
        out = {}

        def start_response(status, headers, exc_info=None):
            out["status"], out["headers"] = status, headers

        from django.core.signals import request_finished, request_started
        from django.db import close_old_connections

        # As Django's test client does: the request's start and end must not close the
        # test's connection (inside its transaction, PostgreSQL's would be closed).
        for signal in (request_started, request_finished):
            signal.disconnect(close_old_connections)
        try:
            result = app(environ, start_response)
            try:
                body = b"".join(result)
            finally:
                if hasattr(result, "close"):
                    result.close()  # as a WSGI server does: Django's request_finished
        finally:
            for signal in (request_started, request_finished):
                signal.connect(close_old_connections)
        return out["status"], out["headers"], body

    def fast_hit(self, path, qs=""):
        """The fast path's answer to a cached request: Django not called."""
        before = self.calls
        answer = self.call(self.fast, path, qs)
        self.assertEqual(self.calls, before, f"{path}?{qs} went to Django")
        return answer

    def test_hits_are_djangos_own_answers_byte_for_byte(self):
        for path, qs in [
            ("/api/courses/", ""),
            ("/api/courses/", "page=1&page_size=1"),
            ("/api/courses/", "page_size=1&page=2"),
            ("/api/courses/a/", ""),
            ("/api/courses/b/", ""),
        ]:
            miss = self.call(self.django, path, qs)  # builds and caches
            self.assertIn(("X-Cache", "miss"), miss[1])
            django_hit = self.call(self.django, path, qs)
            self.assertIn(("X-Cache", "hit"), django_hit[1])
            fast = self.fast_hit(path, qs)
            # Same status, same headers in the same order, same bytes.
            self.assertEqual(fast, django_hit, path + qs)
            self.assertEqual(fast[2], miss[2])

    def test_detail_hit_equals_the_uncached_bytes(self):
        self.call(self.django, "/api/courses/b/")
        self.assertEqual(self.fast_hit("/api/courses/b/")[2], _old_detail_bytes("b"))

    def test_everything_else_goes_to_django(self):
        self.call(self.django, "/api/courses/")
        self.call(self.django, "/api/courses/a/")
        cases = [
            {"path": "/api/courses/", "method": "HEAD"},
            {"path": "/api/courses/", "method": "POST"},
            {"path": "/api/courses/", "qs": "page=01"},
            {"path": "/api/courses/", "qs": "page=1&page=1"},
            {"path": "/api/courses/", "qs": "page_size=101"},
            {"path": "/api/courses/", "qs": "x=1"},
            {"path": "/api/courses/a/", "qs": "x=1"},
            {"path": "/api/courses/a/", "HTTP_X_FORWARDED_PROTO": "http"},  # -> 301
            {"path": "/api/courses/a/", "HTTP_HOST": "evil.example"},  # -> 400
            {"path": "/api/courses/ä/"},
            {"path": "/api/courses/nope/"},  # not cached: Django's 404
            {"path": "/api/courses/a"},
        ]
        for case in cases:
            case = dict(case)
            path = case.pop("path")
            qs = case.pop("qs", "")
            before = self.calls
            self.call(self.fast, path, qs, **case)
            self.assertEqual(self.calls, before + 1, case)  # Django answered it
        status = self.call(self.fast, "/api/courses/a/", HTTP_X_FORWARDED_PROTO="http")[0]
        self.assertEqual(status[:3], "301")
        status = self.call(self.fast, "/api/courses/a/", HTTP_HOST="evil.example")[0]
        self.assertEqual(status[:3], "400")

    def test_a_write_makes_the_next_read_go_to_django(self):
        self.call(self.django, "/api/courses/")
        self.call(self.django, "/api/courses/a/")
        self.fast_hit("/api/courses/"), self.fast_hit("/api/courses/a/")
        with self.captureOnCommitCallbacks(execute=True):
            course = Course.objects.get(slug="a")
            course.summary = "revised"
            course.save()
        for path in ("/api/courses/", "/api/courses/a/"):
            before = self.calls
            _status, headers, body = self.call(self.fast, path)
            self.assertEqual((self.calls, ("X-Cache", "miss") in headers), (before + 1, True))
            self.assertIn(b"revised", body)
            self.assertEqual(self.fast_hit(path)[2], body)

    def test_off_when_disabled_and_after_a_cache_error(self):
        from aiia.fastpath import FastPath

        self.call(self.django, "/api/courses/a/")
        with override_settings(API_FAST_PATH=False):
            self.assertFalse(FastPath(self.django).enabled)
        down = mock.patch("courses.pagecache.cache.get_many", side_effect=ConnectionError("down"))
        with down, self.assertLogs("aiia.fastpath", "WARNING"):
            self.call(self.fast, "/api/courses/a/")
        self.assertGreater(self.fast.off_until, 0)
        before = self.calls
        self.call(self.fast, "/api/courses/a/")  # still off: straight to Django
        self.assertEqual(self.calls, before + 1)


@override_settings(API_LIST_REBUILD_INTERVAL=1.0)  # production's (aiia/settings.py)
class CoalescedRebuildTests(ApiTestCase):
    """Issue 17, fifth pass: a list page is rebuilt at most once per interval after writes;
    a write shows in it within the interval; details are not coalesced."""

    def setUp(self):
        super().setUp()
        self.now = 1_000_000.0
        clock = mock.patch("courses.pagecache.time.time", side_effect=lambda: self.now)
        clock.start()
        self.addCleanup(clock.stop)
        listcache.pagecache._recent.clear()  # the process' copies (same clock in every test)
        self.addCleanup(listcache.pagecache._recent.clear)
        self.create({"title": "A", "lessons": [{"title": "La"}]})

    # GET /api/courses/ over HTTPS, as gunicorn hands it to the WSGI fast path
    LIST_ENVIRON: ClassVar[dict] = {
        "REQUEST_METHOD": "GET",
        "PATH_INFO": "/api/courses/",
        "QUERY_STRING": "",
        "HTTP_HOST": "localhost",
        "HTTP_X_FORWARDED_PROTO": "https",
    }

    def slugs(self, response):
        return [c["slug"] for c in response.json()["results"]]

    def test_writes_within_the_interval_answer_the_page_built_before_them(self):
        first = self.list()
        self.assertEqual((first["X-Cache"], self.slugs(first)), ("miss", ["a"]))
        for n, title in enumerate(["B", "C", "D"]):
            self.now += 0.25  # binary fractions: exact clock arithmetic
            self.create({"title": title})
            with self.assertNumQueries(0):
                same = self.list()  # 0.25, 0.5, 0.75 s after the page was built
            self.assertEqual((same["X-Cache"], same.content), ("hit", first.content), n)
        self.now += 0.25  # the page is 1.0 s old: the writes are due
        rebuilt = self.list()
        self.assertEqual((rebuilt["X-Cache"], self.slugs(rebuilt)), ("miss", ["d", "c", "b", "a"]))
        self.assertEqual(rebuilt.json()["count"], 4)
        self.assertEqual(self.list()["X-Cache"], "hit")

    def test_one_rebuild_per_interval_however_many_writes(self):
        self.list()
        misses = 0
        for i in range(20):  # 20 writes over 2.5 s, each followed by 5 reads
            self.now += 0.125
            self.create({"title": f"W{i}"})
            for _ in range(5):
                misses += self.list()["X-Cache"] == "miss"
        self.assertEqual(misses, 2)  # at 1.0 s and 2.0 s, not 20
        self.now += 1.0
        self.assertEqual(self.list().json()["count"], 21)  # every write shown in the end

    def test_without_writes_a_page_stays_fresh_for_its_timeout(self):
        self.list()
        self.now += listcache.PAGE_TIMEOUT - 1
        self.assertEqual(self.list()["X-Cache"], "hit")
        self.now += 1
        self.assertEqual(self.list()["X-Cache"], "miss")

    def test_the_entry_is_timed_before_its_rows_are_read(self):
        from courses import views

        real = views._page_sql  # called while the page's rows are read

        def slow(*args, **kwargs):
            self.now += 0.75  # a write may commit while the rows are read
            return real(*args, **kwargs)

        with mock.patch.object(views, "_page_sql", side_effect=slow):
            self.list()
        entry = cache.get(listcache.pagecache.entry_key(listcache.KIND, "1:20"))
        self.assertEqual(entry[1], self.now - 0.75)  # when the build began, not when it ended
        self.now += 0.125
        self.create({"title": "B"})
        self.assertEqual(self.slugs(self.list()), ["a"])  # within the interval
        self.now += 0.125  # 1.0 s after the build began, 0.25 s after it was stored
        self.assertEqual(self.slugs(self.list()), ["b", "a"])

    def test_the_fast_path_answers_within_the_interval_too(self):
        from aiia.fastpath import FastPath

        answered = []
        fast = FastPath(lambda environ, start: answered.append(1) or [b"django"])
        environ = self.LIST_ENVIRON
        built = self.list().content
        self.now += 0.5
        self.create({"title": "B"})
        self.assertEqual(b"".join(fast(dict(environ), lambda *a: None)), built)
        self.now += 0.5
        self.assertEqual(b"".join(fast(dict(environ), lambda *a: None)), b"django")
        self.assertEqual(answered, [1])

    def test_the_fast_path_keeps_a_copy_for_the_rest_of_the_interval_only(self):
        from aiia.fastpath import FastPath

        pagecache = listcache.pagecache
        fast = FastPath(lambda environ, start: [b"django"])
        environ = self.LIST_ENVIRON

        def answer():
            return b"".join(fast(dict(environ), lambda *a: None))

        built = self.list().content
        self.now += 0.25
        self.assertEqual(answer(), built)  # read from the cache, copied in the process
        self.create({"title": "B"})
        no_read = mock.patch.object(pagecache, "lean_reader", side_effect=AssertionError("read"))
        with no_read, mock.patch.object(pagecache, "cache", None):
            self.now += 0.5
            self.assertEqual(answer(), built)  # 0.75 s after the build: no cache read at all
        self.now += 0.25  # 1.0 s: the copy is over, and the cache's entry is stale
        self.assertEqual(answer(), b"django")
        self.assertEqual(self.slugs(self.list()), ["b", "a"])

    def test_the_process_copies_are_bounded(self):
        pagecache = listcache.pagecache
        for page in range(2, pagecache.RECENT_MAX + 50):  # page 1 is read below
            pagecache._recent[f"courses:list:entry:{page}:20"] = (self.now, b"x")
            if len(pagecache._recent) >= pagecache.RECENT_MAX:
                break
        self.list()  # stores page 1:20's entry
        self.assertEqual(
            pagecache.peek(listcache.KIND, listcache.GENERATION_KEY, "1:20", 1.0)[:1], b"{"
        )
        self.assertEqual(len(pagecache._recent), 1)  # full: emptied, then this page's copy

    def test_details_show_a_write_at_once(self):
        self.client.get("/api/courses/a/")
        with self.captureOnCommitCallbacks(execute=True):
            course = Course.objects.get(slug="a")
            course.summary = "revised"
            course.save()
        detail = self.client.get("/api/courses/a/")
        self.assertEqual((detail["X-Cache"], detail.json()["summary"]), ("miss", "revised"))
