"""The SSH runner's pure parts: specs, the command line sent, host key policies, error texts.

No server here: tests/integration/test_ssh_runner.py runs the same runner against a real sshd."""

from __future__ import annotations

import base64
import io
import socket
import subprocess
import sys
from pathlib import Path

import paramiko
import pytest

from aiia_ops.errors import CommandFailed, OpsError
from aiia_ops.host.runners import LocalRunner, PrintingRunner, RecordingRunner
from aiia_ops.host.ssh import (
    AcceptNew,
    RefuseUnknown,
    SSHRunner,
    SSHSpec,
    UnknownHostKey,
    _BytesFeed,
    _Sink,
    auth_failed_message,
    changed_host_key_message,
    env_argv,
    fingerprint,
    key_path,
    known_hosts_path,
    refused_message,
    remote_command,
    unknown_host_key_message,
)
from aiia_ops.host.targets import runner_for
from aiia_ops.model import Host

# Two fixed ed25519 public keys and the fingerprints `ssh-keygen -lf` prints for them.
KEY_A = "AAAAC3NzaC1lZDI1NTE5AAAAIKU8Y2rLb2pe1B7I1qsr3I601O9Tu1zDnGprBjUGjHMB"
FP_A = "SHA256:43Qq2X55AfQDKmkflnATycqwpOqPtHNm6Dv8mZDfF68"
KEY_B = "AAAAC3NzaC1lZDI1NTE5AAAAIDqikLsPTcmyXe+C8fOPvPtNg3Sc2SydUzbsGDkjDf0o"
FP_B = "SHA256:MAEVk3CL4MMAoiuIOZ59KZcdqUPUSPmGS3fhZgjf9fw"


def key(b64: str) -> paramiko.PKey:
    return paramiko.Ed25519Key(data=base64.b64decode(b64))


# --- specs -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "parsed", "known_as", "shown"),
    [
        ("root@127.0.0.1:2222", ("root", "127.0.0.1", 2222), "[127.0.0.1]:2222", None),
        ("deploy@eduaiia.com", ("deploy", "eduaiia.com", 22), "eduaiia.com", None),
        ("203.0.113.7:22", (None, "203.0.113.7", 22), "203.0.113.7", "203.0.113.7"),
        (" ops@srv-1.example.org:2200 ", ("ops", "srv-1.example.org", 2200), None, None),
    ],
)
def test_spec_parsing(text, parsed, known_as, shown):
    spec = SSHSpec.parse(text)
    assert (spec.user, spec.address, spec.port) == parsed
    assert spec.known_hosts_name == (known_as or f"[{spec.address}]:{spec.port}")
    assert str(spec) == (shown or text.strip())


@pytest.mark.parametrize("text", ["", "root@", "root@host:", "a b@host", "host:0", "host:65536"])
def test_bad_spec_says_the_form(text):
    with pytest.raises(OpsError) as err:
        SSHSpec.parse(text)
    assert str(err.value) == (
        f"ssh: {text!r} is not user@address[:port] (for example root@203.0.113.7:22)"
    )


# --- the command line ------------------------------------------------------------------------


def test_argv_is_quoted_once_and_only_once():
    argv = ["sh", "-c", "echo 'it''s' $HOME; rm -rf /tmp/x", "a b"]
    assert remote_command(argv) == (
        "sh -c 'echo '\"'\"'it'\"'\"''\"'\"'s'\"'\"' $HOME; rm -rf /tmp/x' 'a b'"
    )
    # the server's shell gives the command back exactly this argv
    shell = ["sh", "-c", f"printf '%s\\n' {remote_command(argv)}"]
    assert subprocess.run(shell, capture_output=True, text=True).stdout.splitlines() == argv


def test_env_is_an_env_prefix_in_argv_not_shell_text():
    assert env_argv(["docker", "load"], None) == ["docker", "load"]
    assert env_argv(["docker", "load"], {}) == ["docker", "load"]
    assert env_argv(["printenv", "A"], {"A": "x y", "B_2": "$(reboot)"}) == [
        "env",
        "A=x y",
        "B_2=$(reboot)",
        "printenv",
        "A",
    ]
    assert remote_command(["printenv", "B"], {"B": "$(reboot); `id`"}) == (
        "env 'B=$(reboot); `id`' printenv B"
    )


