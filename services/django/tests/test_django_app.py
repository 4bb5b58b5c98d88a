"""The app's own Django test suite, on the host: SQLite and local-memory cache, no engine."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from django_testlib import APP_DIR

pytest.importorskip("django", reason="install services/django/requirements.txt")


def manage(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "manage.py", *args],
        cwd=APP_DIR,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1", **(env or {})},
    )


def test_django_test_suite_passes():
    result = manage("test", "--settings=aiia.settings_test", "--noinput", "-v", "1")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "OK" in result.stderr


def test_migrations_match_the_models():
    result = manage("makemigrations", "--check", "--dry-run", "--settings=aiia.settings_test")
    assert result.returncode == 0, result.stdout + result.stderr


def test_production_settings_refuse_to_start_without_a_secret_key():
    env = {"DJANGO_SETTINGS_MODULE": "aiia.settings", "DJANGO_SECRET_KEY": "", "DJANGO_DEBUG": ""}
    result = manage("check", env=env)
    assert result.returncode != 0
    assert "DJANGO_SECRET_KEY is required" in result.stderr


def test_production_settings_pass_check_deploy():
    env = {
        "DJANGO_SETTINGS_MODULE": "aiia.settings",
        "DJANGO_SECRET_KEY": "host-check-" + "k" * 50,
        "ALLOWED_HOSTS": "eduaiia.com,www.eduaiia.com",
        "DJANGO_DEBUG": "",
    }
    result = manage("check", "--deploy", "--fail-level", "WARNING", env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "no issues (0 silenced)" in result.stdout
