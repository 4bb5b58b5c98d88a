"""`invoke config.render`: every rendered config, the compose file and the env files,
written into the host's state dir (or another folder, for a look)."""

from __future__ import annotations

from pathlib import Path

from aiia_ops.commands.compose import compose_data, dump, env_files
from aiia_ops.commands.render import render_stack
from aiia_ops.host.files import atomic_write, write_rendered
from aiia_ops.host.git import shared_image_tags
from aiia_ops.host.secrets import load_secrets, write_env_file
from aiia_ops.model import Stack
from aiia_ops.model.state import StateDir


def render(model: Stack, state: StateDir, envs: list[str], out: Path | None = None) -> list[Path]:
    """Write the files; returns the configs and the compose file written (env files are
    written too, always into the state dir, and never listed: they hold secrets)."""
    secrets = load_secrets(state.root, list(model.environments))
    target = Path(out) if out else state.config
    written = write_rendered(render_stack(model, secrets, envs=envs), target)
    compose_path = (target / "compose.yml") if out else state.compose_file
    atomic_write(compose_path, dump(compose_data(model, str(state.root), shared_image_tags(model))))
    for name, values in env_files(model, secrets).items():
        write_env_file(state.env_files / f"{name}.env", values)
    return [*written, compose_path]
