"""flows/switch.app_files: a release's own config is on disk before it starts."""

from __future__ import annotations

from aiia_ops.flows import switch
from aiia_ops.host.files import sync_files
from aiia_ops.host.runners import RecordingRunner
from aiia_ops.model.load import stack_from_data
from aiia_ops.model.secrets import EnvSecrets, Secrets
from tests.stackfiles import patched_stack


def secrets(model) -> Secrets:
    envs = {n: EnvSecrets("db-pw", "sk", "tok", "rp") for n in model.environments}
    return Secrets("pg-pw", "r", "b", envs, "", "c", "k", "s")


def test_only_the_environments_own_files_are_written_and_a_change_reaches_them():
    model = stack_from_data(patched_stack())
    runner = RecordingRunner()
    changed = sync_files(runner, switch.app_files(model, secrets(model), "/srv/aiia", "prod"))
    assert "/srv/aiia/config/app-prod/gunicorn.conf.py" in changed
    assert "/srv/aiia/env/django_prod.env" in changed
    assert all(
        p.startswith(("/srv/aiia/config/app-prod/", "/srv/aiia/env/django_prod.env"))
        for p in changed
    )  # fmt: skip: no nginx, PgBouncer or staging file
    assert sync_files(runner, switch.app_files(model, secrets(model), "/srv/aiia", "prod")) == []
    more = stack_from_data(patched_stack({"environments": {"prod": {"gunicorn": {"threads": 6}}}}))
    again = sync_files(runner, switch.app_files(more, secrets(more), "/srv/aiia", "prod"))
    assert again == ["/srv/aiia/config/app-prod/gunicorn.conf.py"]
    assert b"threads = 6" in runner.files[again[0]]
