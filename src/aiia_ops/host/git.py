"""Versions from git: the commit of the checkout, and of each service image's sources.

A shared service's image is tagged with the last commit that changed its folder (or the
base image's), so a code-only change to the app leaves nginx, PostgreSQL, PgBouncer and
Redis on the very same tag: nothing of theirs is rebuilt or restarted. "-dirty" marks
uncommitted changes in those folders.
"""

from __future__ import annotations

import subprocess

from aiia_ops import REPO_ROOT
from aiia_ops.errors import OpsError
from aiia_ops.model import Stack

SHARED_FOLDERS = {
    "nginx": "nginx",
    "postgresql": "postgres",
    "pgbouncer": "pgbouncer",
    "redis": "redis",
}


def _git(*args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(REPO_ROOT), *args], capture_output=True, text=True
    ).stdout.strip()


def head_version() -> str:
    """The checkout's commit (12 characters), with -dirty when tracked files changed."""
    commit = _git("rev-parse", "--short=12", "HEAD") or "unknown"
    dirty = _git("status", "--porcelain", "--untracked-files=no")
    return f"{commit}-dirty" if dirty else commit


def folder_version(*paths: str) -> str:
    commit = _git("log", "-1", "--format=%H", "--", *paths)[:12] or "unknown"
    dirty = _git("status", "--porcelain", "--", *paths)
    return f"{commit}-dirty" if dirty else commit


def image_tag(folder: str) -> str:
    """The tag `invoke build` gives services/<folder>'s image."""
    if folder == "django":
        return head_version()
    return folder_version(f"services/{folder}", "services/base")


def shared_image_tags(stack: Stack) -> dict[str, str]:
    return {name: image_tag(folder) for name, folder in SHARED_FOLDERS.items()}


def resolve_ref(ref: str | None) -> tuple[str, str]:
    """(full commit, 12-char tag) of a git ref in this repository (default HEAD)."""
    commit = _git("rev-parse", "--verify", "--quiet", f"{ref or 'HEAD'}^{{commit}}")
    if not commit:
        raise OpsError(
            f"unknown git ref {ref!r}: no such commit, branch or tag in "
            f"{REPO_ROOT} (fetch it first?)"
        )
    return commit, commit[:12]


# A release is built from a checkout of exactly its commit, beside this one: these argv
# run through a runner (so a dry run prints them instead of creating the checkout).
def worktree_add(path: str, commit: str) -> list[str]:
    return ["git", "-C", str(REPO_ROOT), "worktree", "add", "--detach", path, commit]


def worktree_remove(path: str) -> list[str]:
    return ["git", "-C", str(REPO_ROOT), "worktree", "remove", "--force", path]
