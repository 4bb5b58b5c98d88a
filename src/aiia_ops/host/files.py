"""Files on this machine: the one atomic write every writer uses."""

from __future__ import annotations

import os
from pathlib import Path


def atomic_write(
    path: Path, data: str | bytes, mode: int = 0o644, group: int | None = None
) -> None:
    """Written beside the target under a name unique to this process, then renamed over it:
    a reader sees the old file or the new one, never half of one, and two writers never
    share a temporary file."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data.encode() if isinstance(data, str) else data)
            fh.flush()
            os.fsync(fh.fileno())
        if group is not None and os.geteuid() == 0:
            os.chown(tmp, 0, group)
        os.chmod(tmp, mode)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
