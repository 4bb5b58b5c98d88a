"""The SSH runner: the same argv commands and files as `LocalRunner`, on a server over SSH.

Built on `fabric.Connection` (SSH config, connect, SFTP). Commands are sent as `quote(argv)`
on an exec channel of the connection's transport; stdin, stdout and stderr are streamed in
chunks on their own threads, so input of any size (a whole `docker save` image) goes through
without being held in memory. (`Connection.run` feeds stdin one byte per 10 ms loop and
decodes it as text, which suits neither a 100 MB image nor binary data: 2,000 characters
took 21 s through it.)

Host keys are verified, never trusted blindly: against `~/.ssh/known_hosts`, or the file named
by `AIIA_SSH_KNOWN_HOSTS`, or an explicit `known_hosts=`. `accept_new_host_key=True` records
the key of a host seen for the first time (OpenSSH's `StrictHostKeyChecking=accept-new`); a
*changed* key is always refused.

Everything that can be pure is: spec parsing, the env prefix, the error messages.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import hashlib
import os
import posixpath
import re
import secrets as _secrets
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING

import paramiko

from aiia_ops.commands.argv import Argv, Result, quote
from aiia_ops.errors import OpsError
from aiia_ops.host.runners import Runner

if TYPE_CHECKING:  # pragma: no cover
    import fabric

KNOWN_HOSTS_ENV = "AIIA_SSH_KNOWN_HOSTS"
KEY_ENV = "AIIA_SSH_KEY"
DEFAULT_KNOWN_HOSTS = "~/.ssh/known_hosts"
CHUNK = 256 * 1024

_SPEC = re.compile(
    r"^(?:(?P<user>[A-Za-z0-9._-]+)@)?(?P<address>[A-Za-z0-9.-]+)(?::(?P<port>\d{1,5}))?$"
)
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


# --- pure parts ------------------------------------------------------------------------------


@dataclass(frozen=True)
class SSHSpec:
    """`user@address[:port]` from a host's `ssh:` entry. No user: the SSH config's or yours."""

    address: str
    user: str | None = None
    port: int = 22

    @classmethod
    def parse(cls, text: str) -> SSHSpec:
        match = _SPEC.match(text.strip())
        port = int(match["port"]) if match and match["port"] else 22
        if not match or not 0 < port < 65536:
            raise OpsError(
                f"ssh: {text!r} is not user@address[:port] (for example root@203.0.113.7:22)"
            )
        return cls(address=match["address"], user=match["user"], port=port)

    @property
    def known_hosts_name(self) -> str:
        """The name OpenSSH and paramiko use for this host in known_hosts."""
        return self.address if self.port == 22 else f"[{self.address}]:{self.port}"

    def __str__(self) -> str:
        user = f"{self.user}@" if self.user else ""
        port = "" if self.port == 22 else f":{self.port}"
        return f"{user}{self.address}{port}"


def env_argv(argv: Argv, env: Mapping[str, str] | None) -> list[str]:
    """`env K=V ... argv`: variables as argv words, so they are quoted like everything else.

    The remote sshd would drop most variables sent the SSH way (AcceptEnv), and shell text
    like `K=V cmd` is exactly the hand-made quoting this project avoids."""
    if not env:
        return [str(a) for a in argv]
    bad = [name for name in env if not _ENV_NAME.match(name)]
    if bad:
        raise OpsError(f"environment variable names must match [A-Za-z_][A-Za-z0-9_]*: {bad}")
    return ["env", *(f"{k}={v}" for k, v in env.items()), *(str(a) for a in argv)]


def remote_command(argv: Argv, env: Mapping[str, str] | None = None) -> str:
    """The one command line sent to the server: `quote()` of the (env-prefixed) argv."""
    return quote(env_argv(argv, env))


def known_hosts_path(explicit: str | os.PathLike | None = None, environ=os.environ) -> Path:
    """Explicit file > $AIIA_SSH_KNOWN_HOSTS > ~/.ssh/known_hosts."""
    chosen = explicit or environ.get(KNOWN_HOSTS_ENV) or DEFAULT_KNOWN_HOSTS
    return Path(os.path.expanduser(str(chosen)))


def key_path(explicit: str | os.PathLike | None = None, environ=os.environ) -> Path | None:
    """Explicit key > $AIIA_SSH_KEY > None (the SSH agent and ~/.ssh/id_*)."""
    chosen = explicit or environ.get(KEY_ENV)
    return Path(os.path.expanduser(str(chosen))) if chosen else None


def fingerprint(key: paramiko.PKey) -> str:
    """`SHA256:...` as `ssh-keygen -lf` prints it."""
    digest = hashlib.sha256(key.asbytes()).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


def known_hosts_line(spec: SSHSpec, key: paramiko.PKey) -> str:
    return f"{spec.known_hosts_name} {key.get_name()} {key.get_base64()}"


def keyscan_hint(spec: SSHSpec, known_hosts: Path) -> str:
    port = f"-p {spec.port} " if spec.port != 22 else ""
    return f"ssh-keyscan {port}{spec.address} >> {known_hosts}"


def unknown_host_key_message(
    spec: SSHSpec, key_type: str, key_fingerprint: str, known_hosts: Path
) -> str:
    return (
        f"refusing to connect to {spec}: its host key ({key_type} {key_fingerprint}) is not "
        f"in {known_hosts}.\n"
        f"  Check the fingerprint on the server (ssh-keygen -lf /etc/ssh/ssh_host_*_key.pub), "
        f"then either record it:\n"
        f"    {keyscan_hint(spec, known_hosts)}\n"
        f"  or connect once with --accept-new-host-key to record it on first contact.\n"
        f"  (Another known_hosts file: set {KNOWN_HOSTS_ENV}.)"
    )


def changed_host_key_message(
    spec: SSHSpec, key_type: str, expected: str, offered: str, known_hosts: Path
) -> str:
    return (
        f"refusing to connect to {spec}: its host key CHANGED. {known_hosts} has "
        f"{key_type} {expected}, the server now offers {offered}.\n"
        f"  This is either a rebuilt server or someone in the middle. If the server was "
        f"rebuilt, verify the new fingerprint on it, then drop the old entry:\n"
        f"    ssh-keygen -R '{spec.known_hosts_name}' -f {known_hosts}"
    )


def _entry(host_name: str | None) -> str:
    return f"hosts.{host_name}.ssh in deploy/" if host_name else "the host's ssh: entry"


def refused_message(spec: SSHSpec, host_name: str | None) -> str:
    return (
        f"cannot connect to {spec}: connection refused. Is sshd running there and listening "
        f"on port {spec.port}? (the address comes from {_entry(host_name)})"
    )


def unresolved_message(spec: SSHSpec, host_name: str | None) -> str:
    return f"cannot connect to {spec}: cannot resolve {spec.address!r}. Check {_entry(host_name)}."


def unreachable_message(spec: SSHSpec, host_name: str | None, reason: str) -> str:
    return (
        f"cannot connect to {spec}: {reason}. Check the address and port in "
        f"{_entry(host_name)}, and that a firewall lets port {spec.port} through."
    )


def auth_failed_message(spec: SSHSpec, key: Path | None) -> str:
    user = spec.user or "your user"
    if key:
        tried = f"with key {key}"
        pub = f"{key}.pub"
    else:
        tried = "with the SSH agent and ~/.ssh/id_* keys"
        pub = "~/.ssh/id_ed25519.pub"
    port = f"-p {spec.port} " if spec.port != 22 else ""
    return (
        f"authentication failed for {spec} {tried}: the server accepted none of them.\n"
        f"  Install the public key for {user} on the server "
        f"(ssh-copy-id -i {pub} {port}{spec.user + '@' if spec.user else ''}{spec.address}), "
        f"or point {KEY_ENV} at the right private key."
    )


# --- host key policies -----------------------------------------------------------------------


class UnknownHostKey(paramiko.SSHException):
    def __init__(self, hostname: str, key: paramiko.PKey):
        super().__init__(f"unknown host key for {hostname}")
        self.hostname, self.key = hostname, key


class RefuseUnknown(paramiko.MissingHostKeyPolicy):
    """Like OpenSSH's StrictHostKeyChecking=yes."""

    def missing_host_key(self, client, hostname, key):
        raise UnknownHostKey(hostname, key)


