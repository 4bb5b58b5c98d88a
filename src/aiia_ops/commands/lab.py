"""The test lab: N real hosts on this machine, as data. Pure: names, addresses, argv, parsers.

A lab host is a network namespace `labK` with one veth into the bridge `labbr0`, its own
sshd (listening on its own address only) and its own dockerd (own data root, exec root,
socket and `--bip`). The namespaces have no default route: nothing in them can try to reach
outside (an engine otherwise tries to resolve a registry). Only 127.0.0.1 and the lab's own
addresses are ever targets.

Why constants here and not a `lab:` block in deploy/stack.yml: the lab is a property of the
*test machine*, not of the stack being deployed. Every stack file (the real one, the e2e
test stack, a level-3 profile) points its `hosts.<name>.ssh` at the lab's addresses, and the
lab must be the same for all of them. So the bridge, subnet and paths live once, in
`LabNet` below; `hosts_for(n)` derives every per-host name and address from the index.

The flow (flows/lab.py) reads facts with the commands and parsers here, asks `plan_up()` /
`plan_down()` what to do, and runs it.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

from aiia_ops.commands.argv import Result
from aiia_ops.errors import OpsError

Argv = tuple[str, ...]

DOCKERD = "/usr/sbin/dockerd"
SSHD = "/usr/sbin/sshd"
NSENTER = "/usr/bin/nsenter"
SFTP_SERVER = "/usr/lib/openssh/sftp-server"
DEFAULT_DIR = "/var/lib/aiia-lab"
RUN_DIR = "/run/aiia-lab"  # pidfiles and the record of the lab that is up
RECORD = f"{RUN_DIR}/lab.json"
NETNS_DIR = "/var/run/netns"
MAX_HOSTS = 40
SSH_USER = "root"
CLIENT_KEY = "id_ed25519"
_HOST_NAME = re.compile(r"^lab([1-9][0-9]?)$")


@dataclass(frozen=True)
class LabNet:
    """The lab's one network: bridge, subnet, the gateway address on this machine's side."""

    bridge: str = "labbr0"
    prefix: str = "10.77.0"  # a /24
    gateway_octet: int = 1
    first_octet: int = 10  # host K is PREFIX.(10+K): lab1 = 10.77.0.11
    docker_prefix: str = "172.31"  # host K's engine bridge: 172.31.K.1/24

    @property
    def gateway(self) -> str:
        return f"{self.prefix}.{self.gateway_octet}"

    @property
    def cidr(self) -> str:
        return f"{self.gateway}/24"

    def address(self, k: int) -> str:
        return f"{self.prefix}.{self.first_octet + k}"

    def bip(self, k: int) -> str:
        return f"{self.docker_prefix}.{k}.1/24"


NET = LabNet()


@dataclass(frozen=True)
class LabHost:
    """One lab host: every name, address and path, derived from its index and the lab dir."""

    index: int
    dir: str  # the lab's state dir (keys, configs, data roots)
    net: LabNet = NET

    @property
    def name(self) -> str:
        return f"lab{self.index}"

    @property
    def address(self) -> str:
        return self.net.address(self.index)

    @property
    def netns(self) -> str:
        return f"{NETNS_DIR}/{self.name}"

    @property
    def veth(self) -> str:
        """The bridge-side end (the namespace side is `eth0`)."""
        return f"v{self.name}"

    @property
    def home(self) -> str:
        return f"{self.dir}/{self.name}"

    @property
    def data_root(self) -> str:
        return f"{self.home}/docker"

    @property
    def exec_root(self) -> str:
        return f"/run/aiia-lab-{self.name}"

    @property
    def socket(self) -> str:
        return f"/run/aiia-lab-{self.name}.sock"

    @property
    def docker_host(self) -> str:
        return f"unix://{self.socket}"

    @property
    def dockerd_pidfile(self) -> str:
        return f"{RUN_DIR}/{self.name}-dockerd.pid"

    @property
    def sshd_pidfile(self) -> str:
        return f"{RUN_DIR}/{self.name}-sshd.pid"

    @property
    def dockerd_log(self) -> str:
        return f"{self.home}/dockerd.log"

    @property
    def sshd_log(self) -> str:
        return f"{self.home}/sshd.log"

    @property
    def daemon_json(self) -> str:
        """The engine's own (empty) config: never /etc/docker/daemon.json of this machine."""
        return f"{self.home}/daemon.json"

    @property
    def engine_key(self) -> str:
        """The engine's identity key (its `docker info` ID): not /etc/docker/key.json, which
        every engine of this machine would otherwise share."""
        return f"{self.home}/key.json"

    @property
    def sshd_config(self) -> str:
        return f"{self.home}/sshd_config"

    @property
    def host_key(self) -> str:
        return f"{self.home}/ssh_host_ed25519_key"

    @property
    def bip(self) -> str:
        return self.net.bip(self.index)

    @property
    def ssh_spec(self) -> str:
        """What a stack's `hosts.<name>.ssh` holds, and what `SSHRunner` takes."""
        return f"{SSH_USER}@{self.address}:22"


