"""`invoke test --env=ENV` for real: the CI test phase in the images `invoke build` made.

The images: aiia/django and aiia/postgres tagged with this commit (`nox -s tests` runs
`invoke build` first), or with AIIA_TEST_IMAGE_TAG. Each run makes its own private network
and throwaway PostgreSQL and must leave nothing behind.
"""

from __future__ import annotations

import os
import re
import subprocess
import uuid

import pytest

from aiia_ops.tasks.common import current_version
from tests.conftest import run_invoke

pytestmark = pytest.mark.docker

LABEL = "org.eduaiia.apptest"


def docker(*args: str, input: str | None = None, timeout: float = 300):
    return subprocess.run(
        ["docker", *args], input=input, capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="module")
def tag() -> str:
    try:
        engine = docker("version", "--format", "{{.Server.Version}}", timeout=20)
    except FileNotFoundError:
        pytest.skip("no docker client: run `invoke provision`")
    if engine.returncode != 0:
        pytest.skip(f"no Docker engine answers: {engine.stderr.strip()}")
    tag = os.environ.get("AIIA_TEST_IMAGE_TAG") or current_version()
    for image in (f"aiia/django:{tag}", f"aiia/postgres:{tag}"):
        if docker("image", "inspect", image).returncode != 0:
            pytest.fail(f"{image} is not built: run `invoke build` (nox -s tests does)")
    return tag


def phase_rows(output: str) -> dict[str, str]:
    """{phase: ok|FAIL} from the table the task prints at the end."""
    return dict(re.findall(r"^(checks|migrations|safety|tests|static)\s+(ok|FAIL)\s", output, re.M))


def leftovers(run_id: str) -> list[str]:
    label = f"{LABEL}={run_id}"
    containers = docker("ps", "-aq", "--filter", f"label={label}").stdout.split()
    networks = docker("network", "ls", "-q", "--filter", f"label={label}").stdout.split()
    return containers + networks


def run_id_of(output: str) -> str:
    match = re.search(r"\(run ([0-9a-f]{8})\)", output)
    assert match, output
    return match.group(1)


@pytest.mark.parametrize("env", ["prod", "staging"])
def test_every_phase_passes_in_the_built_image(tag, env):
    proc = run_invoke("test", f"--env={env}", f"--tag={tag}", timeout=900)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert phase_rows(out) == {
        "checks": "ok",
        "migrations": "ok",
        "safety": "ok",
        "tests": "ok",
        "static": "ok",
    }
    assert "migration safety: ok (every migration checked: courses.0001_initial" in out
    assert f"testing aiia/django:{tag} with the {env} settings" in out
    # The suite really ran on PostgreSQL, in the throwaway database.
    assert "Using existing test database for alias 'default' ('aiia_apptest')" in out
    assert re.search(r"^Ran \d+ tests? in ", out, re.M), out
    assert "System check identified no issues" in out
    assert "No changes detected" in out
    assert re.search(r"\d+ static files? copied to '/app/storage/static', \d+ post-processed", out)
    assert leftovers(run_id_of(out)) == []


@pytest.fixture
def image_missing_a_migration(tag):
    """The app image with a model field added and no migration for it: what a developer who
    forgot `makemigrations` ships. Tagged beside a copy of the postgres image."""
    broken = f"{tag}-nomigration-{uuid.uuid4().hex[:6]}"
    dockerfile = (
        f"FROM aiia/django:{tag}\n"
        "USER root\n"
        "RUN printf '\\n\\nclass Forgotten(models.Model):\\n    note = models.TextField()\\n'"
        " >> /app/code/courses/models.py\n"
        "USER 10001:10001\n"
    )
    built = docker("build", "-q", "-t", f"aiia/django:{broken}", "-", input=dockerfile)
    assert built.returncode == 0, built.stderr
    docker("tag", f"aiia/postgres:{tag}", f"aiia/postgres:{broken}")
    yield broken
    docker("rmi", f"aiia/django:{broken}", f"aiia/postgres:{broken}")


def test_a_missing_migration_fails_the_run_and_names_the_phase(image_missing_a_migration):
    proc = run_invoke("test", "--env=prod", f"--tag={image_missing_a_migration}", timeout=900)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out
    rows = phase_rows(out)
    assert rows["migrations"] == "FAIL"
    assert (rows["checks"], rows["static"]) == ("ok", "ok")
    assert "Forgotten" in out  # makemigrations says which model needs a migration
    assert re.search(r"error: \d of 5 phases failed \(.*migrations.*\)", out), out
    assert leftovers(run_id_of(out)) == []


def test_an_image_that_is_not_built_is_a_clear_error(tag):
    proc = run_invoke("test", "--env=prod", "--tag=no-such-tag-built")
    assert proc.returncode == 1
    assert proc.stderr.strip() == (
        "error: image aiia/django:no-such-tag-built is not built: run `invoke build` first "
        "(it tags the images with this commit), or pass --tag with a tag that exists "
        "(docker images aiia/*)"
    )
