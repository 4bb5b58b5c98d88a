"""Errors meant for people: each says what is wrong and what to do about it."""


class OpsError(Exception):
    """A user-facing failure. Tasks turn it into `invoke.Exit` with the message, no traceback."""


class CommandFailed(OpsError):
    def __init__(self, argv_text: str, code: int, stdout: str, stderr: str):
        self.argv_text, self.code, self.stdout, self.stderr = argv_text, code, stdout, stderr
        tail = (stderr or stdout).strip().splitlines()[-15:]
        detail = "\n".join("    " + line for line in tail)
        super().__init__(f"command failed (exit {code}): {argv_text}\n{detail}".rstrip())
