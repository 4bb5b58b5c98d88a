"""invoke k8s.render: Kubernetes manifests from the stack (rendered and validated here;
no cluster runs them on these machines: docs/kubernetes.md)."""

from __future__ import annotations

from pathlib import Path

from invoke import Collection

from aiia_ops.commands.k8s import K8S_VERSION
from aiia_ops.flows import k8s as flow
from aiia_ops.host.runners import LocalRunner, PrintingRunner
from aiia_ops.tasks.common import load, task


@task(
    help={
        "env": "environment whose overlay to render (default: every environment)",
        "out": "folder to write into (default: <state dir>/k8s)",
        "dry_run": "print the files that would be written, write nothing",
    }
)
def render(c, env=None, out=None, dry_run=False, stack=None):
    """Render the kustomize layout: base/ (shared services) and overlays/<env>/ (the app)."""
    model, state = load(stack)
    envs = [model.environment(env).name] if env else None
    target = Path(out) if out else state.root / "k8s"
    runner = PrintingRunner(reader=LocalRunner()) if dry_run else LocalRunner()
    written = flow.render(model, runner, target, envs)
    if not dry_run:
        for path in written:
            print(f"wrote {path}")
    print(f"Kubernetes {K8S_VERSION} manifests; apply: kubectl apply -k {target}/overlays/<env>")


namespace = Collection("k8s", render)
