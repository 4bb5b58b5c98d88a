"""Helpers shared by the Django service tests: paths, rendering with the real renderer."""

from __future__ import annotations

import functools
import json
import os
import re
import subprocess
import uuid
from pathlib import Path
from unittest import mock

import pytest

from aiia_ops import DEFAULT_STACK
from aiia_ops.commands import render
from aiia_ops.model import Stack, load_stack
from aiia_ops.model.secrets import EnvSecrets, Secrets

SERVICE_DIR = Path(__file__).resolve().parents[1]
APP_DIR = SERVICE_DIR / "app"
TEMPLATE = SERVICE_DIR / "templates" / "gunicorn.conf.py.j2"
BAKED_CONFIG = SERVICE_DIR / "etc" / "gunicorn.conf.py"
BUILT_TAG = "aiia/django:test"
BUILD_VERSION = f"pytest-{uuid.uuid4().hex[:8]}"


def stack() -> Stack:
    return load_stack(DEFAULT_STACK)


def fake_secrets(model: Stack) -> Secrets:
    envs = {name: EnvSecrets(f"db-{name}", f"key-{name}") for name in model.environments}
    return Secrets("pg-secret", "redis-secret", "bouncer-secret", envs)


def render_gunicorn(model: Stack | None = None) -> dict[str, str]:
    """{environment name: rendered gunicorn.conf.py}, by the project's own renderer."""
    model = model or stack()
    ours = tuple(t for t in render.TEMPLATES if t.service == "django")
    with mock.patch.object(render, "TEMPLATES", ours):
        files = render.render_stack(model, fake_secrets(model))
    out = {}
    for path, rendered in files.items():
        match = re.fullmatch(r"app-(\w+)/gunicorn\.conf\.py", path)
        assert match, f"unexpected rendered file {path}"
        out[match.group(1)] = rendered.text
    return out


def load_config(text: str, env: dict[str, str] | None = None) -> dict:
    """Execute a gunicorn config file as gunicorn does; its settings (no dunders/modules)."""
    namespace: dict = {}
    with mock.patch.dict("os.environ", env or {}):
        exec(compile(text, "gunicorn.conf.py", "exec"), namespace)
    return {
        k: v
        for k, v in namespace.items()
        if not k.startswith("__") and not hasattr(v, "__spec__")  # drop imported modules
    }


def dockerfile_healthcheck() -> dict:
    """The Dockerfile's HEALTHCHECK: {interval, timeout, retries, command}."""
    text = (SERVICE_DIR / "Dockerfile").read_text().replace("\\\n", " ")
    m = re.search(r"^HEALTHCHECK\s+(.*?)\s+CMD\s+(\[.*\])\s*$", text, re.M)
    assert m, "the Dockerfile has no exec-form HEALTHCHECK ... CMD [...]"
    opts = dict(re.findall(r"--([a-z-]+)=(\S+)", m.group(1)))
    return {
        "interval": opts.get("interval"),
        "timeout": opts.get("timeout"),
        "retries": int(opts.get("retries", 0)),
        "command": json.loads(m.group(2)),
    }


# --- docker -------------------------------------------------------------------------------


def docker(*args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
    proc = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        cmd = " ".join(args)
        pytest.fail(f"docker {cmd} -> exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


@functools.cache
def _image() -> str:
    ref = os.environ.get("AIIA_DJANGO_IMAGE")
    if not ref and os.environ.get("AIIA_TEST_IMAGE_TAG"):
        ref = f"aiia/django:{os.environ['AIIA_TEST_IMAGE_TAG']}"
    if ref:
        docker("image", "inspect", ref)
        return ref
    if docker("image", "inspect", "aiia/base:trixie", check=False).returncode != 0:
        pytest.fail("the base image aiia/base:trixie is missing: run `invoke provision`")
    wheels = subprocess.run(
        [str(SERVICE_DIR / "build-wheelhouse")], capture_output=True, text=True, timeout=600
    )
    assert wheels.returncode == 0, wheels.stdout + wheels.stderr
    docker(
        "build", "-q", "-t", BUILT_TAG, "--build-arg", f"APP_VERSION={BUILD_VERSION}",
        str(SERVICE_DIR), timeout=900,
    )  # fmt: skip
    return BUILT_TAG


def django_image() -> str:
    """The image under test, built once per session (after ./build-wheelhouse) as
    aiia/django:test, or ready-made: AIIA_DJANGO_IMAGE names a full reference,
    AIIA_TEST_IMAGE_TAG a tag of aiia/django (CI builds them with the stack's tags)."""
    try:
        engine = docker("info", "--format", "{{.ServerVersion}}", check=False, timeout=30)
    except FileNotFoundError:
        pytest.skip("no docker client")
    if engine.returncode != 0:
        pytest.skip(f"no Docker engine: {engine.stderr.strip()}")
    return _image()


def image_env(image: str) -> dict[str, str]:
    items = json.loads(docker("inspect", "-f", "{{json .Config.Env}}", image).stdout)
    return dict(item.split("=", 1) for item in items)
