"""`invoke provision` as data: facts in -> exact commands, skip reasons or refusals out."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
from invoke import Context, Exit

from aiia_ops.commands import facts as F
from aiia_ops.commands import provision as P
from aiia_ops.commands.argv import Result
from aiia_ops.flows import provision as FP
from aiia_ops.host.files import context_sha
from aiia_ops.host.runners import RecordingRunner
from aiia_ops.tasks import provision as T

CTX = "/repo/services/base"
SHA = "0123456789abcdef"
DEBIAN_ID = "sha256:6fc16aa9270e0000000000000000000000000000000000000000000000000000"
BASE_LABEL = f"{SHA}.6fc16aa9270e"

# A fresh Debian 12 machine, as root, no systemd as PID 1, nothing installed.
FRESH = P.HostFacts(
    is_root=True,
    os_id="debian",
    os_version="12",
    systemd=False,
    docker_client="28.2.2",
    free_bytes=80 * 1024**3,
)
# The same machine once provisioned.
READY = replace(
    FRESH,
    dockerd="20.10.24+dfsg1",
    engine_version="20.10.24+dfsg1",
    engine_api="1.41",
    compose_version="2.26.1-4",
    debian_image_id=DEBIAN_ID,
    base_image_sha=BASE_LABEL,
    debootstrap=True,
    iptables=True,
    daemon_json='{\n  "userland-proxy": false\n}\n',
)
ENGINE_CONFIG = [
    ["mkdir", "-p", "/etc/docker"],
    ["tee", "/etc/docker/daemon.json.aiia-new"],
    ["mv", "-f", "/etc/docker/daemon.json.aiia-new", "/etc/docker/daemon.json"],
]

R = "/var/tmp/aiia-trixie-rootfs"
DEBOOTSTRAP_BUILD = [
    ["rm", "-rf", R, f"{R}.tar"],
    ["debootstrap", "--variant=minbase", "trixie", R],
    ["tee", f"{R}/etc/dpkg/dpkg.cfg.d/docker"],
    ["tee", f"{R}/etc/apt/sources.list.d/debian.sources"],
    ["rm", "-f", f"{R}/etc/apt/sources.list"],
    ["find", f"{R}/usr/share/doc", "-type", "f", "!", "-name", "copyright", "-delete"],
    [
        *("find", f"{R}/usr/share/man", f"{R}/usr/share/info", f"{R}/usr/share/locale"),
        *("-type", "f", "!", "-name", "locale.alias", "-delete"),
    ],
    ["find", f"{R}/var/cache/apt", f"{R}/var/lib/apt/lists", "-type", "f", "-delete"],
    ["tar", "-C", R, "--numeric-owner", "-cf", f"{R}.tar", "."],
    [
        *("docker", "import", "--change", 'CMD ["bash"]', "--change"),
        *("LABEL org.aiia.built-by=debootstrap", f"{R}.tar", "debian:trixie-slim"),
    ],
    ["rm", "-rf", R, f"{R}.tar"],
]
COMPOSE_FETCH = [
    ["docker", "rm", "-f", "aiia-compose-fetch"],
    [
        *("docker", "run", "--name", "aiia-compose-fetch", "debian:trixie-slim", "sh", "-c"),
        "apt-get update -qq && apt-get install -y -qq --no-install-recommends docker-compose",
    ],
    ["mkdir", "-p", "/usr/local/lib/docker/cli-plugins"],
    [
        *("docker", "cp", "aiia-compose-fetch:/usr/libexec/docker/cli-plugins/docker-compose"),
        "/usr/local/lib/docker/cli-plugins/docker-compose",
    ],
    ["docker", "rm", "aiia-compose-fetch"],
    ["docker", "compose", "version"],
]


def base_build(label: str) -> list[list[str]]:
    return [
        [
            *("docker", "build", "--label", f"org.aiia.context-sha256={label}"),
            *("-t", "aiia/base:trixie", CTX),
        ]
    ]


def run_plan(facts: P.HostFacts, phases=P.PHASES) -> list[P.Step]:
    return P.plan(facts, phases=phases, base_context=CTX, base_sha=SHA)


def table(steps: list[P.Step]) -> dict[str, list[list[str]] | str]:
    """name -> its commands, or "skip: reason"."""
    return {s.name: f"skip: {s.skip}" if s.skip else s.argvs for s in steps}


# --- situations -----------------------------------------------------------------------------


def test_fresh_debian_root_without_systemd_installs_starts_and_builds_everything():
    steps = run_plan(FRESH)
    assert table(steps) == {
        "engine.config": ENGINE_CONFIG,
        "engine.install": [
            ["apt-get", "update", "-qq"],
            [
                *("apt-get", "install", "-y", "-qq", "--no-install-recommends"),
                *("docker.io", "debootstrap", "iptables"),
            ],
        ],
        "engine.start": [
            [
                *("start-stop-daemon", "--start", "--oknodo", "--background", "--make-pidfile"),
                *("--pidfile", "/run/aiia-dockerd.pid", "--output", "/var/log/aiia-dockerd.log"),
                *("--exec", "/usr/sbin/dockerd"),
            ]
        ],
        "image.debian": [["docker", "pull", "debian:trixie-slim"]],
        "compose": COMPOSE_FETCH,
        "image.base": base_build(f"{SHA}."),
    }
    assert steps[0].commands[1].input == '{\n  "userland-proxy": false\n}\n'
    start = steps[2]
    assert start.wait_for == ("docker", "version", "--format", "{{.Server.Version}}")
    assert start.wait_seconds == 60
    debian = steps[3]
    # debootstrap is installed with the engine, so the fallback does not install it again.
    assert debian.fallback_argvs[:2] == [
        ["apt-get", "update", "-qq"],
        ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "debootstrap"],
    ]
    assert debian.commands[0].timeout == 120


def test_pull_falls_back_to_debootstrap_and_import():
    steps = run_plan(replace(READY, debian_image_id=None), phases=("images",))
    (debian, compose) = steps
    assert debian.argvs == [["docker", "pull", "debian:trixie-slim"]]
    assert debian.fallback_argvs == DEBOOTSTRAP_BUILD
    sources = debian.fallback[3].input
    assert "URIs: http://deb.debian.org/debian-security" in sources
    assert "Suites: trixie trixie-updates" in sources
    assert "path-exclude /usr/share/doc/*" in debian.fallback[2].input
    assert compose.skip == "docker compose 2.26.1-4"


def test_fresh_debian_with_systemd_starts_the_engine_with_systemctl():
    start = run_plan(replace(FRESH, systemd=True))[2]
    assert start.argvs == [["systemctl", "enable", "--now", "docker"]]
    assert start.wait_for is not None


def test_engine_installed_but_stopped_is_only_started():
    facts = replace(FRESH, dockerd="20.10.24+dfsg1", debootstrap=True, iptables=True)
    _config, install, start = run_plan(facts, phases=("engine",))
    assert install.skip == "installed: dockerd 20.10.24+dfsg1, debootstrap, iptables"
    assert start.argvs[0][0] == "start-stop-daemon"


def test_only_missing_packages_are_installed():
    facts = replace(FRESH, debootstrap=True, iptables=True)
    install = run_plan(facts, phases=("engine",))[1]
    assert install.argvs[1][-1] == "docker.io"
    assert install.description == "install docker.io from the OS archive"


def test_engine_settings_are_merged_into_an_existing_daemon_json():
    facts = replace(READY, daemon_json='{"log-driver": "local", "userland-proxy": true}')
    config = run_plan(facts, phases=("engine",))[0]
    assert config.argvs == ENGINE_CONFIG
    assert json.loads(config.commands[1].input) == {"log-driver": "local", "userland-proxy": False}
    # The running engine keeps its settings until it restarts: said, not done behind its back.
    assert "next start: `invoke engine.stop` then `invoke provision`" in config.description
    assert not [c for c in config.argvs if c[0] in ("systemctl", "start-stop-daemon")]


@pytest.mark.parametrize("text", ['{"userland-proxy": false', "[1, 2]"])
def test_an_unreadable_daemon_json_is_refused_and_left_alone(text):
    with pytest.raises(P.Refused) as err:
        run_plan(replace(READY, daemon_json=text))
    assert "/etc/docker/daemon.json is not" in str(err.value)
    assert "nothing was changed" in str(err.value)


def test_not_root_with_an_engine_leaves_the_engine_settings_alone():
    facts = replace(READY, is_root=False, daemon_json=None)
    config = run_plan(facts, phases=("engine",))[0]
    assert config.skip.startswith("not root: the engine keeps its own settings")


def test_provisioned_machine_skips_every_step_with_its_reason():
    assert table(run_plan(READY)) == {
        "engine.config": "skip: /etc/docker/daemon.json has them",
        "engine.install": "skip: engine answers: 20.10.24+dfsg1 (API 1.41)",
        "engine.start": "skip: engine answers: 20.10.24+dfsg1 (API 1.41)",
        "image.debian": "skip: debian:trixie-slim present",
        "compose": "skip: docker compose 2.26.1-4",
        "image.base": f"skip: aiia/base:trixie built from this {CTX} and debian:trixie-slim",
    }


def test_compose_missing_only():
    facts = replace(READY, compose_version=None)
    todo = {k: v for k, v in table(run_plan(facts)).items() if not isinstance(v, str)}
    assert todo == {"compose": COMPOSE_FETCH}


def test_compose_v1_is_not_enough():
    facts = replace(READY, compose_version="1.29.2")
    assert run_plan(facts, phases=("images",))[1].argvs == COMPOSE_FETCH


def test_base_image_missing_only():
    facts = replace(READY, base_image_sha=None)
    todo = {k: v for k, v in table(run_plan(facts)).items() if not isinstance(v, str)}
    assert todo == {"image.base": base_build(BASE_LABEL)}


@pytest.mark.parametrize(
    "label",
    [
        "",  # built by hand, without the label
        f"{SHA}.0123456789ab",  # from another debian:trixie-slim
        f"fedcba9876543210.{BASE_LABEL.split('.')[1]}",  # from another services/base
    ],
)
def test_stale_base_image_is_rebuilt(label):
    step = run_plan(replace(READY, base_image_sha=label), phases=("base",))[0]
    assert step.argvs == base_build(BASE_LABEL)


def test_debian_image_missing_with_engine_up_and_no_debootstrap_installs_it_in_the_fallback():
    facts = replace(READY, debian_image_id=None, debootstrap=False)
    debian = run_plan(facts, phases=("images",))[0]
    assert debian.fallback_argvs == [
        ["apt-get", "update", "-qq"],
        ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "debootstrap"],
        *DEBOOTSTRAP_BUILD,
    ]


def test_non_root_user_with_an_engine_gets_compose_in_their_home():
    facts = replace(READY, is_root=False, home="/home/ana", compose_version=None)
    compose = run_plan(facts, phases=("images",))[1]
    assert ["mkdir", "-p", "/home/ana/.docker/cli-plugins"] in compose.argvs
    assert compose.argvs[3][-1] == "/home/ana/.docker/cli-plugins/docker-compose"


# --- refusals -------------------------------------------------------------------------------


def test_not_root_without_an_engine_is_refused():
    with pytest.raises(P.Refused) as err:
        run_plan(replace(FRESH, is_root=False))
    assert str(err.value) == (
        "provisioning needs root for: engine.config, engine.install, engine.start, image.debian. "
        "Run `invoke provision` as root (e.g. `sudo invoke provision`), or install Docker "
        "Engine 24+ and the compose v2 plugin yourself, give your user access to the engine, "
        "and make debian:trixie-slim pullable; then rerun."
    )


def test_not_debian_without_an_engine_is_refused():
    with pytest.raises(P.Refused) as err:
        run_plan(replace(FRESH, os_id="fedora", os_like=()))
    assert str(err.value) == (
        "no Docker engine answers and this OS (fedora) is not Debian or Ubuntu, which is all "
        "`invoke provision` knows how to install on. Install Docker Engine 24+ and the compose "
        "v2 plugin yourself (https://docs.docker.com/engine/install/), start the engine, then "
        "rerun `invoke provision` for the images."
    )


def test_ubuntu_and_debian_derivatives_are_accepted():
    assert run_plan(replace(FRESH, os_id="ubuntu"))
    assert run_plan(replace(FRESH, os_id="linuxmint", os_like=("ubuntu", "debian")))


def test_not_debian_with_an_engine_still_gets_its_images():
    steps = run_plan(replace(READY, os_id="fedora", base_image_sha=None))
    assert [s.name for s in steps if not s.skip] == ["image.base"]


def test_low_disk_is_refused_with_the_amount_needed():
    with pytest.raises(P.Refused) as err:
        run_plan(replace(FRESH, free_bytes=1 * 1024**3))
    assert str(err.value) == (
        "too little free disk: 1.0 GB free where the engine keeps its data (/var/lib), 3 GB "
        "needed for the engine, the base images and the service images. Free some space "
        "(e.g. `docker system prune`, `apt-get clean`) or grow the disk, then rerun."
    )


def test_low_disk_or_not_root_do_not_matter_when_nothing_is_left_to_do():
    facts = replace(READY, free_bytes=10, is_root=False, os_id="arch")
    assert all(s.skip for s in run_plan(facts))


# --- engine.stop ----------------------------------------------------------------------------


def test_engine_stop_stops_the_dockerd_of_the_pidfile_only():
    stop = P.plan_engine_stop(replace(READY, pidfile_pid=7131))
    assert stop.commands == [
        [
            *("start-stop-daemon", "--stop", "--pidfile", "/run/aiia-dockerd.pid"),
            *("--exec", "/usr/sbin/dockerd", "--retry", "TERM/30/KILL/5", "--remove-pidfile"),
        ]
    ]
    assert stop.message == "stopping dockerd (pid 7131) started by `invoke provision`"


def test_engine_stop_leaves_an_engine_of_systemd_alone():
    stop = P.plan_engine_stop(replace(READY, systemd=True))
    assert stop.commands == []
    assert stop.message == (
        "the engine (20.10.24+dfsg1) was not started by provision (no live dockerd in "
        "/run/aiia-dockerd.pid); systemd manages it: `systemctl stop docker docker.socket` "
        "stops it"
    )


def test_engine_stop_leaves_an_engine_started_by_someone_else_alone():
    stop = P.plan_engine_stop(READY)
    assert stop.commands == []
    assert "someone else started it, so it is left running" in stop.message


def test_engine_stop_with_no_engine_has_nothing_to_do():
    stop = P.plan_engine_stop(FRESH)
    assert (stop.commands, stop.message) == (
        [],
        "no Docker engine answers and none was started by provision: nothing to stop",
    )


# --- facts: commands and their parsers ------------------------------------------------------


def ok(stdout: str) -> Result:
    return Result([], 0, stdout)


FAIL = Result([], 1, "", "error")
NOT_FOUND = Result([], 127, "", "command not found")

OS_RELEASE_DEBIAN = 'PRETTY_NAME="Debian GNU/Linux 12 (bookworm)"\nVERSION_ID="12"\nID=debian\n'
OS_RELEASE_MINT = 'NAME="Linux Mint"\nID=linuxmint\nID_LIKE="ubuntu debian"\nVERSION_ID="21.3"\n'


@pytest.mark.parametrize(
    ("parser", "result", "expected"),
    [
        (
            F.parse_os_release,
            ok(OS_RELEASE_DEBIAN),
            {"os_id": "debian", "os_like": (), "os_version": "12"},
        ),
        (
            F.parse_os_release,
            ok(OS_RELEASE_MINT),
            {"os_id": "linuxmint", "os_like": ("ubuntu", "debian"), "os_version": "21.3"},
        ),
        (F.parse_client_version, ok("Docker version 28.2.2, build e6534b4\n"), "28.2.2"),
        (F.parse_client_version, NOT_FOUND, None),
        (
            F.parse_dockerd_version,
            ok("Docker version 20.10.24+dfsg1, build 5d6db84\n"),
            "20.10.24+dfsg1",
        ),
        (
            F.parse_engine,
            ok("20.10.24+dfsg1 1.41\n"),
            {"engine_version": "20.10.24+dfsg1", "engine_api": "1.41"},
        ),
        (F.parse_engine, Result([], 1, " \n"), {"engine_version": None, "engine_api": None}),
        (F.parse_compose, ok("2.26.1-4\n"), "2.26.1-4"),
        (F.parse_compose, Result([], 1, "", "docker: 'compose' is not a docker command."), None),
        (F.parse_df_avail, ok("       Avail\n85720047616\n"), 85720047616),
        (F.parse_df_avail, FAIL, None),
        (F.parse_label, ok("<no value>\n"), ""),
        (F.parse_label, ok("abc.def\n"), "abc.def"),
        (F.parse_label, FAIL, None),
        (F.parse_image_id, ok("sha256:6fc1\n"), "sha256:6fc1"),
        (F.parse_image_id, FAIL, None),
        (F.parse_is_root, ok("0\n"), True),
        (F.parse_is_root, ok("1000\n"), False),
        (F.parse_pidfile, ok("7131\n"), 7131),
        (F.parse_pidfile, FAIL, None),
    ],
)
def test_fact_parsers(parser, result, expected):
    assert parser(result) == expected


def test_gather_reads_facts_with_read_only_commands():
    runner = RecordingRunner(
        {
            "id -u": "0\n",
            "sh -c": "/root\n",
            "cat /etc/os-release": OS_RELEASE_DEBIAN,
            "test -d /run/systemd/system": FAIL,
            "docker --version": "Docker version 28.2.2, build e6534b4\n",
            "dockerd --version": "Docker version 20.10.24+dfsg1, build 5d6db84\n",
            "debootstrap --version": "debootstrap 1.0.128+nmu2+deb12u2\n",
            "iptables --version": "iptables v1.8.9 (nf_tables)\n",
            "df ": f"Avail\n{80 * 1024**3}\n",
            "cat /run/aiia-dockerd.pid": "7131\n",
            "cat /etc/docker/daemon.json": READY.daemon_json,
            "cat /proc/7131/comm": "dockerd\n",
            "docker version": "20.10.24+dfsg1 1.41\n",
            "docker compose version --short": "2.26.1-4\n",
            "docker image inspect --format '{{.Id}}' debian:trixie-slim": DEBIAN_ID + "\n",
            "docker image inspect --format": BASE_LABEL + "\n",
        }
    )
    facts = FP.gather(runner)
    assert facts == replace(READY, os_version="12", pidfile_pid=7131)
    mutating = {"apt-get", "start-stop-daemon", "systemctl", "rm", "tee", "mkdir"}
    assert not [c for c in runner.commands if c[0] in mutating or c[:2] == ["docker", "run"]]


def test_gather_without_an_engine_skips_image_facts_and_ignores_a_stale_pidfile():
    runner = RecordingRunner(
        {
            "cat /etc/os-release": OS_RELEASE_DEBIAN,
            "id -u": "0\n",
            "test -d": FAIL,
            "docker --version": "Docker version 28.2.2, build e6534b4\n",
            "dockerd --version": NOT_FOUND,
            "debootstrap": NOT_FOUND,
            "iptables": NOT_FOUND,
            "cat /run/aiia-dockerd.pid": "4242\n",
            "cat /proc/4242/comm": "bash\n",  # pid reused by something else
            "docker version": FAIL,
            "docker compose": FAIL,
        }
    )
    facts = FP.gather(runner)
    assert facts.engine_version is None and facts.pidfile_pid is None
    assert facts.dockerd is None and not facts.debootstrap
    assert not [c for c in runner.commands if c[:3] == ["docker", "image", "inspect"]]


def test_context_sha_ignores_docs_and_follows_content(tmp_path):
    (tmp_path / "Dockerfile").write_text("FROM debian:trixie-slim\n")
    before = context_sha(tmp_path)
    (tmp_path / "README.md").write_text("docs\n")
    assert context_sha(tmp_path) == before
    (tmp_path / "Dockerfile").write_text("FROM debian:trixie-slim\nENV A=1\n")
    assert context_sha(tmp_path) != before


# --- the task's dry run prints the plan's exact commands --------------------------------------


def test_dry_run_prints_exact_commands_and_skip_reasons(capsys):
    FP.print_plan(run_plan(replace(READY, compose_version=None, base_image_sha=None)))
    out = capsys.readouterr().out.splitlines()
    assert out[:4] == [
        '[1/6] engine.config: engine settings in /etc/docker/daemon.json: "userland-proxy": false',
        "    skip: /etc/docker/daemon.json has them",
        "[2/6] engine.install: install docker.io, debootstrap, iptables",
        "    skip: engine answers: 20.10.24+dfsg1 (API 1.41)",
    ]
    assert "    $ docker rm -f aiia-compose-fetch   # may fail" in out
    assert (
        "    $ docker run --name aiia-compose-fetch debian:trixie-slim sh -c 'apt-get update -qq"
        " && apt-get install -y -qq --no-install-recommends docker-compose'"
    ) in out
    assert out[-1] == (
        f"    $ docker build --label org.aiia.context-sha256={BASE_LABEL} -t aiia/base:trixie {CTX}"
    )


# --- the tasks, with facts and runner replaced: no traceback, and only what the plan says -----


@pytest.fixture
def fake_host(monkeypatch):
    """Run the tasks against given facts and a recording runner (nothing is executed)."""
    runner = RecordingRunner()
    monkeypatch.setattr(T, "LocalRunner", lambda: runner)

    def use(facts: P.HostFacts) -> RecordingRunner:
        monkeypatch.setattr(FP, "gather", lambda _runner: facts)
        return runner

    return use


def test_provision_refusal_is_an_exit_with_the_message_not_a_traceback(fake_host):
    fake_host(replace(FRESH, is_root=False))
    with pytest.raises(Exit) as err:
        T.provision(Context(), dry_run=True)
    assert str(err.value.message).startswith("provision: provisioning needs root for: ")


def test_provision_on_a_ready_host_runs_nothing(fake_host, capsys):
    label = P.base_label(context_sha(FP.BASE_CONTEXT), DEBIAN_ID)
    runner = fake_host(replace(READY, base_image_sha=label))
    T.provision(Context())
    assert runner.commands == []
    assert "image.base: skip (aiia/base:trixie built from this" in capsys.readouterr().out


def test_engine_stop_task_runs_the_stop_command_only_for_its_own_dockerd(fake_host, capsys):
    runner = fake_host(replace(READY, pidfile_pid=7131))
    T.engine_stop(Context())
    assert runner.commands == P.plan_engine_stop(replace(READY, pidfile_pid=7131)).commands
    runner.commands.clear()
    fake_host(READY)
    T.engine_stop(Context())
    assert runner.commands == []
    assert "left running" in capsys.readouterr().out
