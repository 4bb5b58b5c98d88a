"""Build stack files for tests: the committed deploy/stack.yml with a fixture's patch applied."""

from __future__ import annotations

import copy
import subprocess
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
STACK = ROOT / "deploy" / "stack.yml"
FIXTURES = ROOT / "tests" / "fixtures" / "stacks"


def merge(base: dict, patch: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in patch.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def patched_stack(patch: dict | None = None, remove: list[str] = ()) -> dict:
    data = merge(yaml.safe_load(STACK.read_text()), patch or {})
    for dotted in remove:
        *parents, last = dotted.split(".")
        node = data
        for p in parents:
            node = node[p]
        del node[last]
    return data


def write_fixture_stack(fixture: Path, tmp_dir: Path) -> Path:
    """A fixture holds either `raw` text or a `patch` (+ `remove`) of the committed stack."""
    spec = yaml.safe_load(fixture.read_text())
    target = tmp_dir / f"{fixture.stem}.yml"
    if "raw" in spec:
        target.write_text(spec["raw"])
    else:
        data = patched_stack(spec.get("patch"), spec.get("remove", []))
        target.write_text(yaml.safe_dump(data, sort_keys=False))
    return target


# The end-to-end tests' own stack (tests/e2e/conftest.py): it runs beside the real one
# (project aiia, 172.20.0.0/16, ports 80/443) on the same engine and never touches it.
TEST_PROJECT = "aiiatest"
TEST_SECOND_OCTET = 29  # 172.29.0.0/16
TEST_PORT_OFFSET = 10000  # nginx publishes 127.0.0.1:10080 and 127.0.0.1:10443


def committed_project() -> str:
    """The real stack's project (deploy/stack.yml): never a test stack's."""
    return yaml.safe_load(STACK.read_text())["project"]


def isolated_stack(
    project: str, second_octet: int, port_offset: int, state_dir: str | None = None
) -> dict:
    """The committed stack under other names: project, containers, network, subnet and
    published ports (on 127.0.0.1 only), so it can run beside the real one. Every address
    of the stack is in its subnet, and derived ones (the load test's bare app, the test
    ACME server) are computed from the subnet, so moving the subnet moves them all.
    Limits and tunings are unchanged."""
    if project == committed_project():
        raise ValueError(f"an isolated stack needs a project other than {project!r}")
    data = yaml.safe_load(STACK.read_text())
    text = yaml.safe_dump(data, sort_keys=False)
    text = text.replace("172.20.", f"172.{second_octet}.").replace("aiia_", f"{project}_")
    data = yaml.safe_load(text)
    data["project"] = project
    for host in data["hosts"].values():
        host["port_offset"] = port_offset
        host["publish_address"] = "127.0.0.1"
        if state_dir:  # AIIA_STATE_DIR wins anyway; this keeps /var/lib/aiia out of reach
            host["state_dir"] = state_dir
    return data


def trust_store_ca(stack_file: Path, store_root: Path) -> None:
    """Verify the lab store's certificate for real: its CA (made by `invoke offsite.up` in
    the store's folder, which the lab hosts share with this machine) goes into the stack
    file's backups.pitr.repo1.ca, with verify_tls on."""
    data = yaml.safe_load(stack_file.read_text())
    repo1 = data["backups"]["pitr"]["repo1"]
    repo1["ca"] = (store_root / "ca.pem").read_text()
    repo1["verify_tls"] = True
    stack_file.write_text(yaml.safe_dump(data, sort_keys=False))


def write_isolated_stack(
    path: Path, project: str, second_octet: int, port_offset: int, state_dir: str | None = None
) -> Path:
    """Write it (e.g. for `AIIA_STACK=path invoke setup`); prints nothing, returns the path."""
    data = isolated_stack(project, second_octet, port_offset, state_dir)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _docker(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["docker", *args], capture_output=True, text=True, timeout=300)


def stack_containers(project: str) -> list[str]:
    """Ids of every container labelled as `project`'s: compose services, app releases and
    the one-offs (certbot, load test, the test ACME server) all carry the label."""
    label = f"label=org.eduaiia.stack={project}"
    return _docker("ps", "-aq", "--filter", label).stdout.split()


def remove_stack(project: str, network: str) -> None:
    """Remove a test stack from the engine: the containers labelled with its project, the
    volumes named `<project>_*`, its network. Nothing of another project (the real stack's
    containers, volumes and network have other names and another label)."""
    if project == committed_project():
        raise ValueError(f"refusing to remove the real stack {project!r}: tests remove theirs")
    ids = stack_containers(project)
    if ids:
        _docker("rm", "--force", *ids)
    prefix = f"{project}_"
    volumes = [v for v in _docker("volume", "ls", "-q").stdout.split() if v.startswith(prefix)]
    if volumes:
        _docker("volume", "rm", "--force", *volumes)
    if _docker("network", "inspect", network).returncode == 0:
        _docker("network", "rm", network)


def remove_test_stack() -> None:
    """What a killed test run left of TEST_PROJECT (used by .ci/run's clean-up)."""
    data = isolated_stack(TEST_PROJECT, TEST_SECOND_OCTET, TEST_PORT_OFFSET)
    remove_stack(TEST_PROJECT, data["network"]["name"])


USAGE = """usage:
  python -m tests.stackfiles OUT PROJECT OCTET OFFSET   write an isolated stack file to OUT
  python -m tests.stackfiles remove-test-stack          remove the e2e tests' stack (if any)"""

if __name__ == "__main__":
    import sys

    args = sys.argv[1:]
    if args == ["remove-test-stack"]:
        remove_test_stack()
    elif len(args) == 4:
        out, project, octet, offset = args
        print(write_isolated_stack(Path(out), project, int(octet), int(offset)))
    else:
        sys.exit(USAGE)
