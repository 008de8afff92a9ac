"""The soak's logic without a lab (flannel_ebpf.bench.soak): its fault schedule is replayable from its seed
and every run, short or long, has each kind of fault the issue asks for, in an order that can be carried
out; its verdict flags a lost ping, and RSS, fd or thread growth past the tolerances after each agent
process's own warm-up."""

from __future__ import annotations

import pytest

from flannel_ebpf.bench.soak import (
    INITIAL_HOSTS,
    NEW_HOST,
    STABLE_HOSTS,
    ProcSample,
    Segment,
    make_schedule,
    warmup_seconds,
)

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


def judged(segments=(), procs=(), started_at=None, duration=180.0):
    """A Soak's verdict on made-up measurements (no lab: evaluate() only reads what was recorded)."""
    from flannel_ebpf.bench.soak import Removed, Soak

    soak = Soak(lambda *a, **k: None, "udp", duration / 60, 28)
    soak.live = ["h1", "h2"]
    soak.segments = list(segments) or [Segment("h1", "h2", 0, 10, 250, 250), Segment("h2", "h1", 0, 10, 250, 250)]
    soak.report.procs = list(procs)
    soak.started_at = started_at or {}
    soak.report.removed = Removed("h3", "10.5.3.0/24", "192.168.50.13", "", [1], 12.0, 0.3)
    soak.evaluate()
    return soak.report.violations


def sample(at, rss=70_000, fds=26, threads=12, pid=100):
    return ProcSample(at, "h1", pid, rss, fds, threads)


def test_clean_measurements_pass():
    procs = [sample(30), sample(60), sample(90, rss=71_000, fds=30, threads=13), sample(180, rss=76_000)]
    assert judged(procs=procs, started_at={100: 0.0}) == []


def test_one_lost_ping_is_a_violation_naming_the_pair_and_the_events():
    lossy = [Segment("h1", "h2", 20.0, 30.5, 251, 250), Segment("h2", "h1", 0, 10, 250, 250)]
    (violation,) = judged(segments=lossy)
    assert "1 of 251 pings lost h1->h2" in violation


@pytest.mark.parametrize(
    ("later", "what"),
    [
        (sample(120, rss=77_100), "RSS"),  # +10.1% of the 60 s baseline
        (sample(120, rss=62_900), "RSS"),  # -10.1%
        (sample(120, fds=26 + 9), "fds"),
        (sample(120, threads=12 + 5), "threads"),
    ],
)
def test_growth_past_the_tolerance_after_the_baseline_is_a_violation(later, what):
    # the baseline is the first sample once the process has run the warm-up (a third of 3 minutes)
    (violation,) = judged(procs=[sample(30, rss=40_000), sample(60), later], started_at={100: 0.0})
    assert "h1 agent 100: " in violation and what.lower() in violation.lower()


def test_a_process_started_late_is_judged_from_its_own_warm_up():
    # restarted at 100 s: its baseline is its sample at 160 s or later, not the one at 120 s
    procs = [sample(120, rss=50_000, pid=7), sample(180, rss=70_000, pid=7)]
    assert judged(procs=procs, started_at={7: 100.0}) == []
