"""GET /health/: 200 when database and cache answer, 503 (valid JSON, no leak) otherwise."""

import time
from unittest import mock

from django.db import OperationalError, connection
from django.test import TestCase, override_settings

from . import health

REDIS_NOWHERE = {
    "default": {
        "BACKEND": "django.core.cache.backends.redis.RedisCache",
        "LOCATION": "redis://127.0.0.1:1/0",  # nothing listens on port 1
        "OPTIONS": {"socket_connect_timeout": 1, "socket_timeout": 1},
    }
}


class HealthTests(TestCase):
    def get(self, host="127.0.0.1:8000"):
        # As Docker's HEALTHCHECK does: plain HTTP to 127.0.0.1, no X-Forwarded-Proto.
        return self.client.get("/health/", HTTP_HOST=host)

    def test_ok(self):
        response = self.get()
        self.assertEqual(response.status_code, 200)
        self.assertEqual(response["Content-Type"], "application/json")
        body = response.json()
        self.assertEqual(body["status"], "ok")
        self.assertEqual(body["version"], "test")
        self.assertEqual(body["environment"], "test")
        self.assertTrue(body["checks"]["database"]["ok"])
        self.assertEqual(body["checks"]["database"]["name"], connection.settings_dict["NAME"])
        self.assertTrue(body["checks"]["cache"]["ok"])
        self.assertIn("no-cache", response["Cache-Control"])

    def test_not_redirected_to_https_and_loopback_is_an_allowed_host(self):
        with override_settings(ALLOWED_HOSTS=["eduaiia.com", "127.0.0.1", "localhost"]):
            self.assertEqual(self.get().status_code, 200)
            self.assertEqual(self.get("localhost:8001").status_code, 200)
            self.assertEqual(self.get("evil.example").status_code, 400)

    def test_loopback_and_own_address_always_allowed(self):
        from django.conf import settings

        for name in ("127.0.0.1", "localhost", "[::1]"):
            self.assertIn(name, settings.ALLOWED_HOSTS)

    def test_database_down_is_503_without_leaking_the_error(self):
        error = OperationalError('connection to server at "172.20.0.5", port 6432 failed')
        with mock.patch.object(health, "query_database", side_effect=error):
            response = self.get()
        self.assertEqual(response.status_code, 503)
        body = response.json()
        self.assertEqual(body["status"], "error")
        self.assertEqual(body["checks"]["database"], {"ok": False, "error": "OperationalError"})
        self.assertTrue(body["checks"]["cache"]["ok"])
        self.assertNotIn(b"172.20.0.5", response.content)

    def test_cache_down_is_503(self):
        with override_settings(CACHES=REDIS_NOWHERE):
            started = time.monotonic()
            response = self.get()
            elapsed = time.monotonic() - started
        self.assertEqual(response.status_code, 503)
        body = response.json()
        self.assertEqual(body["status"], "error")
        self.assertTrue(body["checks"]["database"]["ok"])
        self.assertFalse(body["checks"]["cache"]["ok"])
        self.assertEqual(body["checks"]["cache"]["error"], "ConnectionError")
        self.assertLess(elapsed, 3)

    def test_hung_dependency_answers_within_the_deadline(self):
        release = mock.Mock()

        class calls:
            count = 0

        def hang():
            calls.count += 1
            time.sleep(1.0)
            release()
            return "late"

        with (
            mock.patch.object(health, "HEALTH_TIMEOUT", 0.2),
            mock.patch.object(health, "query_database", side_effect=hang),
        ):
            started = time.monotonic()
            first = self.get()
            second = self.get()  # shares the stuck probe: not queued again, same deadline
            self.assertLess(time.monotonic() - started, 0.9)
            deadline = time.monotonic() + 5
            while not release.called and time.monotonic() < deadline:
                time.sleep(0.05)
        self.assertEqual(first.status_code, 503)
        self.assertEqual(first.json()["checks"]["database"], {"ok": False, "error": "timeout"})
        self.assertEqual(second.status_code, 503)
        self.assertEqual(second.json()["checks"]["database"], {"ok": False, "error": "timeout"})
        self.assertEqual(calls.count, 1)  # one probe for both requests
        time.sleep(0.1)
        self.assertEqual(self.get().status_code, 200)  # recovered once the probe returned

    def test_overlapping_requests_share_one_probe_and_all_succeed(self):
        from concurrent.futures import ThreadPoolExecutor

        from django.test import RequestFactory

        calls = []

        def slow():
            calls.append(1)
            time.sleep(0.3)
            return "aiia_test"

        request = RequestFactory().get("/health/", HTTP_HOST="127.0.0.1")
        with (
            mock.patch.object(health, "query_database", side_effect=slow),
            ThreadPoolExecutor(max_workers=8) as pool,
        ):
            codes = list(pool.map(lambda _: health.health(request).status_code, range(8)))
        self.assertEqual(codes, [200] * 8)
        self.assertLess(len(calls), 8)  # coalesced, not one probe per request

    def test_post_not_allowed(self):
        self.assertEqual(self.client.post("/health/", HTTP_HOST="127.0.0.1").status_code, 405)
