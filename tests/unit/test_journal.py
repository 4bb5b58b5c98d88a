"""Issue #13: the deploy journal, the switch state, and the reconcile table (pure)."""

from __future__ import annotations

import itertools

import pytest

from aiia_ops.commands.app import Running
from aiia_ops.commands.journal import (
    STEPS,
    Action,
    Journal,
    SwitchState,
    parse_journal,
    parse_switch,
    reconcile,
    switched_upstreams,
)

F, N = "aiia_django_prod", "aiia_django_prod-next"
A, B = "172.20.0.21", "172.20.0.22"


def final(running=True, release="old", address=A):
    return Running(F, running, release, address, "healthy")


def nxt(running=True, release="new", address=B):
    return Running(N, running, release, address, "healthy")


def kinds(plan):
    return [(a.kind, a.name, a.to) for a in plan.actions]


# -- the journal and the switch state ------------------------------------------------------


def test_a_journal_round_trips_and_moves_step_by_step():
    j = Journal("prod", "deploy", "abc", "lock", N, B, F, A, "old", pid=42)
    j2 = j.at("switch", switched=True)
    assert (j.step, j.switched, j2.step, j2.switched) == ("lock", False, "switch", True)
    assert parse_journal(j2.to_json()) == j2
    assert parse_journal(j2.at("done").to_json()).finished
    with pytest.raises(ValueError):
        j.at("nonsense")


@pytest.mark.parametrize("data", [None, b"", b"{", b"[]", b'{"env": "prod"}', b'{"step": "x"}'])
def test_an_unreadable_or_partial_journal_is_none_and_the_engine_decides(data):
    assert parse_journal(data) is None


def test_a_journal_from_a_newer_version_with_extra_keys_is_read():
    text = Journal("prod", "deploy", "abc", "start", N).to_json().replace("{", '{"x": 1,', 1)
    assert parse_journal(text).step == "start"


def test_switch_state_round_trips_and_refuses_garbage():
    s = SwitchState("prod", f"{B}:8000", "new", N, "t")
    assert parse_switch(s.to_json()) == s and s.address == B
    for bad in (None, b"", b"nope", b'{"env": "prod"}', b'{"env": "prod", "upstream": 5}'):
        assert parse_switch(bad) is None


def test_upstreams_come_from_every_recorded_switch_state_not_from_the_engine():
    recorded = {"prod": SwitchState("prod", f"{B}:8000"), "staging": None}
    engine = {"prod": f"{A}:8000", "staging": "172.20.0.31:8000"}
    # prod: recorded (the engine's final-name container is the old one mid-deploy)
    assert switched_upstreams(["prod", "staging"], recorded, engine) == {
        "prod": f"{B}:8000",
        "staging": "172.20.0.31:8000",
    }
    assert switched_upstreams(["prod", "staging"], {}, {}) == {}


def test_the_steps_are_the_issues_boundaries_in_order():
    issue = "lock backup image migrate start health switch reload drain retire record"
    for a, b in itertools.pairwise(issue.split()):
        assert STEPS.index(a) < STEPS.index(b)


# -- reconcile: the table -------------------------------------------------------------------


def test_killed_before_the_switch_the_next_container_is_removed_the_old_one_kept():
    plan = reconcile(F, final(), nxt(), served=A)
    assert kinds(plan) == [("remove", N, "")]  # never served: no drain needed
    assert plan.serves.release == "old"


def test_a_stopped_leftover_next_is_removed_without_a_stop():
    assert kinds(reconcile(F, final(), nxt(running=False), served=A)) == [("remove", N, "")]


def test_killed_after_the_switch_the_served_next_is_adopted_never_removed():
    plan = reconcile(F, final(), nxt(), served=B)
    assert kinds(plan) == [("stop", F, "30"), ("remove", F, ""), ("rename", N, F)]
    assert plan.serves == Running(F, True, "new", B, "healthy")
    assert any("adopting" in n for n in plan.notes)


def test_killed_after_the_old_one_stopped_the_next_is_adopted():
    plan = reconcile(F, final(running=False), nxt(), served=B)
    assert kinds(plan) == [("remove", F, ""), ("rename", N, F)]


def test_killed_after_the_old_one_was_removed_only_the_rename_is_left():
    assert kinds(reconcile(F, None, nxt(), served=B)) == [("rename", N, F)]


