"""Deploy decisions as data: recorded engine answers in, planned commands out (no engine).

A `Host` answers the questions a deploy asks (docker inspect of the live release, image
inspect, docker info, df, the shared services' state, releases/<env>.jsonl). The plan is
read from a PrintingRunner whose reader is that host: the dry run, which is the deploy.
"""

from __future__ import annotations

import io
import json

import pytest

from aiia_ops.commands import app as apps
from aiia_ops.commands import docker as cmd
from aiia_ops.commands import journal as jn
from aiia_ops.commands import release_config as rcfg
from aiia_ops.commands.argv import Result, quote
from aiia_ops.errors import OpsError
from aiia_ops.flows import deploy as flow
from aiia_ops.flows.deploy import Deploy, DeployFailed
from aiia_ops.flows.steps import Steps
from aiia_ops.host import git
from aiia_ops.host.lock import deploy_lock, lock_dir
from aiia_ops.host.runners import PrintingRunner, RecordingRunner
from aiia_ops.model import load_stack
from aiia_ops.model.secrets import EnvSecrets, Secrets

STATE = "/srv/aiia"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
TAG = COMMIT[:12]
LIVE_TAG = "aaaaaaaaaaaa"
MISSING = Result([], 1, "", "Error: No such object")


class Host(RecordingRunner):
    """A RecordingRunner that keeps reads (`query`) apart from changes (`commands`), and
    answers the most specific argv prefix first."""

    def __init__(self, answers: dict[str, Result | str], files: dict[str, bytes] | None = None):
        super().__init__(dict(sorted(answers.items(), key=lambda kv: -len(kv[0]))))
        self.files.update(files or {})
        self.queries: list[list[str]] = []

    def query(self, argv, *, input=None, timeout=None) -> Result:
        self.queries.append(list(map(str, argv)))
        before = len(self.commands)
        result = super().query(argv, input=input, timeout=timeout)
        del self.commands[before:]
        return result


@pytest.fixture(scope="module")
def stack():
    return load_stack()


@pytest.fixture(autouse=True)
def no_git_no_slack(monkeypatch):
    monkeypatch.setattr(flow, "resolve_ref", lambda ref: (COMMIT, TAG))
    monkeypatch.setattr(
        git, "shared_image_tags", lambda stack: dict.fromkeys(git.SHARED_FOLDERS, "t")
    )
    monkeypatch.delenv("AIIA_SLACK_WEBHOOK_URL", raising=False)


SECRETS = Secrets(
    "pg-secret-1",
    "redis-secret-1",
    "pgb-secret-1",
    {e: EnvSecrets(f"db-{e}-pw", f"key-{e}-pw", f"tok-{e}-pw") for e in ("prod", "staging")},
)


def inspect_json(
    stack, env, name: str, tag: str, address: str, running: bool = True, config: str = ""
) -> str:
    labels = {apps.RELEASE_LABEL: tag, **({rcfg.CONFIG_LABEL: config} if config else {})}
    return json.dumps(
        {
            "Name": f"/{name}",
            "State": {"Running": running, "Health": {"Status": "healthy"}},
            "Config": {"Labels": labels},
            "NetworkSettings": {
                "Networks": {stack.network.name: {"IPAMConfig": {"IPv4Address": address}}}
            },
        }
    )


def release_log(*entries: tuple[str, str]) -> bytes:
    return b"".join(
        json.dumps({"commit": c, "result": r, "env": "prod"}).encode() + b"\n" for c, r in entries
    )


def answers(stack, env, *, live: str | None = LIVE_TAG, images: dict[str, bool] | None = None):
    """What a healthy host with the stack up says; `images`: tag -> present on the engine."""
    out: dict[str, Result | str] = {
        quote(apps.engine_version()): "27.5.1\n",
        quote(apps.free_disk(STATE)): "    Avail\n50000000000\n",
        quote(apps.inspect_container(apps.next_name(env))): MISSING,
    }
    for svc in ("pgbouncer", "postgresql", "redis"):
        out[quote(apps.is_running(getattr(stack.services, svc).container))] = "true\n"
    for other in stack.environments.values():
        out[quote(apps.inspect_container(other.container))] = MISSING
    if live:
        out[quote(apps.inspect_container(env.container))] = inspect_json(
            stack, env, env.container, live, str(env.address)
        )
    for tag, present in (images or {}).items():
        out[quote(apps.image_inspect(f"{env.image}:{tag}"))] = "sha256:x\n" if present else MISSING
    return out


def dry_deploy(stack, env_name="prod", host=None, local=None, remote=False, label="local"):
    env = stack.environment(env_name)
    host = host or Host(answers(stack, env, images={TAG: True}))
    local = local or Host({})
    out = io.StringIO()
    d = Deploy(
        stack,
        env,
        STATE,
        PrintingRunner(out, reader=host, host=label),
        SECRETS,
        local=PrintingRunner(out, reader=local, host="build"),
        steps=Steps(out=lambda line: print(line, file=out)),
        remote_engine=remote,
    )
    return d, host, local, out


def in_order(printed: list[str], expected: list[str]) -> None:
    """Each expected line is printed, after the one before it."""
    at = -1
    for line in expected:
        later = [i for i, p in enumerate(printed) if p == line and i > at]
        assert later, f"not printed (after line {at}): {line}\n" + "\n".join(printed)
        at = later[0]


