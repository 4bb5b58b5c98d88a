"""templates/gunicorn.conf.py.j2 rendered by the project's renderer from deploy/stack.yml,
and the image's Dockerfile figures against the same model. No engine needed."""

from __future__ import annotations

import subprocess
import sys

import pytest
from django_testlib import (
    BAKED_CONFIG,
    SERVICE_DIR,
    dockerfile_healthcheck,
    load_config,
    render_gunicorn,
    stack,
)

MODEL = stack()
RENDERED = render_gunicorn(MODEL)


def test_one_config_per_environment():
    assert set(RENDERED) == set(MODEL.environments)


@pytest.mark.parametrize("name", sorted(MODEL.environments))
def test_rendered_values_follow_the_stack(name):
    env = MODEL.environments[name]
    g = env.gunicorn
    cfg = load_config(RENDERED[name])
    assert cfg["bind"] == f"0.0.0.0:{env.port}"
    assert cfg["workers"] == g.workers
    assert cfg["threads"] == g.threads
    assert cfg["worker_class"] == g.worker_class
    assert cfg["timeout"] == g.timeout.whole_seconds
    assert cfg["graceful_timeout"] == g.timeout.whole_seconds
    assert cfg["keepalive"] == g.keepalive.whole_seconds
    assert cfg["max_requests"] == g.max_requests
    assert cfg["max_requests_jitter"] == g.max_requests_jitter
    assert cfg["worker_tmp_dir"] == "/dev/shm"
    assert cfg["accesslog"] == ("-" if g.access_log else None)
    assert cfg["errorlog"] == "-"
    # Measured: preloading saves memory only with several workers (README.md).
    assert cfg["preload_app"] is (g.workers > 1)
    assert callable(cfg["pre_fork"])
    assert callable(cfg["worker_exit"])


@pytest.mark.parametrize("name", sorted(MODEL.environments))
def test_gunicorn_accepts_every_setting(name):
    config = pytest.importorskip("gunicorn.config")
    cfg = config.Config()
    for key, value in load_config(RENDERED[name]).items():
        assert key in cfg.settings, f"{key} is not a gunicorn setting"
        cfg.set(key, value)  # runs gunicorn's own validator


def test_baked_default_matches_the_rendered_prod_config():
    prod = MODEL.environments["prod"]
    env = {"PORT": str(prod.port), "GUNICORN_WORKERS": str(prod.gunicorn.workers)}
    baked = load_config(BAKED_CONFIG.read_text(), env)
    rendered = load_config(RENDERED["prod"])
    hooks = {"pre_fork", "worker_exit"}
    assert set(baked) == set(rendered)
    assert {k: v for k, v in baked.items() if k not in hooks} == {
        k: v for k, v in rendered.items() if k not in hooks
    }


def test_dockerfile_healthcheck_matches_the_stack():
    hc = dockerfile_healthcheck()
    envs = list(MODEL.environments.values())
    want = envs[0].healthcheck  # one image: every environment must use the same check
    assert all(e.healthcheck == want for e in envs)
    assert hc["interval"] == str(want.interval)
    assert hc["timeout"] == str(want.timeout)
    assert hc["retries"] == want.retries
    probe = (SERVICE_DIR / "bin" / "healthcheck").read_text()
    assert f"/{want.http.strip('/')}/" in probe


@pytest.mark.parametrize(
    ("leave", "code"),
    [("sys.exit(0)", 0), ("sys.exit(3)", 3), ("sys.exit(-1)", 255), ("raise KeyError", 1)],
)
@pytest.mark.parametrize("config", ["rendered", "baked"])
def test_worker_exit_skips_teardown_keeps_code_and_output(tmp_path, config, leave, code):
    # gunicorn calls worker_exit in the `finally` of the worker's life (arbiter.spawn_worker):
    # the hook leaves with os._exit, so it must pass on the code gunicorn was exiting with
    # (3 = boot error, which halts the master) and flush what the worker had buffered.
    text = RENDERED["prod"] if config == "rendered" else BAKED_CONFIG.read_text()
    (tmp_path / "conf.py").write_text(text)
    script = (
        "import atexit, sys\n"
        f"ns = {{}}; exec(open({str(tmp_path / 'conf.py')!r}).read(), ns)\n"
        "atexit.register(print, 'teardown ran')\n"
        "sys.stdout.write('buffered, no newline')\n"
        f"try:\n    {leave}\nfinally:\n    ns['worker_exit'](None, None)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env={"PORT": "8000", "PATH": "/usr/bin:/bin"}, timeout=60)  # fmt: skip
    assert proc.returncode == code, proc.stderr
    assert proc.stdout == "buffered, no newline"  # flushed, and no atexit/teardown ran
