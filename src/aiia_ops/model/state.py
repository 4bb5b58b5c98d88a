"""Where a host keeps its runtime state: secrets, rendered configs, releases, backups, lock."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from aiia_ops.model.types import Stack


@dataclass(frozen=True)
class StateDir:
    root: Path

    @property
    def secrets(self) -> Path:
        return self.root / "secrets"

    @property
    def config(self) -> Path:
        """Rendered configs: one folder per service, mounted read-only at /etc/aiia."""
        return self.root / "config"

    @property
    def env_files(self) -> Path:
        """Per-container env files holding secrets (0600), read by the compose client."""
        return self.root / "env"

    @property
    def compose_file(self) -> Path:
        return self.root / "compose.yml"

    def sub(self, name: str) -> Path:
        return self.root / name


def local_state_dir(stack: Stack, host: str = "local") -> StateDir:
    """AIIA_STATE_DIR wins; else the host's state_dir; a non-root user falls back to ~."""
    override = os.environ.get("AIIA_STATE_DIR")
    if override:
        return StateDir(Path(override))
    configured = Path(stack.hosts[host].state_dir) if host in stack.hosts else Path("/var/lib/aiia")
    if (
        os.geteuid() != 0
        and not os.access(configured.parent, os.W_OK)
        and not (configured.exists() and os.access(configured, os.W_OK))
    ):
        return StateDir(Path.home() / ".local" / "state" / stack.project)
    return StateDir(configured)