def test_env_value_survives_the_shell():
    command = remote_command(["printenv", "V"], {"V": "a 'b' \"c\" $d `e`\nf"})
    out = subprocess.run(["sh", "-c", command], capture_output=True, text=True).stdout
    assert out == "a 'b' \"c\" $d `e`\nf\n"


@pytest.mark.parametrize("name", ["A B", "1X", "X=Y", "", "PATH;id"])
def test_bad_env_names_are_refused(name):
    with pytest.raises(OpsError, match=r"names must match \[A-Za-z_\]"):
        env_argv(["true"], {name: "1"})


# --- where keys and known hosts come from ----------------------------------------------------


def test_known_hosts_path_precedence(tmp_path):
    home = Path("~/.ssh/known_hosts").expanduser()
    assert known_hosts_path(None, {}) == home
    assert known_hosts_path(None, {"AIIA_SSH_KNOWN_HOSTS": "/srv/kh"}) == Path("/srv/kh")
    assert known_hosts_path(tmp_path / "kh", {"AIIA_SSH_KNOWN_HOSTS": "/srv/kh"}) == (
        tmp_path / "kh"
    )


def test_key_path_precedence():
    assert key_path(None, {}) is None
    assert key_path(None, {"AIIA_SSH_KEY": "/k/id"}) == Path("/k/id")
    assert key_path("/explicit", {"AIIA_SSH_KEY": "/k/id"}) == Path("/explicit")


def test_runner_for_picks_the_runner_without_connecting():
    local = runner_for(Host(ssh=None), "local")
    assert type(local) is LocalRunner
    assert local.host == "local"
    remote = runner_for(
        Host(ssh="root@127.0.0.1:1"), "prod", known_hosts="/nonexistent/kh", key_filename=None
    )
    assert isinstance(remote, SSHRunner)
    assert (remote.host, remote.spec, remote.known_hosts) == (
        "prod",
        SSHSpec("127.0.0.1", "root", 1),
        Path("/nonexistent/kh"),
    )
    assert remote._connection is None