@dataclass(frozen=True)
class Lab:
    dir: str
    hosts: tuple[LabHost, ...]
    net: LabNet = NET

    @property
    def client_key(self) -> str:
        return f"{self.dir}/{CLIENT_KEY}"

    @property
    def authorized_keys(self) -> str:
        return f"{self.dir}/authorized_keys"

    @property
    def known_hosts(self) -> str:
        return f"{self.dir}/known_hosts"


def check_count(n: object) -> int:
    try:
        count = int(str(n))
    except ValueError:
        count = 0
    if not 1 <= count <= MAX_HOSTS:
        raise OpsError(
            f"--hosts {n!r}: the lab has 1 to {MAX_HOSTS} hosts (for example --hosts 3); "
            "nothing was changed"
        )
    return count


def check_first(first: object, n: int) -> int:
    try:
        k = int(str(first))
    except ValueError:
        k = 0
    if not k >= 1 or k + n - 1 > MAX_HOSTS:
        raise OpsError(
            f"--first {first!r} with --hosts {n}: hosts lab{first}..lab{k + n - 1} do not fit "
            f"the lab's lab1..lab{MAX_HOSTS} (for example --first 1); nothing was changed"
        )
    return k


def lab_dir(environ) -> str:
    """$AIIA_LAB_DIR, else $AIIA_STATE_DIR/lab, else /var/lib/aiia-lab."""
    if environ.get("AIIA_LAB_DIR"):
        return environ["AIIA_LAB_DIR"].rstrip("/") or "/"
    if environ.get("AIIA_STATE_DIR"):
        return environ["AIIA_STATE_DIR"].rstrip("/") + "/lab"
    return DEFAULT_DIR


def hosts_for(n: int, directory: str, net: LabNet = NET) -> tuple[LabHost, ...]:
    return tuple(LabHost(k, directory, net) for k in range(1, n + 1))


def host_index(name: str) -> int | None:
    m = _HOST_NAME.match(name)
    return int(m[1]) if m and int(m[1]) <= MAX_HOSTS else None


# --- facts: commands and parsers -----------------------------------------------------------

NETNS_LIST: Argv = ("ip", "netns", "list")
LINKS: Argv = ("ip", "-o", "link", "show")
PROC_MOUNTS = "/proc/mounts"


def bridge_addrs_argv(net: LabNet = NET) -> Argv:
    return ("ip", "-o", "-4", "addr", "show", "dev", net.bridge)


def ns_addrs_argv(h: LabHost) -> Argv:
    return ("ip", "-n", h.name, "-o", "-4", "addr", "show")


def ns_pids_argv(h: LabHost) -> Argv:
    return ("ip", "netns", "pids", h.name)


def forward_rule(net: LabNet = NET) -> Argv:
    return ("FORWARD", "-i", net.bridge, "-o", net.bridge, "-j", "ACCEPT")


def forward_check_argv(net: LabNet = NET) -> Argv:
    return ("iptables", "-C", *forward_rule(net))


def engine_ping_argv(h: LabHost) -> Argv:
    return ("docker", "-H", h.docker_host, "version", "--format", "{{.Server.Version}}")


def engine_info_argv(h: LabHost) -> Argv:
    return ("docker", "-H", h.docker_host, "info", "--format", "{{.ID}} {{.DockerRootDir}}")


def keyscan_argv(h: LabHost) -> Argv:
    return ("ssh-keyscan", "-T", "2", "-t", "ed25519", h.address)


def parse_netns(r: Result) -> set[str]:
    """`ip netns list` -> {"lab1", "other"} ("lab1 (id: 3)" lines)."""
    return {line.split()[0] for line in r.stdout.splitlines() if line.strip()} if r.ok else set()


def parse_links(r: Result) -> set[str]:
    """`ip -o link show` -> {"lo", "labbr0", "vlab1", ...} ("vlab1@if2" -> "vlab1")."""
    names = set()
    for line in r.stdout.splitlines():
        parts = line.split(":", 2)
        if len(parts) >= 2:
            names.add(parts[1].strip().split("@")[0])
    return names


