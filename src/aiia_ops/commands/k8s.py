"""Kubernetes manifests, built as data from the model (never templated YAML) and dumped.

A kustomize layout: `base/` holds the shared services (nginx and its Ingress, PgBouncer,
PostgreSQL, Redis, the storage claims, the network policies), `overlays/<env>/` one
environment's app on top of the base. Every figure comes from deploy/stack.yml: resources
from the memory/CPU limits and reservations, probes from the health checks, the rolling
update from the deploy policy; the service configs are the ones `invoke config.render`
renders, with the few lines that name a host address or hold a password changed (`_swap`
fails loudly when a template no longer has the line it changes).

No secret value is ever rendered: the builder renders the configs with placeholder secrets
and refuses to return anything that still contains one. Secrets are named here and created
in the cluster by the operator (`secrets.example.yaml` lists their keys).

Nothing here is run against a cluster (none can run on these machines): the manifests are
checked against the API schemas and by `kubectl kustomize` in tests/unit/test_k8s.py.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import yaml

from aiia_ops.commands.compose import app_environment
from aiia_ops.commands.render import SERVICE_UID, render_stack
from aiia_ops.errors import OpsError
from aiia_ops.model import Environment, Healthcheck, Service, Stack
from aiia_ops.model.secrets import EnvSecrets, Secrets

K8S_VERSION = "1.30.0"  # the API version the manifests are written and validated for
NAMESPACE = "aiia"
CONFIG_MOUNT = "/etc/aiia"
INGRESS_CLASS = "nginx"
# Pod addresses PostgreSQL accepts passwords from (pg_hba.conf): the cluster's pod network,
# whatever its CNI; the network policies, not this line, limit who reaches the port.
POD_CIDR = "10.0.0.0/8"
# Figures a single host does not have, so deploy/stack.yml does not either.
REPLICAS = {"app": 2, "nginx": 2}  # two pods on two nodes: one may be drained at a time
STORAGE = {"pgdata": "10Gi", "redis_data": "1Gi", "app_storage": "5Gi"}
DNS_PEERS = {
    "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}},
    "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}},
}
PART_OF = "aiia"


@dataclass(frozen=True)
class SecretRef:
    """A key of a named Secret, and what goes in it (for secrets.example.yaml)."""

    secret: str
    key: str
    holds: str


def secret_refs(stack: Stack) -> list[SecretRef]:
    refs = [
        SecretRef("postgresql", "superuser-password", "the superuser's password (first start)"),
        SecretRef("redis", "password", "Redis' password (clients and the health check)"),
        SecretRef(
            "redis", "requirepass.conf", "the ACL user lines of redis.conf (with their passwords)"
        ),
        SecretRef(
            "pgbouncer-userlist",
            "userlist.txt",
            'one line per role: "<role>" "<password>" (roles: '
            + ", ".join([*(e.db_user for e in stack.environments.values()), "pgbouncer_admin"])
            + ")",
        ),
    ]
    for env in stack.environments.values():
        s = f"django-{env.name}"
        refs += [
            SecretRef(s, "secret-key", f"Django's SECRET_KEY for {env.name}"),
            SecretRef(s, "db-password", f"the password of role {env.db_user}"),
            SecretRef(s, "api-write-token", "the bearer token of the write API"),
        ]
    for domains in cert_groups(stack):
        refs.append(SecretRef(tls_secret(domains[0]), "tls.crt", f"certificate: {domains}"))
        refs.append(SecretRef(tls_secret(domains[0]), "tls.key", "its private key"))
    return refs


def placeholder_secrets(stack: Stack) -> Secrets:
    """Values that must never reach a manifest: the builder checks for them."""
    return Secrets(
        "K8S-PLACEHOLDER-postgres",
        "K8S-PLACEHOLDER-redis",
        "K8S-PLACEHOLDER-pgbouncer-admin",
        {
            n: EnvSecrets(f"K8S-PLACEHOLDER-db-{n}", f"K8S-PLACEHOLDER-key-{n}", "K8S-PLACEHOLDER")
            for n in stack.environments
        },
    )


# --- small builders ------------------------------------------------------------------------


def cert_groups(stack: Stack) -> list[list[str]]:
    """One certificate per environment (its domains) and one for the status page."""
    return [list(e.domains) for e in stack.environments.values()] + [[stack.status_domain]]


def tls_secret(domain: str) -> str:
    return "tls-" + domain.replace(".", "-")


def app_name(env: Environment) -> str:
    return f"django-{env.name}"


def labels(component: str, env: str | None = None) -> dict[str, str]:
    out = {"app.kubernetes.io/name": component, "app.kubernetes.io/part-of": PART_OF}
    if env:
        out["app.kubernetes.io/instance"] = env
    return out


def component_selector(component: str) -> dict:
    return {"matchLabels": {"app.kubernetes.io/name": component}}


def _meta(name: str, component: str, env: str | None = None, **extra) -> dict:
    return {"name": name, "labels": labels(component, env), **extra}


def quantity_memory(size) -> str:
    mib, rest = divmod(size.bytes, 2**20)
    return f"{mib}Mi" if rest == 0 else str(size.bytes)


def quantity_cpu(cpus: float) -> str:
    return f"{round(cpus * 1000)}m"


def resources(item: Service | Environment) -> dict:
    return {
        "requests": {
            "memory": quantity_memory(item.memory.reservation),
            "cpu": quantity_cpu(item.cpu.reservation),
        },
        "limits": {
            "memory": quantity_memory(item.memory.limit),
            "cpu": quantity_cpu(item.cpu.limit),
        },
    }


def probe(hc: Healthcheck, port: int | None = None, exec_command: list[str] | None = None) -> dict:
    """The stack's health check as a probe: interval/timeout/retries ->
    periodSeconds/timeoutSeconds/failureThreshold."""
    if hc.http and port is not None and exec_command is None:
        # Kubelet sends Host: <pod IP>; Django answers only its ALLOWED_HOSTS.
        how: dict = {
            "httpGet": {
                "path": hc.http,
                "port": port,
                "httpHeaders": [{"name": "Host", "value": "localhost"}],
            }
        }
    else:
        command = exec_command or hc.command
        if not command:
            raise OpsError("a health check has neither a command nor an http path")
        how = {"exec": {"command": list(command)}}
    return how | {
        "periodSeconds": hc.interval.whole_seconds,
        "timeoutSeconds": hc.timeout.whole_seconds,
        "failureThreshold": hc.retries,
    }


POD_SECURITY = {
    "runAsUser": SERVICE_UID,
    "runAsGroup": SERVICE_UID,
    "runAsNonRoot": True,
    "fsGroup": SERVICE_UID,
    "seccompProfile": {"type": "RuntimeDefault"},
}
CONTAINER_SECURITY = {
    "runAsUser": SERVICE_UID,
    "runAsNonRoot": True,
    "readOnlyRootFilesystem": True,
    "allowPrivilegeEscalation": False,
    "capabilities": {"drop": ["ALL"]},
}


def secret_env(name: str, secret: str, key: str) -> dict:
    return {"name": name, "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}}


def empty_dir(name: str, memory: bool = False, size: str | None = None) -> dict:
    spec: dict = {}
    if memory:
        spec["medium"] = "Memory"
    if size:
        spec["sizeLimit"] = size
    return {"name": name, "emptyDir": spec}


def config_volume(configmap: str, files: list[str], secret: str | None = None, keys=()) -> dict:
    """The rendered config dir: a ConfigMap's files (and, for configs that need a password,
    a Secret's keys) projected into one read-only directory, as on the host."""
    sources: list[dict] = [
        {"configMap": {"name": configmap, "items": [{"key": cm_key(f), "path": f} for f in files]}}
    ]
    if secret:
        sources.append({"secret": {"name": secret, "items": [{"key": k, "path": k} for k in keys]}})
    return {"name": "config", "projected": {"sources": sources, "defaultMode": 0o440}}


