"""ssl-renew killed mid-way (issue #13): nginx keeps a whole pair, the next run finishes.

The pair itself goes in atomically (services/certbot/aiia-install-cert: a new version
directory, then one rename of the live link; tested with the image). What a kill can
still leave is an installed pair nginx has not loaded yet, and a certbot one-off
container: the next run reloads nginx (after nginx -t) and removes the container.
"""

from __future__ import annotations

import json
import signal

import pytest

from aiia_ops.commands.argv import Result
from aiia_ops.flows import tls as renewal
from aiia_ops.host.signals import Interrupted
from tests.unit.test_tls import LE, PEBBLE_X509, STACK, FakeHost, host_rules
from tests.unit.test_tls import flow as flow  # the fixture


class Host(FakeHost):
    """FakeHost whose files are real (the renewal's journal is read back), and which can
    be killed when a command containing `kill_at` starts."""

    def __init__(self, rules, kill_at: str | None = None):
        super().__init__(rules)
        self.kill_at = kill_at

    def read_file(self, path):
        return self.local.read_file(path)

    def _execute(self, argv, *, input, env, timeout, stream):
        if self.kill_at and self.kill_at in " ".join(argv):
            self.commands.append(" ".join(argv))
            raise Interrupted(signal.SIGTERM)
        return super()._execute(argv, input=input, env=env, timeout=timeout, stream=stream)


@pytest.mark.parametrize("kill_at", ["aiia-install-cert install", "nginx -s reload"])
def test_a_renewal_killed_after_its_install_is_reloaded_by_the_next_run(flow, kill_at):
    killed = Host(host_rules(), kill_at=kill_at)
    with pytest.raises(Interrupted):
        renewal.renew(killed, STACK, flow, directory=LE)
    assert json.loads((flow.root / "journal" / "renew.json").read_text()) == {
        "pending_reload": ["eduaiia.com"]
    }
    assert not (flow.root / "locks" / renewal.RENEW_LOCK).exists()  # released on the signal
    if kill_at.startswith("aiia-install-cert"):  # the one-off's container is removed too
        after = killed.commands[killed.commands.index(killed.ran(kill_at)[0]) + 1]
        assert after.startswith("docker rm --force")

    # The next run: the pair is installed and valid, so nothing is due; nginx reloads it.
    again = Host(host_rules(prod_x509=PEBBLE_X509))
    assert renewal.renew(again, STACK, flow, directory=LE) == {}
    order = [again.commands.index(c) for c in (again.ran("nginx -t")[0],
                                               again.ran("nginx -s reload")[0])]  # fmt: skip
    assert order == sorted(order)
    assert not again.ran("certbot certonly")
    assert not (flow.root / "journal" / "renew.json").exists()

    # And the one after: nothing pending, nothing due, no docker command at all.
    third = Host(host_rules(prod_x509=PEBBLE_X509))
    renewal.renew(third, STACK, flow, directory=LE)
    assert not third.ran("docker")


def test_a_pending_pair_nginx_refuses_is_rolled_back_not_loaded(flow):
    killed = Host(host_rules(), kill_at="nginx -s reload")
    with pytest.raises(Interrupted):
        renewal.renew(killed, STACK, flow, directory=LE)
    refusing = Host(
        [("nginx -t", Result([], 1, "", "nginx: [emerg] bad key")), *host_rules(PEBBLE_X509)]
    )
    renewal.renew(refusing, STACK, flow, directory=LE)
    assert refusing.ran("aiia-install-cert rollback")
    assert not refusing.ran("nginx -s reload")
    assert not (flow.root / "journal" / "renew.json").exists()


def test_a_successful_renewal_leaves_no_journal(flow):
    host = Host(host_rules())
    assert list(renewal.renew(host, STACK, flow, directory=LE)) == ["eduaiia.com"]
    assert not (flow.root / "journal" / "renew.json").exists()


def test_the_renewal_reloads_nginx_under_the_host_wide_switch_lock(flow):
    """Like every deploy's render + reload (flows/switch.py): nginx -t and the reload of a
    renewal never interleave with a deploy's switch."""
    from aiia_ops.commands import journal as jn

    killed = Host(host_rules(), kill_at="nginx -s reload")
    with pytest.raises(Interrupted):
        renewal.renew(killed, STACK, flow, directory=LE)
    switch = str(flow.root / "locks" / jn.SWITCH_LOCK)
    assert killed.ran(f"mkdir {switch}")  # the killed run held it at its reload ...
    assert not (flow.root / "locks" / jn.SWITCH_LOCK).exists()  # ... and let it go
    again = Host(host_rules(prod_x509=PEBBLE_X509))
    renewal.renew(again, STACK, flow, directory=LE)
    steps = (f"mkdir {switch}", "nginx -t", "nginx -s reload", f"rm -rf {switch}")
    at = {c: again.commands.index(again.ran(c)[0]) for c in steps}
    assert list(at.values()) == sorted(at.values()), again.commands