def parse_addrs(r: Result) -> set[str]:
    """`ip -o -4 addr show` -> {"10.77.0.11/24", ...}."""
    out = set()
    for line in r.stdout.splitlines() if r.ok else ():
        words = line.split()
        if "inet" in words:
            out.add(words[words.index("inet") + 1])
    return out


def parse_pids(r: Result) -> list[int]:
    return [int(w) for w in r.stdout.split() if w.isdigit()] if r.ok else []


def parse_pid(text: bytes | str | None) -> int | None:
    if text is None:
        return None
    value = text.decode(errors="replace") if isinstance(text, bytes) else text
    value = value.strip()
    return int(value) if value.isdigit() and int(value) > 0 else None


def parse_mounts(text: bytes | str | None, roots: tuple[str, ...]) -> list[str]:
    """Mount points under any of `roots`, deepest first (the order to unmount them)."""
    value = (text.decode(errors="replace") if isinstance(text, bytes) else text) or ""
    points = []
    for line in value.splitlines():
        words = line.split()
        if len(words) < 2:
            continue
        point = words[1].replace("\\040", " ")
        if any(point == r or point.startswith(r.rstrip("/") + "/") for r in roots):
            points.append(point)
    return sorted(set(points), key=lambda p: (-p.count("/"), p))


def parse_keyscan(r: Result) -> str | None:
    """`ssh-keyscan -t ed25519 ADDR` -> "ssh-ed25519 AAAA..." (None: no answer)."""
    for line in r.stdout.splitlines() if r.ok else ():
        words = line.split()
        if len(words) >= 3 and not line.startswith("#"):
            return f"{words[1]} {words[2]}"
    return None


def parse_record(text: bytes | str | None) -> dict | None:
    """/run/aiia-lab/lab.json: {"dir": ..., "hosts": [...]} of the lab that is up."""
    if not text:
        return None
    try:
        data = json.loads(text)
    except ValueError:
        return None
    if not isinstance(data, dict) or not isinstance(data.get("dir"), str):
        return None
    return data


def record_text(directory: str, names: list[str]) -> str:
    return json.dumps({"dir": directory, "hosts": names}, indent=2) + "\n"


# --- facts -> plan ---------------------------------------------------------------------------


@dataclass(frozen=True)
class HostFacts:
    netns: bool = False
    veth: bool = False
    addrs: frozenset[str] = frozenset()  # IPv4 addresses inside the namespace
    dockerd_pid: int | None = None  # from the pidfile, and a live dockerd
    sshd_pid: int | None = None  # from the pidfile, and a live sshd
    stale_dockerd_pidfile: bool = False
    stale_sshd_pidfile: bool = False
    host_key: bool = False
    engine: str | None = None  # the engine's version when it answers
    ssh_key: str | None = None  # the host key sshd offers ("ssh-ed25519 AAAA...")


@dataclass(frozen=True)
class LabFacts:
    bridge: bool = False
    bridge_addrs: frozenset[str] = frozenset()
    forward_rule: bool = False
    client_key: bool = False
    hosts: dict[str, HostFacts] = field(default_factory=dict)


@dataclass(frozen=True)
class Cmd:
    argv: Argv
    check: bool = True


@dataclass(frozen=True)
class Step:
    """One idempotent step of lab.up: its commands, or why it is not needed."""

    name: str
    description: str
    commands: tuple[Cmd, ...] = ()
    skip: str | None = None


def _c(*argv: str, check: bool = True) -> Cmd:
    return Cmd(tuple(argv), check)


def keygen_argv(path: str, comment: str) -> Argv:
    return ("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", path)