def cm_key(path: str) -> str:
    """ConfigMap keys may not hold '/': conf.d/prod.conf -> conf.d_prod.conf."""
    return path.replace("/", "_")


def configmap(name: str, component: str, files: dict[str, str], env: str | None = None) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _meta(name, component, env),
        "data": {cm_key(p): text for p, text in sorted(files.items())},
    }


def service(name: str, component: str, ports: list[tuple[str, int]], env=None, headless=False):
    spec: dict = {
        "selector": labels(component, env),
        "ports": [{"name": n, "port": p, "targetPort": p, "protocol": "TCP"} for n, p in ports],
    }
    if headless:
        spec["clusterIP"] = "None"
    return {"apiVersion": "v1", "kind": "Service", "metadata": _meta(name, component, env)} | {
        "spec": spec
    }


def pdb(name: str, component: str, env: str | None = None) -> dict:
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": _meta(name, component, env),
        "spec": {"maxUnavailable": 1, "selector": {"matchLabels": labels(component, env)}},
    }


def spread(component: str, env: str | None = None) -> dict:
    """Prefer the replicas on different nodes (preferred: a one-node cluster still runs)."""
    return {
        "podAntiAffinity": {
            "preferredDuringSchedulingIgnoredDuringExecution": [
                {
                    "weight": 100,
                    "podAffinityTerm": {
                        "topologyKey": "kubernetes.io/hostname",
                        "labelSelector": {"matchLabels": labels(component, env)},
                    },
                }
            ]
        }
    }


