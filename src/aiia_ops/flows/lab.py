"""`invoke lab.up|down|status|load`: the test lab of real hosts on this machine.

Facts (namespaces, links, the FORWARD rule, pidfiles and the processes they name, the
engines' answers) are read with `runner.query()` / `read_file()`; commands/lab.py plans;
`runner.run()` acts. A dry run (`PrintingRunner(reader=LocalRunner())`) prints the same plan
against the real machine and waits for nothing.

Other procedures and tests use `current()` (the lab that is up), `runner_for_host()` (an
`SSHRunner` to a lab host, keys and known_hosts of the lab) and `load_image()`.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

from aiia_ops.commands import lab as L
from aiia_ops.commands.argv import quote
from aiia_ops.errors import OpsError
from aiia_ops.flows.steps import Steps
from aiia_ops.host.runners import PrintingRunner, Runner

ENGINE_WAIT = 90.0
SSHD_WAIT = 20.0
STOP_WAIT = 30.0
QUERY_TIMEOUT = 10


def _say(line: str) -> None:
    print(line, flush=True)


def _dry(runner: Runner) -> bool:
    return isinstance(runner, PrintingRunner)


# --- facts -----------------------------------------------------------------------------------


def _text(runner: Runner, path: str) -> str | None:
    data = runner.read_file(path)
    return None if data is None else data.decode(errors="replace")


def live_pid(runner: Runner, pidfile: str, comm: str) -> tuple[int | None, bool]:
    """(pid, stale): the pid in `pidfile` when it names a live `comm` process; stale is True
    when the file exists but names none (a dead daemon, or a reused pid)."""
    pid = L.parse_pid(runner.read_file(pidfile))
    if pid is None:
        return None, runner.read_file(pidfile) is not None
    name = (_text(runner, f"/proc/{pid}/comm") or "").strip()
    return (pid, False) if name == comm else (None, True)


def gather(runner: Runner, lab: L.Lab, probe: bool = True) -> L.LabFacts:
    netns = L.parse_netns(runner.query(L.NETNS_LIST, timeout=QUERY_TIMEOUT))
    links = L.parse_links(runner.query(L.LINKS, timeout=QUERY_TIMEOUT))
    bridge = lab.net.bridge in links
    bridge_addrs = (
        L.parse_addrs(runner.query(L.bridge_addrs_argv(lab.net), timeout=QUERY_TIMEOUT))
        if bridge
        else set()
    )
    hosts = {}
    for h in lab.hosts:
        addrs = (
            L.parse_addrs(runner.query(L.ns_addrs_argv(h), timeout=QUERY_TIMEOUT))
            if h.name in netns
            else set()
        )
        dockerd, stale_d = live_pid(runner, h.dockerd_pidfile, "dockerd")
        sshd, stale_s = live_pid(runner, h.sshd_pidfile, "sshd")
        engine = ssh_key = None
        if probe and dockerd:
            r = runner.query(L.engine_ping_argv(h), timeout=QUERY_TIMEOUT)
            engine = r.stdout.strip() if r.ok else None
        if probe and sshd:
            ssh_key = L.parse_keyscan(runner.query(L.keyscan_argv(h), timeout=QUERY_TIMEOUT))
        hosts[h.name] = L.HostFacts(
            netns=h.name in netns,
            veth=h.veth in links,
            addrs=frozenset(addrs),
            dockerd_pid=dockerd,
            sshd_pid=sshd,
            stale_dockerd_pidfile=stale_d,
            stale_sshd_pidfile=stale_s,
            host_key=runner.read_file(f"{h.host_key}.pub") is not None,
            engine=engine,
            ssh_key=ssh_key,
        )
    return L.LabFacts(
        bridge=bridge,
        bridge_addrs=frozenset(bridge_addrs),
        forward_rule=runner.query(L.forward_check_argv(lab.net), timeout=QUERY_TIMEOUT).ok,
        client_key=runner.read_file(f"{lab.client_key}.pub") is not None,
        hosts=hosts,
    )


def recorded(runner: Runner) -> dict | None:
    return L.parse_record(runner.read_file(L.RECORD))


def current(runner: Runner, environ=os.environ) -> L.Lab:
    """The lab that is up (its record in /run/aiia-lab), else an empty lab at the default
    dir."""
    rec = recorded(runner)
    if rec:
        idx = sorted(i for i in (L.host_index(n) for n in rec.get("hosts", [])) if i)
        return L.Lab(rec["dir"], tuple(L.LabHost(k, rec["dir"]) for k in idx))
    return L.Lab(L.lab_dir(environ), ())


# --- lab.up ----------------------------------------------------------------------------------


def _run_steps(runner: Runner, steps: list[L.Step], out) -> None:
    for s in steps:
        if s.skip:
            out(f"-> {s.description}: {s.skip}")
            continue
        out(f"-> {s.description}")
        for c in s.commands:
            if not _dry(runner):  # the printing runner prints the command itself
                out(f"   $ {quote(c.argv)}")
            runner.run(c.argv, check=c.check, timeout=120)


def _tail(runner: Runner, path: str, lines: int = 8) -> str:
    text = _text(runner, path) or ""
    return "\n".join(f"    {line}" for line in text.splitlines()[-lines:])


def _wait(runner: Runner, what: str, check, alive, seconds: float, log: str) -> None:
    """Poll `check` until it passes; fail at once when the daemon died (`alive` is False),
    or after `seconds`, with the end of its log."""
    deadline = time.monotonic() + seconds
    while not check():
        dead = not alive()
        if dead or time.monotonic() > deadline:
            why = "the daemon exited" if dead else f"no answer after {seconds:.0f}s"
            raise OpsError(
                f"{what}: {why}. The end of {log}:\n{_tail(runner, log)}\n"
                "Fix the cause, then rerun `invoke lab.up` (it converges)."
            )
        time.sleep(0.3)


def up(runner: Runner, n: int, environ=os.environ, out=_say, first: int = 1) -> list[dict]:
    """Converge lab hosts first..first+n-1, each with a running sshd and dockerd that answer;
    other hosts of the lab are kept as they are (a test may have stopped one on purpose).
    Returns `describe()` of the converged hosts."""
    n = L.check_count(n)
    first = L.check_first(first, n)
    rec = recorded(runner)
    directory = rec["dir"] if rec else L.lab_dir(environ)
    if rec and rec["dir"] != L.lab_dir(environ):
        out(f"(the lab that is up keeps its state in {directory}; converging that one)")
    wanted = range(first, first + n)
    kept = [i for i in (L.host_index(x) for x in (rec or {}).get("hosts", [])) if i]
    kept = sorted(set(kept) - set(wanted))
    lab = L.Lab(directory, tuple(L.LabHost(k, directory) for k in wanted))
    every = L.Lab(directory, tuple(L.LabHost(k, directory) for k in sorted({*wanted, *kept})))
    if kept:
        out(f"(keeping {', '.join(f'lab{k}' for k in kept)} as they are: "
            "`invoke lab.down` removes all)")  # fmt: skip
    steps = Steps(out=out)
    with steps.step(f"network and keys for {len(lab.hosts)} hosts on {lab.net.bridge}"):
        _run_steps(runner, L.plan_network(lab, gather(runner, lab, probe=False)), out)
    with steps.step("sshd and dockerd configs, authorized key, known_hosts"):
        host_keys = {h.name: _text(runner, f"{h.host_key}.pub") or "" for h in every.hosts}
        client_pub = _text(runner, f"{lab.client_key}.pub") or ""
        runner.write_file(lab.authorized_keys, client_pub, mode=0o600)
        runner.write_file(lab.known_hosts, L.known_hosts_text(every, host_keys), mode=0o644)
        for h in lab.hosts:
            runner.write_file(h.sshd_config, L.sshd_config_text(h, lab), mode=0o644)
            runner.write_file(h.daemon_json, L.daemon_json_text(h), mode=0o644)
        runner.write_file(L.RECORD, L.record_text(directory, [h.name for h in every.hosts]))
    with steps.step("sshd and dockerd in every host"):
        _run_steps(runner, L.plan_daemons(lab, gather(runner, lab, probe=False)), out)
    with steps.step("every sshd and engine answers"):
        if _dry(runner):
            out(
                "   (dry run: would wait until each sshd offers its host key and each engine "
                "answers)"
            )
        else:
            for h in lab.hosts:
                _wait_host(runner, h, host_keys.get(h.name, ""))
    return [] if _dry(runner) else describe(lab, gather(runner, lab))


def _wait_host(runner: Runner, h: L.LabHost, host_pub: str) -> None:
    want = " ".join(host_pub.split()[:2])

    def ssh_ok() -> bool:
        return L.parse_keyscan(runner.query(L.keyscan_argv(h), timeout=5)) == want

    def engine_ok() -> bool:
        return runner.query(L.engine_ping_argv(h), timeout=5).ok

    def sshd_alive() -> bool:
        return live_pid(runner, h.sshd_pidfile, "sshd")[0] is not None

    def dockerd_alive() -> bool:  # dockerd writes its pidfile a moment after it starts
        pid, stale = live_pid(runner, h.dockerd_pidfile, "dockerd")
        return pid is not None or (not stale and time.monotonic() - started < 10)

    started = time.monotonic()
    _wait(runner, f"{h.name}: sshd on {h.address}:22", ssh_ok, sshd_alive, SSHD_WAIT, h.sshd_log)
    _wait(runner, f"{h.name}: dockerd on {h.socket}", engine_ok, dockerd_alive, ENGINE_WAIT,
          h.dockerd_log)  # fmt: skip


# --- lab.status ------------------------------------------------------------------------------


def describe(lab: L.Lab, f: L.LabFacts) -> list[dict]:
    rows = []
    for h in lab.hosts:
        hf = f.hosts.get(h.name, L.HostFacts())
        rows.append(
            {
                "name": h.name,
                "address": h.address,
                "ssh": h.ssh_spec,
                "ssh_user": L.SSH_USER,
                "ssh_port": 22,
                "key": lab.client_key,
                "known_hosts": lab.known_hosts,
                "docker_host": h.docker_host,
                "socket": h.socket,
                "netns": hf.netns,
                "sshd_pid": hf.sshd_pid,
                "dockerd_pid": hf.dockerd_pid,
                "engine": hf.engine,
                "ssh_answers": hf.ssh_key is not None,
                "up": bool(hf.netns and hf.engine and hf.ssh_key),
            }
        )
    return rows


def status(runner: Runner, environ=os.environ) -> dict:
    lab = current(runner, environ)
    f = gather(runner, lab)
    return {
        "dir": lab.dir,
        "bridge": lab.net.bridge if f.bridge else None,
        "forward_rule": f.forward_rule,
        "hosts": describe(lab, f),
    }


# --- lab.down --------------------------------------------------------------------------------


def _stop_all(runner: Runner, pids: dict[int, str], out) -> None:
    """TERM every process at once (engines shut down in parallel), wait, KILL what is left."""
    for pid, what in pids.items():
        if not _dry(runner):
            out(f"   $ {quote(L.kill_argv(pid))}   # {what}")
        runner.run(L.kill_argv(pid), check=False)
    if _dry(runner):
        return
    deadline = time.monotonic() + STOP_WAIT
    left = dict(pids)
    while left:
        left = {p: w for p, w in left.items() if runner.read_file(f"/proc/{p}/comm") is not None}
        if left and time.monotonic() > deadline:
            for pid, what in left.items():
                out(
                    f"   {what} still runs after {STOP_WAIT:.0f}s: "
                    f"$ {quote(L.kill_argv(pid, 'KILL'))}"
                )
                runner.run(L.kill_argv(pid, "KILL"), check=False)
            time.sleep(0.5)
            return
        time.sleep(0.2)


def down(runner: Runner, environ=os.environ, out=_say, names: list[str] | None = None) -> list[str]:
    """Remove every trace of the lab (or only of hosts `names`), found by its own names and
    pidfiles, and only those; the bridge, rule and keys go with the last host. Returns what
    was removed (one line each)."""
    rec = recorded(runner)
    directory = rec["dir"] if rec else L.lab_dir(environ)
    netns = L.parse_netns(runner.query(L.NETNS_LIST, timeout=QUERY_TIMEOUT))
    links = L.parse_links(runner.query(L.LINKS, timeout=QUERY_TIMEOUT))
    pidfiles = set(runner.query(("ls", "-1", L.RUN_DIR), timeout=QUERY_TIMEOUT).stdout.split())
    hosts = L.lab_hosts_found(
        directory, netns, links, {p for p in pidfiles if p.endswith(".pid")},
        (rec or {}).get("hosts", []),
    )  # fmt: skip
    if names is not None:
        unknown = sorted(set(names) - {h.name for h in hosts})
        if unknown:
            raise OpsError(f"no lab host {', '.join(unknown)} is up; nothing was changed "
                           "(`invoke lab.status` lists them)")  # fmt: skip
        others = [h.name for h in hosts if h.name not in names]
        hosts = [h for h in hosts if h.name in names]
    else:
        others = []
    removed: list[str] = []
    daemons: dict[int, str] = {}
    for h in hosts:
        for pidfile, comm in ((h.dockerd_pidfile, "dockerd"), (h.sshd_pidfile, "sshd")):
            pid, _ = live_pid(runner, pidfile, comm)
            if pid:
                daemons[pid] = f"{h.name}'s {comm}"
    if daemons:
        out("-> stop the lab's daemons")
        _stop_all(runner, daemons, out)
        removed += [f"{what} (pid {pid})" for pid, what in daemons.items()]
    for h in hosts:
        out(f"-> {h.name}")
        if h.name in netns:  # whatever else runs in the namespace is the lab's too
            pids = L.parse_pids(runner.query(L.ns_pids_argv(h), timeout=QUERY_TIMEOUT))
            rest = {p: f"process {p} in {h.name}" for p in pids if p not in daemons}
            _stop_all(runner, rest, out)
            removed += list(rest.values())
        mounts = L.parse_mounts(runner.read_file(L.PROC_MOUNTS), (h.exec_root, h.data_root))
        for argv in L.remove_host_argvs(h, mounts, links, netns):
            if not _dry(runner):
                out(f"   $ {quote(argv)}")
            runner.run(argv, check=argv[0] != "umount")
        removed.append(L.describe_host(h))
    if others:  # the rest of the lab still uses the bridge, the rule and the keys
        if not _dry(runner):
            runner.write_file(L.RECORD, L.record_text(directory, others))
        return removed
    lab_bridge = L.NET.bridge in links
    rule = runner.query(L.forward_check_argv(), timeout=QUERY_TIMEOUT).ok
    teardown = L.Teardown(hosts, lab_bridge, rule, directory)
    out("-> shared")
    for argv in L.remove_shared_argvs(teardown):
        if not _dry(runner):
            out(f"   $ {quote(argv)}")
        runner.run(argv)
    if teardown.forward_rule:
        removed.append(f"iptables rule {quote(L.forward_rule())}")
        # Inserted twice by hand or by two racing runs: remove every copy.
        for _ in range(10):
            if _dry(runner) or not runner.query(L.forward_check_argv(), timeout=10).ok:
                break
            runner.run(("iptables", "-D", *L.forward_rule()))
    if lab_bridge:
        removed.append(f"bridge {L.NET.bridge}")
    removed.append(f"keys and known_hosts in {directory}")
    for d in (directory, L.RUN_DIR):
        runner.run(("rmdir", d), check=False)  # only when empty: nothing else is removed
    return removed


# --- images and SSH for other procedures -----------------------------------------------------


@dataclass(frozen=True)
class Loaded:
    host: str
    result: str  # "loaded" or "present"
    seconds: float


def load_image(
    runner: Runner, image: str, names: list[str] | None = None, out=_say
) -> list[Loaded]:
    """`docker save IMAGE | docker -H unix:///run/aiia-lab-labK.sock load` for each lab host
    (all, or `names`) whose engine lacks that image id."""
    lab = current(runner)
    if not lab.hosts:
        raise OpsError("no lab is up: run `invoke lab.up --hosts N` first")
    wanted = {h.name: h for h in lab.hosts}
    unknown = sorted(set(names or []) - set(wanted))
    if unknown:
        raise OpsError(f"no lab host {', '.join(unknown)} (the lab has {', '.join(wanted)})")
    local = runner.query(L.local_image_argv(image), timeout=30)
    if not local.ok:
        raise OpsError(
            f"image {image!r} is not in this machine's engine: build it (`invoke build`) or "
            "name one `docker images` lists"
        )
    done = []
    for name in names or list(wanted):
        h = wanted[name]
        have = runner.query(L.image_present_argv(image, h), timeout=30)
        if have.ok and have.stdout.strip() == local.stdout.strip():
            out(f"-> {name}: {image} present")
            done.append(Loaded(name, "present", 0.0))
            continue
        save, load = L.load_argvs(image, h)
        out(f"-> {name}: $ {quote(save)} | {quote(load)}")
        t0 = time.monotonic()
        runner.pipe_from_local(save, load, timeout=900)
        done.append(Loaded(name, "loaded", time.monotonic() - t0))
    return done


def runner_for_host(name: str, runner: Runner | None = None, **options):
    """An `SSHRunner` to lab host `name`, with the lab's key and known_hosts."""
    from aiia_ops.host.runners import LocalRunner
    from aiia_ops.host.ssh import SSHRunner

    lab = current(runner or LocalRunner())
    for h in lab.hosts:
        if h.name == name:
            return SSHRunner(
                h.ssh_spec,
                key_filename=lab.client_key,
                known_hosts=lab.known_hosts,
                host=h.name,
                **options,
            )
    raise OpsError(f"no lab host {name!r} is up (`invoke lab.status` lists them)")
