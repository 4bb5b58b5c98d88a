"""The SSH runner against a real OpenSSH server on 127.0.0.1 (tests/sshd.py), logging in as
root by key: commands with stdin and env, failures, files over SFTP, host key checking, and
the local Docker engine reached over SSH, including an image shipped with `docker save | ssh
docker load`."""

from __future__ import annotations

import os
import subprocess
import uuid

import pytest

from aiia_ops.errors import CommandFailed, OpsError
from aiia_ops.host.ssh import SSHRunner, fingerprint
from aiia_ops.host.targets import runner_for
from aiia_ops.model import Host

pytestmark = pytest.mark.docker

BASE = "aiia/base:trixie"
SHIP = "aiia/ssh-ship-test:1"


def docker(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["docker", *args], capture_output=True, text=True, timeout=timeout, check=False
    )


@pytest.fixture
def ssh(sshd_host):
    with SSHRunner(
        sshd_host.spec,
        host="test",
        key_filename=sshd_host.key_path,
        known_hosts=sshd_host.known_hosts_path,
    ) as runner:
        yield runner


@pytest.fixture(scope="module")
def engine() -> str:
    try:
        result = docker("version", "--format", "{{.Server.Version}}", timeout=15)
    except FileNotFoundError:
        pytest.skip("no docker client: run `invoke provision` first")
    if result.returncode != 0:
        pytest.skip(f"no Docker engine answers ({result.stderr.strip()}): run `invoke provision`")
    return result.stdout.strip()


def test_command_gets_stdin_env_and_exit_code(ssh):
    result = ssh.run(
        ["sh", "-c", 'cat; printf "%s|%s\\n" "$GREETING" "$(id -un)"; echo to-stderr >&2'],
        input="line one\nline two\n",
        env={"GREETING": "it's $HOME; `id`"},
    )
    assert result.stdout == "line one\nline two\nit's $HOME; `id`|root\n"
    assert result.stderr == "to-stderr\n"
    assert ssh.run(["sh", "-c", "exit 7"], check=False).code == 7


def test_binary_stdin_arrives_intact(ssh):
    data = bytes(range(256)) * 4096  # 1 MiB, every byte value
    result = ssh.run(["sha256sum"], input=data)
    expected = subprocess.run(["sha256sum"], input=data, capture_output=True).stdout.decode()
    assert result.stdout == expected


def test_failure_raises_command_failed_with_secrets_scrubbed(ssh):
    ssh.redact("hunter2-token")
    with pytest.raises(CommandFailed) as err:
        ssh.run(["sh", "-c", "echo 'auth with hunter2-token failed' >&2; exit 3", "hunter2-token"])
    assert err.value.code == 3
    assert "hunter2-token" not in str(err.value)
    assert str(err.value) == (
        "command failed (exit 3): sh -c 'echo '\"'\"'auth with ******** failed'\"'\"' >&2; "
        "exit 3' ********\n    auth with ******** failed"
    )


def test_timeout_gives_124(ssh):
    result = ssh.run(["sleep", "30"], check=False, timeout=1)
    assert result.code == 124
    assert "timed out after 1s" in result.stderr
    assert ssh.run(["true"]).ok  # the connection is still usable


def test_a_lost_connection_is_said_and_the_next_command_reconnects(ssh, tmp_path):
    ssh.write_file(str(tmp_path / "before"), "x")
    with pytest.raises(OpsError) as err:
        ssh.run(["sh", "-c", "kill -9 $PPID; sleep 10"])  # the session's sshd process
    assert str(err.value) == (
        f"lost the SSH connection to {ssh.spec} while running: sh -c 'kill -9 $PPID; sleep 10'"
    )
    assert ssh.run(["echo", "back"]).stdout == "back\n"
    assert ssh.read_file(str(tmp_path / "before")) == b"x"  # SFTP reopened too


def test_stream_echoes_lines_live(ssh, capsys):
    result = ssh.run(["sh", "-c", "echo one; echo two >&2; printf three"], stream=True)
    out, err = capsys.readouterr()
    assert out == "[test] one\n[test] three\n"
    assert err == "[test] two\n"
    assert result.stdout == "one\nthree"


def test_files_round_trip_with_mode_and_group(ssh, tmp_path):
    path = tmp_path / "state" / "config" / "app.env"
    ssh.write_file(str(path), "SECRET_KEY=abc\n", mode=0o640, group=4321)
    assert path.read_text() == "SECRET_KEY=abc\n"
    st = path.stat()
    assert (st.st_mode & 0o7777, st.st_uid, st.st_gid) == (0o640, 0, 4321)
    assert ssh.read_file(str(path)) == b"SECRET_KEY=abc\n"
    ssh.write_file(str(path), b"\x00\xffbinary", mode=0o600)  # replaced, not appended
    assert ssh.read_file(str(path)) == b"\x00\xffbinary"
    assert path.stat().st_mode & 0o7777 == 0o600
    assert os.listdir(path.parent) == ["app.env"]  # no temp file left behind
    assert ssh.read_file(str(tmp_path / "missing")) is None


