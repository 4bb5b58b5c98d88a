"""The lab's daemon plan (commands/lab.py): what `invoke lab.up` runs for a host."""

from aiia_ops.commands import lab as L


def _plan(**host_facts):
    lab = L.Lab("/var/lib/aiia-lab", (L.LabHost(3, "/var/lib/aiia-lab"),))
    facts = L.LabFacts(hosts={"lab3": L.HostFacts(**host_facts)})
    return {step.name: step for step in L.plan_daemons(lab, facts)}


def test_sshd_gets_its_privilege_separation_dir_before_it_starts():
    # A fresh machine has no /run/sshd (only the machine's own sshd service makes it), and
    # sshd exits 255 without it: lab.up makes it first.
    argvs = [list(c.argv) for c in _plan()["lab3.sshd"].commands]
    assert argvs[0] == ["mkdir", "-p", "-m", "755", "/run/sshd"]
    assert "/usr/sbin/sshd" in argvs[-1]


def test_a_running_sshd_is_left_alone():
    step = _plan(sshd_pid=42)["lab3.sshd"]
    assert step.commands == () and "42" in step.skip
