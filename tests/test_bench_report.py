"""The benchmark report: pure, no network. Files are produced, every backend is present, failures show."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest

from flannel_ebpf.bench.report import (
    BACKENDS,
    BackendResult,
    RunMetadata,
    load_results,
    main,
    normalize,
    ratios,
    render_markdown,
    report_json,
    write_report,
)

META = RunMetadata(kernel="6.18.0-test", cpus=2, date="2025-01-01T00:00:00+00:00", extra={"underlay_mtu": "1500"})


def sample_results() -> list[dict]:
    return [
        {"name": "udp-ebpf-xdp", "tcp1_gbps": 15.0, "tcp4_gbps": 18.0, "udp_small_pps": 900_000,
         "rtt_p50_ms": 0.05, "rtt_p99_ms": 0.09, "cpu_s_per_gbit": 0.10},
        {"name": "udp-ebpf-peer", "error": "XDP not supported | here\nsecond line"},
        {"name": "udp-tun", "tcp1_gbps": 0.5, "tcp4_gbps": 0.6, "udp_small_pps": 60_000,
         "rtt_p50_ms": 0.30, "rtt_p99_ms": 0.80, "cpu_s_per_gbit": 4.0},
        {"name": "vxlan", "tcp1_gbps": 12.5, "tcp4_gbps": 14.0, "udp_small_pps": 800_000,
         "rtt_p50_ms": 0.05, "rtt_p99_ms": 0.10, "cpu_s_per_gbit": 0.12},
        {"name": "host-gw", "tcp1_gbps": 16.0, "tcp4_gbps": 19.0, "udp_small_pps": 1_000_000,
         "rtt_p50_ms": 0.04, "rtt_p99_ms": 0.08, "cpu_s_per_gbit": 0.08},
        {"name": "none", "tcp1_gbps": 17.0, "tcp4_gbps": None, "udp_small_pps": float("nan"),
         "rtt_p50_ms": "n/a", "rtt_p99_ms": 0.07, "cpu_s_per_gbit": 0.07},
    ]  # fmt: skip


def test_write_report_produces_every_file_with_every_backend(tmp_path: Path) -> None:
    files = write_report(sample_results(), META, tmp_path / "out")
    assert files.markdown.exists() and files.json.exists()
    assert files.png is not None and files.png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert files.png.stat().st_size > 10_000

    markdown = files.markdown.read_text()
    for name in ("udp, eBPF (XDP decap)", "udp, eBPF (peer delivery", "userspace TUN", "kernel vxlan", "host-gw"):
        assert name in markdown
    assert "no overlay" in markdown
    assert "6.18.0-test" in markdown and "2025-01-01" in markdown and "CPUs: 2" in markdown
    assert "## Relative to kernel vxlan" in markdown and "## Relative to the userspace TUN" in markdown
    # The failure shows, on one table row, with its pipe escaped.
    failed = [line for line in markdown.splitlines() if line.startswith("| udp, eBPF (peer delivery")]
    assert len(failed) == 3  # results, vs vxlan, vs TUN
    assert "failed: XDP not supported \\| here second line" in failed[0]
    # 15 / 12.5 = 1.20 against vxlan, 15 / 0.5 = 30 against the TUN path.
    assert "1.20x" in markdown and "30.00x" in markdown

    data = json.loads(files.json.read_text())
    assert [b["name"] for b in data["backends"]] == list(BACKENDS)
    assert data["metadata"] == {"kernel": "6.18.0-test", "cpus": 2, "date": META.date, "underlay_mtu": "1500"}
    assert data["ratios"]["vs_vxlan"]["udp-ebpf-xdp"]["tcp1_gbps"] == pytest.approx(1.2)
    assert data["ratios"]["vs_udp_tun"]["udp-ebpf-xdp"]["tcp1_gbps"] == pytest.approx(30.0)
    assert data["ratios"]["vs_vxlan"]["udp-ebpf-peer"]["tcp1_gbps"] is None
    tc = next(b for b in data["backends"] if b["name"] == "udp-ebpf-peer")
    assert tc["error"].startswith("XDP not supported")
    none = next(b for b in data["backends"] if b["name"] == "none")
    assert none["udp_small_pps"] is None and none["rtt_p50_ms"] is None  # NaN and text become null


def test_missing_backends_and_failed_baselines_never_crash(tmp_path: Path) -> None:
    results = [
        BackendResult(name="udp-tun", error="forwarding process died"),
        {"name": "vxlan", "error": "no vxlan module"},
        {"name": "udp-ebpf-xdp", "tcp1_gbps": 10.0},
        {"name": "something-new", "tcp1_gbps": 1.0},
    ]
    rows = normalize(results)
    assert [r.name for r in rows] == [*BACKENDS, "something-new"]
    assert next(r for r in rows if r.name == "host-gw").error == "not run"
    table = ratios(rows, "vxlan")
    assert all(v is None for per in table.values() for v in per.values())
    markdown = render_markdown(rows, META)
    assert "No ratios: vxlan has no result" in markdown and "No ratios: udp-tun has no result" in markdown
    status = {line.split(" | ")[0]: line.rsplit(" | ", 1)[1] for line in markdown.splitlines() if line.startswith("| ")}
    assert status["| host-gw (no encapsulation)"] == "not run |"  # not asked for, not a failure
    assert status["| kernel vxlan"] == "failed: no vxlan module |"
    files = write_report(rows, META, tmp_path)
    assert files.png is not None and files.png.exists()
    json.loads(files.json.read_text())  # valid JSON, no NaN


def test_everything_failed_still_renders(tmp_path: Path) -> None:
    files = write_report([], META, tmp_path, stem="empty")
    assert files.png is not None and files.png.exists()
    data = report_json([], META)
    assert all(b["error"] == "not run" for b in data["backends"])


def test_dict_keyed_by_name_and_cli_round_trip(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    by_name = {r["name"]: {k: v for k, v in r.items() if k != "name"} for r in sample_results()}
    source = tmp_path / "results.json"
    meta = {"kernel": "6.18", "cpus": 2, "date": "2025-01-02", "iperf3": "3.12"}
    # NaN is not JSON: the bench runner would have written null.
    by_name["none"]["udp_small_pps"] = None
    source.write_text(json.dumps({"metadata": meta, "backends": by_name}))
    rows, loaded = load_results(source)
    assert [r.name for r in rows] == list(BACKENDS)
    assert loaded.extra == {"iperf3": "3.12"}
    assert main([str(source), str(tmp_path / "cli")]) == 0
    assert (tmp_path / "cli" / "bench.png").exists()
    assert "kernel vxlan" in capsys.readouterr().out
    assert math.isclose(rows[BACKENDS.index("udp-ebpf-xdp")].tcp1_gbps or 0, 15.0)


def test_round_order_puts_no_backend_in_the_same_place_twice() -> None:
    from flannel_ebpf.bench.runner import round_order

    orders = [round_order(BACKENDS, n, 3) for n in (1, 2, 3)]
    assert orders[0] == list(BACKENDS)
    for order in orders:
        assert sorted(order) == sorted(BACKENDS)
    for name in BACKENDS:
        assert len({order.index(name) for order in orders}) == 3, name
    assert round_order(BACKENDS, 1, 1) == list(BACKENDS)
    assert round_order([], 2, 3) == []


def test_every_round_is_kept_and_the_ratio_spread_is_per_round() -> None:
    rounds = {"tcp1_gbps": [10.0, 12.0, 11.0]}
    rows = [
        {"name": "udp-ebpf", "tcp1_gbps": 11.0, "rounds": {"tcp1_gbps": [11.0, 13.2, None]}},
        {"name": "vxlan", "tcp1_gbps": 11.0, "rounds": rounds},
    ]
    doc = report_json(rows, META)
    by_name = {b["name"]: b for b in doc["backends"]}
    assert by_name["udp-ebpf"]["rounds"]["tcp1_gbps"] == (11.0, 13.2, None)
    # Round 1: 11/10, round 2: 13.2/12; round 3 is missing on one side and left out.
    low, high = doc["ratio_spreads"]["vs_vxlan"]["udp-ebpf"]["tcp1_gbps"]
    assert low == pytest.approx(1.1) and high == pytest.approx(1.1)
    markdown = render_markdown(rows, META)
    vs_vxlan = markdown.split("## Relative to kernel vxlan")[1]
    row = next(line for line in vs_vxlan.splitlines() if line.startswith("| udp, eBPF (default flags) |"))
    assert "| 1.00x (1.10-1.10) |" in row
    # A metric measured once has no spread.
    assert "tcp4_gbps" not in doc["ratio_spreads"]["vs_vxlan"]["udp-ebpf"]
    # The JSON reads back with its rounds.
    assert BackendResult.from_mapping(json.loads(json.dumps(by_name["udp-ebpf"]))).rounds["tcp1_gbps"][1] == 13.2


def test_median_of_rounds_keeps_each_round_aligned() -> None:
    from flannel_ebpf.bench.runner import _median_of_rounds

    notes: list[str] = []
    first = BackendResult(name="vxlan", tcp1_gbps=10.0, udp_small_pps=5.0)
    merged = _median_of_rounds([first, BackendResult(name="vxlan", error="x"), replace(first, tcp1_gbps=14.0)], notes)
    assert merged.tcp1_gbps == 12.0 and merged.udp_small_pps == 5.0
    assert merged.rounds["tcp1_gbps"] == (10.0, None, 14.0)
    assert "udp_small_pps" in merged.rounds  # measured twice (rounds 1 and 3)
