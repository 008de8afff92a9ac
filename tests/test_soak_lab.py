"""Issue 28, part 3: `make soak` in three minutes (CI's version of the hour-long run).

The same runner and schedule generator as `make soak` (flannel_ebpf.bench.soak): six hosts on a
three-member etcd cluster, every ordered pair of containers flooding, while the seeded schedule kills -9
and restarts agents, stops etcd members (once two, quorum lost for 15 s), removes a host with `down
--release-lease` and adds a new one, all with a 60 s lease TTL. Checks every 30 s and at the end.
Asserted: no ping lost on any pair, each agent's RSS within 10% of its value after a third of the run
(fds and threads flat), nothing left of the removed host, and every fault of the schedule carried out.
The report (markdown + JSON) goes to FLANNEL_EBPF_SOAK_OUT (default: the test's tmp dir) and is printed.

On udp eBPF, about 3.6 minutes (CI's time is bounded); FLANNEL_EBPF_SOAK_BACKENDS=udp,vxlan adds vxlan.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from flannel_ebpf.bench.soak import Soak, render, write_report
from tests.helpers import backends_from_env

pytestmark = pytest.mark.lab

SEED = 28
MINUTES = 3.0
CHECK_EVERY = 30.0
BACKENDS = backends_from_env("FLANNEL_EBPF_SOAK_BACKENDS")


@pytest.mark.parametrize("backend", BACKENDS)
def test_three_minutes_of_churn(lab_factory, backend, tmp_path):
    soak = Soak(lab_factory, backend, MINUTES, SEED, CHECK_EVERY, say=lambda m: print(m, flush=True))
    report = soak.run()
    stem = write_report(report, Path(os.environ.get("FLANNEL_EBPF_SOAK_OUT", tmp_path)))
    print(render(report))
    print(f"written: {stem}.md, {stem}.json")

    assert [e["kind"] for e in report.events] == [e.kind for e in soak.schedule]
    assert not [e for e in report.events if e["notes"].startswith("FAILED")]
    assert report.removed is not None and report.removed.clean_after is not None
    assert len(report.pairs) >= 30 and all(p["sent"] > 100 for p in report.pairs.values())
    assert sum(p["lost"] for p in report.pairs.values()) == 0, report.violations
    assert report.violations == []