def test_a_deploy_starts_on_the_free_slot_switches_nginx_then_retires_the_old_one(stack):
    d, host, local, out = dry_deploy(stack)
    env = d.env
    result = d.deploy(None)
    assert result["release"] == TAG and result["address"] == str(env.standby_address)
    new = apps.next_name(env)
    lock = lock_dir(STATE, deploy_lock("prod"))
    printed = d.runner.printed
    drain = stack.deploy.drain_timeout.whole_seconds
    planned = [
        ["mkdir", "-p", f"{STATE}/locks"],
        ["mkdir", lock],
        apps.migration_safety(stack, env, STATE, TAG),
        cmd.one_off_app(stack, env, STATE, TAG, ["migrate", "--noinput"]),
        cmd.one_off_app(stack, env, STATE, TAG, ["collectstatic", "--noinput"]),
        apps.run_release(stack, env, STATE, TAG, str(env.standby_address), new, d.config),
        *cmd.nginx_reload(stack),
        apps.stop_container(env.container, drain),
        apps.remove_stopped(env.container),
        apps.rename_container(new, env.container),
        ["rm", "-rf", lock],
    ]
    in_order(printed, [f"[local] {quote(argv)}" for argv in planned])
    # the release and its one-offs start hardened (commands/hardening.py)
    hardened = "--cap-drop ALL --security-opt no-new-privileges:true --read-only --tmpfs "
    # migration safety, migrate, collectstatic (one-offs) and the release itself
    runs = [line for line in printed if line.startswith("[local] docker run ")]
    assert len(runs) == 4 and all(hardened in line for line in runs), runs
    assert all("--pids-limit 64 --ulimit nofile=1024:1024" in line for line in runs)
    # nginx's config is rewritten (upstream: the new release) before the reload
    nginx_test = printed.index(f"[local] {quote(cmd.nginx_reload(stack)[0])}")
    writes = [line for line in printed[:nginx_test] if line.startswith("[local] write ")]
    assert any("nginx" in w for w in writes)
    assert any(f"{STATE}/releases/prod.jsonl" in w for w in printed)
    text = out.getvalue()
    assert "# dry run: deploy" in text and "(dry run: would wait up to" in text
    assert "(dry run: would check that https://" in text
    # the image is on the host: nothing built, nothing shipped
    assert local.commands == [] and local.queries == []
    assert not [line for line in printed if "docker save" in line or "worktree" in line]
    # reads went to the host, and nothing else did: it was not changed
    assert host.commands == []
    assert [apps.image_inspect(f"{env.image}:{TAG}")] == [
        q for q in host.queries if q[:3] == ["docker", "image", "inspect"]
    ]


def test_the_plan_never_contains_a_secret(stack):
    d, *_ = dry_deploy(stack)
    d.runner.redact(*SECRETS.values())
    d.deploy(None)
    text = "\n".join(d.runner.printed)
    assert not [s for s in SECRETS.values() if s in text]


def test_with_no_live_release_it_starts_on_the_primary_address_and_only_renames(stack):
    env = stack.environment("staging")
    host = Host(answers(stack, env, live=None, images={TAG: True}))
    d, *_ = dry_deploy(stack, "staging", host=host)
    assert d.deploy(None)["address"] == str(env.address)
    printed = d.runner.printed
    assert f"[local] {quote(apps.rename_container(apps.next_name(env), env.container))}" in printed
    assert not [line for line in printed if "docker stop" in line]


def test_a_leftover_next_container_is_removed_after_the_lock_is_taken(stack):
    env = stack.environment("prod")
    facts = answers(stack, env, images={TAG: True})
    leftover = apps.next_name(env)
    facts[quote(apps.inspect_container(leftover))] = inspect_json(
        stack, env, leftover, "bbbbbbbbbbbb", str(env.standby_address), running=False
    )
    d, *_ = dry_deploy(stack, host=Host(facts))
    d.deploy(None)
    lock = lock_dir(STATE, deploy_lock("prod"))
    in_order(
        d.runner.printed,
        [f"[local] mkdir {lock}", f"[local] {quote(apps.remove_container(leftover))}"],
    )


def test_a_missing_image_is_built_from_a_checkout_of_exactly_that_commit(stack):
    env = stack.environment("prod")
    host = Host(answers(stack, env, images={TAG: False}))
    local = Host({quote(apps.image_inspect(f"{env.image}:{TAG}")): MISSING})
    d, *_ = dry_deploy(stack, host=host, local=local)
    d.deploy(None)
    built = d.local.printed
    checkout = built[0].split()[-2]
    assert built[0] == f"[build] {quote(git.worktree_add(checkout, COMMIT))}"
    assert built[1:-1] == [
        f"[build] {quote(argv)}" for argv in apps.release_build(stack, checkout, TAG)
    ]
    assert built[-1] == f"[build] {quote(git.worktree_remove(checkout))}"
    assert "docker build" in built[-2] and f"aiia/django:{TAG}" in built[-2]
    assert f"{checkout}/services/django" in built[-2]
    # the target is this machine's engine: nothing to ship
    assert not [line for line in d.runner.printed if "docker save" in line]
    assert local.commands == [] and host.commands == []


def test_a_remote_host_without_the_image_gets_it_through_save_and_load(stack):
    env = stack.environment("prod")
    host = Host(answers(stack, env, images={TAG: False}))
    local = Host({quote(apps.image_inspect(f"{env.image}:{TAG}")): "sha256:x\n"})
    d, *_ = dry_deploy(stack, host=host, local=local, remote=True, label="box")
    d.deploy(None)
    assert d.local.printed == []  # built already: no second build
    image = f"{env.image}:{TAG}"
    in_order(
        d.runner.printed,
        [
            f"[box] {quote(apps.save_image(image))} | {quote(apps.load_image())}",
            f"[box] {quote(apps.migration_safety(stack, env, STATE, TAG))}",
            f"[box] {quote(cmd.one_off_app(stack, env, STATE, TAG, ['migrate', '--noinput']))}",
        ],
    )


def test_a_remote_host_that_has_the_image_gets_nothing_shipped(stack):
    d, *_ = dry_deploy(stack, remote=True, label="box")
    d.deploy(None)
    assert not [line for line in d.runner.printed if "docker save" in line]
    assert d.local.printed == []


def test_preflight_refuses_when_a_shared_service_is_down(stack):
    env = stack.environment("prod")
    facts = answers(stack, env, images={TAG: True})
    facts[quote(apps.is_running(stack.services.redis.container))] = "false\n"
    d, *_ = dry_deploy(stack, host=Host(facts))
    with pytest.raises(OpsError, match="is not running; start the stack first: invoke up"):
        d.deploy(None)
    assert d.runner.printed == []  # refused before the lock


def test_preflight_refuses_a_full_disk(stack):
    env = stack.environment("prod")
    facts = answers(stack, env, images={TAG: True})
    facts[quote(apps.free_disk(STATE))] = "Avail\n1048576\n"
    d, *_ = dry_deploy(stack, host=Host(facts))
    with pytest.raises(OpsError, match="only 1 MB free under /srv/aiia"):
        d.deploy(None)