def pvc(name: str, component: str, size: str, mode: str = "ReadWriteOnce") -> dict:
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": _meta(name, component),
        "spec": {"accessModes": [mode], "resources": {"requests": {"storage": size}}},
    }


def _swap(text: str, old: str, new: str, where: str) -> str:
    if old not in text:
        raise OpsError(
            f"{where}: the rendered config no longer contains {old!r}, which the Kubernetes "
            "manifests replace; update commands/k8s.py to the template's new form"
        )
    return text.replace(old, new)


# --- the configs, without addresses of the bridge network or passwords ----------------------


def k8s_configs(stack: Stack, secrets: Secrets) -> dict[str, str]:
    """commands/render.py's output, adapted: Service names for addresses, the pod network
    for the bridge subnet, Redis' password moved to a Secret-mounted include file, and
    PgBouncer's userlist.txt left out (it is a Secret)."""
    upstreams = {e.name: f"{app_name(e)}:{e.port}" for e in stack.environments.values()}
    rendered = render_stack(stack, secrets, upstreams=upstreams)
    pg = stack.services.postgresql
    out: dict[str, str] = {}
    for rel, f in rendered.items():
        text = f.text
        if rel == "pgbouncer/userlist.txt":
            continue
        if rel == "pgbouncer/pgbouncer.ini":
            text = _swap(text, f"host={pg.address} ", "host=postgresql ", rel)
        if rel == "postgresql/pg_hba.conf":
            text = _swap(text, str(stack.network.subnet), POD_CIDR.ljust(15), rel)
        if rel == "redis/redis.conf":
            # The lines that hold passwords (ACL users, or a requirepass) move to the Secret.
            lines = text.splitlines()
            secret = [li for li in lines if li.startswith(("requirepass ", "user "))]
            if not secret:
                raise OpsError(f"{rel}: no user or requirepass line to move into the redis Secret")
            include = f"include {CONFIG_MOUNT}/requirepass.conf"
            kept = [include if li == secret[0] else li for li in lines if li not in secret[1:]]
            text = "\n".join(kept) + ("\n" if text.endswith("\n") else "")
        out[rel] = text
    return out


def _files_of(configs: dict[str, str], prefix: str) -> dict[str, str]:
    return {rel[len(prefix) + 1 :]: t for rel, t in configs.items() if rel.startswith(prefix + "/")}


# --- the workloads ---------------------------------------------------------------------------