def test_runners_module_does_not_import_paramiko():
    code = (
        "import sys, aiia_ops.host.runners; "
        "print('paramiko' in sys.modules, 'fabric' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False False"


# --- host keys -------------------------------------------------------------------------------


def test_fingerprint_is_what_ssh_keygen_prints():
    assert fingerprint(key(KEY_A)) == FP_A
    assert fingerprint(key(KEY_B)) == FP_B


def test_unknown_host_keys_are_refused_by_default():
    client = paramiko.SSHClient()
    with pytest.raises(UnknownHostKey) as err:
        RefuseUnknown().missing_host_key(client, "[127.0.0.1]:2222", key(KEY_A))
    assert err.value.hostname == "[127.0.0.1]:2222"
    assert len(client.get_host_keys()) == 0


def test_accept_new_appends_one_line_to_known_hosts(tmp_path):
    known_hosts = tmp_path / "ssh" / "known_hosts"
    client = paramiko.SSHClient()
    AcceptNew(known_hosts).missing_host_key(client, "[127.0.0.1]:2222", key(KEY_A))
    AcceptNew(known_hosts).missing_host_key(client, "eduaiia.com", key(KEY_B))
    assert known_hosts.read_text() == (
        f"[127.0.0.1]:2222 ssh-ed25519 {KEY_A}\neduaiia.com ssh-ed25519 {KEY_B}\n"
    )
    assert known_hosts.stat().st_mode & 0o777 == 0o600
    assert client.get_host_keys().lookup("[127.0.0.1]:2222")["ssh-ed25519"] == key(KEY_A)


# --- error messages as data ------------------------------------------------------------------

SPEC = SSHSpec("127.0.0.1", "root", 2222)
KH = Path("/root/.ssh/known_hosts")


def test_unknown_host_key_message():
    assert unknown_host_key_message(SPEC, "ssh-ed25519", FP_A, KH) == (
        f"refusing to connect to root@127.0.0.1:2222: its host key (ssh-ed25519 {FP_A}) is not "
        "in /root/.ssh/known_hosts.\n"
        "  Check the fingerprint on the server (ssh-keygen -lf /etc/ssh/ssh_host_*_key.pub), "
        "then either record it:\n"
        "    ssh-keyscan -p 2222 127.0.0.1 >> /root/.ssh/known_hosts\n"
        "  or connect once with --accept-new-host-key to record it on first contact.\n"
        "  (Another known_hosts file: set AIIA_SSH_KNOWN_HOSTS.)"
    )
    standard_port = unknown_host_key_message(SSHSpec("eduaiia.com"), "ssh-ed25519", FP_A, KH)
    assert "    ssh-keyscan eduaiia.com >> /root/.ssh/known_hosts\n" in standard_port


def test_changed_host_key_message():
    assert changed_host_key_message(SPEC, "ssh-ed25519", FP_A, FP_B, KH) == (
        "refusing to connect to root@127.0.0.1:2222: its host key CHANGED. "
        f"/root/.ssh/known_hosts has ssh-ed25519 {FP_A}, the server now offers {FP_B}.\n"
        "  This is either a rebuilt server or someone in the middle. If the server was "
        "rebuilt, verify the new fingerprint on it, then drop the old entry:\n"
        "    ssh-keygen -R '[127.0.0.1]:2222' -f /root/.ssh/known_hosts"
    )


def test_refused_and_auth_messages():
    assert refused_message(SPEC, "prod") == (
        "cannot connect to root@127.0.0.1:2222: connection refused. Is sshd running there and "
        "listening on port 2222? (the address comes from hosts.prod.ssh in deploy/)"
    )
    assert auth_failed_message(SPEC, Path("/keys/deploy")) == (
        "authentication failed for root@127.0.0.1:2222 with key /keys/deploy: the server "
        "accepted none of them.\n"
        "  Install the public key for root on the server "
        "(ssh-copy-id -i /keys/deploy.pub -p 2222 root@127.0.0.1), "
        "or point AIIA_SSH_KEY at the right private key."
    )
    assert "with the SSH agent and ~/.ssh/id_* keys" in auth_failed_message(SPEC, None)


def runner(**kw) -> SSHRunner:
    return SSHRunner("root@127.0.0.1:2222", host="prod", known_hosts=KH, **kw)


@pytest.mark.parametrize(
    ("exc", "start"),
    [
        (
            paramiko.ssh_exception.NoValidConnectionsError(
                {("127.0.0.1", 2222): ConnectionRefusedError(111, "Connection refused")}
            ),
            "cannot connect to root@127.0.0.1:2222: connection refused.",
        ),
        (ConnectionRefusedError(111, "refused"), "cannot connect to root@127.0.0.1:2222: conn"),
        (
            socket.gaierror(-2, "Name or service not known"),
            "cannot connect to root@127.0.0.1:2222: cannot resolve '127.0.0.1'.",
        ),
        (TimeoutError(), "cannot connect to root@127.0.0.1:2222: no answer within 15s."),
        (paramiko.AuthenticationException("x"), "authentication failed for root@127.0.0.1:2222"),
        (UnknownHostKey("[127.0.0.1]:2222", key(KEY_A)), "refusing to connect to root@"),
        (
            paramiko.BadHostKeyException("[127.0.0.1]:2222", key(KEY_B), key(KEY_A)),
            "refusing to connect to root@127.0.0.1:2222: its host key CHANGED.",
        ),
        (paramiko.SSHException("Error reading SSH protocol banner"), "SSH to root@127.0.0.1"),
    ],
)
def test_connection_errors_become_ops_errors(exc, start):
    error = runner()._connect_error(exc)
    assert isinstance(error, OpsError)
    assert str(error).startswith(start)


def test_connection_error_text_is_scrubbed():
    r = runner(key_filename="/keys/token-s3cr3t-token")
    r.redact("s3cr3t")
    text = str(r._connect_error(paramiko.AuthenticationException()))
    assert "s3cr3t" not in text
    assert "/keys/token-********-token" in text


def test_missing_key_file_is_reported_before_connecting(tmp_path):
    r = runner(key_filename=tmp_path / "nope")
    with pytest.raises(OpsError) as err:
        r.connection  # noqa: B018
    assert str(err.value) == (
        f"SSH key {tmp_path / 'nope'} does not exist (set AIIA_SSH_KEY to a private key file)"
    )


# --- streams ---------------------------------------------------------------------------------


def test_sink_echoes_whole_scrubbed_lines_and_keeps_the_bytes():
    echo = io.StringIO()
    sink = _Sink(echo, "[prod] ", lambda s: s.replace("hunter2", "********"))
    for chunk in [b"one\ntw", b"o hunter2\nthr", b"ee"]:
        sink.add(chunk)
    assert echo.getvalue() == "[prod] one\n[prod] two ********\n"
    sink.close()
    assert echo.getvalue().endswith("[prod] three\n")
    assert sink.text() == "one\ntwo hunter2\nthree"  # scrubbing is the runner's job on errors


def test_bytes_feed_chunks_then_stops():
    feed = _BytesFeed(b"x" * (256 * 1024 + 3))
    assert [len(feed()), len(feed()), len(feed())] == [256 * 1024, 3, 0]


# --- pipe_from_local on the other runners ----------------------------------------------------


def test_local_pipe_streams_between_two_processes():
    result = LocalRunner().pipe_from_local(["head", "-c", "3000000", "/dev/zero"], ["wc", "-c"])
    assert (result.code, result.stdout.strip()) == (0, "3000000")
    assert result.argv == ["head", "-c", "3000000", "/dev/zero", "|", "wc", "-c"]


def test_local_pipe_failure_names_both_sides_and_scrubs():
    runner = LocalRunner(host="local")
    runner.redact("hunter2")
    with pytest.raises(CommandFailed) as err:
        runner.pipe_from_local(["echo", "hunter2"], ["sh", "-c", "cat >&2; exit 3"])
    assert err.value.code == 3
    assert str(err.value) == (
        "command failed (exit 3): echo ******** | [local] sh -c 'cat >&2; exit 3'\n    ********"
    )
    missing = LocalRunner().pipe_from_local(["true"], ["no-such-cmd-x"], check=False)
    assert (missing.code, missing.stderr) == (127, "no-such-cmd-x: command not found")


def test_printing_runner_prints_the_pipe():
    out = io.StringIO()
    runner = PrintingRunner(out=out, host="prod")
    runner.pipe_from_local(["docker", "save", "aiia/django:abc"], ["docker", "load"])
    assert out.getvalue() == "[prod] docker save aiia/django:abc | docker load\n"


def test_recording_runner_records_the_pipe():
    runner = RecordingRunner()
    runner.pipe_from_local(["docker", "save", "x"], ["docker", "load"])
    assert runner.commands == [["docker", "save", "x", "|", "docker", "load"]]


def test_runner_for_spec_is_what_deploy_uses_for_an_address():
    from aiia_ops.host.ssh import runner_for_spec

    runner = runner_for_spec("deploy@203.0.113.7:2200", known_hosts="/kh", key_filename="/k")
    assert (runner.host, runner.host_name, str(runner.spec)) == (
        "deploy@203.0.113.7:2200",
        None,
        "deploy@203.0.113.7:2200",
    )
    assert (runner.known_hosts, runner.key_filename) == (Path("/kh"), Path("/k"))
    assert runner.accept_new_host_key is False


def test_secrets_never_show_in_a_runner_repr():
    runner = SSHRunner("root@127.0.0.1:2222", known_hosts="/nonexistent")
    runner.redact("hunter2-token")
    assert "hunter2" not in repr(runner)
    local = LocalRunner()
    local.redact("hunter2-token")
    assert "hunter2" not in repr(local)