def test_preflight_refuses_without_an_engine(stack):
    env = stack.environment("prod")
    facts = answers(stack, env, images={TAG: True})
    facts[quote(apps.engine_version())] = Result([], 1, "", "Cannot connect")
    d, *_ = dry_deploy(stack, host=Host(facts))
    with pytest.raises(OpsError, match="does not answer on the host; run invoke provision"):
        d.deploy(None)


# -- rollback target -----------------------------------------------------------------------

A, B, C, D = "a" * 12, "b" * 12, "c" * 12, "d" * 12


def rollback_deploy(stack, history: bytes, images: dict[str, bool], live: str = D) -> Deploy:
    env = stack.environment("prod")
    host = Host(
        answers(stack, env, live=live, images=images),
        files={f"{STATE}/releases/prod.jsonl": history},
    )
    return Deploy(stack, env, STATE, host, SECRETS, local=Host({}), steps=Steps(out=lambda _: 0))


HISTORY = release_log((A, "good"), (B, "good"), (C, "bad"), (D, "good"))


def test_rollback_goes_to_the_previous_good_release(stack):
    d = rollback_deploy(stack, HISTORY, {A: True, B: True, C: True, D: True})
    assert d.rollback_target(None) == B


def test_rollback_never_picks_a_bad_release_nor_the_live_one(stack):
    history = release_log((A, "good"), (C, "good"), (C, "bad"), (D, "good"))
    d = rollback_deploy(stack, history, {A: True, C: True, D: True})
    assert d.rollback_target(None) == A
    with pytest.raises(OpsError, match=f"{D} is not a good earlier release of prod"):
        d.rollback_target(D)


def test_rollback_skips_a_release_whose_image_is_gone(stack):
    d = rollback_deploy(stack, HISTORY, {A: True, B: False})
    assert d.rollback_target(None) == A


def test_rollback_to_a_prefix(stack):
    d = rollback_deploy(stack, HISTORY, {A: True, B: True})
    assert d.rollback_target("aaaa") == A


def test_rollback_to_a_bad_release_is_refused_naming_the_targets(stack):
    d = rollback_deploy(stack, HISTORY, {A: True, B: True})
    with pytest.raises(OpsError, match=f"rollback targets: {B}, {A}"):
        d.rollback_target(C)


def test_rollback_with_no_image_left_says_what_to_do(stack):
    d = rollback_deploy(stack, HISTORY, {A: False, B: False})
    with pytest.raises(OpsError) as err:
        d.rollback_target(None)
    assert "no earlier good release of prod whose image is still on the host" in str(err.value)
    assert "invoke deploy --env=prod --ref COMMIT" in str(err.value)


def test_a_dry_rollback_plans_the_release_without_build_or_migrations(stack):
    env = stack.environment("prod")
    host = Host(
        answers(stack, env, live=D, images={A: True, B: True}),
        files={f"{STATE}/releases/prod.jsonl": HISTORY},
    )
    d, *_ = dry_deploy(stack, host=host)
    assert d.rollback(None)["release"] == B
    printed = "\n".join(d.runner.printed)
    assert "migrate --noinput" not in printed and "collectstatic --noinput" in printed
    assert "migration_safety" not in printed  # a rollback runs no migrations to check
    assert f"{env.image}:{B}" in printed


def test_images_beyond_keep_releases_are_pruned_never_live_or_recent_ones():
    history = [{"commit": f"{i:012d}", "result": "good"} for i in range(8)]
    pruned = apps.images_to_prune("000000000007", {"prod": history}, {"000000000001"}, 5)
    assert pruned == ["000000000000", "000000000002"]


# -- failures: what is undone --------------------------------------------------------------


def real_deploy(stack, facts, files=None) -> tuple[Deploy, Host]:
    env = stack.environment("prod")
    host = Host(facts, files=files)
    # The host's rendered files as the live release left them: only nginx's will change.
    flow.write_host_files(host, stack, SECRETS, STATE, {"prod": f"{env.address}:{env.port}"})
    lines: list[str] = []
    d = Deploy(stack, env, STATE, host, SECRETS, local=Host({}), steps=Steps(out=lines.append))
    return d, host


def test_a_release_that_never_gets_healthy_is_removed_and_recorded_bad(stack):
    env = stack.environment("prod")
    new = apps.next_name(env)
    facts = answers(stack, env, images={TAG: True})
    facts[quote(apps.health_probe(new))] = Result([], 1, "unhealthy: database down", "")
    facts[quote(apps.container_status(new))] = "exited\n"
    facts[quote(apps.container_logs(new))] = "Traceback: boom\n"
    d, host = real_deploy(stack, facts)
    with pytest.raises(DeployFailed) as err:
        d.deploy(None)
    message = str(err.value)
    assert "did not become healthy within 1m: the live release keeps serving" in message
    assert "--- health check output ---\nunhealthy: database down" in message
    assert f"--- last log lines of {new} ---\nTraceback: boom" in message
    started = apps.run_release(stack, env, STATE, TAG, str(env.standby_address), new, d.config)
    lock = lock_dir(STATE, deploy_lock("prod"))
    changes = host.commands
    assert changes[changes.index(started) + 1 :] == [
        apps.remove_container(new),
        ["rm", "-rf", lock],
    ]  # never switched: nginx untouched, the live release never stopped
    last = json.loads(host.files[f"{STATE}/releases/prod.jsonl"].splitlines()[-1])
    assert (last["commit"], last["result"]) == (TAG, "bad")
    assert b"deploy prod " + TAG.encode() + b": bad" in host.files[f"{STATE}/audit.log"]