def _pod(component: str, containers: list[dict], volumes: list[dict], env=None, **extra) -> dict:
    return {
        "metadata": {"labels": labels(component, env)},
        "spec": {
            "securityContext": POD_SECURITY | extra.pop("security", {}),
            "automountServiceAccountToken": False,
            "containers": containers,
            "volumes": volumes,
            **extra,
        },
    }


def _container(name: str, image: str, item, ports: list[int], mounts: list[dict], **extra):
    return {
        "name": name,
        "image": image,
        "imagePullPolicy": "IfNotPresent",
        "ports": [{"containerPort": p, "protocol": "TCP"} for p in ports],
        "resources": resources(item),
        "securityContext": CONTAINER_SECURITY,
        "volumeMounts": mounts,
        **extra,
    }


def rolling_update(stack: Stack) -> dict:
    """The deploy policy: a new pod starts beside the old one, which leaves only when the
    new one is ready (maxUnavailable 0, maxSurge 1); a rollout that is not healthy within
    the deploy's health timeout is reported as failed."""
    return {
        "strategy": {
            "type": "RollingUpdate",
            "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1},
        },
        "progressDeadlineSeconds": max(stack.deploy.health_timeout.whole_seconds, 1),
    }


def deployment(name, component, replicas, pod, env=None, strategy=None) -> dict:
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _meta(name, component, env),
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": labels(component, env)},
            **(strategy or {}),
            "template": pod,
        },
    }


def nginx_objects(stack: Stack, configs: dict[str, str], tag: str) -> list[dict]:
    nginx = stack.services.nginx
    files = _files_of(configs, "nginx")
    mounts = [
        {"name": "config", "mountPath": CONFIG_MOUNT, "readOnly": True},
        {"name": "tmp", "mountPath": "/tmp"},
        {"name": "status", "mountPath": "/srv/status", "readOnly": True},
    ]
    volumes = [config_volume("nginx-config", sorted(files)), empty_dir("tmp"), empty_dir("status")]
    for name, target in nginx.volumes.items():
        if name == "ssl":
            continue
        mounts.append({"name": name, "mountPath": target})
        volumes.append(empty_dir(name))
    for domains in cert_groups(stack):
        vol = tls_secret(domains[0])
        mounts.append(
            {
                "name": vol,
                "mountPath": f"{nginx.volumes['ssl']}/live/{domains[0]}",
                "readOnly": True,
            }
        )
        items = [
            {"key": "tls.crt", "path": "fullchain.pem"},
            {"key": "tls.key", "path": "privkey.pem"},
        ]
        volumes.append({"name": vol, "secret": {"secretName": vol, "items": items}})
    for env in stack.environments.values():
        vol = f"storage-{env.name}"
        mounts.append({"name": vol, "mountPath": f"/srv/storage/{env.name}", "readOnly": True})
        volumes.append({"name": vol, "persistentVolumeClaim": {"claimName": vol, "readOnly": True}})
    # The image's own HEALTHCHECK: /health answers only 127.0.0.1, inside the pod.
    check = probe(nginx.healthcheck, exec_command=["aiia-healthcheck", nginx.healthcheck.http])
    container = _container(
        "nginx",
        f"{nginx.image}:{tag}",
        nginx,
        list(nginx.publish),
        mounts,
        readinessProbe=check,
        livenessProbe=check,
        # SIGQUIT (the image's STOPSIGNAL) drains; give it the deploy's drain time.
    )
    pod = _pod(
        "nginx",
        [container],
        volumes,
        # Non-root nginx binds 80/443: a namespaced sysctl Kubernetes counts as safe.
        security={"sysctls": [{"name": "net.ipv4.ip_unprivileged_port_start", "value": "0"}]},
        affinity=spread("nginx"),
        terminationGracePeriodSeconds=stack.deploy.drain_timeout.whole_seconds,
    )
    ingress = {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "Ingress",
        "metadata": _meta(
            "aiia",
            "nginx",
            # The stack's nginx keeps terminating TLS itself (same config as on one host).
            annotations={"nginx.ingress.kubernetes.io/backend-protocol": "HTTPS"},
        ),
        "spec": {
            "ingressClassName": INGRESS_CLASS,
            "tls": [{"hosts": g, "secretName": tls_secret(g[0])} for g in cert_groups(stack)],
            "rules": [
                {
                    "host": domain,
                    "http": {
                        "paths": [
                            {
                                "path": "/",
                                "pathType": "Prefix",
                                "backend": {
                                    "service": {"name": "nginx", "port": {"name": "https"}}
                                },
                            }
                        ]
                    },
                }
                for group in cert_groups(stack)
                for domain in group
            ],
        },
    }
    return [
        configmap("nginx-config", "nginx", files),
        deployment("nginx", "nginx", REPLICAS["nginx"], pod, strategy=rolling_update(stack)),
        service("nginx", "nginx", [("http", 80), ("https", 443)]),
        pdb("nginx", "nginx"),
        ingress,
    ]