def test_write_failure_is_an_ops_error(ssh, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(OpsError, match=r"cannot write .*/file/x on root@127\.0\.0\.1:\d+"):
        ssh.write_file(str(blocker / "x"), "data")


def test_unknown_host_key_is_refused_with_what_to_do(sshd_host, tmp_path):
    known_hosts = tmp_path / "known_hosts"
    runner = SSHRunner(sshd_host.spec, key_filename=sshd_host.key_path, known_hosts=known_hosts)
    with pytest.raises(OpsError) as err:
        runner.run(["true"])
    host_key = sshd_host.host_key_path.with_suffix(".pub").read_text().split()
    expected_fp = subprocess.run(
        ["ssh-keygen", "-lf", str(sshd_host.host_key_path)], capture_output=True, text=True
    ).stdout.split()[1]
    text = str(err.value)
    assert text.startswith(
        f"refusing to connect to {sshd_host.spec}: its host key ({host_key[0]} {expected_fp})"
    )
    assert f"ssh-keyscan -p {sshd_host.port} 127.0.0.1 >> {known_hosts}" in text
    assert "--accept-new-host-key" in text
    assert not known_hosts.exists()


def test_accept_new_records_the_key_then_a_changed_key_is_refused(sshd_host, tmp_path):
    known_hosts = tmp_path / "known_hosts"
    with SSHRunner(
        sshd_host.spec,
        key_filename=sshd_host.key_path,
        known_hosts=known_hosts,
        accept_new_host_key=True,
    ) as runner:
        assert runner.run(["echo", "hi"]).stdout == "hi\n"
    assert known_hosts.read_text() == sshd_host.known_hosts_path.read_text()

    # Same address, another key recorded: even accept-new refuses.
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "other")],
        check=True,
    )
    kind, b64 = (tmp_path / "other.pub").read_text().split()[:2]
    known_hosts.write_text(f"[127.0.0.1]:{sshd_host.port} {kind} {b64}\n")
    runner = SSHRunner(
        sshd_host.spec,
        key_filename=sshd_host.key_path,
        known_hosts=known_hosts,
        accept_new_host_key=True,
    )
    with pytest.raises(OpsError, match="its host key CHANGED") as err:
        runner.run(["true"])
    assert f"ssh-keygen -R '[127.0.0.1]:{sshd_host.port}' -f {known_hosts}" in str(err.value)


def test_known_hosts_from_the_environment(sshd_host, monkeypatch):
    monkeypatch.setenv("AIIA_SSH_KNOWN_HOSTS", str(sshd_host.known_hosts_path))
    monkeypatch.setenv("AIIA_SSH_KEY", str(sshd_host.key_path))
    with runner_for(Host(ssh=sshd_host.spec), "prod") as runner:
        assert runner.run(["hostname"]).stdout.strip() == os.uname().nodename


def test_wrong_key_and_closed_port_say_what_to_do(sshd_host, tmp_path):
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "stranger")],
        check=True,
    )
    stranger = SSHRunner(
        sshd_host.spec, key_filename=tmp_path / "stranger", known_hosts=sshd_host.known_hosts_path
    )
    with pytest.raises(OpsError) as err:
        stranger.run(["true"])
    assert str(err.value).startswith(
        f"authentication failed for {sshd_host.spec} with key {tmp_path / 'stranger'}"
    )
    closed = SSHRunner("root@127.0.0.1:1", host="prod", known_hosts=sshd_host.known_hosts_path)
    with pytest.raises(OpsError) as err:
        closed.run(["true"])
    assert str(err.value) == (
        "cannot connect to root@127.0.0.1:1: connection refused. Is sshd running there and "
        "listening on port 1? (the address comes from hosts.prod.ssh in deploy/)"
    )


def test_host_key_fingerprint_matches_ssh_keygen(ssh, sshd_host):
    key = ssh.connection.client.get_transport().get_remote_server_key()
    expected = subprocess.run(
        ["ssh-keygen", "-lf", str(sshd_host.host_key_path)], capture_output=True, text=True
    ).stdout.split()[1]
    assert fingerprint(key) == expected


# --- Docker over SSH -------------------------------------------------------------------------


def test_docker_over_ssh_reaches_the_local_engine(ssh, engine):
    result = ssh.run(["docker", "version", "--format", "{{.Server.Version}}"])
    assert result.stdout.strip() == engine


def test_image_shipped_over_ssh_without_a_registry(ssh, engine):
    if docker("image", "inspect", BASE).returncode != 0:
        pytest.skip(f"{BASE} is missing: run `invoke provision`")
    tag = f"{SHIP}-{uuid.uuid4().hex[:8]}"
    assert docker("tag", BASE, tag).returncode == 0
    try:
        # Local and remote share one engine here, so the tag is removed once `docker save` has
        # written the whole image; the remote `docker load` finishes only after that (it tags
        # at the end of the stream), so the tag being back proves the image crossed over SSH.
        local = ["sh", "-c", f"docker save {tag} && docker rmi {tag} >/dev/null"]
        result = ssh.pipe_from_local(local, ["docker", "load"], timeout=300)
        assert result.stdout.strip() == f"Loaded image: {tag}"
        inspect = docker("image", "inspect", "--format", "{{.Id}}", tag)
        assert inspect.returncode == 0, inspect.stderr
        assert inspect.stdout == docker("image", "inspect", "--format", "{{.Id}}", BASE).stdout
        # and the exact command a deploy runs
        again = ssh.pipe_from_local(["docker", "save", tag], ["docker", "load"], timeout=300)
        assert again.stdout.strip() == f"Loaded image: {tag}"
    finally:
        docker("rmi", tag)


def test_failed_ship_names_both_sides(ssh, engine):
    with pytest.raises(CommandFailed) as err:
        ssh.pipe_from_local(["docker", "save", "aiia/no-such-image:0"], ["docker", "load"])
    text = str(err.value)
    assert text.startswith(
        "command failed (exit 1): docker save aiia/no-such-image:0 | [test] docker load"
    )
    assert "aiia/no-such-image" in text
