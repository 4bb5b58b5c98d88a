"""The releases log and the audit log: append-only JSON lines under the state dir.

<state_dir>/releases/<env>.jsonl   one line per deploy or rollback:
    {"time": ISO-8601 UTC, "env", "commit", "image", "who", "action": "deploy"|"rollback",
     "result": "good"|"bad"|"failed", "duration_s", "detail"}
<state_dir>/audit.log              one human line per action of any task that changes state.
The monitor's status page reads both.
"""

from __future__ import annotations

import datetime as _dt
import getpass
import json
import os
import socket
from pathlib import Path


def now_iso() -> str:
    return _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def who() -> str:
    """The person (or CI run) acting: GITHUB_ACTOR in Actions, else user@host."""
    actor = os.environ.get("GITHUB_ACTOR")
    if actor:
        return f"{actor} (GitHub Actions)"
    try:
        user = getpass.getuser()
    except Exception:
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


def releases_file(state_dir: Path, env: str) -> Path:
    return Path(state_dir) / "releases" / f"{env}.jsonl"


def release_line(env: str, fields: dict) -> str:
    return (
        json.dumps({"time": now_iso(), "env": env, "who": who(), **fields}, sort_keys=True) + "\n"
    )


def audit_line(message: str) -> str:
    return f"{now_iso()} {who()} {message}\n"


def parse_releases(data: bytes) -> list[dict]:
    out = []
    for line in data.decode(errors="replace").splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue  # a torn last line after a crash is not worth failing over
    return out


def read_releases(state_dir: Path, env: str) -> list[dict]:
    path = releases_file(state_dir, env)
    return parse_releases(path.read_bytes()) if path.exists() else []


def audit(state_dir: Path, message: str) -> None:
    path = Path(state_dir) / "audit.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(audit_line(message))