def pgbouncer_objects(stack: Stack, configs: dict[str, str], tag: str) -> list[dict]:
    b = stack.services.pgbouncer
    files = _files_of(configs, "pgbouncer")
    check = probe(b.healthcheck)
    container = _container(
        "pgbouncer",
        f"{b.image}:{tag}",
        b,
        [b.port],
        [
            {"name": "config", "mountPath": CONFIG_MOUNT, "readOnly": True},
            {"name": "tmp", "mountPath": "/tmp"},
        ],
        readinessProbe=check,
        livenessProbe=check,
    )
    volumes = [
        config_volume("pgbouncer-config", sorted(files), "pgbouncer-userlist", ["userlist.txt"]),
        empty_dir("tmp"),
    ]
    pod = _pod("pgbouncer", [container], volumes)
    return [
        configmap("pgbouncer-config", "pgbouncer", files),
        deployment("pgbouncer", "pgbouncer", 1, pod, strategy=rolling_update(stack)),
        service("pgbouncer", "pgbouncer", [("pgbouncer", b.port)]),
    ]


def postgresql_objects(stack: Stack, configs: dict[str, str], tag: str) -> list[dict]:
    pg = stack.services.postgresql
    files = _files_of(configs, "postgresql")
    data_dir = pg.volumes["pgdata"]
    check = probe(pg.healthcheck)
    container = _container(
        "postgresql",
        f"{pg.image}:{tag}",
        pg,
        [pg.port],
        [
            {"name": "config", "mountPath": CONFIG_MOUNT, "readOnly": True},
            {"name": "pgdata", "mountPath": data_dir},
            {"name": "run", "mountPath": "/var/run/postgresql"},
            {"name": "tmp", "mountPath": "/tmp"},
        ],
        # A volume's root may hold lost+found: initdb gets a subdirectory of it.
        env=[
            {"name": "PGDATA", "value": f"{data_dir}/pgdata"},
            secret_env("POSTGRES_PASSWORD", "postgresql", "superuser-password"),
        ],
        readinessProbe=check,
        livenessProbe=check,
    )
    pod = _pod(
        "postgresql",
        [container],
        [config_volume("postgresql-config", sorted(files)), empty_dir("run"), empty_dir("tmp")],
        terminationGracePeriodSeconds=60,  # the compose file's stop_grace_period
    )
    note = (
        "One PostgreSQL pod with its own volume, as on the single host. In production a "
        "PostgreSQL operator (CloudNativePG) would own this: replicas, failover, "
        "backups and upgrades (docs/kubernetes.md)."
    )
    statefulset = {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": _meta("postgresql", "postgresql", annotations={"aiia/note": note}),
        "spec": {
            "serviceName": "postgresql",
            "replicas": 1,
            "selector": {"matchLabels": labels("postgresql")},
            "template": pod,
            "volumeClaimTemplates": [
                {
                    "metadata": {"name": "pgdata", "labels": labels("postgresql")},
                    "spec": {
                        "accessModes": ["ReadWriteOnce"],
                        "resources": {"requests": {"storage": STORAGE["pgdata"]}},
                    },
                }
            ],
        },
    }
    return [
        configmap("postgresql-config", "postgresql", files),
        statefulset,
        service("postgresql", "postgresql", [("postgresql", pg.port)], headless=True),
    ]