def test_a_failure_after_the_switch_points_nginx_back_at_the_live_release(stack, monkeypatch):
    env = stack.environment("prod")
    new = apps.next_name(env)
    facts = answers(stack, env, images={TAG: True})

    def through_nginx(self, tag):
        raise DeployFailed(f"https://{env.domains[0]}/health/ through nginx did not report {tag}")

    monkeypatch.setattr(Deploy, "check_through_nginx", through_nginx)
    d, host = real_deploy(stack, facts)
    with pytest.raises(DeployFailed, match="through nginx did not report"):
        d.deploy(None)
    reload = cmd.nginx_reload(stack)
    changes = host.commands
    first = changes.index(reload[1])
    switch_lock = lock_dir(STATE, "switch")  # every reload under the host-wide switch lock
    assert changes[first + 1 :] == [
        ["rm", "-rf", switch_lock],
        ["mkdir", "-p", f"{STATE}/locks"],
        ["mkdir", switch_lock],
        *reload,  # the second reload: back to the live release
        ["rm", "-rf", switch_lock],
        apps.remove_container(new),
        ["rm", "-rf", lock_dir(STATE, deploy_lock("prod"))],
    ]
    assert apps.stop_container(env.container, 30) not in changes
    nginx = [p for p in host.files if p.endswith("nginx.conf") or "/nginx/" in p]
    text = b"".join(host.files[p] for p in nginx).decode()
    assert f"{env.address}:{env.port}" in text  # upstream: the live release again
    assert f"{env.standby_address}:{env.port}" not in text
    last = json.loads(host.files[f"{STATE}/releases/prod.jsonl"].splitlines()[-1])
    assert last["result"] == "bad"


def test_a_dry_run_on_a_fresh_machine_generates_no_secrets(state_dir):
    with pytest.raises(OpsError, match="are not set: run `invoke setup`"):
        flow.prepare(load_stack(), "staging", dry_run=True)
    assert not state_dir.exists()


def test_a_dry_run_prepares_printing_runners_that_read_the_real_ones(state_dir):
    d = flow.prepare(load_stack(), "staging", dry_run=False, backup=False)  # makes secrets
    dry = flow.prepare(load_stack(), "staging", dry_run=True, backup=False)
    assert not d.dry_run and dry.dry_run and not dry.ships_images
    assert isinstance(dry.local, PrintingRunner) and dry.local.reader is not None
    assert dry.runner.host == "local" and dry.local.host == "build"
    secrets = set(dry.secrets.values())  # redacted from both printers' output
    assert secrets <= dry.runner.secrets and secrets <= dry.local.secrets


# -- migration safety ----------------------------------------------------------------------

REFUSAL = (
    "migration safety: refused: courses.0002_drop: RemoveField course.summary drops column "
    "courses_course.summary, which breaks the release still running during the deploy; "
    "split it: release N (expand) ...\n"
    "migration safety: 1 breaking operation(s) in pending migrations; nothing was migrated."
)


def test_the_safety_check_runs_the_new_image_against_the_live_database(stack):
    env = stack.environment("prod")
    argv = apps.migration_safety(stack, env, STATE, TAG)
    assert argv == cmd.one_off_app(stack, env, STATE, TAG, ["manage.py", "migration_safety"])
    assert f"{env.image}:{TAG}" in argv
    assert f"DB_HOST={stack.services.postgresql.address}" in argv  # straight to PostgreSQL


def test_a_breaking_migration_is_refused_before_anything_changes(stack):
    env = stack.environment("prod")
    facts = answers(stack, env, images={TAG: True})
    check = apps.migration_safety(stack, env, STATE, TAG)
    facts[quote(check)] = Result([], 3, "", REFUSAL + "\n")
    d, host = real_deploy(stack, facts)
    with pytest.raises(flow.MigrationRefused) as err:
        d.deploy(None)
    message = str(err.value)
    assert message.startswith(
        f"migration safety refused {TAG}: courses.0002_drop: RemoveField course.summary drops "
        "column courses_course.summary"
    )
    assert "split it: release N (expand)" in message
    assert message.endswith("The live release keeps serving; nothing was migrated.")
    changes = host.commands
    lock = lock_dir(STATE, deploy_lock("prod"))
    # after the check: the recovery's sweep of a -next container and the lock's release;
    # no migrate, no start, no nginx reload, the live release never stopped
    assert changes[changes.index(check) + 1 :] == [
        apps.remove_container(apps.next_name(env)),
        ["rm", "-rf", lock],
    ]
    last = json.loads(host.files[f"{STATE}/releases/prod.jsonl"].splitlines()[-1])
    assert (last["commit"], last["result"]) == (TAG, "failed")
    assert "RemoveField course.summary" in last["detail"]


def test_a_release_older_than_the_check_is_deployed_with_a_warning(stack):
    env = stack.environment("prod")
    facts = answers(stack, env, images={TAG: True})
    facts[quote(apps.migration_safety(stack, env, STATE, TAG))] = Result(
        [], 1, "", "Unknown command: 'migration_safety'\nType 'manage.py help' for usage.\n"
    )
    d, _ = real_deploy(stack, facts)
    lines: list[str] = []
    d.steps = Steps(out=lines.append)
    d.check_migrations(TAG)  # no error: the deploy goes on to migrate
    assert any("has no migration safety check (an older release)" in line for line in lines)


def test_a_check_that_cannot_run_stops_the_deploy_naming_why(stack):
    env = stack.environment("prod")
    facts = answers(stack, env, images={TAG: True})
    facts[quote(apps.migration_safety(stack, env, STATE, TAG))] = Result(
        [], 1, "", "CommandError: cannot read the migrations: connection refused\n"
    )
    d, host = real_deploy(stack, facts)
    with pytest.raises(OpsError, match="could not run:\nCommandError: cannot read the migr"):
        d.deploy(None)
    assert cmd.one_off_app(stack, env, STATE, TAG, ["migrate", "--noinput"]) not in host.commands


def test_the_verdict_reads_the_exit_code_and_keeps_the_checks_own_lines():
    assert apps.migration_safety_verdict(0, "migration safety: ok (x)\n", "") == (
        "ok",
        "migration safety: ok (x)",
    )
    verdict, detail = apps.migration_safety_verdict(3, "", "noise\n" + REFUSAL)
    assert verdict == "refused" and detail == REFUSAL
    assert apps.migration_safety_verdict(1, "", "Traceback ...")[0] == "error"


# -- issue #13: crash safety (journal, adoption, switch state, signals) --------------------


