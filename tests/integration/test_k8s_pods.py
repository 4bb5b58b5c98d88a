"""The Kubernetes pod specs of `invoke k8s.render`, run on the Docker engine as near to
their spec as one engine comes (no cluster can run here: docs/kubernetes.md).

Each container runs from its rendered spec, translated mechanically: read-only root
filesystem, UID/GID 10001, every capability dropped, no privilege escalation, the pod's
sysctls, its memory/CPU limits, a tmpfs for each emptyDir, the projected /etc/aiia built
from the ConfigMap's data and the Secret's keys, named volumes for the claims, env values
and secretKeyRefs (filled with test values here). Then the spec's own probe must pass,
and the chain app -> PgBouncer -> PostgreSQL and app -> Redis must work: what the settings
claim (the images run read-only, Redis takes its password from the included Secret file,
PgBouncer its userlist from the Secret) is checked on the real images.
"""

from __future__ import annotations

import shlex
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from aiia_ops.commands import k8s
from aiia_ops.host.git import image_tag
from aiia_ops.model import load_stack

pytestmark = pytest.mark.docker

STACK = load_stack()
FOLDER = {"nginx": "nginx", "postgresql": "postgres", "pgbouncer": "pgbouncer", "redis": "redis"}
RUN = uuid.uuid4().hex[:8]
PASSWORDS = {
    "superuser": f"pg-{RUN}-su",
    "redis": f"redis-{RUN}-pw",
    "admin": f"admin-{RUN}-pw",
    "prod": f"prod-{RUN}-db",
}


def docker(*args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"docker {shlex.join(args)}:\n{proc.stdout}\n{proc.stderr}")
    return proc


def secret_values() -> dict[tuple[str, str], str]:
    """What an operator would put in the Secrets (secrets.example.yaml), for this test."""
    users = [(e.db_user, f"{n}-{RUN}-db") for n, e in STACK.environments.items()]
    userlist = "".join(
        f'"{u}" "{p}"\n' for u, p in [*users, ("pgbouncer_admin", PASSWORDS["admin"])]
    )
    out = {
        ("postgresql", "superuser-password"): PASSWORDS["superuser"],
        ("redis", "password"): PASSWORDS["redis"],
        ("redis", "requirepass.conf"): f'requirepass "{PASSWORDS["redis"]}"\n',
        ("pgbouncer-userlist", "userlist.txt"): userlist,
    }
    for name in STACK.environments:
        out[(f"django-{name}", "secret-key")] = f"key-{RUN}-{name}-0123456789abcdef0123456789abcdef"
        out[(f"django-{name}", "db-password")] = f"{name}-{RUN}-db"
        out[(f"django-{name}", "api-write-token")] = f"token-{RUN}-{name}"
    return out


@pytest.fixture(scope="module")
def tree():
    tags = {name: image_tag(folder) for name, folder in FOLDER.items()}
    return k8s.manifest_tree(STACK, tags, image_tag("django"))


def workload(tree, name: str) -> dict:
    for docs in tree.values():
        for d in docs:
            if d.get("kind") in ("Deployment", "StatefulSet") and d["metadata"]["name"] == name:
                return d
    raise AssertionError(f"no workload {name}")


def configmap(tree, name: str) -> dict[str, str]:
    for docs in tree.values():
        for d in docs:
            if d.get("kind") == "ConfigMap" and d["metadata"]["name"] == name:
                return d["data"]
    raise AssertionError(f"no ConfigMap {name}")


