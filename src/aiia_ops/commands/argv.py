"""Commands are argv lists; this is the one place they are quoted, and what running one gives."""

from __future__ import annotations

import shlex
from collections.abc import Sequence
from dataclasses import dataclass

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
