"""Build stack files for tests: the committed deploy/stack.yml with a fixture's patch applied."""

from __future__ import annotations

import copy
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


def isolated_stack(project: str, second_octet: int, port_offset: int) -> dict:
    """The committed stack under other names: project, containers, network, subnet and
    published ports, so it can run beside the real one. Limits and tunings are unchanged."""
    data = yaml.safe_load(STACK.read_text())
    text = yaml.safe_dump(data, sort_keys=False)
    text = text.replace("172.20.", f"172.{second_octet}.").replace("aiia_", f"{project}_")
    data = yaml.safe_load(text)
    data["project"] = project
    for host in data["hosts"].values():
        host["port_offset"] = port_offset
        host["publish_address"] = "127.0.0.1"
    return data


def write_isolated_stack(path: Path, project: str, second_octet: int, port_offset: int) -> Path:
    """Write it (e.g. for `AIIA_STACK=path invoke setup`); prints nothing, returns the path."""
    path.write_text(
        yaml.safe_dump(isolated_stack(project, second_octet, port_offset), sort_keys=False)
    )
    return path


if __name__ == "__main__":  # python -m tests.stackfiles OUT PROJECT OCTET OFFSET
    import sys

    out, project, octet, offset = sys.argv[1:5]
    print(write_isolated_stack(Path(out), project, int(octet), int(offset)))
