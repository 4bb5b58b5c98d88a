"""Test sessions: `nox -s lint`, `nox -s unit` (fast, no engine), `nox -s tests` (what CI runs)."""

from __future__ import annotations

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
    # Two pytest processes side by side: this machine's engine, and the lab hosts' own
    # engines (tests/split.py); arguments given after `--` run one plain pytest instead.
    if session.posargs:
        session.run("pytest", *session.posargs, env={"AIIA_ALLOW_SKIP": ""})
    else:
        session.run(
            "python", "-m", "tests.split", "-m", "not extended", env={"AIIA_ALLOW_SKIP": ""}
        )


@nox.session
def extended(session: nox.Session) -> None:
    """The fault matrices (deploy, restore) and the clusters on lab hosts (level 3, swarm,
    off-site PITR): long; run after `nox -s tests` has provisioned and built."""
    install(session, "test", "extended")
    session.install("-r", APP_REQUIREMENTS)
    session.run("invoke", "provision")
    session.run("invoke", "build")
    session.run("pytest", "-m", "extended", *session.posargs, env={"AIIA_ALLOW_SKIP": ""})
