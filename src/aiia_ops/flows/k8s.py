"""`invoke k8s.render`: the Kubernetes manifests (kustomize base + overlays), written
through a runner, so that a dry run prints the files it would write."""

from __future__ import annotations

from pathlib import Path

from aiia_ops.commands import k8s
from aiia_ops.host.git import image_tag, shared_image_tags
from aiia_ops.host.runners import Runner
from aiia_ops.model import Stack


def image_tags(model: Stack) -> tuple[dict[str, str], str]:
    """The tags `invoke build` gives the shared images, and the app's (this checkout)."""
    return shared_image_tags(model), image_tag("django")


def render(model: Stack, runner: Runner, out: Path, envs: list[str] | None = None) -> list[Path]:
    """Build every manifest first (a builder error writes nothing), then write them."""
    tags, app_tag = image_tags(model)
    files = k8s.render_files(k8s.manifest_tree(model, tags, app_tag, envs))
    written = []
    for rel, text in sorted(files.items()):
        path = Path(out) / rel
        runner.write_file(str(path), text, mode=0o644)
        written.append(path)
    return written
