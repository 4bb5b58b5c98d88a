"""Files on this machine: the one atomic write every writer uses, the rendered configs
written with it, and the hash of a build context."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from aiia_ops.commands.render import SERVICE_UID, HostFile, RenderedFile


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


def write_rendered(files: dict[str, RenderedFile], out_dir: Path) -> list[Path]:
    """Write rendered configs under `out_dir`; secret ones 0640 and group the service user
    when root. Not root: the container user can only read what everyone can (0644)."""
    out_dir = Path(out_dir)
    written = []
    for rel, f in sorted(files.items()):
        target = out_dir / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        os.chmod(target.parent, 0o755)
        if f.secret and os.geteuid() == 0:
            atomic_write(target, f.text, mode=0o640, group=SERVICE_UID)
        else:
            atomic_write(target, f.text, mode=0o644)
        written.append(target)
    return written


def sync_files(runner, files: list[HostFile]) -> list[str]:
    """Write, through `runner`, the files whose content differs on its host; return the
    paths that changed."""
    changed = []
    for f in files:
        if runner.read_file(f.path) != f.data:
            runner.write_file(f.path, f.data, mode=f.mode, group=f.group)
            changed.append(f.path)
    return changed


def context_sha(directory: Path) -> str:
    """sha256 over the relative paths and contents of a build context's files (docs aside)."""
    digest = hashlib.sha256()
    files = (p for p in Path(directory).rglob("*") if p.is_file() and p.suffix != ".md")
    for path in sorted(files):
        digest.update(str(path.relative_to(directory)).encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]
