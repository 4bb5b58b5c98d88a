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

    def test_cache_key_is_each_containers_own(self):
        # Level 3: instances share one Redis and number their workers alike (same pid).
        from django.core.cache import cache

        with mock.patch.object(health.os, "getpid", return_value=20):
            for container in ("c0ffee000001", "c0ffee000002"):
                with mock.patch.object(health.socket, "gethostname", return_value=container):
                    health.query_cache()
        self.assertIsNotNone(cache.get("health:c0ffee000001:20"))
        self.assertIsNotNone(cache.get("health:c0ffee000002:20"))

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


class ClientErrorLogTests(TestCase):
    """Issue 17: a scanner's 4xx answers cannot flood the log."""

    def setUp(self):
        import logging

        from .logfilters import ClientErrorFilter

        self.now = 0.0
        self.filter = ClientErrorFilter(burst=3, window=60, clock=lambda: self.now)
        self.lines = []
        test = self

        class Collect(logging.Handler):
            def emit(self, record):
                test.lines.append((record.levelname, record.name, record.getMessage()))

        self.handler = Collect()
        self.handler.addFilter(self.filter)
        self.loggers = [logging.getLogger(n) for n in ("django.request", "django.security")]
        self.saved = [(lg.level, lg.propagate) for lg in self.loggers]
        for lg in self.loggers:
            lg.addHandler(self.handler)
            lg.setLevel(logging.INFO)
            lg.propagate = False  # only this handler: the suite's output stays quiet

    def tearDown(self):
        for lg, (level, propagate) in zip(self.loggers, self.saved, strict=True):
            lg.removeHandler(self.handler)
            lg.setLevel(level)
            lg.propagate = propagate

    def test_a_flood_of_404s_logs_a_few_info_lines_then_a_count(self):
        self.client = self.client_class(HTTP_X_FORWARDED_PROTO="https")
        for i in range(50):
            self.assertEqual(self.client.get(f"/wp-admin/{i}.php").status_code, 404)
        self.assertEqual(len(self.lines), 3)
        self.assertEqual({level for level, _, _ in self.lines}, {"INFO"})
        self.assertIn("Not Found: /wp-admin/0.php", self.lines[0][2])
        self.now = 61.0  # the next window: one line says what was dropped
        self.client.get("/wp-admin/next.php")
        self.assertEqual(len(self.lines), 4)
        self.assertIn("47 more client errors not logged", self.lines[3][2])
        self.assertIn("/wp-admin/next.php", self.lines[3][2])

    def test_server_errors_still_pass_at_error(self):
        import logging

        for _ in range(10):
            logging.getLogger("django.request").error("boom", extra={"status_code": 500})
        self.assertEqual(len(self.lines), 10)
        self.assertEqual({level for level, _, _ in self.lines}, {"ERROR"})

    def test_csrf_and_disallowed_host_warnings_are_limited_too(self):
        with override_settings(ALLOWED_HOSTS=["eduaiia.com"]):
            for _ in range(20):
                response = self.client.get("/api/courses/", HTTP_HOST="evil.example")
                self.assertEqual(response.status_code, 400)
        self.assertEqual(len(self.lines), 3)
        self.assertTrue(all(level == "INFO" for level, _, _ in self.lines))
        self.assertIn("Invalid HTTP_HOST header", self.lines[0][2])

    def test_the_filter_is_on_the_apps_stdout_handler(self):
        from django.conf import settings

        handler = settings.LOGGING["handlers"]["stdout"]
        self.assertIn("client_errors", handler["filters"])
        self.assertEqual(
            settings.LOGGING["filters"]["client_errors"]["()"], "aiia.logfilters.ClientErrorFilter"
        )


class PrecompressedStaticTests(TestCase):
    """Issue 17: collectstatic writes FILE.gz beside each text file, for gzip_static."""

    def test_collectstatic_writes_gzip_beside_css_and_js(self):
        import gzip
        import json
        import tempfile
        from pathlib import Path

        from django.core.management import call_command

        storages = {
            "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
            "staticfiles": {"BACKEND": "aiia.storage.GzipManifestStaticFilesStorage"},
        }
        with tempfile.TemporaryDirectory() as root:
            with override_settings(STATIC_ROOT=root, STORAGES=storages):
                call_command("collectstatic", interactive=False, verbosity=0)
            root = Path(root)
            manifest = json.loads((root / "staticfiles.json").read_text())["paths"]
            for name in ("admin/css/base.css", manifest["admin/css/base.css"],
                         manifest["admin/js/core.js"]):  # fmt: skip
                original = (root / name).read_bytes()
                packed = (root / (name + ".gz")).read_bytes()
                self.assertEqual(gzip.decompress(packed), original, name)
                self.assertLess(len(packed), len(original) / 2, name)
                self.assertEqual(packed[4:8], b"\0\0\0\0", "mtime 0: the same bytes each run")
            self.assertFalse(list(root.rglob("*.png.gz")), "images are not gzipped")
            self.assertFalse(list(root.rglob("*.gz.gz")))
            # A second run rewrites nothing that is current.
            from .storage import gzip_tree

            self.assertEqual(gzip_tree(root), [])