def redis_objects(stack: Stack, configs: dict[str, str], tag: str) -> list[dict]:
    r = stack.services.redis
    files = _files_of(configs, "redis")
    check = probe(r.healthcheck)
    container = _container(
        "redis",
        f"{r.image}:{tag}",
        r,
        [r.port],
        [
            {"name": "config", "mountPath": CONFIG_MOUNT, "readOnly": True},
            {"name": "data", "mountPath": r.volumes["redis_data"]},
        ],
        env=[secret_env("REDISCLI_AUTH", "redis", "password")],  # the health check's AUTH
        readinessProbe=check,
        livenessProbe=check,
    )
    volumes = [
        config_volume("redis-config", sorted(files), "redis", ["requirepass.conf"]),
        {"name": "data", "persistentVolumeClaim": {"claimName": "redis-data"}},
    ]
    pod = _pod("redis", [container], volumes)
    # One writer on a ReadWriteOnce volume: the old pod stops before the new one starts.
    return [
        configmap("redis-config", "redis", files),
        deployment("redis", "redis", 1, pod, strategy={"strategy": {"type": "Recreate"}}),
        service("redis", "redis", [("redis", r.port)]),
        pvc("redis-data", "redis", STORAGE["redis_data"]),
    ]


def storage_objects(stack: Stack) -> list[dict]:
    """Each environment's storage (static files, uploads): written by its app pods, read
    by nginx, so ReadWriteMany (an NFS/CephFS-like storage class)."""
    return [
        pvc(f"storage-{e.name}", "app", STORAGE["app_storage"], "ReadWriteMany")
        for e in stack.environments.values()
    ]


def app_objects(stack: Stack, env: Environment, configs: dict[str, str], tag: str) -> list[dict]:
    name = app_name(env)
    files = _files_of(configs, f"app-{env.name}")
    values = app_environment(stack, env, tag) | {
        "DB_HOST": "pgbouncer",
        "REDIS_HOST": "redis",
        "ALLOWED_HOSTS": ",".join([*env.domains, "localhost", "127.0.0.1"]),
    }
    check = probe(env.healthcheck, port=env.port)
    container = _container(
        "django",
        f"{env.image}:{tag}",
        env,
        [env.port],
        [
            {"name": "config", "mountPath": CONFIG_MOUNT, "readOnly": True},
            {"name": "storage", "mountPath": env.volumes.get("storage", "/app/storage")},
            {"name": "tmp", "mountPath": "/tmp"},
            {"name": "shm", "mountPath": "/dev/shm"},  # gunicorn's worker_tmp_dir
        ],
        env=[
            *({"name": k, "value": v} for k, v in values.items()),
            secret_env("DJANGO_SECRET_KEY", name, "secret-key"),
            secret_env("DB_PASSWORD", name, "db-password"),
            secret_env("API_WRITE_TOKEN", name, "api-write-token"),
            secret_env("REDIS_PASSWORD", "redis", "password"),
        ],
        readinessProbe=check,
        livenessProbe=check,
    )
    volumes = [
        config_volume(f"{name}-config", sorted(files)),
        {"name": "storage", "persistentVolumeClaim": {"claimName": f"storage-{env.name}"}},
        empty_dir("tmp"),
        empty_dir("shm", memory=True, size="4Mi"),
    ]
    pod = _pod(
        "app",
        [container],
        volumes,
        env=env.name,
        affinity=spread("app", env.name),
        terminationGracePeriodSeconds=stack.deploy.drain_timeout.whole_seconds,
    )
    return [
        configmap(f"{name}-config", "app", files, env.name),
        deployment(name, "app", REPLICAS["app"], pod, env.name, rolling_update(stack)),
        service(name, "app", [("http", env.port)], env.name),
        pdb(name, "app", env.name),
    ]


