import io
import stat

import pytest

from aiia_ops.errors import OpsError
from aiia_ops.host.runners import PrintingRunner
from aiia_ops.host.secrets import load_secrets


def test_generated_once_0600_and_stable(tmp_path):
    first = load_secrets(tmp_path, ["prod", "staging"])
    again = load_secrets(tmp_path, ["prod", "staging"])
    assert first.values() == again.values()
    assert len(set(first.values())) == len(first.values())  # all different
    for f in (tmp_path / "secrets").iterdir():
        assert stat.S_IMODE(f.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "secrets").stat().st_mode) == 0o700


def test_environment_variables_win(tmp_path, monkeypatch):
    monkeypatch.setenv("AIIA_PROD_SECRET_KEY", "from-ci-" + "k" * 40)
    assert load_secrets(tmp_path, ["prod"]).environments["prod"].secret_key.startswith("from-ci-")


def test_never_shown(tmp_path):
    s = load_secrets(tmp_path, ["prod"])
    assert s.postgres_password not in repr(s) and s.postgres_password not in str(s)
    runner = PrintingRunner(out=io.StringIO())
    runner.redact(*s.values())
    runner.run(["psql", f"password={s.postgres_password}"])
    assert s.postgres_password not in runner.printed[0] and "********" in runner.printed[0]


def test_missing_secrets_without_create_say_what_to_do(tmp_path):
    with pytest.raises(
        OpsError, match=r"run `invoke setup` \(it generates them once\) or set AIIA_"
    ):
        load_secrets(tmp_path, ["prod"], create=False)


def test_loose_permissions_are_refused(tmp_path):
    load_secrets(tmp_path, ["prod"])
    (tmp_path / "secrets" / "prod.env").chmod(0o644)
    with pytest.raises(OpsError, match="readable by other users; run: chmod 600"):
        load_secrets(tmp_path, ["prod"])
