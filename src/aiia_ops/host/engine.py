"""The one Docker engine client: `docker` CLI commands (built in commands/engine.py) run
through a runner, so the same code reads this machine's engine (LocalRunner) or a remote
one (SSHRunner). No SDK, no socket of its own. Every method is a read (`runner.query`).

API:
    engine = Engine(runner)               # cgroup_root="/sys/fs/cgroup", timeout=30
    engine.ping() -> dict                 # `docker version`'s Server part; EngineError if
                                          # no engine answers (cheap: no CLI plugins run)
    engine.info() -> dict                 # `docker info` (DockerRootDir, ...); EngineError too
    engine.containers(project=None) -> list[dict]   # `docker ps -a` rows (Names, ID, State)
    engine.inspect(names) -> {name: Container}      # one `docker inspect` for all; missing
                                                    # ones are left out
    engine.inspect_raw(names) -> {name: dict}       # the same, the engine's JSON as is
    engine.usage({name: container_id}) -> {name: Usage | None}
        # memory/CPU counters from the cgroup files, ONE command for all containers;
        # `docker stats --no-stream` for those without readable cgroup files (no CPU then).
        # Usage.memory_used is THE memory formula (usage - inactive_file, as docker stats).
    engine.exec(name, argv, timeout_s=None) -> Result   # `docker exec`, never raises
    engine.image_sizes(images) -> {repo:tag: bytes}      # missing images left out

Container and Usage are the dataclasses of commands/engine.py.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from aiia_ops.commands import engine as cmd
from aiia_ops.commands.argv import Result
from aiia_ops.commands.engine import Container, Usage
from aiia_ops.errors import OpsError
from aiia_ops.host.runners import Runner


class EngineError(OpsError):
    """The engine did not answer."""


class Engine:
    def __init__(self, runner: Runner, cgroup_root: str = cmd.CGROUP_ROOT, timeout: float = 30):
        self.runner, self.cgroup_root, self.timeout = runner, cgroup_root, timeout

    def _unreachable(self, result: Result) -> EngineError:
        why = (result.stderr.strip().splitlines() or ["no answer"])[-1][:200]
        return EngineError(
            f"the Docker engine on {self.runner.host} does not answer ({why}); "
            "run `invoke provision` to install and start it"
        )

    def ping(self) -> dict:
        result = self.runner.query(cmd.version(), timeout=self.timeout)
        server = cmd.parse_version(result.stdout)
        if server is None:
            raise self._unreachable(result)
        return server

    def info(self) -> dict:
        result = self.runner.query(cmd.info(), timeout=self.timeout)
        data = cmd.parse_info(result.stdout)
        if data is None:
            raise self._unreachable(result)
        return data

    def containers(self, project: str | None = None) -> list[dict]:
        return cmd.parse_json_lines(self.runner.query(cmd.ps(project), timeout=self.timeout).stdout)

    def inspect_raw(self, names: Sequence[str]) -> dict[str, dict]:
        if not names:
            return {}
        return cmd.parse_inspect(self.runner.query(cmd.inspect(names), timeout=self.timeout).stdout)

    def inspect(self, names: Sequence[str]) -> dict[str, Container]:
        return {n: Container.from_inspect(a) for n, a in self.inspect_raw(names).items()}

    def usage(self, containers: Mapping[str, str]) -> dict[str, Usage | None]:
        """{name: container id} → {name: Usage}; None for a container nothing could read."""
        ids = list(containers.values())
        if not ids:
            return {}
        read = self.runner.query(cmd.read_cgroups(ids, self.cgroup_root), timeout=self.timeout)
        by_id = cmd.parse_cgroups(read.stdout, ids, self.cgroup_root)
        out = {name: by_id.get(cid) for name, cid in containers.items()}
        missing = [name for name, u in out.items() if u is None]
        if missing:
            stats = self.runner.query(cmd.stats(missing), timeout=self.timeout)
            out.update({n: u for n, u in cmd.parse_stats(stats.stdout).items() if n in out})
        return out

    def image_sizes(self, images: Sequence[str]) -> dict[str, int]:
        if not images:
            return {}
        result = self.runner.query(cmd.image_inspect(images), timeout=self.timeout)
        return cmd.parse_image_sizes(result.stdout)

    def exec(self, name: str, argv: Sequence[str], timeout_s: float | None = None) -> Result:
        wait = None if timeout_s is None else timeout_s + self.timeout
        return self.runner.query(cmd.exec_in(name, argv, timeout_s), timeout=wait)


__all__ = ["Container", "Engine", "EngineError", "Usage"]