class Pods:
    """Runs pod specs on one user-defined network; Service names are network aliases."""

    def __init__(self, tree, root: Path):
        self.tree, self.root = tree, root
        self.network = f"aiia-k8stest-{RUN}"
        self.names: list[str] = []
        self.volumes: list[str] = []
        self.secrets = secret_values()
        docker("network", "create", self.network)

    def run(self, name: str, alias: str, tls: dict[str, str] | None = None) -> str:
        w = workload(self.tree, name)
        pod = w["spec"]["template"]["spec"]
        (c,) = pod["containers"]
        cname = f"aiia-k8stest-{name}-{RUN}"
        if docker("image", "inspect", c["image"], check=False).returncode != 0:
            pytest.fail(f"{c['image']} is not built: run invoke build (nox -s tests does)")
        sc, psc = c["securityContext"], pod["securityContext"]
        argv = [
            "run",
            "--detach",
            "--name",
            cname,
            "--network",
            self.network,
            "--network-alias",
            alias,
            "--user",
            f"{sc['runAsUser']}:{psc['runAsGroup']}",
            "--group-add",
            str(psc["fsGroup"]),
            "--memory",
            c["resources"]["limits"]["memory"].replace("Mi", "m"),
            "--cpus",
            str(int(c["resources"]["limits"]["cpu"].rstrip("m")) / 1000),
        ]
        assert sc["readOnlyRootFilesystem"] and sc["capabilities"] == {"drop": ["ALL"]}
        argv += ["--read-only", "--cap-drop", "ALL", "--security-opt", "no-new-privileges"]
        for s in psc.get("sysctls", []):
            argv += ["--sysctl", f"{s['name']}={s['value']}"]
        volumes = {v["name"]: v for v in pod["volumes"]}
        for m in c["volumeMounts"]:
            v = volumes[m["name"]]
            ro = ",readonly" if m.get("readOnly") else ""
            if "emptyDir" in v:
                argv += ["--tmpfs", f"{m['mountPath']}:rw,mode=1777"]
            elif "projected" in v:
                src = self.project(cname, v["projected"]["sources"])
                argv += ["--mount", f"type=bind,source={src},target={m['mountPath']}{ro}"]
            elif "secret" in v:
                src = self.root / cname / m["name"]
                src.mkdir(parents=True)
                for item in v["secret"]["items"]:
                    (src / item["path"]).write_text(tls[(v["secret"]["secretName"], item["key"])])
                argv += ["--mount", f"type=bind,source={src},target={m['mountPath']}{ro}"]
            else:
                claim = (
                    v["persistentVolumeClaim"]["claimName"]
                    if "persistentVolumeClaim" in v
                    else m["name"]
                )
                vol = f"aiia-k8stest-{claim}-{RUN}"
                if vol not in self.volumes:
                    self.volumes.append(vol)
                argv += ["--mount", f"type=volume,source={vol},target={m['mountPath']}{ro}"]
        for e in c.get("env", []):
            if "value" in e:
                argv += ["--env", f"{e['name']}={e['value']}"]
            else:
                ref = e["valueFrom"]["secretKeyRef"]
                argv += ["--env", f"{e['name']}={self.secrets[(ref['name'], ref['key'])]}"]
        self.names.append(cname)
        docker(*argv, c["image"])
        return cname

    def project(self, cname: str, sources: list[dict]) -> Path:
        out = self.root / cname / "config"
        for src in sources:
            if "configMap" in src:
                data = configmap(self.tree, src["configMap"]["name"])
                items = [(i["key"], i["path"], data[i["key"]]) for i in src["configMap"]["items"]]
            else:
                name = src["secret"]["name"]
                items = [
                    (i["key"], i["path"], self.secrets[(name, i["key"])])
                    for i in src["secret"]["items"]
                ]
            for _, path, text in items:
                (out / path).parent.mkdir(parents=True, exist_ok=True)
                (out / path).write_text(text)
                (out / path).chmod(0o644)
        for d in [out, *(p for p in out.rglob("*") if p.is_dir())]:
            d.chmod(0o755)
        return out

    def probe(self, name: str, cname: str, timeout: float = 90) -> None:
        """The spec's readiness probe, until it passes."""
        w = workload(self.tree, name)
        (c,) = w["spec"]["template"]["spec"]["containers"]
        p = c["readinessProbe"]
        if "exec" in p:
            argv = ["exec", cname, *p["exec"]["command"]]
        else:
            get = p["httpGet"]
            host = get["httpHeaders"][0]["value"]
            script = (
                "import sys,urllib.request as u;"
                f"r=u.Request('http://127.0.0.1:{get['port']}{get['path']}',headers={{'Host':'{host}'}});"
                "sys.exit(0 if u.urlopen(r,timeout=5).status==200 else 1)"
            )
            argv = ["exec", cname, "/usr/bin/python3", "-I", "-c", script]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if docker(*argv, check=False, timeout=p["timeoutSeconds"] + 5).returncode == 0:
                return
            state = docker("inspect", "--format", "{{.State.Status}}", cname, check=False).stdout
            if state.strip() in ("exited", "dead"):
                break
            time.sleep(1)
        logs = docker("logs", "--tail", "40", cname, check=False)
        pytest.fail(f"{name}'s readiness probe never passed:\n{logs.stdout}{logs.stderr}")

    def close(self) -> None:
        for name in self.names:
            docker("rm", "--force", "--volumes", name, check=False)
        for vol in self.volumes:
            docker("volume", "rm", "--force", vol, check=False)
        docker("network", "rm", self.network, check=False)


