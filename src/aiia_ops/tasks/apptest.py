"""invoke test --env=ENV: the CI test phase in the built app image (flows/apptest.py)."""

from __future__ import annotations

from aiia_ops.flows import apptest
from aiia_ops.tasks.common import current_version, load, task


@task(
    help={
        "env": "the environment whose production settings are checked: prod or staging",
        "tag": "image tag to test (default: this commit, as `invoke build` tags it)",
    }
)
def test(c, env="prod", tag=None, stack=None):
    """The CI test phase in the built app image: checks, migrations, test suite, static files.

    Each phase runs in a throwaway container of aiia/django:TAG; the database is a throwaway
    aiia/postgres:TAG container on a private network made for this run, removed at the end.
    """
    model, _ = load(stack)
    apptest.test(model, env, tag or current_version())