def plan_network(lab: Lab, f: LabFacts) -> list[Step]:
    """Bridge, FORWARD rule, namespaces, veths, addresses, keys. No default route is added
    (none exists in a new namespace)."""
    net = lab.net
    steps = []
    if f.bridge and net.cidr in f.bridge_addrs:
        steps.append(Step("bridge", f"bridge {net.bridge} {net.cidr}", skip="present"))
    else:
        cmds = [] if f.bridge else [_c("ip", "link", "add", net.bridge, "type", "bridge")]
        cmds += [
            _c("ip", "addr", "add", net.cidr, "dev", net.bridge),
            _c("ip", "link", "set", net.bridge, "up"),
        ]
        steps.append(Step("bridge", f"bridge {net.bridge} {net.cidr}", tuple(cmds)))
    desc = f"iptables: accept forwarding within {net.bridge} (Docker's FORWARD policy is DROP)"
    if f.forward_rule:
        steps.append(Step("forward", desc, skip="rule present"))
    else:
        steps.append(Step("forward", desc, (_c("iptables", "-I", *forward_rule(net)),)))
    for h in lab.hosts:
        hf = f.hosts.get(h.name, HostFacts())
        want = f"{h.address}/24"
        if hf.netns and hf.veth and want in hf.addrs:
            steps.append(Step(f"{h.name}.net", f"{h.name}: netns, veth, {want}", skip="present"))
            continue
        cmds = [] if hf.netns else [_c("ip", "netns", "add", h.name)]
        if not hf.veth:
            cmds += [
                _c(
                    "ip",
                    "link",
                    "add",
                    h.veth,
                    "type",
                    "veth",
                    "peer",
                    "name",
                    "eth0",
                    "netns",
                    h.name,
                ),
                _c("ip", "link", "set", h.veth, "master", net.bridge, "up"),
            ]
        if want not in hf.addrs or not hf.veth:
            cmds.append(_c("ip", "-n", h.name, "addr", "add", want, "dev", "eth0"))
        cmds += [
            _c("ip", "-n", h.name, "link", "set", "lo", "up"),
            _c("ip", "-n", h.name, "link", "set", "eth0", "up"),
        ]
        steps.append(Step(f"{h.name}.net", f"{h.name}: netns, veth, {want}", tuple(cmds)))
    key_cmds = [_c("mkdir", "-p", *(h.home for h in lab.hosts)), _c("chmod", "700", lab.dir)]
    if not f.client_key:
        key_cmds.append(_c(*keygen_argv(lab.client_key, "aiia-lab-client")))
    for h in lab.hosts:
        if not f.hosts.get(h.name, HostFacts()).host_key:
            key_cmds.append(_c(*keygen_argv(h.host_key, f"aiia-lab-{h.name}")))
    steps.append(Step("keys", "the lab's client key and one host key per host", tuple(key_cmds)))
    return steps


def sshd_config_text(h: LabHost, lab: Lab) -> str:
    return "\n".join(
        [
            f"# aiia lab host {h.name}: written by `invoke lab.up`",
            f"ListenAddress {h.address}",
            "Port 22",
            f"HostKey {h.host_key}",
            f"AuthorizedKeysFile {lab.authorized_keys}",
            f"PidFile {h.sshd_pidfile}",
            "PermitRootLogin prohibit-password",
            "PubkeyAuthentication yes",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "UsePAM no",
            # The lab dir may sit under a world-writable /tmp (AIIA_STATE_DIR of a test):
            # StrictModes would refuse it. The key files themselves are 0600 in 0700 dirs.
            "StrictModes no",
            # Sessions share this machine's filesystem but not its engine: `docker` in an SSH
            # session of this host talks to this host's own dockerd.
            f"SetEnv DOCKER_HOST={h.docker_host}",
            f"Subsystem sftp {SFTP_SERVER}",
            "LogLevel VERBOSE",
            "",
        ]
    )


def known_hosts_text(lab: Lab, host_keys: dict[str, str]) -> str:
    """One line per host whose public host key is known ("ssh-ed25519 AAAA... comment")."""
    lines = []
    for h in lab.hosts:
        words = host_keys.get(h.name, "").split()
        if len(words) >= 2:
            lines.append(f"{h.address} {words[0]} {words[1]}")
    return "\n".join(lines) + "\n"


def daemon_json_text(h: LabHost) -> str:
    """Its own identity key (its `docker info` ID): dockerd 20.10 reads the key path only
    from the config file; by default every engine here would share /etc/docker/key.json."""
    return json.dumps({"deprecated-key-path": h.engine_key}, indent=2) + "\n"


def sshd_argv(h: LabHost) -> Argv:
    """sshd daemonizes itself once it listens, and writes its PidFile."""
    return (NSENTER, f"--net={h.netns}", SSHD, "-f", h.sshd_config, "-E", h.sshd_log)


def dockerd_argv(h: LabHost) -> Argv:
    """dockerd inside the namespace (nsenter --net, not `ip netns exec`: the latter remounts
    /sys and dockerd fails with "Devices cgroup isn't mounted"), started in the background by
    start-stop-daemon, which does nothing when the pidfile names a live dockerd."""
    return (
        *("start-stop-daemon", "--start", "--background", "--oknodo"),
        *("--pidfile", h.dockerd_pidfile, "--exec", DOCKERD, "--startas", NSENTER),
        *("--output", h.dockerd_log, "--"),
        f"--net={h.netns}",
        DOCKERD,
        *("--data-root", h.data_root, "--exec-root", h.exec_root),
        *("--pidfile", h.dockerd_pidfile, "-H", h.docker_host, "--bip", h.bip),
        *("--config-file", h.daemon_json),
        *("--containerd-namespace", h.name, "--containerd-plugins-namespace", f"{h.name}-plugins"),
    )