@pytest.fixture(scope="module")
def pods(tree, tmp_path_factory):
    p = Pods(tree, tmp_path_factory.mktemp("k8s-pods"))
    try:
        yield p
    finally:
        p.close()


@pytest.fixture(scope="module")
def database(pods):
    pg = pods.run("postgresql", "postgresql")
    pods.probe("postgresql", pg)
    for env in STACK.environments.values():
        subprocess.run(
            ["docker", "exec", "-i", pg, "ensure-database", env.database, env.db_user],
            input=pods.secrets[(f"django-{env.name}", "db-password")] + "\n",
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        )
    return pg


def test_redis_runs_read_only_with_its_password_from_the_secret_file(pods):
    name = pods.run("redis", "redis")
    pods.probe("redis", name)  # redis-cli -e ping with REDISCLI_AUTH from the secretKeyRef
    bare = docker("exec", "--env", "REDISCLI_AUTH=", name, "redis-cli", "ping", check=False)
    assert "NOAUTH" in bare.stdout + bare.stderr
    wrong = docker("exec", "--env", "REDISCLI_AUTH=wrong", name, "redis-cli", "ping", check=False)
    assert "PONG" not in wrong.stdout


def test_postgresql_and_pgbouncer_run_read_only_and_pgbouncer_logs_in_from_the_secret(
    pods, database
):
    bouncer = pods.run("pgbouncer", "pgbouncer")
    pods.probe("pgbouncer", bouncer)
    env = STACK.environments["prod"]
    query = docker(
        "exec",
        "--env",
        f"PGPASSWORD={pods.secrets[('django-prod', 'db-password')]}",
        database,
        "psql",
        "-h",
        "pgbouncer",
        "-p",
        str(STACK.services.pgbouncer.port),
        "-U",
        env.db_user,
        "-d",
        env.database,
        "-tAc",
        "select current_user, inet_client_addr() is not null",
    )
    assert query.stdout.strip() == f"{env.db_user}|t"  # through PgBouncer, over the network
    data = docker(
        "exec", database, "sh", "-c", 'echo "$PGDATA"; test -s "$PGDATA/PG_VERSION"'
    ).stdout
    assert data.strip().endswith("/pgdata")  # initdb in a subdirectory of the claim


def test_the_app_runs_read_only_and_its_http_probe_passes_through_pgbouncer_and_redis(
    pods, database
):
    if "aiia-k8stest-pgbouncer-" + RUN not in pods.names:
        pods.probe("pgbouncer", pods.run("pgbouncer", "pgbouncer"))
    if "aiia-k8stest-redis-" + RUN not in pods.names:
        pods.probe("redis", pods.run("redis", "redis"))
    app = pods.run("django-prod", "django-prod")
    pods.probe("django-prod", app, timeout=120)
    root = docker("exec", app, "sh", "-c", "touch /app/x 2>&1 || echo read-only", check=False)
    assert "read-only" in root.stdout.lower()
