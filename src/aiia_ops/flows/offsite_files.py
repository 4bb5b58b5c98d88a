"""`invoke backup.media`: the media (every environment's storage volume) and the
configuration set (rendered configs without secrets, certificates, the stack file) copied
off-site with restic, incrementally and encrypted, to the pgBackRest store's bucket. And
the restores `invoke recover` uses on a new host. Argv: commands/offsite_files.py."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from pathlib import Path

from aiia_ops.commands import offsite_files as of
from aiia_ops.commands import pgbackrest as pb
from aiia_ops.errors import CommandFailed, OpsError
from aiia_ops.host.runners import Runner
from aiia_ops.model import Stack
from aiia_ops.model.state import StateDir


def _last_line(exc: CommandFailed) -> str:
    lines = [ln for ln in (exc.stderr + exc.stdout).splitlines() if ln.strip()]
    return lines[-1] if lines else str(exc)


def restic(runner: Runner, argv: list[str], what: str, timeout: float = 3600):
    try:
        return runner.run(argv, timeout=timeout)
    except CommandFailed as exc:
        raise OpsError(f"{what} failed: {_last_line(exc)}") from None


def live_image(stack: Stack, runner: Runner) -> str:
    pg = stack.services.postgresql
    out = runner.query(pb.inspect(pg.container, "{{.Config.Image}}"))
    if not out.ok:
        raise OpsError(f"{pg.container} is not running here: the copy runs in its image")
    return out.stdout.strip()


def volume_name(stack: Stack, env: str) -> str:
    return f"{stack.project}_{stack.environment(env).storage_volume}"


def sources(stack: Stack, state: StateDir, runner: Runner) -> of.Sources:
    vols = {
        env: volume_name(stack, env)
        for env in stack.environments
        if runner.query(of.volume_inspect(volume_name(stack, env))).ok
    }
    source = str(Path(stack.source).resolve()) if stack.source else None
    return of.Sources(vols, str(state.config), str(state.root / "ssl"), source)


def ensure_repository(stack: Stack, image: str, env_file: str, runner: Runner) -> bool:
    """restic's repository in the bucket, made once. True when made now."""
    if runner.query(of.cat_config(stack, image, env_file), timeout=300).ok:
        return False
    restic(runner, of.init(stack, image, env_file), "restic init (the off-site file store)", 300)
    return True


def backup(stack: Stack, state: StateDir, runner: Runner) -> dict:
    """One incremental copy; records it in <state>/backups/offsite-files.json (the
    monitor's "last off-site media copy")."""
    pb.require(stack)
    image = live_image(stack, runner)
    env_file = str(state.env_files / "postgresql.env")
    t0 = time.monotonic()
    made = ensure_repository(stack, image, env_file, runner)
    src = sources(stack, state, runner)
    out = restic(runner, of.backup(stack, image, env_file, src), "restic backup")
    summary = of.parse_backup_summary(out.stdout)
    record = {**summary, "time": datetime.now(UTC).isoformat(timespec="seconds"),
              "seconds": round(time.monotonic() - t0, 1), "environments": sorted(src.volumes),
              "repository": of.repository(stack), "initialized": made}  # fmt: skip
    runner.run(["mkdir", "-p", str(state.root / "backups")])
    runner.write_file(str(state.root / of.STATUS_FILE), json.dumps(record, indent=2) + "\n")
    return record


def last_copy(state: StateDir, runner: Runner) -> dict | None:
    raw = runner.read_file(str(state.root / of.STATUS_FILE))
    return None if raw is None else json.loads(raw)


def latest_snapshot(stack: Stack, image: str, env_file: str, runner: Runner):
    out = runner.query(of.snapshots(stack, image, env_file), timeout=300)
    if not out.ok:
        tail = (out.stderr or out.stdout).strip().splitlines()
        raise OpsError(
            f"cannot list the off-site file copies: {tail[-1] if tail else 'restic failed'}"
        )
    snaps = of.parse_snapshots(out.stdout)
    return snaps[-1] if snaps else None


def restore_storage(stack: Stack, image: str, env_file: str, env: str, runner: Runner) -> None:
    """The newest copy of an environment's storage volume into that volume (made now)."""
    volume = volume_name(stack, env)
    runner.run(pb.create_volume(volume))
    path = of.storage_path(env)
    restic(runner, of.restore(stack, image, env_file, [path], of.volume_mount(volume, path)),
           f"restic restore of {env}'s storage")  # fmt: skip


def restore_certificates(stack: Stack, image: str, env_file: str, root: str, runner: Runner):
    """nginx's certificates (state ssl/) from the newest copy into the new host's state."""
    path = f"{of.ROOT}/ssl"
    restic(runner, of.restore(stack, image, env_file, [path], of.dir_mount(f"{root}/ssl", path)),
           "restic restore of the certificates")  # fmt: skip