class Engine(Host):
    """A Host whose app containers change with the commands run: `docker run/stop/start/
    rm/rename` update what `docker inspect` answers, as a real engine would."""

    def __init__(self, stack, facts, containers: dict[str, tuple[str, str, bool]], **kw):
        super().__init__(facts, **kw)
        self.stack = stack
        self.fail: dict[str, Result] = {}  # argv prefix -> failure, for the first match
        self.containers = dict(containers)  # name -> (tag, address, running)
        self.configs: dict[str, str] = {}  # name -> the config digest label it runs with
        self._sync()

    def _sync(self) -> None:
        for env in self.stack.environments.values():
            for name in (env.container, apps.next_name(env)):
                c = self.containers.get(name)
                key = quote(apps.inspect_container(name))
                config = self.configs.get(name, "")
                self.answers[key] = (
                    inspect_json(self.stack, env, name, *c, config=config) if c else MISSING
                )
        self.answers = dict(sorted(self.answers.items(), key=lambda kv: -len(kv[0])))

    def _execute(self, argv, *, input, env, timeout, stream) -> Result:
        argv = list(map(str, argv))
        for prefix, failure in list(self.fail.items()):
            if quote(argv).startswith(prefix):
                del self.fail[prefix]
                self.commands.append(argv)
                return failure
        if argv[:2] == ["ls", "-1"]:  # the directories under one, from the files written
            root = argv[2].rstrip("/") + "/"
            names = {p[len(root) :].split("/")[0] for p in self.files if p.startswith(root)}
            return Result(argv, 0 if names else 2, "".join(f"{n}\n" for n in sorted(names)))
        result = super()._execute(argv, input=input, env=env, timeout=timeout, stream=stream)
        c = self.containers
        if argv[:2] == ["rm", "-rf"]:
            gone = argv[2].rstrip("/") + "/"
            self.files = {p: v for p, v in self.files.items() if not p.startswith(gone)}
        if argv[:3] == ["docker", "run", "--detach"]:
            name, ip = argv[argv.index("--name") + 1], argv[argv.index("--ip") + 1]
            c[name] = (argv[-1].rsplit(":", 1)[1], ip, True)
            labels = [argv[i + 1] for i, a in enumerate(argv) if a == "--label"]
            mine = [v.split("=", 1)[1] for v in labels if v.startswith(f"{rcfg.CONFIG_LABEL}=")]
            self.configs[name] = mine[0] if mine else ""
        elif argv[:2] == ["docker", "stop"] and argv[-1] in c:
            c[argv[-1]] = (*c[argv[-1]][:2], False)
        elif argv[:2] == ["docker", "start"] and argv[-1] in c:
            c[argv[-1]] = (*c[argv[-1]][:2], True)
        elif argv[:2] == ["docker", "rm"]:
            c.pop(argv[-1], None)
        elif argv[:2] == ["docker", "rename"]:
            c[argv[3]] = c.pop(argv[2])
            self.configs[argv[3]] = self.configs.pop(argv[2], "")
        self._sync()
        return result


def engine_deploy(stack, containers, files=None, out=None):
    env = stack.environment("prod")
    host = Engine(stack, answers(stack, env, images={TAG: True}), containers, files=files)
    flow.write_host_files(host, stack, SECRETS, STATE, {"prod": f"{env.address}:{env.port}"})
    lines = out if out is not None else []
    d = Deploy(stack, env, STATE, host, SECRETS, local=Host({}), steps=Steps(out=lines.append))
    d.check_through_nginx = lambda tag: lines.append(f"   (checked {tag} through nginx)")
    return d, host, lines


def nginx_text(host) -> str:
    return b"".join(v for p, v in host.files.items() if "/config/nginx/" in p).decode()


def test_each_step_boundary_is_journaled_and_the_deploy_ends_done(stack):
    env = stack.environment("prod")
    d, host, _ = engine_deploy(stack, {env.container: (LIVE_TAG, str(env.address), True)})
    seen = []
    real_mark = d._mark

    def mark(step, **kw):
        real_mark(step, **kw)
        seen.append(json.loads(host.files[jn.journal_path(STATE, "prod")])["step"])

    d._mark = mark
    d.deploy(None)
    assert seen == ["lock", "image", "migrate", "collectstatic", "start", "health", "switch",
                    "reload", "drain", "retire", "record", "done"]  # fmt: skip
    journal = jn.parse_journal(host.files[jn.journal_path(STATE, "prod")])
    assert journal.finished and journal.switched and journal.old_release == LIVE_TAG
    state = jn.parse_switch(host.files[jn.switch_path(STATE, "prod")])
    assert state.upstream == f"{env.standby_address}:{env.port}" and state.release == TAG
    assert host.containers == {env.container: (TAG, str(env.standby_address), True)}


def test_a_served_next_left_by_a_killed_deploy_is_adopted_never_removed(stack):
    env = stack.environment("prod")
    new, a, b = apps.next_name(env), str(env.address), str(env.standby_address)
    killed = jn.Journal("prod", "deploy", TAG, "reload", new, b, env.container, a, LIVE_TAG,
                        switched=True, pid=999999)  # fmt: skip
    files = {
        jn.journal_path(STATE, "prod"): killed.to_json().encode(),
        jn.switch_path(STATE, "prod"): jn.SwitchState("prod", f"{b}:{env.port}", TAG).to_json(),
    }
    lines: list[str] = []
    d, host, _ = engine_deploy(
        stack, {env.container: (LIVE_TAG, a, True), new: (TAG, b, True)}, files, lines
    )
    result = d.deploy(None)
    changes = host.commands
    lock = changes.index(["mkdir", lock_dir(STATE, deploy_lock("prod"))])
    after = changes[lock + 1 :]
    switch_lock = lock_dir(STATE, "switch")
    # nginx first made to serve the recorded state (the killed run may not have reloaded)
    assert after[:6] == [
        ["mkdir", "-p", f"{STATE}/locks"],
        ["mkdir", switch_lock],
        *cmd.nginx_reload(stack),
        ["rm", "-rf", switch_lock],
        # then the old release (no longer served) drained and removed, the -next renamed
        apps.stop_container(env.container, stack.deploy.drain_timeout.whole_seconds),
    ]
    assert after[6:8] == [
        apps.remove_container(env.container),
        apps.rename_container(new, env.container),
    ]
    assert apps.remove_container(new) not in changes
    # the same release was already switched: finished without a second rollout
    assert not [c for c in changes if c[:3] == ["docker", "run", "--detach"]]
    assert result["address"] == b
    assert any("stopped after step 'reload'" in line for line in lines)
    assert any(f"{TAG} already serves" in line for line in lines)
    assert host.containers == {env.container: (TAG, b, True)}


