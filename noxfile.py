"""Test sessions: `nox -s lint`, `nox -s unit` (fast, no engine), `nox -s tests` (what CI runs)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import nox

nox.options.default_venv_backend = "venv"
nox.options.sessions = ["lint", "unit"]

PYPROJECT = nox.project.load_toml("pyproject.toml")
APP_REQUIREMENTS = "services/django/requirements.txt"


def install(session: nox.Session, *groups: str) -> None:
    session.install("-e", ".")
    for group in groups:
        session.install(*nox.project.dependency_groups(PYPROJECT, group))


@nox.session
def lint(session: nox.Session) -> None:
    """ruff: lint and format check of the whole tree."""
    install(session, "lint")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session
def unit(session: nox.Session) -> None:
    """Fast tests: the pure core and the app's own suite on the host; no Docker engine."""
    install(session, "test")
    session.install("-r", APP_REQUIREMENTS)
    session.run("pytest", "-m", "not docker and not e2e", *session.posargs)


@nox.session
def tests(session: nox.Session) -> None:
    """Everything CI runs: lint, then provision the engine, build the images, run every test."""
    install(session, "test", "lint")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")
    session.install("-r", APP_REQUIREMENTS)
    session.run("invoke", "provision")
    session.run("invoke", "build")
    # The end-to-end tests bring up their own isolated stack (tests/e2e/conftest.py) beside
    # any real one; every tool they need comes with the test group, so no skip is accepted.
    env = {"AIIA_ALLOW_SKIP": ""}
    if session.posargs:
        session.run("pytest", *session.posargs, env=env)
        return
    # The lab's tests use the lab hosts' own engines and mostly wait on daemons: they run in a
    # second pytest process beside the rest (this machine's engine); their output follows.
    log = Path(session.create_tmp()) / "lab-tests.log"
    with log.open("w") as out:
        lab = subprocess.Popen(
            [str(Path(session.bin) / "pytest"), "-m", "lab"],
            env={**os.environ, **env, "PATH": f"{session.bin}:{os.environ['PATH']}"},
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        try:
            session.run("pytest", "-m", "not lab", env=env)
        finally:
            code = lab.wait()
            session.log(f"--- the lab's tests (pytest -m lab, run beside) ---\n{log.read_text()}")
    if code != 0:
        session.error(f"the lab's tests failed (pytest -m lab exited {code}): see above")
