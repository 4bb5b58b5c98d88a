"""Runners execute argv commands built elsewhere; they decide nothing.

Commands are argv lists built in commands/; they are quoted in exactly one place,
`commands.argv.quote()`, when printed or sent over SSH. Secrets registered with `redact()`
never reach printed output.

Reads and writes are told apart by the caller: `query()` asks the host a question (a fact:
`docker inspect`, `df`), `run()` changes it. A dry run is a `PrintingRunner` whose reader is
the real target: facts are real, every change is printed instead of made.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from aiia_ops.commands.argv import Argv, Result, quote
from aiia_ops.errors import CommandFailed
from aiia_ops.host.files import atomic_write


@dataclass
class Runner:
    """Base runner: redaction and the check-and-raise logic shared by every runner."""

    secrets: set[str] = field(default_factory=set, repr=False)  # never in a repr or traceback
    host: str = "local"

    def redact(self, *values: str) -> None:
        self.secrets.update(v for v in values if v and len(v) >= 4)

    def scrub(self, text: str) -> str:
        for secret in sorted(self.secrets, key=len, reverse=True):
            text = text.replace(secret, "********")
        return text

    def run(
        self,
        argv: Argv,
        *,
        check: bool = True,
        input: str | bytes | None = None,
        env: dict[str, str] | None = None,
        timeout: float | None = None,
        stream: bool = False,
    ) -> Result:
        result = self._execute(
            list(map(str, argv)), input=input, env=env, timeout=timeout, stream=stream
        )
        if check and not result.ok:
            raise CommandFailed(
                self.scrub(quote(argv)),
                result.code,
                self.scrub(result.stdout),
                self.scrub(result.stderr),
            )
        return result

    def query(
        self, argv: Argv, *, input: str | bytes | None = None, timeout: float | None = None
    ) -> Result:
        """A read: ask the host without changing it; never raises on a non-zero exit."""
        return self.run(argv, check=False, input=input, timeout=timeout)

    def _execute(self, argv, *, input, env, timeout, stream) -> Result:  # pragma: no cover
        raise NotImplementedError

    def pipe_from_local(
        self, local_argv: Argv, remote_argv: Argv, *, check: bool = True, timeout=None
    ) -> Result:
        """`local_argv` on this machine piped into `remote_argv` on the target host, streamed
        (`docker save IMAGE` | `docker load` ships an image without a registry)."""
        local, remote = list(map(str, local_argv)), list(map(str, remote_argv))
        result = self._pipe(local, remote, timeout=timeout)
        if check and not result.ok:
            raise CommandFailed(
                self.scrub(f"{quote(local)} | [{self.host}] {quote(remote)}"),
                result.code,
                self.scrub(result.stdout),
                self.scrub(result.stderr),
            )
        return result

    def _pipe(self, local, remote, *, timeout) -> Result:  # pragma: no cover
        raise NotImplementedError

    # Files on the target host (state dir: rendered configs, locks, logs). Local runners use
    # the filesystem; SSH runners use SFTP; the printing runner only says what it would write.
    def write_file(
        self, path: str, data: str | bytes, mode: int = 0o644, group: int | None = None
    ) -> None:  # pragma: no cover
        raise NotImplementedError

    def read_file(self, path: str) -> bytes | None:  # pragma: no cover
        raise NotImplementedError


class LocalRunner(Runner):
    """Runs on this machine."""

    def write_file(self, path, data, mode=0o644, group=None) -> None:
        atomic_write(Path(path), data, mode=mode, group=group)

    def read_file(self, path) -> bytes | None:
        try:
            return Path(path).read_bytes()
        except FileNotFoundError:
            return None

    def _execute(self, argv, *, input, env, timeout, stream) -> Result:
        full_env = {**os.environ, **(env or {})}
        data = input.encode() if isinstance(input, str) else input
        try:
            proc = subprocess.run(
                argv,
                input=data,
                env=full_env,
                timeout=timeout,
                stdout=None if stream else subprocess.PIPE,
                stderr=None if stream else subprocess.PIPE,
            )
        except FileNotFoundError:
            return Result(argv, 127, "", f"{argv[0]}: command not found")
        except subprocess.TimeoutExpired:
            return Result(argv, 124, "", f"timed out after {timeout}s")
        decode = lambda b: (b or b"").decode(errors="replace")  # noqa: E731
        return Result(argv, proc.returncode, decode(proc.stdout), decode(proc.stderr))

    def _pipe(self, local, remote, *, timeout) -> Result:
        """Both ends here: an OS pipe between two processes."""
        argv = [*local, "|", *remote]
        try:
            first = subprocess.Popen(local, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        except FileNotFoundError:
            return Result(argv, 127, "", f"{local[0]}: command not found")
        try:
            second = subprocess.Popen(
                remote, stdin=first.stdout, stdout=subprocess.PIPE, stderr=subprocess.PIPE
            )
        except FileNotFoundError:
            first.kill()
            first.communicate()
            return Result(argv, 127, "", f"{remote[0]}: command not found")
        first.stdout.close()  # the second process owns the read end now
        try:
            out, err2 = second.communicate(timeout=timeout)
            _, err1 = first.communicate(timeout=5 if timeout else None)
        except subprocess.TimeoutExpired:
            for proc in (first, second):
                proc.kill()
                proc.communicate()
            return Result(argv, 124, "", f"timed out after {timeout}s")
        stderr = "\n".join(e.decode(errors="replace") for e in (err1, err2) if e.strip())
        return Result(argv, first.returncode or second.returncode, out.decode(), stderr)


class PrintingRunner(Runner):
    """Dry run: prints each command (secrets redacted) and changes nothing.

    Reads go to `reader` (a real runner) when given, so a plan can still see the host."""

    def __init__(self, out=None, reader: Runner | None = None, **kw):
        super().__init__(**kw)
        self.out = out or sys.stdout
        self.printed: list[str] = []
        self.reader = reader

    def write_file(self, path, data, mode=0o644, group=None) -> None:
        size = len(data.encode() if isinstance(data, str) else data)
        line = f"[{self.host}] write {path} ({size} bytes, mode {mode:o})"
        self.printed.append(line)
        print(line, file=self.out)

    def read_file(self, path) -> bytes | None:
        return self.reader.read_file(path) if self.reader else None

    def query(self, argv, *, input=None, timeout=None) -> Result:
        """Facts come from the real target; without one, every question answers empty."""
        if self.reader is not None:
            return self.reader.query(argv, input=input, timeout=timeout)
        return Result(list(map(str, argv)))

    def _execute(self, argv, *, input, env, timeout, stream) -> Result:
        line = self.scrub(f"[{self.host}] {quote(argv)}")
        self.printed.append(line)
        print(line, file=self.out)
        return Result(argv)

    def _pipe(self, local, remote, *, timeout) -> Result:
        line = self.scrub(f"[{self.host}] {quote(local)} | {quote(remote)}")
        self.printed.append(line)
        print(line, file=self.out)
        return Result([*local, "|", *remote])


class RecordingRunner(Runner):
    """For tests: records commands and answers from a table of canned results."""

    def __init__(self, answers: dict[str, Result | str] | None = None, **kw):
        super().__init__(**kw)
        self.answers = answers or {}
        self.commands: list[list[str]] = []
        self.files: dict[str, bytes] = {}

    def write_file(self, path, data, mode=0o644, group=None) -> None:
        self.files[str(path)] = data.encode() if isinstance(data, str) else data

    def read_file(self, path) -> bytes | None:
        return self.files.get(str(path))

    def _execute(self, argv, *, input, env, timeout, stream) -> Result:
        self.commands.append(argv)
        for prefix, answer in self.answers.items():
            if quote(argv).startswith(prefix):
                return answer if isinstance(answer, Result) else Result(argv, 0, answer)
        return Result(argv)

    def _pipe(self, local, remote, *, timeout) -> Result:
        return self._execute(
            [*local, "|", *remote], input=None, env=None, timeout=None, stream=False
        )