def test_the_issues_bug_a_failure_in_retire_keeps_the_new_release_serving(stack):
    """The rename fails after the old release was stopped: recovery must not point nginx
    back at the stopped container nor remove the healthy new one."""
    env = stack.environment("prod")
    new, a, b = apps.next_name(env), str(env.address), str(env.standby_address)
    d, host, lines = engine_deploy(stack, {env.container: (LIVE_TAG, a, True)})
    host.fail[quote(apps.rename_container(new, env.container))] = Result([], 1, "", "rename: no")
    with pytest.raises(OpsError):
        d.deploy(None)
    assert apps.remove_container(new) not in host.commands
    # nginx still (and only) told to serve the new release
    state = jn.parse_switch(host.files[jn.switch_path(STATE, "prod")])
    assert state.upstream == f"{b}:{env.port}"
    assert f"{b}:{env.port}" in nginx_text(host) and f"{a}:{env.port}" not in nginx_text(host)
    # the recovery finished the retire: the served release under the final name
    assert host.containers == {env.container: (TAG, b, True)}
    assert any("prod serves " + TAG in line for line in lines)


def test_another_environments_switch_state_is_rendered_not_the_engines_view(stack):
    """prod's switch renders staging's upstream from staging's recorded switch state (a
    staging deploy in its drain), not from the container it sees under the final name."""
    env, staging = stack.environment("prod"), stack.environment("staging")
    recorded = jn.SwitchState("staging", f"{staging.standby_address}:{staging.port}", "s2")
    d, host, _ = engine_deploy(
        stack,
        {
            env.container: (LIVE_TAG, str(env.address), True),
            staging.container: ("s1", str(staging.address), True),
            apps.next_name(staging): ("s2", str(staging.standby_address), True),
        },
        files={jn.switch_path(STATE, "staging"): recorded.to_json().encode()},
    )
    d.deploy(None)
    text = nginx_text(host)
    assert f"{staging.standby_address}:{staging.port}" in text
    assert f"{staging.address}:{staging.port}" not in text
    assert f"{env.standby_address}:{env.port}" in text  # prod's own new upstream
    # staging's containers untouched by prod's deploy
    assert host.containers[apps.next_name(staging)] == ("s2", str(staging.standby_address), True)


def test_sigterm_during_a_step_runs_the_recovery_and_stops_cleanly(stack, monkeypatch):
    import os
    import signal

    env = stack.environment("prod")
    d, host, _ = engine_deploy(stack, {env.container: (LIVE_TAG, str(env.address), True)})

    def killed(self, name):
        os.kill(os.getpid(), signal.SIGTERM)  # arrives while the new release is checked
        time.sleep(1)

    import time

    monkeypatch.setattr(Deploy, "wait_healthy", killed)
    with pytest.raises(flow.DeployInterrupted, match="interrupted by SIGTERM"):
        d.deploy(None)
    assert host.containers == {env.container: (LIVE_TAG, str(env.address), True)}
    assert not [c for c in host.commands if c[:2] == ["docker", "stop"]]
    last = json.loads(host.files[f"{STATE}/releases/prod.jsonl"].splitlines()[-1])
    assert last["result"] == "interrupted"
    assert ["rm", "-rf", lock_dir(STATE, deploy_lock("prod"))] == host.commands[-1]
    assert jn.parse_journal(host.files[jn.journal_path(STATE, "prod")]).finished


def test_a_recovery_that_cannot_finish_leaves_the_journal_for_the_next_run(stack):
    env = stack.environment("prod")
    new = apps.next_name(env)
    d, host, lines = engine_deploy(stack, {env.container: (LIVE_TAG, str(env.address), True)})
    host.fail[quote(apps.health_probe(new))] = Result([], 1, "", "")
    host.answers[quote(apps.container_status(new))] = "exited\n"
    host.fail[quote(apps.remove_container(new))] = Result([], 1, "", "connection lost")
    with pytest.raises(DeployFailed):
        d.deploy(None)
    journal = jn.parse_journal(host.files[jn.journal_path(STATE, "prod")])
    assert journal.step == "record" and not journal.finished
    assert any("recovery stopped" in line for line in lines)


@pytest.mark.parametrize("paused", [True, False])
def test_a_pool_left_paused_by_a_killed_restore_is_resumed_right_after_the_lock(stack, paused):
    from aiia_ops.commands import backups as bk
    from aiia_ops.commands import restores as rj

    env = stack.environment("prod")
    facts = answers(stack, env, images={TAG: True})
    facts[quote(bk.container_running(stack.services.pgbouncer.container))] = "true\n"
    facts[quote(rj.show_databases(stack))] = (
        f"name,host,port,database,paused,disabled\n{env.database},x,5432,{env.database},"
        f"{int(paused)},0\n"
    )
    d, _, _, out = dry_deploy(stack, host=Host(facts))
    d.deploy(None)
    printed = d.runner.printed
    resume = f"[local] {quote(bk.resume(stack, env.database))}"
    if not paused:
        assert resume not in printed and "a killed restore" not in out.getvalue()
        return
    lock = lock_dir(STATE, deploy_lock("prod"))
    in_order(
        printed,
        [
            f"[local] {quote(['mkdir', lock])}",
            resume,
            f"[local] {quote(rj.cancel_guard(stack, env.database))}",
            f"[local] {quote(apps.migration_safety(stack, env, STATE, TAG))}",
        ],
    )