PRIVSEP_DIR = "/run/sshd"


def plan_daemons(lab: Lab, f: LabFacts) -> list[Step]:
    steps = []
    for h in lab.hosts:
        hf = f.hosts.get(h.name, HostFacts())
        if hf.sshd_pid:
            steps.append(
                Step(f"{h.name}.sshd", f"{h.name}: sshd", skip=f"runs (pid {hf.sshd_pid})")
            )
        else:
            # sshd refuses to start without its privilege separation directory, which only
            # the machine's own sshd service creates (a fresh machine has none).
            cmds = [_c("mkdir", "-p", "-m", "755", PRIVSEP_DIR)]
            if hf.stale_sshd_pidfile:
                cmds.append(_c("rm", "-f", h.sshd_pidfile))
            cmds.append(_c(*sshd_argv(h)))
            steps.append(Step(f"{h.name}.sshd", f"{h.name}: sshd on {h.address}:22", tuple(cmds)))
        desc = f"{h.name}: dockerd on {h.socket} (data {h.data_root}, bip {h.bip})"
        if hf.dockerd_pid:
            steps.append(Step(f"{h.name}.dockerd", desc, skip=f"runs (pid {hf.dockerd_pid})"))
        else:
            cmds = [_c("mkdir", "-p", RUN_DIR), _c("rm", "-f", h.dockerd_pidfile, h.socket)]
            cmds.append(_c(*dockerd_argv(h)))
            steps.append(Step(f"{h.name}.dockerd", desc, tuple(cmds)))
    return steps


# --- lab.down --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Teardown:
    """What lab.down removes, found by the lab's own names and pidfiles."""

    hosts: tuple[LabHost, ...]
    bridge: bool
    forward_rule: bool
    dir: str


def lab_hosts_found(
    directory: str, netns: set[str], links: set[str], pidfile_names: set[str], recorded: list[str]
) -> tuple[LabHost, ...]:
    """Every host of the lab that left a trace: its namespace, its veth, a pidfile, the record."""
    indexes = {host_index(n) for n in netns | set(recorded)}
    indexes |= {host_index(n[1:]) for n in links if n.startswith("vlab")}
    indexes |= {host_index(n.split("-")[0]) for n in pidfile_names}
    return tuple(LabHost(k, directory) for k in sorted(i for i in indexes if i))


def lab_files(lab_dir_path: str) -> tuple[str, ...]:
    """The lab's shared files (per-host files live in each host's home)."""
    return tuple(
        f"{lab_dir_path}/{n}"
        for n in (CLIENT_KEY, f"{CLIENT_KEY}.pub", "authorized_keys", "known_hosts")
    )


def kill_argv(pid: int, signal: str = "TERM") -> Argv:
    return ("kill", f"-{signal}", str(pid))


def remove_host_argvs(
    h: LabHost, mounts: list[str], links: set[str], netns: set[str]
) -> list[Argv]:
    """After its processes are gone: mounts, veth, namespace, files."""
    out: list[Argv] = [("umount", "-l", m) for m in mounts]
    if h.veth in links:
        out.append(("ip", "link", "del", h.veth))
    if h.name in netns:
        out.append(("ip", "netns", "del", h.name))
    out.append(("rm", "-rf", h.exec_root, h.socket, h.dockerd_pidfile, h.sshd_pidfile, h.home))
    return out


def remove_shared_argvs(t: Teardown, net: LabNet = NET) -> list[Argv]:
    out: list[Argv] = []
    if t.forward_rule:
        out.append(("iptables", "-D", *forward_rule(net)))
    if t.bridge:
        out.append(("ip", "link", "del", net.bridge))
    out.append(("rm", "-f", *lab_files(t.dir), RECORD))
    return out


def describe_host(h: LabHost) -> str:
    return (
        f"{h.name}: namespace {h.name}, veth {h.veth}, sshd and dockerd (pidfiles in {RUN_DIR}), "
        f"socket {h.socket}, exec root {h.exec_root}, data and keys in {h.home}"
    )


def load_argvs(image: str, h: LabHost) -> tuple[Argv, Argv]:
    """`docker save IMAGE | docker -H unix://... load`: an image to a lab engine, no registry."""
    return ("docker", "save", image), ("docker", "-H", h.docker_host, "load")


def image_present_argv(image: str, h: LabHost) -> Argv:
    return ("docker", "-H", h.docker_host, "image", "inspect", "--format", "{{.Id}}", image)


def local_image_argv(image: str) -> Argv:
    return ("docker", "image", "inspect", "--format", "{{.Id}}", image)