# --- network policies --------------------------------------------------------------------------


def policy(name: str, component: str, ingress=None, egress=None, env=None, selector=None) -> dict:
    types, spec = [], {}
    if ingress is not None:
        types.append("Ingress")
        spec["ingress"] = ingress
    if egress is not None:
        types.append("Egress")
        spec["egress"] = egress
    sel = selector if selector is not None else {"matchLabels": labels(component, env)}
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": _meta(name, component, env),
        "spec": {"podSelector": sel, "policyTypes": types, **spec},
    }


def _tcp(*ports: int) -> list[dict]:
    return [{"protocol": "TCP", "port": p} for p in ports]


def _from(component: str) -> list[dict]:
    return [{"podSelector": component_selector(component)}]


def base_policies(stack: Stack) -> list[dict]:
    """Default deny both ways, then exactly the flows of the single host: 80/443 from
    anywhere to nginx only; nginx to the apps; apps to PgBouncer and Redis; PgBouncer to
    PostgreSQL; every pod to the cluster DNS."""
    s = stack.services
    app_ports = sorted({e.port for e in stack.environments.values()})
    dns = [{"to": [DNS_PEERS], "ports": [*_tcp(53), {"protocol": "UDP", "port": 53}]}]
    return [
        policy("default-deny", "network", ingress=[], egress=[], selector={}),
        policy("allow-dns", "network", egress=dns, selector={}),
        policy(
            "nginx",
            "nginx",
            ingress=[{"ports": _tcp(*s.nginx.publish)}],
            egress=[{"to": _from("app"), "ports": _tcp(*app_ports)}],
        ),
        policy(
            "pgbouncer",
            "pgbouncer",
            ingress=[{"from": _from("app"), "ports": _tcp(s.pgbouncer.port)}],
            egress=[{"to": _from("postgresql"), "ports": _tcp(s.postgresql.port)}],
        ),
        policy(
            "postgresql",
            "postgresql",
            ingress=[{"from": _from("pgbouncer"), "ports": _tcp(s.postgresql.port)}],
        ),
        policy("redis", "redis", ingress=[{"from": _from("app"), "ports": _tcp(s.redis.port)}]),
    ]


def app_policy(stack: Stack, env: Environment) -> dict:
    s = stack.services
    return policy(
        app_name(env),
        "app",
        ingress=[{"from": _from("nginx"), "ports": _tcp(env.port)}],
        egress=[
            {"to": _from("pgbouncer"), "ports": _tcp(s.pgbouncer.port)},
            {"to": _from("redis"), "ports": _tcp(s.redis.port)},
        ],
        env=env.name,
    )


# --- the layout ----------------------------------------------------------------------------------


def kustomization(resources: list[str]) -> dict:
    return {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "namespace": NAMESPACE,
        "resources": resources,
    }