class AcceptNew(paramiko.MissingHostKeyPolicy):
    """Like StrictHostKeyChecking=accept-new: a first-seen key is appended to known_hosts.

    A key that differs from a recorded one never reaches a policy: paramiko raises
    BadHostKeyException for it."""

    def __init__(self, known_hosts: Path):
        self.known_hosts = known_hosts

    def missing_host_key(self, client, hostname, key):
        client.get_host_keys().add(hostname, key.get_name(), key)
        self.known_hosts.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(self.known_hosts, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        with os.fdopen(fd, "a") as fh:
            fh.write(f"{hostname} {key.get_name()} {key.get_base64()}\n")


# --- the runner ------------------------------------------------------------------------------


class _Sink:
    """Collects one output stream; with `echo`, also writes complete, scrubbed lines live."""

    def __init__(self, echo: IO[str] | None, prefix: str, scrub: Callable[[str], str]):
        self.parts: list[bytes] = []
        self.echo, self.prefix, self.scrub = echo, prefix, scrub
        self._partial = b""

    def add(self, data: bytes) -> None:
        self.parts.append(data)
        if self.echo is None:
            return
        *lines, self._partial = (self._partial + data).split(b"\n")
        for line in lines:
            self._write(line)

    def close(self) -> None:
        if self.echo is not None and self._partial:
            self._write(self._partial)
            self._partial = b""

    def _write(self, line: bytes) -> None:
        self.echo.write(self.prefix + self.scrub(line.decode(errors="replace")) + "\n")
        self.echo.flush()

    def text(self) -> str:
        return b"".join(self.parts).decode(errors="replace")


class SSHRunner(Runner):
    """Runs argv commands and reads/writes files on a server over SSH.

    `SSHRunner("root@203.0.113.7:22", host="prod")`. The connection opens on first use and is
    reused; `close()` it, or use the runner as a context manager."""

    def __init__(
        self,
        spec: str | SSHSpec,
        *,
        key_filename: str | os.PathLike | None = None,
        known_hosts: str | os.PathLike | None = None,
        accept_new_host_key: bool = False,
        connect_timeout: float = 15,
        host: str | None = None,
        **kw,
    ):
        self.spec = spec if isinstance(spec, SSHSpec) else SSHSpec.parse(spec)
        super().__init__(host=host or str(self.spec), **kw)
        self.host_name = host  # the stack's name for it (hosts.<name>), when known
        self.key_filename = key_path(key_filename)
        self.known_hosts = known_hosts_path(known_hosts)
        self.accept_new_host_key = accept_new_host_key
        self.connect_timeout = connect_timeout
        self._connection: fabric.Connection | None = None
        self._sftp: paramiko.SFTPClient | None = None

    # connection ------------------------------------------------------------------------------

    @property
    def connection(self) -> fabric.Connection:
        """The open `fabric.Connection` (opened here, with the host key policy set)."""
        if self._connection is None or not self._connection.is_connected:
            self._sftp = None  # belonged to the lost connection, if any
            self._connection = self._open()
        return self._connection

    def _open(self) -> fabric.Connection:
        import fabric  # here, so importing this module stays cheap

        if self.key_filename and not self.key_filename.is_file():
            raise OpsError(
                f"SSH key {self.key_filename} does not exist (set {KEY_ENV} to a private key file)"
            )
        connect_kwargs: dict = {"banner_timeout": self.connect_timeout}
        if self.key_filename:
            connect_kwargs.update(
                key_filename=str(self.key_filename), look_for_keys=False, allow_agent=False
            )
        conn = fabric.Connection(
            self.spec.address,
            user=self.spec.user,
            port=self.spec.port,
            connect_timeout=self.connect_timeout,
            connect_kwargs=connect_kwargs,
        )
        client = conn.client
        if self.known_hosts.is_file():
            client.get_host_keys().load(str(self.known_hosts))
        client.set_missing_host_key_policy(
            AcceptNew(self.known_hosts) if self.accept_new_host_key else RefuseUnknown()
        )
        try:
            conn.open()
        except Exception as exc:
            conn.close()
            raise self._connect_error(exc) from None
        return conn

    def _connect_error(self, exc: Exception) -> OpsError:
        spec, name = self.spec, self.host_name
        if isinstance(exc, UnknownHostKey):
            text = unknown_host_key_message(
                spec, exc.key.get_name(), fingerprint(exc.key), self.known_hosts
            )
        elif isinstance(exc, paramiko.BadHostKeyException):
            text = changed_host_key_message(
                spec,
                exc.expected_key.get_name(),
                fingerprint(exc.expected_key),
                fingerprint(exc.key),
                self.known_hosts,
            )
        elif isinstance(exc, paramiko.AuthenticationException):
            text = auth_failed_message(spec, self.key_filename)
        elif isinstance(
            exc, ConnectionRefusedError | paramiko.ssh_exception.NoValidConnectionsError
        ):
            refused = all(
                getattr(e, "errno", None) == errno.ECONNREFUSED
                for e in getattr(exc, "errors", {None: exc}).values()
            )
            text = (
                refused_message(spec, name)
                if refused
                else unreachable_message(spec, name, str(exc))
            )
        elif isinstance(exc, socket.gaierror):
            text = unresolved_message(spec, name)
        elif isinstance(exc, TimeoutError):
            text = unreachable_message(spec, name, f"no answer within {self.connect_timeout:g}s")
        elif isinstance(exc, paramiko.SSHException | OSError | EOFError):
            text = f"SSH to {spec} failed: {exc or type(exc).__name__}"
        else:
            raise exc
        return OpsError(self.scrub(text))

    @property
    def sftp(self) -> paramiko.SFTPClient:
        client = self.connection.client  # reconnects (and forgets the old SFTP) if needed
        if self._sftp is None:
            self._sftp = client.open_sftp()
        return self._sftp

    def close(self) -> None:
        if self._sftp is not None:
            self._sftp.close()
            self._sftp = None
        if self._connection is not None:
            self._connection.close()
            self._connection = None

    def __enter__(self) -> SSHRunner:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # commands --------------------------------------------------------------------------------

    def _execute(self, argv, *, input, env, timeout, stream) -> Result:
        data = input.encode() if isinstance(input, str) else input
        feed = None if data is None else _BytesFeed(data)
        return self._exec(argv, remote_command(argv, env), feed, timeout, stream)

    def _exec(
        self,
        argv: list[str],
        command: str,
        stdin: Callable[[], bytes] | None,
        timeout: float | None,
        stream: bool,
    ) -> Result:
        """One exec channel: threads move stdin in, stdout and stderr out, chunk by chunk."""
        try:
            channel = self.connection.client.get_transport().open_session()
            channel.exec_command(command)
        except paramiko.SSHException as exc:
            text = f"SSH to {self.spec}: cannot start a command: {exc}"
            raise OpsError(self.scrub(text)) from None
        prefix = f"[{self.host}] "
        out = _Sink(sys.stdout if stream else None, prefix, self.scrub)
        err = _Sink(sys.stderr if stream else None, prefix, self.scrub)
        threads = [
            threading.Thread(target=_pump_out, args=(channel.recv, out), daemon=True),
            threading.Thread(target=_pump_out, args=(channel.recv_stderr, err), daemon=True),
        ]
        if stdin is not None:
            threads.append(threading.Thread(target=_pump_in, args=(stdin, channel), daemon=True))
        else:
            channel.shutdown_write()
        for t in threads:
            t.start()
        finished = channel.status_event.wait(timeout)
        if not finished:
            channel.close()
        for t in threads[:2]:
            t.join(10)  # output after the exit status is only what is already buffered
        for t in threads[2:]:
            t.join(1)  # stdin: the command may have ended without reading it all
        out.close()
        err.close()
        if not finished:
            return Result(argv, 124, out.text(), f"timed out after {timeout}s on {self.spec}")
        code = channel.recv_exit_status()
        if code == -1 and _transport_died(channel.get_transport()):
            text = f"lost the SSH connection to {self.spec} while running: {quote(argv)}"
            raise OpsError(self.scrub(text))
        return Result(argv, code, out.text(), err.text())

    def _pipe(self, local: list[str], remote: list[str], *, timeout: float | None) -> Result:
        """`local | ssh host remote`: the local stdout is sent in chunks as the remote stdin,
        so a whole `docker save` image never sits in memory."""
        argv = [*local, "|", *remote]
        try:
            proc = subprocess.Popen(local, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        except FileNotFoundError:
            return Result(argv, 127, "", f"{local[0]}: command not found")
        local_err: list[bytes] = []
        err_thread = threading.Thread(
            target=lambda: local_err.append(proc.stderr.read()), daemon=True
        )
        err_thread.start()
        try:
            remote_result = self._exec(
                remote, remote_command(remote), lambda: proc.stdout.read1(CHUNK), timeout, False
            )
        finally:
            # The remote side is done: if it stopped reading early, the local side must stop.
            if not _wait(proc, 5):
                proc.kill()
                proc.wait()
            err_thread.join(10)
            proc.stdout.close()
            proc.stderr.close()
        local_stderr = b"".join(local_err).decode(errors="replace")
        code = proc.returncode or remote_result.code
        stderr = "\n".join(s for s in (local_stderr, remote_result.stderr) if s.strip())
        return Result(argv, code, remote_result.stdout, stderr)

    # files -----------------------------------------------------------------------------------

    def write_file(self, path, data, mode=0o644, group=None) -> None:
        """Atomic over SFTP: a private temp file beside the target, chmod/chgrp, rename."""
        path = str(path)
        payload = data.encode() if isinstance(data, str) else data
        directory, name = posixpath.split(path)
        tmp = posixpath.join(directory, f".{name}.{_secrets.token_hex(4)}.tmp")
        sftp = self.sftp
        try:
            self._makedirs(directory)
            with sftp.open(tmp, "wb") as fh:
                fh.chmod(0o600)  # before any byte is written: secrets never sit readable
                fh.set_pipelined(True)
                fh.write(payload)
            if group is not None:
                sftp.chown(tmp, sftp.stat(tmp).st_uid, group)
            sftp.chmod(tmp, mode)
            sftp.posix_rename(tmp, path)
        except OSError as exc:
            with contextlib.suppress(OSError):
                sftp.remove(tmp)
            raise OpsError(self.scrub(f"cannot write {path} on {self.spec}: {_why(exc)}")) from None

    def _makedirs(self, directory: str) -> None:
        missing = []
        while directory not in ("", "/"):
            try:
                self.sftp.stat(directory)
                break
            except FileNotFoundError:
                missing.append(directory)
                directory = posixpath.dirname(directory)
        for d in reversed(missing):
            self.sftp.mkdir(d)

    def read_file(self, path) -> bytes | None:
        try:
            with self.sftp.open(str(path), "rb") as fh:
                fh.prefetch()
                return fh.read()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise OpsError(self.scrub(f"cannot read {path} on {self.spec}: {_why(exc)}")) from None


class _BytesFeed:
    """stdin from bytes, in chunks."""

    def __init__(self, data: bytes):
        self.view, self.pos = memoryview(data), 0

    def __call__(self) -> bytes:
        chunk = self.view[self.pos : self.pos + CHUNK]
        self.pos += len(chunk)
        return bytes(chunk)


def _pump_out(recv: Callable[[int], bytes], sink: _Sink) -> None:
    try:
        while data := recv(CHUNK):
            sink.add(data)
    except (OSError, EOFError):
        pass


def _pump_in(read: Callable[[], bytes], channel: paramiko.Channel) -> None:
    try:
        while data := read():
            channel.sendall(data)
        channel.shutdown_write()
    except (OSError, EOFError):
        pass  # the remote command ended without reading everything; its exit code says why


def _transport_died(transport: paramiko.Transport, grace: float = 2) -> bool:
    """No exit status: a dead connection, or a command killed by a signal? paramiko closes
    the channels of a dead transport a moment before it marks the transport inactive."""
    deadline = time.monotonic() + grace
    while transport.is_active():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _wait(proc: subprocess.Popen, seconds: float) -> bool:
    try:
        proc.wait(seconds)
        return True
    except subprocess.TimeoutExpired:
        return False


def _why(exc: OSError) -> str:
    if exc.errno and exc.strerror:
        return exc.strerror.lower()
    return str(exc) or type(exc).__name__


def runner_for_spec(spec: str, *, host: str | None = None, **options) -> SSHRunner:
    """An `SSHRunner` for `user@address[:port]` (a `--host` given as an address, or a stack
    host's `ssh:`). `options`: key_filename, known_hosts, accept_new_host_key, connect_timeout;
    unset, the key and known_hosts come from $AIIA_SSH_KEY and $AIIA_SSH_KNOWN_HOSTS."""
    return SSHRunner(spec, host=host, **options)
