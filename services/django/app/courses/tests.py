"""The JSON API and the course-list cache with its invalidation."""

import json

from django.core.cache import cache
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
        self.assertIn("slug", response.json()["fields"])
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