def manifest_tree(
    stack: Stack,
    tags: dict[str, str],
    app_tag: str,
    envs: list[str] | None = None,
    secrets: Secrets | None = None,
) -> dict[str, list[dict]]:
    """{relative path: documents}: base/ and overlays/<env>/ for `envs` (default all).
    `secrets` only matters to tests: whatever values are given, none is rendered."""
    secrets = secrets or placeholder_secrets(stack)
    configs = k8s_configs(stack, secrets)
    selected = [stack.environment(e) for e in envs] if envs else list(stack.environments.values())
    namespace = {"apiVersion": "v1", "kind": "Namespace", "metadata": _meta(NAMESPACE, "network")}
    base = {
        "base/namespace.yaml": [namespace],
        "base/nginx.yaml": nginx_objects(stack, configs, tags.get("nginx", "latest")),
        "base/pgbouncer.yaml": pgbouncer_objects(stack, configs, tags.get("pgbouncer", "latest")),
        "base/postgresql.yaml": postgresql_objects(
            stack, configs, tags.get("postgresql", "latest")
        ),
        "base/redis.yaml": redis_objects(stack, configs, tags.get("redis", "latest")),
        "base/storage.yaml": storage_objects(stack),
        "base/network-policies.yaml": base_policies(stack),
    }
    tree: dict[str, list[dict]] = dict(base)
    tree["base/kustomization.yaml"] = [kustomization([p.split("/", 1)[1] for p in base])]
    for env in selected:
        d = f"overlays/{env.name}"
        tree[f"{d}/app.yaml"] = app_objects(stack, env, configs, app_tag)
        tree[f"{d}/network-policy.yaml"] = [app_policy(stack, env)]
        tree[f"{d}/kustomization.yaml"] = [
            kustomization(["../../base", "app.yaml", "network-policy.yaml"])
        ]
    tree["secrets.example.yaml"] = secrets_example(stack)
    _check_no_secrets(tree, secrets)
    bad = [f"{p}: {q}" for p, docs in tree.items() for q in bad_quantities(docs)]
    if bad:
        raise OpsError(f"not a Kubernetes quantity: {', '.join(bad)} (nothing was written)")
    return tree


def secrets_example(stack: Stack) -> list[dict]:
    """The Secrets the manifests name, with placeholder text: copy, fill in, apply. Never
    part of a kustomization."""
    by_secret: dict[str, dict[str, str]] = {}
    for ref in secret_refs(stack):
        by_secret.setdefault(ref.secret, {})[ref.key] = f"<{ref.holds}>"
    return [
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": name, "namespace": NAMESPACE},
            "type": "kubernetes.io/tls" if name.startswith("tls-") else "Opaque",
            "stringData": keys,
        }
        for name, keys in by_secret.items()
    ]


def _check_no_secrets(tree: dict[str, list[dict]], secrets: Secrets) -> None:
    text = yaml.safe_dump(tree)
    for value in (v for v in secrets.values() if v):
        if value in text:
            raise OpsError(
                "a secret value reached the Kubernetes manifests; commands/k8s.py must move it "
                "to a Secret reference (nothing was written)"
            )


# The API server's quantity grammar (k8s.io/apimachinery resource.Quantity). The JSON schemas
# only say "string or number", so a schema validator accepts "lots"; this check does not.
QUANTITY = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+|[KMGTPE]i|[numkMGTPE])?$")


def bad_quantities(doc, path: str = "") -> list[str]:
    """Every resources/storage quantity in `doc` the API server would refuse: key paths."""
    found: list[str] = []
    if isinstance(doc, dict):
        for key, value in doc.items():
            here = f"{path}.{key}" if path else str(key)
            if key in ("requests", "limits") and isinstance(value, dict):
                for name, q in value.items():
                    if not (isinstance(q, int | float) or QUANTITY.match(str(q))):
                        found.append(f"{here}.{name}={q!r}")
            else:
                found += bad_quantities(value, here)
    elif isinstance(doc, list):
        for i, value in enumerate(doc):
            found += bad_quantities(value, f"{path}[{i}]")
    return found


HEADER = (
    "# Rendered from deploy/stack.yml by `invoke k8s.render`; do not edit.\n"
    "# Validated against the Kubernetes {version} API schemas; no cluster runs it here "
    "(docs/kubernetes.md).\n"
)


class _PlainDumper(yaml.SafeDumper):
    def ignore_aliases(self, data) -> bool:
        return True


def _str_presenter(dumper, data: str):
    style = "|" if "\n" in data else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", data, style=style)


_PlainDumper.add_representer(str, _str_presenter)


def dump_documents(docs: list[dict]) -> str:
    body = yaml.dump_all(docs, Dumper=_PlainDumper, sort_keys=False, width=100)
    return HEADER.format(version=K8S_VERSION) + body


def render_files(tree: dict[str, list[dict]]) -> dict[str, str]:
    return {path: dump_documents(docs) for path, docs in tree.items()}