def test_sigterm_while_the_release_is_recorded_is_held_then_said_without_a_traceback(
    stack, monkeypatch
):
    import os
    import signal

    env = stack.environment("prod")
    d, host, _ = engine_deploy(stack, {env.container: (LIVE_TAG, str(env.address), True)})
    prune = Deploy.prune_images

    def killed(self, current):
        os.kill(os.getpid(), signal.SIGTERM)  # arrives after "recorded: ... good"
        prune(self, current)

    monkeypatch.setattr(Deploy, "prune_images", killed)
    with pytest.raises(flow.DeployInterrupted) as err:
        d.deploy(None)
    assert str(err.value) == (
        f"deploy of prod to {TAG} interrupted by SIGTERM after it was recorded good: "
        f"{TAG} serves, nothing to recover"
    )
    last = json.loads(host.files[f"{STATE}/releases/prod.jsonl"].splitlines()[-1])
    assert last["result"] == "good"
    assert jn.parse_journal(host.files[jn.journal_path(STATE, "prod")]).finished
    assert ["rm", "-rf", lock_dir(STATE, deploy_lock("prod"))] == host.commands[-1]


# -- a release's own config (commands/release_config.py) ----------------------------------

OTHER_COMMIT = "fedcba9876543210fedcba9876543210fedcba98"
OTHER = OTHER_COMMIT[:12]


def started_with(host, name: str) -> list[str]:
    """The last `docker run` of container `name`."""
    return [c for c in host.commands if c[:3] == ["docker", "run", "--detach"] and name in c][-1]


def config_mount(argv: list[str]) -> str:
    mounts = [argv[i + 1] for i, a in enumerate(argv) if a == "--mount"]
    return next(m for m in mounts if m.endswith("target=/etc/aiia,readonly"))


def stack_with(max_requests: int):
    from aiia_ops.model.load import stack_from_data
    from tests.stackfiles import patched_stack

    patch = {"environments": {"prod": {"gunicorn": {"max_requests": max_requests}}}}
    return stack_from_data(patched_stack(patch))


def deploy_with(stack, host, lines, *, action="deploy"):
    """One more deploy (or rollback) on the same fake host, with `stack`."""
    env = stack.environment("prod")
    d = Deploy(stack, env, STATE, host, SECRETS, local=Host({}), steps=Steps(out=lines.append))
    d.check_through_nginx = lambda tag: None
    return d, (d.rollback(None) if action == "rollback" else d.deploy(None))


def two_releases(stack, monkeypatch):
    """TAG deployed with `stack`, then OTHER with a changed stack (max_requests 19999)."""
    env = stack.environment("prod")
    d, host, lines = engine_deploy(stack, {env.container: (LIVE_TAG, str(env.address), True)})
    host.answers[quote(apps.image_inspect(f"{env.image}:{OTHER}"))] = "sha256:y\n"
    d.deploy(None)
    first = rcfg.config_dir(STATE, env, d.config.digest)
    monkeypatch.setattr(flow, "resolve_ref", lambda ref: (OTHER_COMMIT, OTHER))
    changed = stack_with(19999)
    second, _ = deploy_with(changed, host, lines)
    return d, host, lines, first, changed, second


def test_a_release_mounts_its_own_copy_of_the_config_and_the_log_records_which(stack):
    env = stack.environment("prod")
    d, host, _ = engine_deploy(stack, {env.container: (LIVE_TAG, str(env.address), True)})
    d.deploy(None)
    path = rcfg.config_dir(STATE, env, d.config.digest)
    assert path.startswith(f"{STATE}/config/releases/app-prod/")
    run = started_with(host, apps.next_name(env))
    assert config_mount(run) == f"type=bind,source={path},target=/etc/aiia,readonly"
    assert f"{rcfg.CONFIG_LABEL}={d.config.digest}" in run
    current = host.files[f"{STATE}/config/app-prod/gunicorn.conf.py"]
    assert host.files[f"{path}/gunicorn.conf.py"] == current
    written = [p for p in host.files if p.startswith(path)]
    assert written[-1] == f"{path}/{rcfg.MANIFEST}"  # the manifest last: a cut copy has none
    last = json.loads(host.files[f"{STATE}/releases/prod.jsonl"].splitlines()[-1])
    assert (last["commit"], last["result"], last["config"]) == (TAG, "good", d.config.digest)


def test_a_rollback_starts_the_release_with_the_config_it_was_deployed_with(stack, monkeypatch):
    env = stack.environment("prod")
    d, host, lines, first, changed, second = two_releases(stack, monkeypatch)
    assert second.config.digest != d.config.digest
    assert b"max_requests = 19999" in host.files[f"{STATE}/config/app-prod/gunicorn.conf.py"]
    # the rollback, still with the changed stack: TAG gets TAG's config back
    _, result = deploy_with(changed, host, lines, action="rollback")
    assert result["release"] == TAG
    assert f"source={first}," in config_mount(started_with(host, apps.next_name(env)))
    assert b"max_requests = 19999" not in host.files[f"{first}/gunicorn.conf.py"]
    assert f"   its own config, kept since its deploy: {first}" in lines
    last = json.loads(host.files[f"{STATE}/releases/prod.jsonl"].splitlines()[-1])
    assert (last["action"], last["config"]) == ("rollback", d.config.digest)
    # the current stack's rendering is still where the stack puts it
    assert b"max_requests = 19999" in host.files[f"{STATE}/config/app-prod/gunicorn.conf.py"]


@pytest.mark.parametrize("damage", ["changed", "manifest gone", "never recorded"])
def test_a_rollback_without_an_intact_copy_renders_the_current_stack_and_says_why(
    stack, monkeypatch, damage
):
    env = stack.environment("prod")
    _, host, lines, first, changed, second = two_releases(stack, monkeypatch)
    log = f"{STATE}/releases/prod.jsonl"
    if damage == "changed":
        host.files[f"{first}/gunicorn.conf.py"] += b"# edited by hand\n"
        why = f"{TAG}'s config copy {first}: gunicorn.conf.py differs from what its manifest"
    elif damage == "manifest gone":
        del host.files[f"{first}/{rcfg.MANIFEST}"]
        why = f"{TAG}'s config copy {first} is gone or was never finished"
    else:  # a release from before copies were kept: its record has no digest
        entries = [json.loads(line) for line in host.files[log].splitlines()]
        for entry in (e for e in entries if e["commit"] == TAG):
            entry.pop("config", None)
        host.files[log] = b"".join(json.dumps(e).encode() + b"\n" for e in entries)
        why = f"no config recorded for {TAG} (deployed before releases kept one)"
    back, result = deploy_with(changed, host, lines, action="rollback")
    assert result["release"] == TAG
    assert [line for line in lines if line.startswith(f"   {why}")], "\n".join(lines)
    assert back.config.digest == second.config.digest  # the current stack's, by content
    mount = config_mount(started_with(host, apps.next_name(env)))
    assert f"source={rcfg.config_dir(STATE, env, second.config.digest)}," in mount


