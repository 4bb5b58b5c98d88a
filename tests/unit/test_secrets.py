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


def test_each_environment_has_its_own_redis_password(tmp_path):
    s = load_secrets(tmp_path, ["prod", "staging"])
    prod, staging = s.environments["prod"], s.environments["staging"]
    assert prod.redis_password and staging.redis_password and s.redis_admin_password
    assert len({prod.redis_password, staging.redis_password, s.redis_password}) == 3
    assert s.redis_admin_password in s.values() and staging.redis_password in s.values()
    assert "REDIS_PASSWORD=" in (tmp_path / "secrets" / "staging.env").read_text()


def test_a_host_from_before_the_redis_users_gets_them_generated(tmp_path):
    """An older secrets dir (one shared Redis password) keeps its values and gains the
    new ones; without `create` it says what to run."""
    folder = tmp_path / "secrets"
    folder.mkdir(mode=0o700)
    for name, text in {
        "shared.env": "POSTGRES_PASSWORD=p\nREDIS_PASSWORD=r\nPGBOUNCER_ADMIN_PASSWORD=b\n",
        "prod.env": "DB_PASSWORD=d\nSECRET_KEY=k\nAPI_WRITE_TOKEN=t\n",
    }.items():
        (folder / name).write_text(text)
        (folder / name).chmod(0o600)
    with pytest.raises(OpsError, match="REDIS_ADMIN_PASSWORD"):
        load_secrets(tmp_path, ["prod"], create=False)
    s = load_secrets(tmp_path, ["prod"])
    assert s.redis_password == "r" and s.environments["prod"].db_password == "d"
    assert s.environments["prod"].redis_password not in ("", "r")
