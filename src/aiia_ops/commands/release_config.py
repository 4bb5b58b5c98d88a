"""A release's own copy of its config: what a rollback starts it with again.

gunicorn reads /etc/aiia/gunicorn.conf.py once, at start. Rendered into the one
`config/app-<env>/` every release mounted, the next deploy's render (from a changed
stack.yml) changed the file under the live release, and a rollback started the old code
with the new config: workers, threads, timeouts tuned for another release. So every
release mounts a copy of its environment's config dir named by its content,

    <state>/config/releases/app-<env>/<digest>/   the files, then release.json (last)

and the releases log records the digest. A rollback mounts the digest its release was
recorded good with, if that copy is still whole on the host; else (a release from before
copies were kept, or a pruned one) it renders the current stack and says so. The env file
(secrets) and the addresses passed as `--env` are always the current ones: an old copy of
a rotated password would lock the release out of its own database.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from aiia_ops.commands.compose import config_dir_name
from aiia_ops.commands.render import HostFile
from aiia_ops.model import Environment

CONFIG_LABEL = "org.eduaiia.config"
MANIFEST = "release.json"


@dataclass(frozen=True)
class ReleaseConfig:
    digest: str
    path: str  # the directory a release of it mounts as /etc/aiia
    files: list[HostFile]  # the config files, then the manifest (written last)


def releases_root(state_dir: str, env: Environment) -> str:
    return f"{state_dir.rstrip('/')}/config/releases/{config_dir_name(env)}"


def config_dir(state_dir: str, env: Environment, digest: str) -> str:
    return f"{releases_root(state_dir, env)}/{digest}"


def _digest(named: dict[str, bytes]) -> str:
    h = hashlib.sha256()
    for name in sorted(named):
        h.update(name.encode() + b"\0" + hashlib.sha256(named[name]).digest())
    return h.hexdigest()[:12]


def release_config(files: list[HostFile], state_dir: str, env: Environment) -> ReleaseConfig:
    """The environment's rendered config dir (from `host_files`) as a release's copy."""
    src = f"{state_dir.rstrip('/')}/config/{config_dir_name(env)}/"
    named = {f.path[len(src) :]: f for f in files if f.path.startswith(src)}
    if not named:
        raise ValueError(f"no rendered file under {src}")
    digest = _digest({name: f.data for name, f in named.items()})
    path = config_dir(state_dir, env, digest)
    copies = [HostFile(f"{path}/{name}", f.data, f.mode, f.group) for name, f in named.items()]
    manifest = {
        "digest": digest,
        "files": {name: hashlib.sha256(f.data).hexdigest() for name, f in sorted(named.items())},
    }
    text = json.dumps(manifest, indent=2, sort_keys=True) + "\n"
    return ReleaseConfig(digest, path, [*copies, HostFile(f"{path}/{MANIFEST}", text.encode())])


def manifest_files(data: bytes | None, digest: str) -> dict[str, str] | None:
    """The files a copy's manifest lists (name -> sha256), or None: no manifest (a copy cut
    short before its last write), not JSON, or another digest."""
    try:
        manifest = json.loads(data or b"")
    except ValueError:
        return None
    if not isinstance(manifest, dict) or manifest.get("digest") != digest:
        return None
    files = manifest.get("files")
    return files if isinstance(files, dict) and files else None


def copy_problem(listed: dict[str, str], contents: dict[str, bytes | None]) -> str | None:
    """What is wrong with a copy whose manifest lists `listed`, read as `contents`."""
    for name, sha in sorted(listed.items()):
        data = contents.get(name)
        if data is None:
            return f"{name} is missing"
        if hashlib.sha256(data).hexdigest() != sha:
            return f"{name} differs from what its manifest recorded"
    return None


def recorded_config(history: list[dict], tag: str) -> str | None:
    """The config digest of `tag`'s newest good record (a rollback of it counts), if any."""
    for entry in reversed(history):
        if entry.get("commit", "")[:12] == tag[:12] and entry.get("result") == "good":
            digest = entry.get("config")
            if digest:
                return str(digest)
    return None


def configs_to_prune(
    present: list[str], history: list[dict], keep_releases: int, in_use: set[str]
) -> list[str]:
    """Copies on the host that none of the environment's last `keep_releases` good records
    names and no container (`in_use`: the live and the new release's) mounts."""
    keep, releases = set(in_use), []
    for entry in reversed(history):
        tag = entry.get("commit", "")[:12]
        if entry.get("result") != "good" or tag in releases:
            continue
        releases.append(tag)
        if len(releases) > keep_releases:
            break
        keep.add(recorded_config(history, tag) or "")
    return sorted(d for d in present if d and d not in keep and not d.startswith("."))
