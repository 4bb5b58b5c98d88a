"""The secrets export: every secrets file of the state dir in one file, encrypted with a
passphrase, for the operator to keep off the server (a recovery onto a new host needs it).

Format: `openssl enc -aes-256-cbc -pbkdf2 -iter 600000 -salt` over a JSON document
{"format": "aiia-secrets-export/1", "project", "created", "files": {"shared.env": ...}}.
Plain openssl on purpose: the operator can open it by hand on any machine
(`openssl enc -d -aes-256-cbc -pbkdf2 -iter 600000 -in FILE`), no project code needed.
The passphrase reaches openssl through its environment (`-pass env:`), never argv.
"""

from __future__ import annotations

import json
import os
import subprocess
from datetime import UTC, datetime
from pathlib import Path

from aiia_ops.errors import OpsError
from aiia_ops.host.files import atomic_write

FORMAT = "aiia-secrets-export/1"
CIPHER = ["-aes-256-cbc", "-pbkdf2", "-iter", "600000", "-salt"]
PASS_VAR = "AIIA_EXPORT_PASSPHRASE"
MIN_PASSPHRASE = 12


def _openssl(args: list[str], data: bytes, passphrase: str) -> subprocess.CompletedProcess:
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "_AIIA_PASS": passphrase}
    return subprocess.run(
        ["openssl", "enc", *args, *CIPHER, "-pass", "env:_AIIA_PASS"],
        input=data, capture_output=True, env=env, timeout=120,
    )  # fmt: skip


def export(state_dir: Path, project: str, names: list[str], out: Path, passphrase: str) -> int:
    """Write the encrypted export of <state>/secrets/<name>.env to `out` (0600). Returns
    the number of files."""
    if len(passphrase) < MIN_PASSPHRASE:
        raise OpsError(
            f"the export passphrase is shorter than {MIN_PASSPHRASE} characters: choose a "
            "longer one (it is all that protects the secrets off the server)"
        )
    files = {}
    for name in names:
        path = Path(state_dir) / "secrets" / f"{name}.env"
        if not path.exists():
            raise OpsError(f"{path} is missing: run `invoke setup` first; nothing was written")
        files[f"{name}.env"] = path.read_text()
    doc = {"format": FORMAT, "project": project,
           "created": datetime.now(UTC).isoformat(timespec="seconds"), "files": files}  # fmt: skip
    proc = _openssl(["-e"], json.dumps(doc).encode(), passphrase)
    if proc.returncode != 0:
        raise OpsError(f"openssl could not encrypt: {proc.stderr.decode().strip()}")
    if not out.parent.is_dir():
        raise OpsError(f"--out {out}: the folder {out.parent} does not exist")
    atomic_write(out, proc.stdout, mode=0o600)
    return len(files)


def read(path: Path, passphrase: str) -> dict:
    """The export's document; a wrong passphrase or a damaged file is a clear error."""
    if not path.is_file():
        raise OpsError(f"--secrets {path}: no such file (the export `invoke secrets.export` made)")
    proc = _openssl(["-d"], path.read_bytes(), passphrase)
    doc = None
    if proc.returncode == 0:
        try:
            doc = json.loads(proc.stdout)
        except (UnicodeDecodeError, json.JSONDecodeError):
            doc = None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise OpsError(
            f"cannot open {path}: wrong passphrase, or not a secrets export "
            f"(set {PASS_VAR} or type it when asked); nothing was changed"
        )
    return doc


def unpack(doc: dict, state_dir: Path) -> None:
    """The export's files into <state_dir>/secrets (0700 folder, 0600 files)."""
    folder = Path(state_dir) / "secrets"
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(folder, 0o700)
    for name, text in doc["files"].items():
        if "/" in name or not name.endswith(".env"):
            raise OpsError(f"the export holds an unexpected file name {name!r}")
        atomic_write(folder / name, text, mode=0o600)
