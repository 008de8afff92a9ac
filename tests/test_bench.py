"""The benchmark runner end to end on a very short run: every backend, one lab, the three report files.

Not a performance test: it proves the runner brings every backend up and down in one lab, measures what
it can, records a failing backend instead of stopping, and writes the report. Every backend must produce
numbers: a backend that fails fails this test.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from flannel_ebpf.bench.report import BACKENDS, METRIC_KEYS
from flannel_ebpf.bench.runner import Durations, percentile, udp_received_pps

pytestmark = pytest.mark.lab

TINY = Durations(
    tcp_seconds=1,
    udp_seconds=1,
    ping_count=40,
    idle_ping_count=10,
    idle_ping_interval=0.005,
    cpu_baseline_seconds=0.3,
    ready_timeout=45,
    rounds=1,
)
MUST_WORK = BACKENDS


def test_percentile_interpolates_between_ranks():
    assert percentile([3.0], 99) == 3.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert percentile(list(map(float, range(101))), 99) == 99.0
    with pytest.raises(ValueError):
        percentile([], 50)


def test_udp_rate_counts_what_arrived():
    report = {"end": {"sum": {"packets": 1000, "lost_packets": 250, "seconds": 2.0}}}
    assert udp_received_pps(report) == 375.0


def _lab_tools_missing() -> str | None:
    if os.geteuid() != 0:
        return "needs root"
    for tool in ("ip", "etcd", "etcdctl", "ping", "iperf3", "tc"):
        if shutil.which(tool) is None:
            return f"needs {tool}"
    return None


@pytest.mark.skipif(_lab_tools_missing() is not None, reason=str(_lab_tools_missing()))
def test_short_run_of_every_backend_writes_the_report(tmp_path: Path):
    from flannel_ebpf.bench.runner import BenchOptions, run_bench

    lines: list[str] = []
    run = run_bench(
        BenchOptions(backends=BACKENDS, durations=TINY, out_dir=tmp_path, stem="t"),
        progress=lambda m: (lines.append(m), print(m)),
    )
    files = run.files
    assert files.markdown.exists() and files.json.exists() and files.png is not None and files.png.exists()
    assert files.png.stat().st_size > 10_000
    assert files.markdown == tmp_path / "t.md"

    doc = json.loads(files.json.read_text())
    meta = doc["metadata"]
    assert meta["kernel"] == os.uname().release and meta["cpus"] == os.cpu_count() and meta["date"]
    assert "schedstat" in meta["cpu"] and "ping" in meta["rtt"]
    by_name = {b["name"]: b for b in doc["backends"]}
    assert set(by_name) == set(BACKENDS)
    for name, b in by_name.items():
        numbers = [b[k] for k in METRIC_KEYS if b[k] is not None]
        # Either it worked (numbers, no error) or it failed with a reason: never silently empty.
        assert (b["error"] is None and numbers) or (b["error"] and not numbers), (name, b)
    for name in MUST_WORK:
        b = by_name[name]
        assert b["error"] is None, (name, b["error"])
        assert b["tcp1_gbps"] > 0 and b["tcp4_gbps"] > 0, b
        assert b["udp_small_pps"] > 0 and 0 < b["rtt_p50_ms"] <= b["rtt_p99_ms"] and b["rtt_idle_p50_ms"] > 0, b
    for name in BACKENDS:
        if name != "none":
            assert by_name[name]["cpu_s_per_gbit"] > 0, name
    assert "DECAP_L4_UDP" in meta["kernel_features"]  # the eBPF agents' kernel probe is in the report
    # The ratio tables are there, against vxlan and (if it ran) the TUN path.
    assert doc["ratios"]["vs_vxlan"]["vxlan"]["tcp1_gbps"] == pytest.approx(1.0)
    assert "| kernel vxlan |" in files.markdown.read_text()
    # One progress line per step, for every backend.
    for name in BACKENDS:
        assert any(f"] {name}: " in line for line in lines), name
    # Every backend went away cleanly: its agents stopped on SIGTERM, `down` succeeded, and the bench's scrub
    # after it (which notes whatever it has to remove) found nothing left behind.
    print("notes:", meta.get("notes", "(none)"))
    teardown = ("left behind after `down`", "on SIGTERM", "`down` on ", ": stopping ")
    assert not [note for note in run.notes if any(what in note for what in teardown)], run.notes


@pytest.mark.skipif(_lab_tools_missing() is not None, reason=str(_lab_tools_missing()))
def test_a_failing_backend_is_recorded_and_the_run_goes_on(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """An agent that cannot start (here: a flag value it refuses) costs its backend, not the run."""
    from flannel_ebpf.bench import runner

    broken = runner.BackendSpec("udp-ebpf-xdp", "udp", ("--udp-decap", "no-such-decap"))
    monkeypatch.setitem(runner.SPECS, "udp-ebpf-xdp", broken)
    run = runner.run_bench(
        runner.BenchOptions(backends=("udp-ebpf-xdp", "host-gw"), durations=TINY, out_dir=tmp_path, stem="f"),
        progress=print,
    )
    by_name = {r.name: r for r in run.results}
    assert by_name["udp-ebpf-xdp"].error and "h1" in by_name["udp-ebpf-xdp"].error
    assert by_name["host-gw"].ok and (by_name["host-gw"].tcp1_gbps or 0) > 0
    doc = json.loads(run.files.json.read_text())
    errors = {b["name"]: b["error"] for b in doc["backends"]}
    assert errors["udp-ebpf-xdp"] and errors["host-gw"] is None
    assert errors["none"] == "not run"  # the report lists every backend, even those not asked for