def test_the_bug_of_the_issue_a_failure_in_retire_never_points_nginx_at_a_stopped_release():
    # The same run failed after stopping the old release: switching back would give 502s.
    plan = reconcile(F, final(running=False), nxt(), served=B, prefer_old=True)
    assert ("switch", F, A) not in kinds(plan)
    assert ("remove", N, "") not in kinds(plan) and ("stop", N, "30") not in kinds(plan)
    assert plan.serves.release == "new"


def test_a_failure_after_the_switch_goes_back_to_the_old_release_while_it_runs():
    plan = reconcile(F, final(), nxt(), served=B, prefer_old=True)
    assert kinds(plan) == [("switch", F, A), ("stop", N, "30"), ("remove", N, "")]
    assert plan.actions[0].release == "old"


def test_served_address_stopped_and_the_other_runs_nginx_goes_to_the_one_that_runs():
    plan = reconcile(F, final(running=False), nxt(), served=A)
    assert kinds(plan) == [("switch", N, B), ("remove", F, ""), ("rename", N, F)]
    plan = reconcile(F, final(), nxt(running=False), served=B)
    assert kinds(plan) == [("switch", F, A), ("remove", N, "")]


def test_nothing_runs_the_final_release_is_started_before_nginx_is_pointed_at_it():
    plan = reconcile(F, final(running=False), nxt(running=False), served=B)
    assert kinds(plan) == [("start", F, ""), ("switch", F, A), ("remove", N, "")]
    assert kinds(reconcile(F, None, nxt(running=False), served=None)) == [
        ("start", N, ""),
        ("switch", N, B),
        ("rename", N, F),
    ]


def test_a_renamed_release_already_served_needs_nothing():
    # The rename happened but the journal was not updated: served is the final name.
    plan = reconcile(F, final(release="new", address=B), None, served=B)
    assert plan.actions == () and not plan.changes


def test_unknown_served_address_keeps_the_final_release_and_records_a_switch():
    plan = reconcile(F, final(), nxt(), served=None)
    assert kinds(plan) == [("switch", F, A), ("remove", N, "")]


def test_no_container_at_all_is_an_empty_plan():
    plan = reconcile(F, None, None, served=A)
    assert plan.actions == () and plan.serves is None


@pytest.mark.parametrize(
    "f_state,n_state,served,prefer_old",
    list(
        itertools.product(
            [None, True, False], [None, True, False], [A, B, None, "10.9.9.9"], [True, False]
        )
    ),
)
def test_invariants_over_every_combination(f_state, n_state, served, prefer_old):
    """Whatever the engine shows: nginx is only pointed at a container that runs (or is
    started first); the one that serves at the end is never stopped nor removed; at most
    one release is left, under the final name."""
    f = None if f_state is None else final(running=f_state)
    n = None if n_state is None else nxt(running=n_state)
    plan = reconcile(F, f, n, served, prefer_old=prefer_old)
    if f is None and n is None:
        assert plan.serves is None and not plan.actions
        return
    started = {a.name for a in plan.actions if a.kind == "start"}
    running = {c.name for c in (f, n) if c and c.running} | started
    keep = next(c for c in (f, n) if c and c.address == plan.serves.address)
    for i, a in enumerate(plan.actions):
        if a.kind == "stop":  # only what served requests is drained: never a fresh -next
            assert a.name == F or next(c for c in (f, n) if c.name == a.name).address == served
        if a.kind == "switch":
            assert a.name in running and a.name == keep.name
            assert all(b.kind != "start" for b in plan.actions[i:])  # started first
        if a.kind in ("stop", "remove"):
            assert a.name != keep.name
    # nginx serves the kept address at the end
    switches = [a for a in plan.actions if a.kind == "switch"]
    assert (switches[-1].to if switches else served) == keep.address
    # the served-and-running one wins unless the old one runs and we go back
    current = next((c for c in (f, n) if c and c.address == served), None)
    if current and current.running and not (prefer_old and f and f.running):
        assert keep is current
    # the final name at the end
    other = n if keep is f else f
    if other:
        assert Action("remove", other.name) in plan.actions
    if keep is n:
        assert plan.actions[-1] == Action("rename", N, F)
