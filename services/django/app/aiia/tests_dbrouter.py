"""aiia/dbrouter.py: reads to the replica, writes to the primary, read-your-writes; off
(every answer None, no `replica` database) unless DB_REPLICA_HOST is set."""

import os
import runpy
import warnings
from pathlib import Path
from unittest import mock

from courses.models import Course
from django.http import HttpResponse
from django.test import RequestFactory, SimpleTestCase, override_settings

from . import dbrouter

# The router only reads the aliases of settings.DATABASES; no connection is opened.
warnings.filterwarnings("ignore", "Overriding setting DATABASES", UserWarning)
SETTINGS = Path(__file__).with_name("settings.py")
WITH_REPLICA = {
    "default": {"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:"},
    "replica": {"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:"},
}


def settings_with(**env):
    base = {"DB_ENGINE": "postgresql", "DB_PASSWORD": "not-a-secret", "AIIA_ENV": "prod"}
    with mock.patch.dict(os.environ, {**base, **env}):
        if "DB_REPLICA_HOST" not in env:
            os.environ.pop("DB_REPLICA_HOST", None)  # restored by patch.dict
        return runpy.run_path(str(SETTINGS))


class SettingsTests(SimpleTestCase):
    def test_off_unless_db_replica_host_is_set(self):
        s = settings_with()
        self.assertEqual(list(s["DATABASES"]), ["default"])
        self.assertNotIn("DATABASE_ROUTERS", s)
        self.assertNotIn("aiia.dbrouter.ReadYourWritesMiddleware", s["MIDDLEWARE"])

    def test_db_replica_host_adds_the_replica_the_router_and_the_middleware_first(self):
        s = settings_with(DB_REPLICA_HOST="10.77.0.25", DB_HOST="10.77.0.25", DB_PORT="5000")
        replica, default = s["DATABASES"]["replica"], s["DATABASES"]["default"]
        self.assertEqual((default["HOST"], default["PORT"]), ("10.77.0.25", 5000))
        self.assertEqual((replica["HOST"], replica["PORT"]), ("10.77.0.25", 5001))
        self.assertEqual(replica["NAME"], default["NAME"])
        self.assertEqual(replica["OPTIONS"]["application_name"], "aiia-django-prod-replica")
        self.assertEqual(replica["TEST"], {"MIRROR": "default"})
        self.assertEqual(s["DATABASE_ROUTERS"], ["aiia.dbrouter.PrimaryReplicaRouter"])
        self.assertEqual(s["MIDDLEWARE"][0], "aiia.dbrouter.ReadYourWritesMiddleware")
        self.assertEqual(s["LEAN_MIDDLEWARE"][0], "aiia.dbrouter.ReadYourWritesMiddleware")

    def test_a_vanished_database_host_fails_in_seconds_not_tcps_minutes(self):
        options = settings_with()["DATABASES"]["default"]["OPTIONS"]
        self.assertEqual((options["keepalives"], options["keepalives_idle"],
                          options["keepalives_interval"], options["keepalives_count"],
                          options["tcp_user_timeout"]), (1, 5, 2, 3, 10000))  # fmt: skip
        self.assertNotIn("load_balance_hosts", options)  # one host (PgBouncer): nothing to spread

    def test_the_cluster_hosts_are_tried_in_random_order_by_primary_and_replica_alike(self):
        s = settings_with(DB_REPLICA_HOST="10.77.0.25,10.77.0.26", DB_HOST="10.77.0.25,10.77.0.26",
                          DB_LOAD_BALANCE_HOSTS="random")  # fmt: skip
        for alias in ("default", "replica"):
            options = s["DATABASES"][alias]["OPTIONS"]
            self.assertEqual(options["load_balance_hosts"], "random")
            self.assertEqual(options["tcp_user_timeout"], 10000)


class RouterTests(SimpleTestCase):
    router = dbrouter.PrimaryReplicaRouter()

    def test_off_the_router_has_no_opinion(self):
        self.assertIsNone(self.router.db_for_read(Course))
        self.assertIsNone(self.router.db_for_write(Course))
        self.assertFalse(dbrouter.pinned())

    @override_settings(DATABASES=WITH_REPLICA)
    def test_reads_go_to_the_replica_until_a_write_pins_the_primary(self):
        token = dbrouter._pinned.set(False)
        try:
            self.assertEqual(self.router.db_for_read(Course), "replica")
            self.assertEqual(self.router.db_for_write(Course), "default")
            self.assertEqual(self.router.db_for_read(Course), "default")  # read-your-writes
        finally:
            dbrouter._pinned.reset(token)
        self.assertTrue(self.router.allow_migrate("default", "courses"))
        self.assertFalse(self.router.allow_migrate("replica", "courses"))


@override_settings(DATABASES=WITH_REPLICA)
class MiddlewareTests(SimpleTestCase):
    def run_view(self, request, write=False):
        seen = {}

        def view(req):
            seen["before"] = dbrouter.PrimaryReplicaRouter().db_for_read(Course)
            if write:
                dbrouter.PrimaryReplicaRouter().db_for_write(Course)
            seen["after"] = dbrouter.PrimaryReplicaRouter().db_for_read(Course)
            return HttpResponse("ok")

        response = dbrouter.ReadYourWritesMiddleware(view)(request)
        return response, seen

    def test_a_plain_get_reads_the_replica_and_sets_no_cookie(self):
        response, seen = self.run_view(RequestFactory().get("/api/courses/"))
        self.assertEqual(seen, {"before": "replica", "after": "replica"})
        self.assertNotIn(dbrouter.COOKIE, response.cookies)

    def test_a_write_pins_the_rest_of_the_request_and_sets_a_short_sticky_cookie(self):
        response, seen = self.run_view(RequestFactory().get("/x/"), write=True)
        self.assertEqual(seen, {"before": "replica", "after": "default"})
        cookie = response.cookies[dbrouter.COOKIE]
        self.assertEqual(cookie["max-age"], dbrouter.STICKY_SECONDS)
        self.assertTrue(cookie["httponly"] and cookie["secure"])
        self.assertFalse(dbrouter.pinned())  # reset for the thread's next request

    def test_an_unsafe_method_reads_the_primary_from_its_first_query(self):
        response, seen = self.run_view(RequestFactory().post("/api/courses/"))
        self.assertEqual(seen, {"before": "default", "after": "default"})
        self.assertIn(dbrouter.COOKIE, response.cookies)

    def test_the_next_request_with_the_cookie_reads_the_primary(self):
        request = RequestFactory().get("/api/courses/")
        request.COOKIES[dbrouter.COOKIE] = "1"
        _, seen = self.run_view(request)
        self.assertEqual(seen, {"before": "default", "after": "default"})
        _, seen = self.run_view(RequestFactory().get("/api/courses/"))  # window over
        self.assertEqual(seen["before"], "replica")