def test_copies_no_kept_release_records_and_no_container_mounts_are_removed(stack):
    env = stack.environment("prod")
    root = rcfg.releases_root(STATE, env)
    stale = {f"{root}/0ld0ld0ld0ld/gunicorn.conf.py": b"x", f"{root}/0ld0ld0ld0ld/x": b"y"}
    kept = {f"{root}/11ve11ve11ve/{rcfg.MANIFEST}": b"{}"}
    log = json.dumps({"commit": LIVE_TAG, "result": "good", "config": "11ve11ve11ve"})
    files = {**stale, **kept, f"{STATE}/releases/prod.jsonl": log.encode() + b"\n"}
    d, host, _ = engine_deploy(
        stack, {env.container: (LIVE_TAG, str(env.address), True)}, files=files
    )
    d.deploy(None)
    assert ["rm", "-rf", f"{root}/0ld0ld0ld0ld"] in host.commands
    # the release before (a rollback target) keeps its copy, the new one has its own
    assert not [c for c in host.commands if c[:2] == ["rm", "-rf"] and "11ve" in c[2]]
    assert f"{root}/{d.config.digest}/{rcfg.MANIFEST}" in host.files


def test_release_config_is_named_by_content_and_checked_file_by_file(stack):
    from aiia_ops.commands.render import HostFile

    env = stack.environment("prod")
    conf = f"{STATE}/config/app-prod/gunicorn.conf.py"
    one = rcfg.release_config([HostFile(conf, b"workers = 2\n")], STATE, env)
    same = rcfg.release_config([HostFile(conf, b"workers = 2\n")], STATE, env)
    other = rcfg.release_config([HostFile(conf, b"workers = 3\n")], STATE, env)
    assert one.digest == same.digest != other.digest
    manifest = one.files[-1].data
    listed = rcfg.manifest_files(manifest, one.digest)
    assert listed is not None and list(listed) == ["gunicorn.conf.py"]
    assert rcfg.manifest_files(manifest, other.digest) is None  # another copy's manifest
    assert rcfg.manifest_files(b"{not json", one.digest) is None
    assert rcfg.copy_problem(listed, {"gunicorn.conf.py": b"workers = 2\n"}) is None
    assert "differs" in rcfg.copy_problem(listed, {"gunicorn.conf.py": b"workers = 3\n"})
    assert "missing" in rcfg.copy_problem(listed, {"gunicorn.conf.py": None})
    with pytest.raises(ValueError, match="no rendered file under"):
        rcfg.release_config([HostFile(f"{STATE}/config/nginx/nginx.conf", b"")], STATE, env)


def test_the_recorded_config_is_the_newest_good_record_of_that_release():
    history = [
        {"commit": A, "result": "good", "config": "c1"},
        {"commit": A, "result": "bad", "config": "c2"},
        {"commit": B, "result": "good", "config": "c3"},
        {"commit": A, "result": "good", "config": "c4"},
        {"commit": A, "result": "good"},  # a record from before copies were kept
    ]
    assert rcfg.recorded_config(history, A) == "c4"
    assert rcfg.recorded_config(history, C) is None
    keep = rcfg.configs_to_prune(["c1", "c2", "c3", "c4", "c9"], history, 1, {"c9"})
    assert keep == ["c1", "c2", "c3"]  # only A's newest, and what a container mounts
    assert rcfg.configs_to_prune(["c1", "c2", "c3", "c4"], history, 2, set()) == ["c1", "c2"]


MOUNT_GONE = (
    'Error response from daemon: invalid mount config for type "bind": bind source path does '
    "not exist: /srv/aiia/config/releases/app-prod/c3f13e90d577\n"
    "Error: failed to start containers: aiia_django_prod\n"
)


@pytest.mark.parametrize("leftover_next", [False, True])
def test_a_stopped_release_that_cannot_start_is_replaced_not_a_deploy_stuck_on_it(
    stack, leftover_next
):
    """Nothing runs and the stopped release does not start (its config copy went with a lost
    state dir): found on a machine whose engine kept its containers. Before, every deploy
    retried that start and failed the same way; now it says why and replaces it."""
    env = stack.environment("prod")
    new, a = apps.next_name(env), str(env.address)
    containers = {env.container: (LIVE_TAG, a, False)}
    if leftover_next:
        containers[new] = (LIVE_TAG, str(env.standby_address), False)
    d, host, lines = engine_deploy(stack, containers)
    host.fail[quote(apps.start_container(env.container))] = Result([], 1, "", MOUNT_GONE)
    d.deploy(None)
    assert host.containers == {env.container: (TAG, host.containers[env.container][1], True)}
    said = "\n".join(lines)
    assert f"{env.container} ({LIVE_TAG}) does not start: Error response from daemon" in said
    assert "bind source path does not exist" in said
    assert "nothing serves prod: the deploy goes on and replaces it" in said
    # nginx was never pointed at the container that could not start
    assert apps.start_container(env.container) in host.commands
    state = jn.parse_switch(host.files[jn.switch_path(STATE, "prod")])
    assert state.release == TAG


def test_after_a_failure_the_message_says_what_the_recovery_left_serving(stack, capsys):
    env = stack.environment("prod")
    new = apps.next_name(env)
    d, host, _ = engine_deploy(stack, {env.container: (LIVE_TAG, str(env.address), True)})
    host.fail[quote(apps.health_probe(new))] = Result([], 1, "", "")
    host.answers[quote(apps.container_status(new))] = "exited\n"
    with pytest.raises(DeployFailed):
        flow.explained(d, lambda: d.deploy(None))
    assert f"prod serves {LIVE_TAG}. The database is never rolled back" in capsys.readouterr().err
