"""The soak's fault schedule (flannel_ebpf.bench.soak.make_schedule): replayable from its seed, and every
run, short or long, has each kind of fault the issue asks for, in an order that can be carried out."""

from __future__ import annotations

import pytest

from flannel_ebpf.bench.soak import INITIAL_HOSTS, NEW_HOST, STABLE_HOSTS, make_schedule, warmup_seconds

REQUIRED = {"agent-kill", "etcd-stop", "quorum-loss", "host-remove", "host-add"}


@pytest.mark.parametrize("minutes", [3, 60])
def test_same_seed_same_schedule_other_seed_other_schedule(minutes):
    assert make_schedule(28, minutes * 60) == make_schedule(28, minutes * 60)
    assert make_schedule(28, minutes * 60) != make_schedule(29, minutes * 60)


@pytest.mark.parametrize("minutes", [3, 60])
@pytest.mark.parametrize("seed", range(200))
def test_every_schedule_can_be_carried_out(seed, minutes):
    duration = minutes * 60
    events = make_schedule(seed, duration)
    kinds = [e.kind for e in events]
    assert set(kinds) >= REQUIRED
    assert kinds.count("quorum-loss") == kinds.count("host-remove") == kinds.count("host-add") == 1
    remove, add = kinds.index("host-remove"), kinds.index("host-add")
    assert remove + 1 < add, "another fault happens while the removed host is gone"
    removed = events[remove].target
    assert removed in INITIAL_HOSTS and removed not in STABLE_HOSTS and events[add].target == NEW_HOST
    alive = set(INITIAL_HOSTS)
    for e in events:
        assert 0 < e.at < duration
        if e.kind == "agent-kill":
            assert e.target in alive and e.target not in STABLE_HOSTS and 1 <= e.hold <= 5
        elif e.kind == "etcd-stop":
            assert e.target in {"1", "2", "3"} and 5 <= e.hold <= 20 and e.signal in {"TERM", "KILL"}
        elif e.kind == "quorum-loss":
            assert len(set(e.target.split("+"))) == 2 and e.hold == 15
        elif e.kind == "host-remove":
            alive.discard(e.target)
        elif e.kind == "host-add":
            alive.add(e.target)
    assert [e.at for e in events] == sorted(e.at for e in events)
    # the planned faults (with their holds) fit in the run, leaving its last part quiet
    last = events[-1]
    assert last.at + last.hold < duration - 20


def test_an_hour_has_many_faults_and_a_short_run_a_third_of_warm_up():
    assert len(make_schedule(28, 3600)) > 60
    assert warmup_seconds(3600) == 300 and warmup_seconds(180) == 60
