"""The hardening table (commands/hardening.py): its figures against the stack's own."""

import pytest

from aiia_ops.commands import hardening, loadtest, tls
from aiia_ops.commands.hardening import PROFILES, Scratch, profile, run_flags
from aiia_ops.model import load_stack

STACK = load_stack()


def test_every_container_of_the_stack_has_a_profile():
    assert set(PROFILES) == {*(s.name for s in STACK.services.all()), "app", "certbot"}


@pytest.mark.parametrize("name", sorted(PROFILES))
def test_every_profile_is_read_only_with_no_capability_and_says_why(name):
    p = profile(name)
    assert p.read_only and not p.cap_add and p.why
    assert all(s.why for s in p.scratch) and all(s.why for s in p.spill)
    assert p.pids >= 16 and p.nofile >= 1024


def _memory_limit(name: str) -> int:
    if name == "certbot":
        return tls.CERTBOT_MEMORY.bytes
    if name == "app":
        return min(e.memory.limit.bytes for e in STACK.environments.values())
    return getattr(STACK.services, name).memory.limit.bytes


@pytest.mark.parametrize("name", sorted(PROFILES))
def test_tmpfs_memory_is_tiny_beside_the_containers_own_limit(name):
    # tmpfs pages are charged to the container: keep them under 1/16 of its limit.
    assert profile(name).tmpfs_bytes * 16 <= _memory_limit(name)


def test_limits_fit_what_the_programs_are_configured_for():
    nginx = STACK.services.nginx.settings
    assert profile("nginx").nofile >= 2 * nginx.worker_connections + 1000
    assert profile("nginx").pids >= nginx.worker_processes + 8
    pg = STACK.services.postgresql.settings
    assert profile("postgresql").pids >= pg.max_connections + 16
    bouncer = STACK.services.pgbouncer.settings
    pools = len(STACK.environments) * (bouncer.default_pool_size + bouncer.reserve_pool_size)
    assert profile("pgbouncer").nofile >= bouncer.max_client_conn + pools + 32
    assert profile("redis").nofile >= 10000 + 32  # Redis' default maxclients + its reserve
    for env in STACK.environments.values():
        g = env.gunicorn
        assert profile("app").pids >= 1 + g.workers * (g.threads + 1) + 16, env.name


def test_tmpfs_spec_names_size_mode_and_owner():
    s = Scratch("/run/x", 64 * 1024, "why", mode="0755", owner=10001)
    assert s.spec() == "/run/x:rw,noexec,nosuid,nodev,size=64k,mode=0755,uid=10001,gid=10001"


def test_run_flags_and_compose_keys_say_the_same():
    for name in PROFILES:
        keys, flags = hardening.compose_keys(name), run_flags(name)
        assert keys["cap_drop"] == ["ALL"] and flags[:2] == ["--cap-drop", "ALL"]
        assert keys["security_opt"] == ["no-new-privileges:true"]
        assert flags[flags.index("--security-opt") + 1] == "no-new-privileges:true"
        assert keys["read_only"] == ("--read-only" in flags)
        assert keys.get("tmpfs", []) == [
            flags[i + 1] for i, f in enumerate(flags) if f == "--tmpfs"
        ]
        assert flags[flags.index("--pids-limit") + 1] == str(keys["pids_limit"])
        n = keys["ulimits"]["nofile"]["soft"]
        assert flags[flags.index("--ulimit") + 1] == f"nofile={n}:{n}"


def test_the_certbot_and_load_test_containers_run_hardened():
    env = STACK.environment("prod")
    bare = loadtest.bare_run_argv(STACK, env, "/var/lib/aiia/config", "aiia/django:x", "/lt")
    docker_flags = " ".join(bare[: bare.index("aiia/django:x")])
    assert " ".join(run_flags("app")) in docker_flags
    lineage = tls.lineages(STACK)[0]
    for argv in (
        tls.rollback_argv(STACK, "/var/lib/aiia", "aiia/certbot:x", lineage),
        tls.install_argv(STACK, "/var/lib/aiia", "aiia/certbot:x", lineage, "https://acme/dir"),
    ):
        assert " ".join(run_flags("certbot")) in " ".join(argv[: argv.index("aiia/certbot:x")])
