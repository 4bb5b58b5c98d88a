"""Runners execute argv commands built elsewhere; they decide nothing.

Commands are lists of strings everywhere in the core. They are quoted in exactly one place,
`quote()`, when printed or sent over SSH. Secrets registered with `redact()` never reach
printed output.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from .errors import CommandFailed

Argv = Sequence[str]


def quote(argv: Argv) -> str:
    return shlex.join(str(a) for a in argv)


@dataclass
class Result:
    argv: list[str]
    code: int = 0
    stdout: str = ""
    stderr: str = ""

    @property
    def ok(self) -> bool:
        return self.code == 0


@dataclass
class Runner:
    """Base runner: redaction and the check-and-raise logic shared by every runner."""

    secrets: set[str] = field(default_factory=set)
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

    def _execute(self, argv, *, input, env, timeout, stream) -> Result:  # pragma: no cover
        raise NotImplementedError


class LocalRunner(Runner):
    """Runs on this machine."""

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


class PrintingRunner(Runner):
    """Dry run: prints each command (secrets redacted) and changes nothing."""

    def __init__(self, out=None, **kw):
        super().__init__(**kw)
        self.out = out or sys.stdout
        self.printed: list[str] = []

    def _execute(self, argv, *, input, env, timeout, stream) -> Result:
        line = self.scrub(f"[{self.host}] {quote(argv)}")
        self.printed.append(line)
        print(line, file=self.out)
        return Result(argv)


class RecordingRunner(Runner):
    """For tests: records commands and answers from a table of canned results."""

    def __init__(self, answers: dict[str, Result | str] | None = None, **kw):
        super().__init__(**kw)
        self.answers = answers or {}
        self.commands: list[list[str]] = []

    def _execute(self, argv, *, input, env, timeout, stream) -> Result:
        self.commands.append(argv)
        for prefix, answer in self.answers.items():
            if quote(argv).startswith(prefix):
                return answer if isinstance(answer, Result) else Result(argv, 0, answer)
        return Result(argv)


def run_all(runner: Runner, commands: Iterable[Argv]) -> list[Result]:
    return [runner.run(c) for c in commands]
